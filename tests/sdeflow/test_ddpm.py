"""DDPM as the VP score SDE inside DiffFlow: schedule, marginals, denoising score matching, and the DiffFlow
samplers and likelihoods run on it unchanged.

Closed forms used throughout: for Gaussian data ``x_0 ~ N(mu, s^2 I)`` in ``d`` dimensions, the marginal of
the VP SDE is ``p_t = N(m(t) mu, v(t) I)`` with ``v = m^2 s^2 + sigma^2``, so its score is
``s*(x, t) = -(x - m mu) / v``. With ``x_t = m x_0 + sigma eps`` the DSM integrand at ``t`` is
``1/2 lambda |s(x_t) + eps / sigma|^2``; at ``s = c s*`` its expectation is (``E|eps|^2 / sigma^2 = d / sigma^2``,
``E<eps / sigma, s*(x_t)> = -E|s*|^2 = -d / v``)::

    1/2 lambda d (1/sigma^2 - 1/v)  +  1/2 lambda (c - 1)^2 d / v

The first term is the minimum (attained at ``c = 1``), the second the excess of a scaled score.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad
from torch import Tensor, nn

import solvers
from sdeflow.ddpm import DDPM, NoisePredictionScore, VPDrift, VPSchedule, denoising_score_matching
from sdeflow.likelihood import bound_nll, ode_nll
from sdeflow.nets import TimeMLP
from sdeflow.sample import sample, sample_ode

F64 = torch.float64
SCHEDULE = VPSchedule()
MU = torch.tensor([1.0, -2.0], dtype=F64)
SIGMA = 0.5


class GaussianScore(nn.Module):
    """``c * s*(x, t)``: (a multiple of) the exact score of ``p_t`` for data ``N(mu, sigma^2 I)``."""

    def __init__(self, mu: Tensor, sigma: float, c: float = 1.0):
        super().__init__()
        self.mu, self.sigma, self.c = mu, sigma, c

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype)
        t = t.reshape(-1, 1) if t.ndim else t
        m = SCHEDULE.mean_coeff(t)
        v = m * m * self.sigma**2 + SCHEDULE.std(t) ** 2
        return -self.c * (x - m * self.mu) / v


def exact_model(mu: Tensor = MU, sigma: float = SIGMA, c: float = 1.0) -> DDPM:
    return DDPM(GaussianScore(mu, sigma, c), SCHEDULE)


def variance_at(t: float, sigma: float = SIGMA) -> float:
    m, s = float(SCHEDULE.mean_coeff(t)), float(SCHEDULE.std(t))
    return m * m * sigma**2 + s * s


def gaussian_nll(x: Tensor, mean: Tensor, var: float) -> Tensor:
    return 0.5 * (x - mean).pow(2).sum(1) / var + 0.5 * x.shape[1] * math.log(2 * math.pi * var)


# ------------------------------------------------------------------------------------------------ schedule


def test_schedule_closed_forms():
    s = SCHEDULE
    for t in (0.0, 0.01, 0.3, 1.0):
        assert float(s.integral(t)) == pytest.approx(quad(lambda u: float(s.beta(u)), 0.0, t)[0], rel=1e-12, abs=0)
    t = torch.linspace(0.0, 1.0, 11, dtype=F64, requires_grad=True)
    (d_integral,) = torch.autograd.grad(s.integral(t).sum(), t)
    torch.testing.assert_close(d_integral, s.beta(t).detach(), rtol=1e-14, atol=0)  # B' = beta
    t = t.detach()
    torch.testing.assert_close(s.mean_coeff(t) ** 2 + s.std(t) ** 2, torch.ones_like(t), rtol=1e-14, atol=0)
    torch.testing.assert_close(s.diffusion(t) ** 2, s.beta(t), rtol=1e-14, atol=0)
    assert float(s.mean_coeff(1.0)) == pytest.approx(math.exp(-0.5 * (0.1 + 0.5 * 19.9)), rel=1e-12)


def test_std_accurate_at_small_t_in_float32():
    # 1 - exp(-B) in float32 loses every digit at B ~ 1e-7; the expm1 form keeps float32 precision.
    t = torch.tensor([1e-6, 1e-4, 1e-3], dtype=torch.float32)
    torch.testing.assert_close(SCHEDULE.std(t).double(), SCHEDULE.std(t.double()), rtol=1e-6, atol=0)
    naive = torch.sqrt(1 - torch.exp(-SCHEDULE.integral(t[:1])))
    assert abs(float(naive) / float(SCHEDULE.std(t[:1])) - 1) > 0.05  # the test can tell the difference


def test_schedule_validation():
    with pytest.raises(ValueError):
        VPSchedule(0.0, 20.0)
    with pytest.raises(ValueError):
        VPSchedule(5.0, 1.0)
    with pytest.raises(ValueError):
        DDPM(nn.Identity(), t0=1.0, T=1.0)


# -------------------------------------------------------------------------------------------- drift, model


def test_vp_drift_time_conventions():
    drift = VPDrift(SCHEDULE)
    assert list(drift.parameters()) == []
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    expected = -0.5 * (0.1 + 0.3 * 19.9) * x
    torch.testing.assert_close(drift(x, 0.3), expected)
    torch.testing.assert_close(drift(x, torch.tensor(0.3)), expected)
    ts = torch.tensor([0.0, 0.3, 0.6, 1.0])
    per = drift(x, ts)
    assert per.dtype == x.dtype
    torch.testing.assert_close(per, -0.5 * SCHEDULE.beta(ts)[:, None] * x)
    torch.testing.assert_close(drift(x, ts[:, None]), per)
    with pytest.raises(ValueError, match="batch size"):
        drift(x, torch.zeros(3))


def test_ddpm_is_a_diffflow_with_vp_coefficients():
    model = DDPM(TimeMLP(2, width=8, depth=1, t_scale=1.0))
    assert (model.t0, model.T, model.schedule) == (1e-3, 1.0, SCHEDULE)
    assert model.g_const is None
    t = torch.tensor(0.4, dtype=F64)
    torch.testing.assert_close(model.g(t) ** 2, SCHEDULE.beta(t))
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.score.parameters())
    x0 = torch.ones(3, 2, 2)
    mean, std = model.marginal(x0, torch.tensor([0.0, 0.5, 1.0]))
    assert mean.shape == (3, 2, 2) and std.shape == (3, 1, 1)
    torch.testing.assert_close(std.flatten() ** 2 + (mean[:, 0, 0]) ** 2, torch.ones(3))


@pytest.mark.parametrize("start", ["point", "gaussian"])
def test_forward_sde_marginals_match_closed_form(start):
    # Euler–Maruyama on the DDPM's forward SDE; compare mean and variance with p(x_t | x_0) at several t.
    # Allowance: 4 Monte-Carlo standard errors plus the Euler bias, computed from the exact recursions of the
    # Euler chain (mean *= a_i, var = a_i^2 var + beta_i dt with a_i = 1 - beta_i dt / 2).
    n, steps, every = 10_000, 500, 100
    g = torch.Generator().manual_seed(1)
    x0 = torch.full((n, 2), 3.0, dtype=F64)
    s0 = 0.0
    if start == "gaussian":
        s0 = 0.7
        x0 = x0 + s0 * torch.randn(n, 2, generator=g, dtype=F64)
    model = exact_model()
    grid = solvers.UniformGrid(0.0, 1.0, steps)
    sol = solvers.sdesolve(model.forward_sde(), x0, grid, generator=g, save=solvers.SaveAt(every=every))
    nodes = grid.nodes()
    em_mean, em_var = 3.0, s0**2
    em = {0: (em_mean, em_var)}
    for i in range(steps):
        beta_dt = float(SCHEDULE.beta(float(nodes[i]))) * (nodes[i + 1] - nodes[i])
        a = 1 - 0.5 * beta_dt
        em_mean, em_var = a * em_mean, a * a * em_var + beta_dt
        em[i + 1] = (em_mean, em_var)
    for k, (t, xs) in enumerate(zip(sol.ts.tolist(), sol.xs, strict=True)):
        m, sd = float(SCHEDULE.mean_coeff(t)), float(SCHEDULE.std(t))
        mean, var = 3.0 * m, m * m * s0**2 + sd * sd
        em_mean, em_var = em[k * every]
        se_mean, se_var = math.sqrt(var / (2 * n)), var * math.sqrt(2 / (2 * n - 1))
        assert abs(float(xs.mean()) - mean) <= 4 * se_mean + abs(em_mean - mean) + 1e-12, t
        assert abs(float(xs.var()) - var) <= 4 * se_var + abs(em_var - var) + 1e-12, t


# ------------------------------------------------------------------------------------- denoising score matching


def dsm_expectation(c: float, t0: float = 1e-3, T: float = 1.0, d: int = 2) -> float:
    """``E_{t ~ U(t0, T)}`` of the DSM integrand at ``s = c s*`` (module docstring), by adaptive quadrature."""

    def integrand(t: float) -> float:
        m, s2 = float(SCHEDULE.mean_coeff(t)), float(SCHEDULE.std(t)) ** 2
        v = m * m * SIGMA**2 + s2
        lam = s2
        return 0.5 * lam * d * (1 / s2 - 1 / v) + 0.5 * lam * (c - 1) ** 2 * d / v

    return quad(integrand, t0, T, limit=200, epsabs=1e-13, epsrel=1e-12)[0] / (T - t0)


def test_dsm_of_exact_score_is_the_closed_form_minimum_and_a_wrong_score_costs_more():
    # 20 independent batches of 20,000 (float64): their spread gives the Monte-Carlo standard error.
    exact, wrong = exact_model(), exact_model(c=0.8)
    losses, excess = [], []
    for k in range(20):
        x0 = MU + SIGMA * torch.randn(20_000, 2, generator=torch.Generator().manual_seed(k), dtype=F64)
        l_exact = denoising_score_matching(exact, x0, torch.Generator().manual_seed(100 + k))
        l_wrong = denoising_score_matching(wrong, x0, torch.Generator().manual_seed(100 + k))  # same t, eps
        losses.append(float(l_exact))
        excess.append(float(l_wrong - l_exact))
    losses_t, excess_t = torch.tensor(losses, dtype=F64), torch.tensor(excess, dtype=F64)
    minimum, wrong_value = dsm_expectation(1.0), dsm_expectation(0.8)
    se = float(losses_t.std()) / math.sqrt(len(losses))
    assert abs(float(losses_t.mean()) - minimum) < 4 * se
    assert se < 0.01 * minimum  # the check is sharp: 1% of the value
    se_excess = float(excess_t.std()) / math.sqrt(len(excess))
    assert bool((excess_t > 0).all())
    assert abs(float(excess_t.mean()) - (wrong_value - minimum)) < 4 * se_excess


def test_dsm_times_are_stratified_uniform():
    class RecordTimes(nn.Module):
        def forward(self, x, t):
            self.t = t
            return torch.zeros_like(x)

    score = RecordTimes()
    model = DDPM(score, t0=0.1, T=0.5)
    denoising_score_matching(model, torch.zeros(1000, 2, dtype=F64), torch.Generator().manual_seed(0))
    t = score.t
    assert t.shape == (1000,) and float(t.min()) >= 0.1 and float(t.max()) <= 0.5
    counts = torch.histc(t, bins=10, min=0.1, max=0.5)
    assert bool((counts == 100).all())  # exactly one time in each 1/B cell: every bin holds B/10
    # zero score: the loss is 1/2 E|eps|^2 = d/2 exactly in expectation
    loss = denoising_score_matching(model, torch.zeros(20_000, 2, dtype=F64), torch.Generator().manual_seed(1))
    assert abs(float(loss) - 1.0) < 4 * math.sqrt(2 * 0.25 * 2 / 20_000)


def test_dsm_gradients_and_determinism():
    torch.manual_seed(0)
    model = DDPM(TimeMLP(2, width=16, depth=2, time_features=4, t_scale=1.0)).to(F64)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    loss = denoising_score_matching(model, x0, torch.Generator().manual_seed(3))
    again = denoising_score_matching(model, x0, torch.Generator().manual_seed(3))
    other = denoising_score_matching(model, x0, torch.Generator().manual_seed(4))
    assert float(loss.detach()) == float(again.detach()) != float(other.detach())
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


# ------------------------------------------------------------------ DiffFlow's samplers and likelihoods on DDPM


def test_sde_and_ode_samplers_reach_the_data_marginal():
    # Exact score, UniformGrid(t0, T, N): samples at t0 ~ N(m(t0) mu, v(t0) I). Allowance per component:
    # mean 0.02 (6 standard errors of 0.0035 plus the prior's mean mismatch sqrt(v0/vT) m(T) |mu| <= 0.007),
    # variance 0.02 (~8 standard errors; Euler–Maruyama at N = 200 measured ~1%).
    model = exact_model()
    grid = solvers.UniformGrid(model.t0, model.T, 200)
    m0, v0 = float(SCHEDULE.mean_coeff(model.t0)), variance_at(model.t0)
    g = torch.Generator().manual_seed(3)
    for xs in (sample(model, 20_000, (2,), grid, generator=g, dtype=F64),
               sample_ode(model, 20_000, (2,), grid.with_steps(50), generator=g, dtype=F64)):
        assert xs.shape == (20_000, 2)
        torch.testing.assert_close(xs.mean(0), m0 * MU, rtol=0, atol=0.02)
        torch.testing.assert_close(xs.var(0), torch.full((2,), v0, dtype=F64), rtol=0, atol=0.02)


def test_ode_nll_is_the_closed_form_up_to_the_prior_mismatch():
    # The probability-flow map of Gaussian marginals is affine: x_T = m(T) mu + sqrt(v(T)/v(t0)) (x - m(t0) mu).
    # ode_nll uses the N(0, I) prior where p_T = N(m(T) mu, v(T) I); adding that difference of log-densities
    # at x_T to the exact NLL must reproduce ode_nll to solver accuracy. The difference itself is the prior
    # mismatch: ~1e-4 nats for mu = 0 (v(T) = 1 - 3e-5), a few 1e-2 for mu = (1, -2) (m(T) mu = 6.6e-3 mu).
    g = torch.Generator().manual_seed(5)
    t0, T = 1e-3, 1.0
    m0, v0 = float(SCHEDULE.mean_coeff(t0)), variance_at(t0)
    mT, vT = float(SCHEDULE.mean_coeff(T)), variance_at(T)
    dopri = solvers.Dopri5(rtol=1e-9, atol=1e-9)
    for mu, mismatch_bound in ((torch.zeros(2, dtype=F64), 5e-4), (MU, 0.1)):
        x = m0 * mu + math.sqrt(v0) * torch.randn(500, 2, generator=g, dtype=F64)
        nll = ode_nll(exact_model(mu), x, t0=t0, T=T, solver=dopri)
        x_T = mT * mu + math.sqrt(vT / v0) * (x - m0 * mu)
        mismatch = gaussian_nll(x_T, torch.zeros(2, dtype=F64), 1.0) - gaussian_nll(x_T, mT * mu, vT)
        torch.testing.assert_close(nll, gaussian_nll(x, m0 * mu, v0) + mismatch, rtol=0, atol=1e-6)
        assert float(mismatch.abs().max()) < mismatch_bound


def test_bound_nll_is_an_upper_bound_whose_gap_shrinks_with_steps():
    # Exact score: the discrete bound exceeds the exact NLL only by the Euler discretisation gap (and a
    # negligible prior term); measured ~90/N nats on this problem, first order in 1/N.
    model = exact_model()
    g = torch.Generator().manual_seed(6)
    m0, v0 = float(SCHEDULE.mean_coeff(model.t0)), variance_at(model.t0)
    x = m0 * MU + math.sqrt(v0) * torch.randn(2000, 2, generator=g, dtype=F64)
    exact = gaussian_nll(x, m0 * MU, v0)
    gaps = {}
    for steps in (100, 400):
        gap = bound_nll(model, x, solvers.UniformGrid(model.t0, model.T, steps), generator=g) - exact
        se = float(gap.std()) / math.sqrt(len(gap))
        assert float(gap.mean()) > 4 * se  # a bound, and a strict one
        gaps[steps] = float(gap.mean())
    assert gaps[400] < 0.5 * gaps[100]


def test_noise_prediction_score_is_the_simple_loss():
    # s = -eps_net / sigma turns the DSM residual sigma s + eps into eps - eps_net: DDPM's simple loss.
    class Net(nn.Module):
        def forward(self, x, t):
            self.x = x
            return 0.5 * x

    net = Net()
    model = DDPM(NoisePredictionScore(net, SCHEDULE))
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    loss = denoising_score_matching(model, x0, torch.Generator().manual_seed(8))
    g = torch.Generator().manual_seed(8)  # replay the draws of denoising_score_matching: u, then eps
    u = torch.rand((), generator=g, dtype=F64)
    t = model.t0 + (model.T - model.t0) * torch.remainder(u + torch.arange(500, dtype=F64) / 500, 1.0)
    eps = torch.randn(x0.shape, generator=g, dtype=F64)
    torch.testing.assert_close(net.x, SCHEDULE.mean_coeff(t)[:, None] * x0 + SCHEDULE.std(t)[:, None] * eps)
    simple = 0.5 * (eps - 0.5 * net.x).pow(2).sum(1).mean()
    torch.testing.assert_close(loss, simple, rtol=1e-12, atol=0)
    # scalar and per-sample times give the same score
    x = torch.randn(4, 2, dtype=F64)
    torch.testing.assert_close(model.score(x, torch.tensor(0.3, dtype=F64)),
                               model.score(x, torch.full((4,), 0.3, dtype=F64)))
    torch.testing.assert_close(model.score(x, 0.3), -0.5 * x / SCHEDULE.std(0.3))
