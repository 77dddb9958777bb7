"""Convergence orders of Euler–Maruyama, asserted against the orders the solver declares.

Strong order: on nested uniform grids driven by ONE Brownian path per sample, the RMS error at ``T``
against the exact solution of the same path is fitted as ``log err = p log dt + c``; ``p`` must match
``EulerMaruyama().strong_order(noise_type)`` (0.5 for multiplicative noise, 1 for additive noise).

Weak order: ``|E phi(x_T) - E phi(X_T)|`` against ``dt`` must have slope ``weak_order`` (1), measured with
the exact solution on the same path as a control variate (so that Monte-Carlo noise is negligible), and
without one on fresh increments drawn from a generator.

The SDEs have closed-form solutions (geometric Brownian motion with commuting noises) or, for the additive
Ornstein–Uhlenbeck process, an exact simulation: on each fine step ``h`` the pair
``(dW, I = int e^{a(h-s)} dW_s)`` is jointly Gaussian, so the fine-grid recursion ``X <- e^{ah} X + S I``
is the exact solution on the very path whose increments ``dW`` drive the solver.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import solvers

T = 1.0
DTYPE = torch.float64
TOLERANCE_STRONG = 0.15
TOLERANCE_WEAK = 0.2


class FinePath:
    """A Brownian path sampled on a fine uniform grid, queried as ``(ta, tb) -> W(tb) - W(ta)`` at its nodes.

    Every coarser nested grid sees sums of the same fine increments, i.e. the same path."""

    def __init__(self, dw: torch.Tensor, t0: float = 0.0, t1: float = T):
        self.n = dw.shape[0]
        self.t0, self.h = t0, (t1 - t0) / self.n
        self.w = torch.cat([torch.zeros_like(dw[:1]), dw.cumsum(0)], 0)  # W at the fine nodes

    def index(self, t: float) -> int:
        i = (t - self.t0) / self.h
        assert abs(i - round(i)) < 1e-6, f"time {t} is not a node of the fine path"
        return round(i)

    def __call__(self, ta: float, tb: float) -> torch.Tensor:
        return self.w[self.index(tb)] - self.w[self.index(ta)]

    @property
    def final(self) -> torch.Tensor:
        return self.w[-1] - self.w[0]


def fitted_slope(dts: list[float], errors: list[float]) -> float:
    return float(np.polyfit(np.log(dts), np.log(errors), 1)[0])


def final_state(sde: solvers.SDE, x0: torch.Tensor, steps: int, brownian) -> torch.Tensor:
    return solvers.sdesolve(sde, x0, solvers.UniformGrid(0.0, T, steps), brownian=brownian).xs[-1]


def rms(error: torch.Tensor) -> float:
    return float(error.pow(2).flatten(1).sum(1).mean().sqrt())


# --------------------------------------------------------------------------------------------------------
# SDEs with closed-form solutions. Geometric Brownian motions dx_i = mu_i x_i dt + x_i sum_j B_ij dW_j:
# the noises commute, so x_i(T) = x_i(0) exp((mu_i - |B_i|^2 / 2) T + sum_j B_ij W_j(T)).
# --------------------------------------------------------------------------------------------------------

MU = torch.tensor([0.5, -0.3], dtype=DTYPE)


class DiagonalGBM(solvers.SDE):
    noise_type = solvers.NoiseType.DIAGONAL
    sigma = torch.tensor([0.8, 0.5], dtype=DTYPE)

    def drift(self, t, x):
        return MU * x

    def diffusion(self, t, x):
        return self.sigma * x

    def exact(self, x0, w):  # w: (batch, 2)
        return x0 * torch.exp((MU - self.sigma**2 / 2) * T + self.sigma * w)


class ScalarGBM(solvers.SDE):
    noise_type = solvers.NoiseType.SCALAR
    sigma = torch.tensor([0.8, -0.5], dtype=DTYPE)

    def drift(self, t, x):
        return MU * x

    def diffusion(self, t, x):
        return (self.sigma * x).unsqueeze(-1)

    def exact(self, x0, w):  # w: (batch, 1), one Brownian motion shared by both coordinates
        return x0 * torch.exp((MU - self.sigma**2 / 2) * T + self.sigma * w)


class GeneralGBM(solvers.SDE):
    """Two coordinates, three Brownian motions: g(x)_ij = B_ij x_i (commutative noise)."""

    noise_type = solvers.NoiseType.GENERAL
    B = torch.tensor([[0.5, -0.4, 0.3], [0.2, 0.6, -0.3]], dtype=DTYPE)

    def drift(self, t, x):
        return MU * x

    def diffusion(self, t, x):
        return x.unsqueeze(-1) * self.B

    def exact(self, x0, w):  # w: (batch, 3)
        return x0 * torch.exp((MU - self.B.pow(2).sum(1) / 2) * T + w @ self.B.T)


MULTIPLICATIVE = {"diagonal": (DiagonalGBM, 2), "scalar": (ScalarGBM, 1), "general": (GeneralGBM, 3)}


def strong_slope(sde, brownian_dim: int, batch: int, levels: list[int], seed: int) -> tuple[float, list]:
    g = torch.Generator().manual_seed(seed)
    finest = levels[-1]
    dw = torch.randn(finest, batch, brownian_dim, generator=g, dtype=DTYPE) * math.sqrt(T / finest)
    path = FinePath(dw)
    x0 = torch.ones(batch, 2, dtype=DTYPE)
    exact = sde.exact(x0, path.final)
    errors = [rms(final_state(sde, x0, n, path) - exact) for n in levels]
    return fitted_slope([T / n for n in levels], errors), errors


@pytest.mark.parametrize("noise", sorted(MULTIPLICATIVE))
@pytest.mark.parametrize("batch, levels", [(4000, [8, 16, 32, 64, 128, 256]),
                                           pytest.param(40000, [8, 16, 32, 64, 128, 256, 512, 1024],
                                                        marks=pytest.mark.slow)])
def test_strong_order_multiplicative_noise(noise, batch, levels):
    sde_class, brownian_dim = MULTIPLICATIVE[noise]
    sde = sde_class()
    slope, errors = strong_slope(sde, brownian_dim, batch, levels, seed=11)
    declared = solvers.EulerMaruyama().strong_order(sde.noise_type)
    assert declared == 0.5
    assert abs(slope - declared) < TOLERANCE_STRONG, f"{noise}: slope {slope:.3f}, errors {errors}"
    assert errors[-1] < errors[0] / 3  # it does converge, not just scale


def test_strong_order_on_a_brownian_path_object():
    """The same check driven by solvers.BrownianPath (torchsde's tree), queried grid after grid."""
    sde, batch, levels = DiagonalGBM(), 1000, [4, 8, 16, 32, 64]
    path = solvers.BrownianPath(0.0, T, (batch, 2), seed=3, dtype=DTYPE)
    x0 = torch.ones(batch, 2, dtype=DTYPE)
    exact = sde.exact(x0, path(0.0, T))
    errors = [rms(final_state(sde, x0, n, path) - exact) for n in levels]
    slope = fitted_slope([T / n for n in levels], errors)
    assert abs(slope - 0.5) < TOLERANCE_STRONG, f"slope {slope:.3f}, errors {errors}"


# --------------------------------------------------------------------------------------------------------
# Additive noise: dx = a x dt + S dW (2 coordinates, 2 Brownian motions), simulated exactly.
# --------------------------------------------------------------------------------------------------------

A = -1.5
S = torch.tensor([[0.7, 0.0], [0.4, 0.5]], dtype=DTYPE)


class AdditiveOU(solvers.SDE):
    noise_type = solvers.NoiseType.ADDITIVE

    def drift(self, t, x):
        return A * x

    def diffusion(self, t, x):
        return S.expand(x.shape[0], 2, 2)


def exact_ou(batch: int, fine: int, seed: int) -> tuple[torch.Tensor, FinePath, torch.Tensor]:
    """x0, the fine path, and the exact x(T) on that path (see the module docstring)."""
    h = T / fine
    e = math.exp(A * h)
    cov = torch.tensor([[h, (e - 1) / A], [(e - 1) / A, (e * e - 1) / (2 * A)]], dtype=DTYPE)
    chol = torch.linalg.cholesky(cov)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(fine, batch, 2, 2, generator=g, dtype=DTYPE)  # (step, batch, brownian, [dW, I])
    pair = z @ chol.T
    dw, integral = pair[..., 0], pair[..., 1]
    x0 = torch.randn(batch, 2, generator=g, dtype=DTYPE)
    x = x0
    for k in range(fine):
        x = e * x + integral[k] @ S.T
    return x0, FinePath(dw), x


@pytest.mark.parametrize("batch, levels", [(2000, [8, 16, 32, 64, 128, 256]),
                                           pytest.param(20000, [8, 16, 32, 64, 128, 256, 512, 1024],
                                                        marks=pytest.mark.slow)])
def test_strong_order_additive_noise(batch, levels):
    x0, path, exact = exact_ou(batch, levels[-1], seed=5)
    sde = AdditiveOU()
    errors = [rms(final_state(sde, x0, n, path) - exact) for n in levels]
    slope = fitted_slope([T / n for n in levels], errors)
    declared = solvers.EulerMaruyama().strong_order(solvers.NoiseType.ADDITIVE)
    assert declared == 1.0
    assert abs(slope - declared) < TOLERANCE_STRONG, f"slope {slope:.3f}, errors {errors}"


def test_exact_ou_reference_is_exact():
    """The reference itself: the fine-grid exact recursion has the OU law at T (mean and covariance)."""
    batch = 100_000
    x0, _, x = exact_ou(batch, 8, seed=9)
    # x(T) - e^{AT} x0 ~ N(0, S S^T (e^{2AT} - 1) / (2A)); checked on standardized second moments.
    noise = x - math.exp(A * T) * x0
    expected = S @ S.T * (math.exp(2 * A * T) - 1) / (2 * A)
    empirical = noise.T @ noise / batch
    torch.testing.assert_close(empirical, expected, rtol=0.03, atol=0.003)
    assert noise.mean(0).abs().max() < 4 * math.sqrt(float(expected.diagonal().max()) / batch)


# --------------------------------------------------------------------------------------------------------
# Weak order 1, GBM dx = mu x dt + sigma x dW.
# --------------------------------------------------------------------------------------------------------


class GBM1(solvers.SDE):
    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, mu: float, sigma: float):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def drift(self, t, x):
        return self.mu * x

    def diffusion(self, t, x):
        return self.sigma * x


