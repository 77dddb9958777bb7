"""torchsde-backed solvers and adjoints (solvers.adaptive): declared orders measured, exact grid landing,
adaptive steps, reversed grids, continuous and reversible adjoints against backprop, clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import solvers
from solvers import SDE, NoiseType, SDEType
from solvers.adaptive import _Noise

T = 1.0
LEVELS = range(3, 9)  # nested grids of 8 .. 256 steps on one Brownian path



# ---------------------------------------------------------------------------------------------------------
# SDEs with closed-form solutions.


class GBM(SDE):
    """``dx = mu x dt + sigma x dW`` (Itô) or ``o dW`` (Stratonovich); ``x(T) = x0 exp(c T + sigma W(T))``
    with ``c = mu - sigma^2/2`` (Itô) or ``c = mu`` (Stratonovich)."""

    def __init__(self, sde_type: SDEType, noise_type: NoiseType = NoiseType.DIAGONAL, mu=0.5, sigma=0.8):
        super().__init__()
        self.sde_type, self.noise_type, self.mu, self.sigma = sde_type, noise_type, mu, sigma

    def drift(self, t, x):
        return self.mu * x

    def diffusion(self, t, x):
        g = self.sigma * x
        return g.unsqueeze(-1) if self.noise_type is NoiseType.SCALAR else g

    def exact(self, x0, path, t=T):
        c = self.mu - (0.5 * self.sigma**2 if self.sde_type is SDEType.ITO else 0.0)
        w = path(0.0, t).reshape(x0.shape[0], -1)
        return x0 * torch.exp(c * t + self.sigma * w)


class OU(SDE):
    """``dx = -theta x dt + sigma dW`` (additive noise: Itô = Stratonovich);
    ``x(T) = e^{-theta T} x0 + sigma int_0^T e^{-theta (T - s)} dW(s)``."""

    noise_type = NoiseType.ADDITIVE

    def __init__(self, sde_type: SDEType, theta=1.5, sigma=0.8):
        super().__init__()
        self.sde_type, self.theta, self.sigma = sde_type, theta, sigma

    def drift(self, t, x):
        return -self.theta * x

    def diffusion(self, t, x):
        return torch.full((*x.shape, 1), self.sigma, dtype=x.dtype)

    def exact(self, x0, path, fine=2**10):
        # The stochastic integral from the path's increments W and space-time Lévy areas U on a fine grid:
        # int_a^b e^{-theta(T-s)} dW = e^{-theta(T-b)} (W - theta U) + O(h^2.5), since int_a^b (b-s) dW = U.
        ts = np.linspace(0.0, T, fine + 1)
        total = torch.zeros_like(x0)
        for a, b in zip(ts[:-1], ts[1:], strict=True):
            w, u = path.interval(a, b, return_U=True)
            total = total + math.exp(-self.theta * (T - b)) * (w - self.theta * u)
        return math.exp(-self.theta * T) * x0 + self.sigma * total


def fitted_slope(solver, sde, x0, path, exact, levels=LEVELS):
    errors, dts = [], []
    with torch.no_grad():
        for k in levels:
            sol = solvers.sdesolve(sde, x0, solvers.UniformGrid(0.0, T, 2**k), solver=solver, brownian=path)
            errors.append(float((sol.xs[-1] - exact).pow(2).mean().sqrt()))
            dts.append(T / 2**k)
    return float(np.polyfit(np.log(dts), np.log(errors), 1)[0]), errors


def gbm_case(solver, sde_type, noise_type=NoiseType.DIAGONAL, batch=1000, seed=0):
    sde = GBM(sde_type, noise_type)
    dims = 2 if noise_type is NoiseType.SCALAR else 1
    x0 = torch.linspace(0.5, 1.5, batch * dims, dtype=torch.float64).reshape(batch, dims)
    levy = "space-time" if isinstance(solver, solvers.SRK) else None
    path = solvers.BrownianPath(0.0, T, (batch, 1), seed=seed, dtype=torch.float64, levy_area=levy)
    return sde, x0, path, sde.exact(x0, path)


@pytest.fixture(scope="module")
def ou_problem():
    batch = 300
    path = solvers.BrownianPath(0.0, T, (batch, 1), seed=7, dtype=torch.float64, levy_area="space-time")
    x0 = torch.linspace(-1.0, 1.0, batch, dtype=torch.float64).reshape(batch, 1)
    return x0, path, OU(SDEType.ITO).exact(x0, path)


GBM_CASES = [
    (solvers.TorchsdeEuler(), SDEType.ITO, NoiseType.DIAGONAL),
    (solvers.Milstein(), SDEType.ITO, NoiseType.DIAGONAL),
    (solvers.Milstein(), SDEType.STRATONOVICH, NoiseType.DIAGONAL),
    (solvers.Milstein(grad_free=True), SDEType.ITO, NoiseType.SCALAR),
    (solvers.SRK(), SDEType.ITO, NoiseType.DIAGONAL),
    (solvers.SRK(), SDEType.ITO, NoiseType.SCALAR),
    (solvers.Heun(), SDEType.STRATONOVICH, NoiseType.DIAGONAL),
    (solvers.StratonovichMidpoint(), SDEType.STRATONOVICH, NoiseType.DIAGONAL),
    (solvers.EulerHeun(), SDEType.STRATONOVICH, NoiseType.SCALAR),
]


@pytest.mark.parametrize(("solver", "sde_type", "noise_type"), GBM_CASES,
                         ids=[f"{type(s).__name__}-{t.value}-{n.value}" for s, t, n in GBM_CASES])
def test_declared_strong_order_gbm(solver, sde_type, noise_type):
    sde, x0, path, exact = gbm_case(solver, sde_type, noise_type)
    slope, errors = fitted_slope(solver, sde, x0, path, exact)
    declared = solver.strong_order(noise_type)
    assert abs(slope - declared) < 0.15, (slope, declared, errors)


OU_CASES = [
    (solvers.TorchsdeEuler(), SDEType.ITO),
    (solvers.Milstein(), SDEType.ITO),
    (solvers.ReversibleHeun(), SDEType.STRATONOVICH),
    (solvers.Heun(), SDEType.STRATONOVICH),
]


@pytest.mark.parametrize(("solver", "sde_type"), OU_CASES, ids=[type(s).__name__ for s, _ in OU_CASES])
def test_declared_strong_order_additive(solver, sde_type, ou_problem):
    x0, path, exact = ou_problem
    slope, errors = fitted_slope(solver, OU(sde_type), x0, path, exact)
    declared = solver.strong_order(NoiseType.ADDITIVE)
    assert abs(slope - declared) < 0.15, (slope, declared, errors)


def test_reversible_heun_order_is_at_least_declared_for_multiplicative_noise():
    # ReversibleHeun's proven strong order for non-additive noise is 1/2 (what it declares); on commuting
    # multiplicative noise it measures close to 1.
    solver = solvers.ReversibleHeun()
    sde, x0, path, exact = gbm_case(solver, SDEType.STRATONOVICH)
    slope, errors = fitted_slope(solver, sde, x0, path, exact)
    assert slope > solver.strong_order(NoiseType.DIAGONAL) - 0.15, (slope, errors)


def test_srk_exceeds_its_order_on_linear_additive_noise(ou_problem):
    # SRA1 integrates linear drift with additive noise to order 2; the declared 1.5 is a lower bound here.
    x0, path, exact = ou_problem
    slope, errors = fitted_slope(solvers.SRK(), OU(SDEType.ITO), x0, path, exact, levels=range(3, 7))
    assert slope > 1.5 - 0.15, (slope, errors)


class Bistable(SDE):
    noise_type = NoiseType.ADDITIVE

    def drift(self, t, x):
        return -torch.sin(3 * x) - x**3

    def diffusion(self, t, x):
        return torch.full((*x.shape, 1), 0.8, dtype=x.dtype)


@pytest.mark.slow
def test_srk_strong_order_additive_nonlinear():
    # No closed form: the reference is SRK itself on a 16x finer grid on the same path.
    batch = 400
    x0 = torch.full((batch, 1), 0.5, dtype=torch.float64)
    path = solvers.BrownianPath(0.0, T, (batch, 1), seed=1, dtype=torch.float64, levy_area="space-time")
    with torch.no_grad():
        reference = solvers.sdesolve(Bistable(), x0, solvers.UniformGrid(0.0, T, 2**13), solver=solvers.SRK(),
                                     brownian=path).xs[-1]
    slope, errors = fitted_slope(solvers.SRK(), Bistable(), x0, path, reference, levels=range(4, 10))
    assert abs(slope - 1.5) < 0.15, (slope, errors)


# ---------------------------------------------------------------------------------------------------------
# Fixed steps land on the grid; torchsde's Euler equals the native Euler–Maruyama on the same path.


class Mixed(SDE):
    """A nonlinear SDE on (batch, 2, 3) states, diagonal or general noise."""

    def __init__(self, noise_type: NoiseType, m: int = 2):
        super().__init__()
        self.noise_type, self.m = noise_type, m

    def drift(self, t, x):
        return torch.sin(x) * (1 + t) - 0.5 * x

    def diffusion(self, t, x):
        if self.noise_type is NoiseType.DIAGONAL:
            return 0.3 * torch.cos(x) + 0.1 * t
        scales = torch.arange(1, self.m + 1, dtype=x.dtype) / self.m
        return 0.3 * torch.tanh(x).unsqueeze(-1) * scales + 0.1


@pytest.mark.parametrize("noise_type", [NoiseType.DIAGONAL, NoiseType.GENERAL])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reversed"])
def test_torchsde_euler_matches_native_euler_on_any_grid(noise_type, reverse):
    sde = Mixed(noise_type)
    x0 = torch.linspace(-1, 1, 5 * 6, dtype=torch.float64).reshape(5, 2, 3)
    shape = (5, 2, 3) if noise_type is NoiseType.DIAGONAL else (5, 2)
    path = solvers.BrownianPath(0.1, 0.9, shape, seed=3, dtype=torch.float64)
    grid = solvers.PowerGrid(0.1, 0.9, 17, exponent=0.7)
    grid = grid.reversed() if reverse else grid
    save = solvers.SaveAt(t0=True, steps=True)
    native = solvers.sdesolve(sde, x0, grid, brownian=path, save=save)
    torchsde_ = solvers.sdesolve(sde, x0, grid, solver=solvers.TorchsdeEuler(), brownian=path, save=save)
    assert torch.equal(torchsde_.ts, grid.times())
    torch.testing.assert_close(torchsde_.xs, native.xs, rtol=1e-12, atol=1e-12)
    assert torchsde_.stats.steps == 17 and torchsde_.stats.rejected_steps == 0


def test_stats_count_steps_and_evaluations():
    sde = GBM(SDEType.STRATONOVICH)
    x0 = torch.ones(3, 1, dtype=torch.float64)
    sol = solvers.sdesolve(sde, x0, solvers.UniformGrid(0.0, 1.0, 10), solver=solvers.Heun(),
                           generator=torch.Generator().manual_seed(0))
    # Heun evaluates (f, g) at the start and at the predictor of every step.
    assert sol.stats == solvers.SolveStats(steps=10, rejected_steps=0, drift_evals=20, diffusion_evals=20)


def test_default_path_follows_the_generator():
    sde = GBM(SDEType.ITO)
    x0 = torch.ones(4, 1, dtype=torch.float64)
    grid = solvers.UniformGrid(0.0, 1.0, 8)

    def solve(seed):
        generator = torch.Generator().manual_seed(seed)
        return solvers.sdesolve(sde, x0, grid, solver=solvers.SRK(), generator=generator)

    assert torch.equal(solve(0).xs, solve(0).xs)
    assert not torch.equal(solve(0).xs, solve(1).xs)


def test_float32_state_and_times():
    seen = []

    class Probe(GBM):
        def drift(self, t, x):
            seen.append((t.dtype, t.device))
            return super().drift(t, x)

    sol = solvers.sdesolve(Probe(SDEType.ITO), torch.ones(4, 3), solvers.UniformGrid(0.0, 1.0, 5),
                           solver=solvers.SRK(), generator=torch.Generator().manual_seed(0))
    assert sol.xs.dtype == torch.float32 and torch.isfinite(sol.xs).all()
    assert set(seen) == {(torch.float32, torch.device("cpu"))}


# ---------------------------------------------------------------------------------------------------------
# Adaptive steps.


def test_adaptive_error_shrinks_with_tolerance_and_lands_on_nodes():
    batch = 64
    sde = GBM(SDEType.ITO)
    x0 = torch.ones(batch, 1, dtype=torch.float64)
    path = solvers.BrownianPath(0.0, T, (batch, 1), seed=2, dtype=torch.float64, levy_area="space-time")
    grid = solvers.ExplicitGrid([0.0, 0.3, 0.35, 1.0])
    exact_t = [sde.exact(x0, path, float(t)) for t in grid.nodes()[1:]]
    results = {}
    for rtol in (1e-2, 1e-4):
        solver = solvers.SRK(adaptive=solvers.AdaptiveSteps(rtol=rtol, atol=1e-6))
        with torch.no_grad():
            sol = solvers.sdesolve(sde, x0, grid, solver=solver, brownian=path,
                                   save=solvers.SaveAt(steps=True))
        assert torch.equal(sol.ts, grid.times()[1:])  # the solver's values at the nodes, not interpolants
        error = max(float((x - e).abs().max()) for x, e in zip(sol.xs, exact_t, strict=True))
        results[rtol] = (error, sol.stats)
    (loose, loose_stats), (tight, tight_stats) = results[1e-2], results[1e-4]
    assert tight < loose / 5, results
    assert tight_stats.steps > 2 * loose_stats.steps, results
    assert loose_stats.steps >= grid.steps and loose_stats.drift_evals > 0


def test_adaptive_solve_rejects_and_respects_dt_min():
    sde = GBM(SDEType.STRATONOVICH, sigma=2.0)
    x0 = torch.ones(16, 1, dtype=torch.float64)
    solver = solvers.Heun(adaptive=solvers.AdaptiveSteps(rtol=1e-4, atol=1e-6, dt0=0.5, dt_min=1e-3))
    with pytest.warns(UserWarning, match="dt_min"):
        sol = solvers.sdesolve(sde, x0, solvers.UniformGrid(0.0, 1.0, 2), solver=solver,
                               generator=torch.Generator().manual_seed(0))
    assert sol.stats.rejected_steps > 0
    assert sol.stats.steps <= 1.0 / 1e-3 + 2


def test_adaptive_reversed_grid_retraces_a_stratonovich_solve():
    # For a Stratonovich SDE, solving backward on the same path inverts the forward solve (up to error).
    sde = GBM(SDEType.STRATONOVICH)
    x0 = torch.linspace(0.5, 1.5, 8, dtype=torch.float64).reshape(8, 1)
    path = solvers.BrownianPath(0.0, T, (8, 1), seed=4, dtype=torch.float64)
    errors = []
    for steps in (16, 128):
        grid = solvers.UniformGrid(0.0, T, steps)
        with torch.no_grad():
            x1 = solvers.sdesolve(sde, x0, grid, solver=solvers.Heun(), brownian=path).xs[-1]
            back = solvers.sdesolve(sde, x1, grid.reversed(), solver=solvers.Heun(), brownian=path,
                                    save=solvers.SaveAt(t0=True, steps=True))
        assert torch.equal(back.ts, grid.reversed().times())
        errors.append(float((back.xs[-1] - x0).abs().max()))
    assert errors[1] < errors[0] / 4 and errors[1] < 1e-2, errors
    solver = solvers.Heun(adaptive=solvers.AdaptiveSteps(rtol=1e-3, atol=1e-5))
    grid = solvers.UniformGrid(0.0, T, 4)
    with torch.no_grad():
        x1 = solvers.sdesolve(sde, x0, grid, solver=solver, brownian=path).xs[-1]
        back = solvers.sdesolve(sde, x1, grid.reversed(), solver=solver, brownian=path).xs[-1]
    assert float((back - x0).abs().max()) < 2e-2


def test_flipped_noise_has_additive_levy_area():
    # U over [a, b] = U over [a, m] + U over [m, b] + (b - m) W over [a, m], for the flipped (reversed-time)
    # path as for the original; a wrong sign or a missing h W term in the flip breaks it.
    path = solvers.BrownianPath(0.0, 1.0, (6, 2), seed=5, dtype=torch.float64, levy_area="space-time")
    for flip, sign in ((False, 1.0), (True, -1.0), (True, 1.0)):
        noise = _Noise(path.interval, (6, 2), torch.float64, flip=flip, sign=sign)
        a, m, b = (-0.9, -0.6, -0.2) if flip else (0.2, 0.6, 0.9)
        w_am, u_am = noise(a, m, return_U=True)
        w_mb, u_mb = noise(m, b, return_U=True)
        w_ab, u_ab = noise(a, b, return_U=True)
        torch.testing.assert_close(w_am + w_mb, w_ab, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(u_am + u_mb + (b - m) * w_am, u_ab, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# Adjoints.


class NeuralSDE(SDE):
    """Small neural SDE; the diffusion is element-wise (g_i depends on x_i and t only), as diagonal noise
    must be for Milstein and for the Itô continuous adjoint."""

    def __init__(self, sde_type: SDEType, noise_type: NoiseType = NoiseType.DIAGONAL):
        super().__init__()
        torch.manual_seed(0)
        self.sde_type, self.noise_type = sde_type, noise_type
        nn = torch.nn
        self.f_net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
        out = 1 if noise_type is NoiseType.DIAGONAL else 6
        self.g_net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, out)).double()

    def drift(self, t, x):
        return self.f_net(torch.cat([x, t.expand(x.shape[0], 1)], 1))

    def diffusion(self, t, x):
        if self.noise_type is NoiseType.DIAGONAL:
            return 0.5 * torch.sigmoid(self.g_net(torch.stack([x, t.expand_as(x)], -1)).squeeze(-1))
        inputs = torch.stack([x.mean(1), t.expand(x.shape[0])], -1)
        return 0.3 * torch.tanh(self.g_net(inputs)).reshape(-1, 2, 3)


def gradients(sde, solver, adjoint, grid, path, save=None):
    x0 = torch.linspace(-1, 1, 16, dtype=torch.float64).reshape(8, 2).requires_grad_(True)
    sol = solvers.sdesolve(sde, x0, grid, solver=solver, adjoint=adjoint, brownian=path, save=save)
    weights = torch.linspace(0.5, 1.5, sol.xs.shape[0], dtype=torch.float64).reshape(-1, 1, 1)
    loss = (weights * sol.xs**2).sum() + sol.xs.sin().sum()
    grads = torch.autograd.grad(loss, [x0, *sde.parameters()])
    return sol, torch.cat([g.reshape(-1) for g in grads])


def relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("sde_type", "solver"),
    [(SDEType.STRATONOVICH, solvers.StratonovichMidpoint()), (SDEType.ITO, solvers.EulerMaruyama())],
    ids=["stratonovich-midpoint", "ito-euler"],
)
def test_backsolve_gradient_converges_to_backprop(sde_type, solver):
    sde = NeuralSDE(sde_type)
    path = solvers.BrownianPath(0.0, T, (8, 2), seed=3, dtype=torch.float64)
    errors = []
    for steps in (50, 400):
        grid = solvers.UniformGrid(0.0, T, steps)
        direct_sol, direct = gradients(sde, solver, solvers.DirectAdjoint(), grid, path)
        back_sol, back = gradients(sde, solver, solvers.BacksolveAdjoint(), grid, path)
        torch.testing.assert_close(back_sol.xs, direct_sol.xs, rtol=1e-10, atol=1e-10)
        errors.append(relative(back, direct))
    assert errors[1] < errors[0] / 2 and errors[1] < 0.05, errors


def test_backsolve_supports_saveat_reversed_grids_and_its_own_settings():
    sde = NeuralSDE(SDEType.STRATONOVICH)
    path = solvers.BrownianPath(0.0, T, (8, 2), seed=3, dtype=torch.float64)
    grid = solvers.PowerGrid(0.05, T, 40, exponent=0.8).reversed()
    save = solvers.SaveAt(t0=True, every=10)
    _, direct = gradients(sde, solvers.Heun(), solvers.DirectAdjoint(), grid, path, save)
    sol, fixed = gradients(sde, solvers.Heun(), solvers.BacksolveAdjoint(solver=solvers.Heun()), grid, path, save)
    assert torch.equal(sol.ts, grid.times()[list(save.indices(40))])
    assert relative(fixed, direct) < 1e-4
    # Adaptive backward steps solve the continuous adjoint more finely than the forward grid: the gradient
    # moves towards the continuous problem's, away from the discrete forward solve's, by O(forward error).
    adaptive = solvers.BacksolveAdjoint(solver=solvers.Heun(), adaptive=solvers.AdaptiveSteps(rtol=1e-3))
    _, refined = gradients(sde, solvers.Heun(), adaptive, grid, path, save)
    assert relative(refined, direct) < 1e-2


@pytest.mark.parametrize(
    ("noise_type", "adaptive", "save", "reverse"),
    [
        (NoiseType.DIAGONAL, None, None, False),
        (NoiseType.DIAGONAL, None, solvers.SaveAt(t0=True, steps=True), True),
        (NoiseType.DIAGONAL, solvers.AdaptiveSteps(rtol=1e-3, atol=1e-5), solvers.SaveAt(every=10), False),
        (NoiseType.GENERAL, None, None, False),
    ],
    ids=["fixed", "save-all-reversed", "adaptive", "general-noise"],
)
def test_reversible_adjoint_is_exact(noise_type, adaptive, save, reverse):
    sde = NeuralSDE(SDEType.STRATONOVICH, noise_type)
    shape = (8, 2) if noise_type is NoiseType.DIAGONAL else (8, 3)
    path = solvers.BrownianPath(0.0, T, shape, seed=6, dtype=torch.float64)
    grid = solvers.UniformGrid(0.0, T, 40)
    grid = grid.reversed() if reverse else grid
    solver = solvers.ReversibleHeun(adaptive=adaptive)
    direct_sol, direct = gradients(sde, solver, solvers.DirectAdjoint(), grid, path, save)
    sol, reversible = gradients(sde, solver, solvers.ReversibleAdjoint(), grid, path, save)
    torch.testing.assert_close(sol.xs, direct_sol.xs, rtol=1e-12, atol=1e-12)
    assert relative(reversible, direct) < 1e-8


# ---------------------------------------------------------------------------------------------------------
# Clear errors.


class Cost(solvers.PathCost):
    def forward(self, step):
        return (step.x1**2).flatten(1).sum(1)


def _solve(sde, solver, **kwargs):
    x0 = torch.ones(2, 2, dtype=torch.float64)
    return solvers.sdesolve(sde, x0, solvers.UniformGrid(0.0, 1.0, 4), solver=solver, **kwargs)


def test_clear_errors():
    with pytest.raises(ValueError, match="Heun integrates stratonovich SDEs; this SDE is ito"):
        _solve(GBM(SDEType.ITO), solvers.Heun())
    with pytest.raises(ValueError, match="TorchsdeEuler integrates ito SDEs; this SDE is stratonovich"):
        _solve(GBM(SDEType.STRATONOVICH), solvers.TorchsdeEuler())
    with pytest.raises(ValueError, match="SRK supports additive, diagonal, scalar noise, not general"):
        _solve(Mixed(NoiseType.GENERAL), solvers.SRK())
    with pytest.raises(ValueError, match="SRK supports"):
        solvers.SRK().strong_order("general")
    with pytest.raises(ValueError, match="cannot sum a PathCost"):
        _solve(GBM(SDEType.ITO), solvers.SRK(), cost=Cost())
    path = solvers.BrownianPath(0.0, 1.0, (2, 2), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="levy_area='space-time'"):
        _solve(GBM(SDEType.ITO), solvers.SRK(), brownian=path)
    with pytest.raises(TypeError, match="BrownianPath or a torchsde Brownian motion"):
        _solve(GBM(SDEType.ITO), solvers.SRK(), brownian=lambda a, b: torch.zeros(2, 2))
    short = solvers.BrownianPath(0.0, 0.5, (2, 2), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="covers"):
        _solve(GBM(SDEType.STRATONOVICH), solvers.Heun(), brownian=short)
    wrong = solvers.BrownianPath(0.0, 1.0, (2, 3), seed=0, dtype=torch.float64)
    with pytest.raises(ValueError, match="Brownian path has shape"):
        _solve(GBM(SDEType.STRATONOVICH), solvers.Heun(), brownian=wrong)
    with pytest.raises(ValueError, match="cannot sum a PathCost"):
        _solve(GBM(SDEType.ITO), solvers.EulerMaruyama(), cost=Cost(), adjoint=solvers.BacksolveAdjoint())
    with pytest.raises(ValueError, match="backward solve of a ito SDE"):
        _solve(GBM(SDEType.ITO), solvers.SRK(), adjoint=solvers.BacksolveAdjoint(solver=solvers.SRK()))
    with pytest.raises(ValueError, match="BacksolveAdjoint\\(adaptive=...\\)"):
        solvers.BacksolveAdjoint(solver=solvers.Heun(adaptive=solvers.AdaptiveSteps()))
    with pytest.raises(TypeError, match="exact adjoint of ReversibleHeun"):
        _solve(GBM(SDEType.STRATONOVICH), solvers.Heun(), adjoint=solvers.ReversibleAdjoint())
    with pytest.raises(TypeError, match="DiscreteAdjoint is the exact adjoint of EulerMaruyama"):
        _solve(GBM(SDEType.ITO), solvers.SRK(), adjoint=solvers.DiscreteAdjoint())
    with pytest.raises(ValueError, match="dt_min must be positive"):
        solvers.AdaptiveSteps(dt_min=0.0)
