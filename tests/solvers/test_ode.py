"""ODE solves and log-densities through torchdiffeq: orders, grids, directions, log-densities against closed
forms, Hutchinson's unbiasedness, adjoint gradients, errors. Float64 throughout."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import solvers
from solvers import (
    RK4,
    AdaptiveHeun,
    Bosh3,
    Dopri5,
    Euler,
    ExactTrace,
    ExplicitGrid,
    HutchinsonTrace,
    Midpoint,
    ODEAdjoint,
    PowerGrid,
    SaveAt,
    UniformGrid,
    log_density,
    odesolve,
)

# A non-normal, rotating, contracting matrix: exercises every entry of the flow.
A = torch.tensor([[-0.3, 1.0, 0.0], [-1.0, -0.2, 0.5], [0.2, 0.0, -0.4]], dtype=torch.float64)


class Linear(solvers.ODE):
    """``dx/dt = a(t) A x``, ``a(t) = 1 + c t``; its flow is ``expm(A int a)`` (A commutes with itself)."""

    def __init__(self, c: float = 0.0):
        super().__init__()
        self.c = c
        self.evals: list[float] = []

    def velocity(self, t, x):
        self.evals.append(float(t.detach()))
        return (1.0 + self.c * t) * x @ A.T.to(x.dtype)

    def flow(self, t0: float, t1: float) -> torch.Tensor:
        integral = (t1 - t0) + 0.5 * self.c * (t1**2 - t0**2)
        return torch.linalg.matrix_exp(A * integral)


def exact(ode: Linear, x0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    return x0 @ ode.flow(t0, t1).T


@pytest.fixture
def x0(generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(4, 3, generator=generator, dtype=dtype)


def fitted_order(errors: list[float], steps: list[int]) -> float:
    slope, _ = np.polyfit(np.log(1.0 / np.asarray(steps, dtype=np.float64)), np.log(errors), 1)
    return float(slope)


@pytest.mark.parametrize("solver", [Euler(), Midpoint(), RK4()], ids=lambda s: type(s).__name__)
def test_fixed_step_order(solver, x0):
    ode = Linear(c=0.5)
    steps = [16, 32, 64, 128]
    errors = []
    for n in steps:
        sol = odesolve(ode, x0, UniformGrid(0.0, 2.0, n), solver=solver)
        errors.append(float((sol.xs[-1] - exact(ode, x0, 0.0, 2.0)).abs().max()))
    assert abs(fitted_order(errors, steps) - solver.order) < 0.1, (errors, fitted_order(errors, steps))


@pytest.mark.parametrize("solver, evals", [(Euler(), 1), (Midpoint(), 2), (RK4(), 4)],
                         ids=["euler", "mid", "rk4"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
def test_fixed_steps_land_on_grid_nodes(solver, evals, reverse, x0):
    grid = ExplicitGrid([0.0, 0.05, 0.13, 0.3, 0.31, 0.6, 0.9, 1.0])
    grid = grid.reversed() if reverse else grid
    ode = Linear(c=1.0)
    sol = odesolve(ode, x0, grid, solver=solver, save=SaveAt(t0=True, steps=True))
    nodes = grid.nodes()
    assert torch.equal(sol.ts, grid.times())
    assert sol.stats.steps == grid.steps and sol.stats.drift_evals == evals * grid.steps == len(ode.evals)
    # Every step starts with an evaluation at its left node: those times are the nodes, bit for bit.
    assert ode.evals[::evals] == nodes[:-1].tolist()
    for t, x in zip(nodes, sol.xs, strict=True):
        tolerance = {1: 1.0, 2: 0.2, 4: 5e-3}[solver.order]  # coarse steps (up to 0.3): loose bounds
        torch.testing.assert_close(x, exact(ode, x0, nodes[0], float(t)), rtol=0, atol=tolerance)
    # Euler by hand on the same nodes: the solve is exactly x_{k+1} = x_k + h_k v(t_k, x_k).
    if isinstance(solver, Euler):
        x = x0
        for k in range(grid.steps):
            x = x + (nodes[k + 1] - nodes[k]) * (1.0 + nodes[k]) * x @ A.T
            torch.testing.assert_close(sol.xs[k + 1], x, rtol=1e-14, atol=1e-14)


def test_saveat_every_and_nothing_to_integrate(x0):
    grid = UniformGrid(0.0, 1.0, 12)
    full = odesolve(Linear(), x0, grid, solver=RK4(), save=SaveAt(t0=True, steps=True))
    every = odesolve(Linear(), x0, grid, solver=RK4(), save=SaveAt(every=4))
    assert every.ts.tolist() == grid.times()[[0, 4, 8, 12]].tolist()
    assert torch.equal(every.xs, full.xs[[0, 4, 8, 12]])
    start = odesolve(Linear(), x0, grid, solver=RK4(), save=SaveAt(t0=True, t1=False))
    assert torch.equal(start.xs[0], x0) and start.stats.drift_evals == 0


@pytest.mark.parametrize("method", [AdaptiveHeun, Bosh3, Dopri5], ids=lambda m: m.__name__)
def test_adaptive_error_shrinks_with_tolerance(method, x0):
    # The grid gives the output times; states there are steps of the solver (not interpolants), so the
    # error at every node follows the tolerance.
    ode = Linear(c=0.5)
    grid = PowerGrid(0.0, 2.0, steps=5, exponent=0.7)
    reference = torch.stack([exact(ode, x0, 0.0, float(t)) for t in grid.nodes()])
    errors, work = [], []
    # Second order needs ~tol^(-1/2) steps: AdaptiveHeun stops at 1e-6 to stay fast.
    tolerances = (1e-2, 1e-4, 1e-6) if method is AdaptiveHeun else (1e-3, 1e-5, 1e-7)
    for tol in tolerances:
        sol = odesolve(ode, x0, grid, solver=method(rtol=tol, atol=tol), save=SaveAt(t0=True, steps=True))
        assert torch.equal(sol.ts, grid.times())
        errors.append(float((sol.xs - reference).abs().max()))
        work.append(sol.stats.drift_evals)
        assert sol.stats.steps >= grid.steps
    assert errors[0] > 5 * errors[1] > 25 * errors[2] and errors[2] < 20 * tolerances[2], errors
    assert work[0] < work[1] < work[2]


@pytest.mark.parametrize("solver", [RK4(), Dopri5(rtol=1e-10, atol=1e-10)], ids=["rk4", "dopri5"])
def test_reversed_grid_returns_to_start(solver, x0):
    ode = Linear(c=1.0)
    grid = PowerGrid(0.1, 1.5, steps=200, exponent=0.8)
    there = odesolve(ode, x0, grid, solver=solver).xs[-1]
    torch.testing.assert_close(there, exact(ode, x0, 0.1, 1.5), rtol=0, atol=1e-8)
    back = odesolve(ode, there, grid.reversed(), solver=solver)
    assert float(back.ts[-1]) == 0.1
    torch.testing.assert_close(back.xs[-1], x0, rtol=0, atol=1e-8)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
@pytest.mark.parametrize("c", [0.0, 0.7], ids=["constant", "time-dependent"])
def test_log_density_of_linear_flow_is_gaussian(c, reverse, generator, dtype):
    # x(t0) ~ N(m, S) pushed by dx/dt = a(t) A x gives x(t1) = M x(t0) ~ N(M m, M S M^T), M = expm(A int a).
    ode = Linear(c=c)
    grid = UniformGrid(0.2, 1.3, 4)
    grid = grid.reversed() if reverse else grid
    t0, t1 = grid.t0, grid.t1
    mean = torch.tensor([0.5, -1.0, 0.3], dtype=dtype)
    root = torch.randn(3, 3, generator=generator, dtype=dtype)
    cov = root @ root.T + 0.5 * torch.eye(3, dtype=dtype)
    x = mean + torch.randn(16, 3, generator=generator, dtype=dtype) @ root.T
    flow = ode.flow(t0, t1)
    out = log_density(ode, x, grid, solver=Dopri5(rtol=1e-11, atol=1e-11),
                      base_log_prob=lambda y: gaussian_log_prob(y, flow @ mean, flow @ cov @ flow.T))
    torch.testing.assert_close(out.x_end, x @ flow.T, rtol=0, atol=1e-9)
    # delta_logp = int_{t0}^{t1} tr(a(t) A) dt, signed: negative going backward for this contracting A.
    integral = (t1 - t0) + 0.5 * c * (t1**2 - t0**2)
    expected = torch.full((16,), float(torch.trace(A)) * integral, dtype=dtype)
    torch.testing.assert_close(out.delta_logp, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(out.log_prob, gaussian_log_prob(x, mean, cov), rtol=0, atol=1e-8)
    assert out.nfe == out.stats.drift_evals > 0


class Net(solvers.ODE):
    """A small time-conditioned neural ODE on (batch, 2)."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.l1 = nn.Linear(3, 16).double()
        self.l2 = nn.Linear(16, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=generator, dtype=p.dtype))

    def velocity(self, t, x):
        h = torch.cat([x, t.expand(x.shape[0], 1)], dim=1)
        return self.l2(torch.tanh(self.l1(h)))


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(distribution, generator, dtype):
    # Each batch row is the same point with its own probe, fixed along the path: the rows' delta_logp are
    # independent draws of an estimator whose mean must be the exact-trace delta_logp on the same grid.
    net = Net(generator)
    grid = UniformGrid(0.0, 1.0, 8)
    rows = 4000
    x = torch.tensor([[0.3, -0.7]], dtype=dtype).expand(rows, 2)
    with torch.no_grad():
        exact_trace = log_density(net, x[:1], grid, solver=RK4()).delta_logp
        trace = HutchinsonTrace(distribution=distribution, generator=torch.Generator().manual_seed(7))
        estimate = log_density(net, x, grid, solver=RK4(), trace=trace).delta_logp
    standard_error = float(estimate.std()) / math.sqrt(rows)
    assert float(estimate.std()) > 1e-3  # the probes really vary
    assert abs(float(estimate.mean() - exact_trace)) < 4 * standard_error