@pytest.mark.parametrize("moment", [1, 2])
def test_weak_order_with_control_variate(moment):
    """E[x_h^p] - E[X_T^p] = E[x_h^p - X_T^p]: the exact solution on the same path removes the MC noise."""
    sde, batch, levels = GBM1(0.5, 0.5), 30_000, [4, 8, 16, 32, 64]  # exact EM slopes: 0.97, 0.94
    g = torch.Generator().manual_seed(21)
    dw = torch.randn(levels[-1], batch, 1, generator=g, dtype=DTYPE) * math.sqrt(T / levels[-1])
    path = FinePath(dw)
    x0 = torch.ones(batch, 1, dtype=DTYPE)
    exact = x0 * torch.exp((sde.mu - sde.sigma**2 / 2) * T + sde.sigma * path.final)
    errors, noise = [], []
    for n in levels:
        difference = final_state(sde, x0, n, path).pow(moment) - exact.pow(moment)
        errors.append(abs(float(difference.mean())))
        noise.append(float(difference.std()) / math.sqrt(batch))
    assert all(e > 10 * s for e, s in zip(errors, noise, strict=True)), (errors, noise)  # bias dominates
    slope = fitted_slope([T / n for n in levels], errors)
    declared = solvers.EulerMaruyama().weak_order(solvers.NoiseType.DIAGONAL)
    assert abs(slope - declared) < TOLERANCE_WEAK, f"moment {moment}: slope {slope:.3f}, errors {errors}"


