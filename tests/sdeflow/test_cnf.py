"""The continuous normalizing flow (FFJORD setting): a trained model's exact density is normalised, the
training estimator is unbiased for the RK4 log-density, the flow is invertible, errors name the problem."""

import copy
import math

import pytest
import torch

import solvers
from sdeflow.cnf import CNF, maximum_likelihood_loss
from sdeflow.nets import TimeMLP

F64 = torch.float64


def two_blobs(n: int, g: torch.Generator) -> torch.Tensor:
    """Two Gaussians N((+-0.6, 0), 0.25^2 I): the flow must expand volume ~4x per axis and split the modes."""
    sign = torch.randint(0, 2, (n, 1), generator=g) * 2 - 1
    return torch.cat([0.6 * sign, torch.zeros(n, 1)], 1) + 0.25 * torch.randn(n, 2, generator=g)


@pytest.fixture(scope="module")
def trained() -> CNF:
    """A CNF trained for a few seconds by maximum likelihood (Hutchinson, RK4 with 6 steps)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        cnf = CNF(TimeMLP(2, width=32, depth=2, t_scale=1.0))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(cnf.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        maximum_likelihood_loss(cnf, two_blobs(128, g), 6, g).backward()
        opt.step()
    return cnf


def test_trained_density_integrates_to_one_and_the_trace_term_matters(trained):
    # Midpoint rule on a 60 x 60 grid over [-3, 3]^2 (h = 0.1; the modes have std 0.25, mass outside < 1e-6).
    # The exact density (Dopri5, exact trace) integrates to 1 within 5e-3 (measured: 1 - 4e-7); without the
    # trace term, i.e. N(x(T)) alone, the integral is far from 1 (measured 0.17), so the check has teeth.
    half, n = 3.0, 60
    h = 2 * half / n
    c = -half + h * (torch.arange(n) + 0.5)
    points = torch.stack(torch.meshgrid(c, c, indexing="ij"), dim=-1).reshape(-1, 2)
    with torch.no_grad():
        log_p = trained.log_prob(points)
        x_T = trained.trajectory(points, 40)[1][-1]
    integral = float(log_p.double().exp().sum()) * h * h
    assert abs(integral - 1.0) < 5e-3
    prior_only = float(torch.exp(-0.5 * x_T.double().pow(2).sum(1) - math.log(2 * math.pi)).sum()) * h * h
    assert abs(prior_only - 1.0) > 0.3
    # and the model learned the data: its test NLL beats N(0, I)'s by far (measured 0.99 vs 2.08 nats)
    x = two_blobs(2000, torch.Generator().manual_seed(1))
    with torch.no_grad():
        nll = float(-trained.log_prob(x).mean())
    standard = float(0.5 * x.pow(2).sum(1).mean()) + math.log(2 * math.pi)
    assert nll < standard - 0.7


def test_hutchinson_training_estimate_is_unbiased_for_the_rk4_log_density(trained):
    # Same RK4 grid: the exact trace gives the RK4 log-density; the Rademacher estimate averages to it. Each
    # of 16 points is repeated 500 times in one batch: every copy gets its own probe.
    x = two_blobs(16, torch.Generator().manual_seed(2)).to(F64)
    model = CNF(copy.deepcopy(trained.drift).to(F64), T=trained.T)
    repeats = 500
    with torch.no_grad():
        exact = model.log_prob(x, steps=6, trace=solvers.ExactTrace())
        draws = model.log_prob(x.repeat(repeats, 1), steps=6, generator=torch.Generator().manual_seed(3))
    draws = draws.reshape(repeats, len(x))
    se = draws.std(0) / math.sqrt(repeats)
    assert bool(((draws.mean(0) - exact).abs() < 4 * se + 1e-9).all())
    assert float(draws.std(0).max()) > 1e-3  # the estimate is noisy: the comparison is not trivial


def test_flow_is_invertible_and_sampling_is_seeded(trained):
    x0 = two_blobs(64, torch.Generator().manual_seed(4))
    ts, xs = trained.trajectory(x0, 40)
    assert ts.shape == (41,) and xs.shape == (41, 64, 2) and float(ts[0]) == 0.0 and float(ts[-1]) == 1.0
    back = solvers.odesolve(trained.probability_flow(), xs[-1], trained.grid(40).reversed(), solver=solvers.RK4())
    torch.testing.assert_close(back.xs[-1], x0, rtol=0, atol=1e-3)
    a = trained.sample(100, (2,), 10, torch.Generator().manual_seed(5))
    b = trained.sample(100, (2,), 10, torch.Generator().manual_seed(5))
    assert a.shape == (100, 2) and torch.equal(a, b)


def test_loss_gradients_reach_every_parameter():
    torch.manual_seed(0)
    cnf = CNF(TimeMLP(2, width=8, depth=2, time_features=4, t_scale=1.0))
    maximum_likelihood_loss(cnf, torch.randn(16, 2), 4, torch.Generator().manual_seed(0)).backward()
    for name, p in cnf.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_errors_name_the_problem():
    cnf = CNF(TimeMLP(2, width=8, depth=1, t_scale=1.0))
    with pytest.raises(ValueError, match="T must be finite and positive"):
        CNF(TimeMLP(2, width=8, depth=1), T=0.0)
    with pytest.raises(ValueError, match="not both"):
        cnf.log_prob(torch.zeros(2, 2), steps=2, trace=solvers.ExactTrace(), generator=torch.Generator())
    with pytest.raises(ValueError, match="needs steps"):
        cnf.log_prob(torch.zeros(2, 2), solver=solvers.RK4())