def test_hutchinson_probes_are_reproducible_and_averaged(generator, dtype):
    net = Net(generator)
    x = torch.randn(5, 2, generator=generator, dtype=dtype)
    grid = UniformGrid(0.0, 1.0, 4)

    def run(seed: int, probes: int = 1) -> torch.Tensor:
        trace = HutchinsonTrace(probes=probes, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            return log_density(net, x, grid, solver=RK4(), trace=trace).delta_logp

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))
    # Rademacher probes on a diagonal Jacobian give the exact trace: eps_i^2 = 1.
    diagonal = log_density(lambda t, x: -torch.sin(x), x, grid, solver=RK4(),
                           trace=HutchinsonTrace(probes=3, generator=torch.Generator().manual_seed(0)))
    exact_diagonal = log_density(lambda t, x: -torch.sin(x), x, grid, solver=RK4())
    torch.testing.assert_close(diagonal.delta_logp, exact_diagonal.delta_logp, rtol=1e-14, atol=1e-14)


def test_log_density_under_no_grad_and_with_create_graph(generator, dtype):
    net = Net(generator)
    x = torch.randn(6, 2, generator=generator, dtype=dtype)
    grid = UniformGrid(0.0, 1.0, 6)
    with torch.no_grad():
        frozen = log_density(net, x, grid, solver=RK4())
    assert not frozen.delta_logp.requires_grad and not frozen.x_end.requires_grad
    live = log_density(net, x, grid, solver=RK4())
    torch.testing.assert_close(live.delta_logp, frozen.delta_logp, rtol=0, atol=1e-14)
    # Maximum likelihood: the log-density's gradient reaches every parameter, through the trace too.
    grads = torch.autograd.grad(live.delta_logp.sum(), list(net.parameters()))
    assert all(float(g.abs().sum()) > 0 for g in grads)