@pytest.mark.parametrize("batch", [200_000, pytest.param(2_000_000, marks=pytest.mark.slow)])
def test_weak_order_fresh_increments(batch):
    """Plain Monte Carlo on the generator's fresh increments against the closed-form moments of X_T.

    mu = -1.25, sigma = 0.25: the O(dt) bias dominates both the O(dt^2) terms and the MC noise already at
    dt = 1/4 .. 1/32 (there the exact EM moments have slopes 1.05 and 1.00; the bias is > 40 standard
    errors at 2e5 samples)."""
    mu, sigma = -1.25, 0.25
    sde, levels = GBM1(mu, sigma), [4, 8, 16, 32]
    x0 = torch.ones(batch, 1, dtype=DTYPE)
    exact = {1: math.exp(mu * T), 2: math.exp((2 * mu + sigma**2) * T)}
    for moment in (1, 2):
        errors, noise = [], []
        for n in levels:
            g = torch.Generator().manual_seed(100 + n)
            x = solvers.sdesolve(sde, x0, solvers.UniformGrid(0.0, T, n), generator=g).xs[-1].pow(moment)
            errors.append(abs(float(x.mean()) - exact[moment]))
            noise.append(float(x.std()) / math.sqrt(batch))
        assert errors[-1] > 10 * noise[-1], (errors, noise)
        slope = fitted_slope([T / n for n in levels], errors)
        assert abs(slope - 1.0) < TOLERANCE_WEAK, f"moment {moment}: slope {slope:.3f}, errors {errors}"


def test_weak_moments_match_the_euler_recursion():
    """The fresh-increment solve has exactly EM's moments: E x_N = (1 + mu h)^N,
    E x_N^2 = ((1 + mu h)^2 + sigma^2 h)^N, within 4 standard errors (checks the draws' variance)."""
    mu, sigma, n, batch = 0.5, 0.8, 4, 400_000
    h = T / n
    x = solvers.sdesolve(GBM1(mu, sigma), torch.ones(batch, 1, dtype=DTYPE), solvers.UniformGrid(0.0, T, n),
                         generator=torch.Generator().manual_seed(4)).xs[-1]
    for moment, expected in ((1, (1 + mu * h) ** n), (2, ((1 + mu * h) ** 2 + sigma**2 * h) ** n)):
        sample = x.pow(moment)
        assert abs(float(sample.mean()) - expected) < 4 * float(sample.std()) / math.sqrt(batch)