def test_log_density_on_image_shaped_states_and_inference_tensors(generator, dtype):
    # (batch, 2, 3) states, v acting on the last axis: tr(dv/dx) = 2 tr(M) whatever x and t.
    m = torch.randn(3, 3, generator=generator, dtype=dtype)
    x = torch.randn(4, 2, 3, generator=generator, dtype=dtype)
    grid = UniformGrid(0.0, 0.5, 3)
    with torch.inference_mode():
        made_in_inference = x.clone()
    with torch.no_grad():
        out = log_density(lambda t, y: y @ m, made_in_inference, grid, solver=RK4())
        hutchinson = log_density(lambda t, y: torch.tanh(y), x, grid, solver=RK4(),
                                 trace=HutchinsonTrace(generator=torch.Generator().manual_seed(1)))
        exact_trace = log_density(lambda t, y: torch.tanh(y), x, grid, solver=RK4())
    assert out.x_end.shape == x.shape and out.delta_logp.shape == (4,)
    torch.testing.assert_close(out.delta_logp, torch.full((4,), 2 * 0.5 * float(torch.trace(m)), dtype=dtype))
    torch.testing.assert_close(hutchinson.delta_logp, exact_trace.delta_logp)  # diagonal Jacobian
    with torch.inference_mode(), pytest.raises(RuntimeError, match="no_grad"):
        log_density(lambda t, y: y @ m, x, grid, solver=RK4())


def test_log_density_gradient_closed_form(dtype):
    # dx/dt = theta A x: delta_logp = theta tr(A) T, so d(sum delta_logp)/dtheta = batch tr(A) T exactly.
    class Scaled(solvers.ODE):
        def __init__(self):
            super().__init__()
            self.theta = nn.Parameter(torch.tensor(0.8, dtype=dtype))

        def velocity(self, t, x):
            return self.theta * x @ A.T

    x = torch.ones(3, 3, dtype=dtype)
    grid = UniformGrid(0.0, 1.5, 10)
    for adjoint in (None, ODEAdjoint()):
        ode = Scaled()
        out = log_density(ode, x, grid, solver=Dopri5(rtol=1e-10, atol=1e-10), adjoint=adjoint)
        (grad,) = torch.autograd.grad(out.delta_logp.sum(), [ode.theta])
        torch.testing.assert_close(grad, torch.trace(A) * 1.5 * 3, rtol=1e-8, atol=1e-8)


def _gradients(net, x0, grid, solver, adjoint, loss):
    x0 = x0.clone().requires_grad_(True)
    value = loss(net, x0, grid, solver, adjoint)
    return torch.autograd.grad(value, [x0, *net.parameters()])


def _state_loss(net, x0, grid, solver, adjoint):
    # Four saved intervals whatever the grid, so the loss itself does not change with the step count.
    sol = odesolve(net, x0, grid, solver=solver, adjoint=adjoint, save=SaveAt(every=grid.steps // 4))
    return (sol.xs**2).sum() + sol.xs[-1, :, 0].sum()


def _logp_loss(net, x0, grid, solver, adjoint):
    out = log_density(net, x0, grid, solver=solver, adjoint=adjoint,
                      base_log_prob=lambda z: -0.5 * (z**2).sum(1))
    return out.log_prob.sum()


@pytest.mark.parametrize("loss", [_state_loss, _logp_loss], ids=["state", "log-density"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "backward"])
def test_adjoint_gradients_match_backprop(loss, reverse, generator, dtype):
    net = Net(generator)
    x0 = torch.randn(5, 2, generator=generator, dtype=dtype)
    grid = UniformGrid(0.0, 1.0, 4)
    grid = grid.reversed() if reverse else grid
    solver = Dopri5(rtol=1e-10, atol=1e-10)
    direct = _gradients(net, x0, grid, solver, None, loss)
    adjoint = _gradients(net, x0, grid, solver, ODEAdjoint(), loss)
    for a, b in zip(direct, adjoint, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    seminorm = _gradients(net, x0, grid, solver, ODEAdjoint(seminorm=True), loss)
    for a, b in zip(direct, seminorm, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fixed_grid_adjoint_converges_to_backprop(generator, dtype):
    # The continuous adjoint of RK4, solved backward with RK4 on the same nodes, differs from backprop's
    # exact discrete gradient by the discretisation error: O(h^4).
    net = Net(generator)
    x0 = torch.randn(5, 2, generator=generator, dtype=dtype)
    gaps = []
    steps = [8, 16, 32]
    for n in steps:
        grid = PowerGrid(0.0, 1.0, n, exponent=0.8)
        direct = _gradients(net, x0, grid, RK4(), None, _state_loss)
        adjoint = _gradients(net, x0, grid, RK4(), ODEAdjoint(), _state_loss)
        gaps.append(max(float((a - b).abs().max()) for a, b in zip(direct, adjoint, strict=True)))
    assert gaps[-1] < 1e-6 and fitted_order(gaps, steps) > 3.5, gaps
    # An adaptive backward solve for a fixed-grid forward one.
    grid = UniformGrid(0.0, 1.0, 64)
    direct = _gradients(net, x0, grid, RK4(), None, _state_loss)
    mixed = _gradients(net, x0, grid, RK4(), ODEAdjoint(solver=Dopri5(), rtol=1e-10, atol=1e-10), _state_loss)
    for a, b in zip(direct, mixed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_callables_and_modules_are_accepted(x0):
    grid = UniformGrid(0.0, 1.0, 5)
    as_class = odesolve(Linear(), x0, grid, solver=RK4())
    as_function = odesolve(lambda t, x: x @ A.T, x0, grid, solver=RK4())
    assert torch.equal(as_class.xs, as_function.xs)
    module = nn.Linear(3, 3).double()
    wrapped = solvers.as_ode(lambda t, x: module(x))
    assert len(list(wrapped.parameters())) == 0
    assert len(list(solvers.as_ode(_ModuleField(module)).parameters())) == 2


class _ModuleField(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, t, x):
        return self.inner(x)


def test_errors(x0):
    grid = UniformGrid(0.0, 1.0, 5)
    with pytest.raises(TypeError, match="callable"):
        odesolve(3.0, x0, grid)
    with pytest.raises(TypeError, match="without forward"):
        odesolve(solvers.SDE(), x0, grid)
    with pytest.raises(ValueError, match=r"\(batch, \*dims\)"):
        odesolve(Linear(), torch.ones(3, dtype=torch.float64), grid)
    with pytest.raises(ValueError, match=r"shape \(4, 2\) for a state of shape \(4, 3\)"):
        odesolve(lambda t, x: x[:, :2], x0, grid, solver=Euler())
    with pytest.raises(ValueError, match=r"shape \(4, 2\) for a state of shape \(4, 3\)"):
        log_density(lambda t, x: x[:, :2], x0, grid, solver=Euler())
    with pytest.raises(TypeError, match="ODE solver object"):
        odesolve(Linear(), x0, grid, solver="rk4")
    with pytest.raises(TypeError, match="ODEAdjoint"):
        odesolve(Linear(), x0, grid, adjoint=True)
    with pytest.raises(TypeError, match="plain function"):
        odesolve(lambda t, x: -x, x0, grid, adjoint=ODEAdjoint())
    with pytest.raises(TypeError, match="StratifiedGrid"):
        odesolve(Linear(), x0, grid.stratified())
    with pytest.raises(ValueError, match="rtol"):
        Dopri5(rtol=-1.0)
    with pytest.raises(ValueError, match="distribution"):
        HutchinsonTrace(distribution="uniform")
    with pytest.raises(ValueError, match="fixed-grid"):
        odesolve(Linear(), x0, grid, solver=RK4(), adjoint=ODEAdjoint(rtol=1e-6))
    with pytest.raises(ValueError, match=r"base_log_prob must return shape \(4,\)"):
        log_density(Linear(), x0, grid, solver=Euler(), base_log_prob=lambda z: z)
    with pytest.raises(FloatingPointError, match="NaN"):
        odesolve(lambda t, x: x**3, 1e3 * x0, grid, solver=Euler())
    with pytest.raises(RuntimeError, match="Dopri5 failed"):
        odesolve(Linear(), x0, grid, solver=Dopri5(rtol=1e-12, atol=1e-12, max_steps=2))


def test_float32_and_exact_trace_class(x0):
    grid = UniformGrid(0.0, 1.0, 10)
    sol = odesolve(Linear(), x0.float(), grid, solver=RK4())
    assert sol.xs.dtype == torch.float32 and sol.ts.dtype == torch.float32
    torch.testing.assert_close(sol.xs[-1].double(), exact(Linear(), x0, 0.0, 1.0), rtol=0, atol=1e-5)
    assert ExactTrace() == ExactTrace() and Dopri5().order == 5 and Euler().order == 1
