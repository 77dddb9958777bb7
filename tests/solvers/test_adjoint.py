"""Gradients of Euler–Maruyama solves, three ways (house style, point 5), plus memory and lifetime.

* :class:`solvers.DiscreteAdjoint` against :class:`solvers.DirectAdjoint` on the same noise: neural SDEs
  with state-dependent diffusion (diagonal, general with m = 3, scalar noise), uniform, power and reversed
  grids, fresh seeded draws and a Brownian path, and three kinds of loss (terminal, path cost with its own
  parameters and ``node`` network, intermediate saved states). The discrete adjoint is backprop
  reassociated, so everything agrees to rounding (asserted at 1e-10 relative, losses at 1e-12).
* central finite differences in float64 on a tiny problem with a fixed Brownian path;
* the closed-form derivative of Euler–Maruyama for ``dx = a x dt + b dW``.

Then: every parameter receives a gradient, ``x0`` need not require one, the stored trajectory is freed by
backward and by dropping the solution (no reference cycles), the memory saved for backward does not grow
with the number of steps beyond the states and increments, and a clear error for other solvers.
"""

from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import solvers

BATCH, DIM, M, HIDDEN, STEPS = 4, 2, 3, 12, 16
NOISES = ("diagonal", "general", "scalar")
GRIDS = {
    "uniform": solvers.UniformGrid(0.0, 1.0, STEPS),
    "power": solvers.PowerGrid(0.01, 1.0, STEPS, exponent=0.5),
    "reversed": solvers.PowerGrid(0.01, 1.0, STEPS, exponent=0.5).reversed(),
}


def _with_time(t: Tensor, x: Tensor) -> Tensor:
    return torch.cat([x, t.expand(x.shape[0], 1)], dim=1)


def _mlp(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, outputs))


class NeuralSDE(solvers.SDE):
    """Drift and state-dependent diffusion are MLPs of ``(x, t)``; the diffusion's shape follows the noise
    type."""

    def __init__(self, noise: str):
        super().__init__()
        self.noise_type = solvers.NoiseType(noise)
        self.columns = {"diagonal": 1, "general": M, "scalar": 1}[noise]
        self.drift_net = _mlp(DIM + 1, DIM)
        self.diffusion_net = _mlp(DIM + 1, DIM * self.columns)

    def drift(self, t, x):
        return self.drift_net(_with_time(t, x))

    def diffusion(self, t, x):
        g = 0.1 + 0.3 * torch.sigmoid(self.diffusion_net(_with_time(t, x)))
        if self.noise_type is solvers.NoiseType.DIAGONAL:
            return g
        return g.reshape(x.shape[0], DIM, self.columns)

    def noise_size(self) -> int:
        return DIM if self.noise_type is solvers.NoiseType.DIAGONAL else self.columns


class NetworkCost(solvers.PathCost):
    """A path cost with parameters of its own and a ``node`` network; it reads every field of the step."""

    def __init__(self):
        super().__init__()
        self.score_net = _mlp(DIM + 1, DIM)
        self.weight = nn.Parameter(torch.tensor(0.7))

    def node(self, t, x):
        return self.score_net(_with_time(t, x))

    def forward(self, step: solvers.Transition) -> Tensor:
        residual = step.x1 - step.x0 - step.drift1 * step.dt  # drift at the later node, as in DiffFlow's loss
        g2 = step.diffusion1.flatten(1).pow(2).sum(1, keepdim=True)
        kinetic = 0.5 * (step.extra1 - step.drift1).pow(2).sum(1) * abs(step.dt)
        return (kinetic + self.weight * (residual * step.extra1).sum(1) * g2.squeeze(1)
                + torch.sin(step.t1) * step.dw.flatten(1).sum(1) * step.x1[:, 0])


def _x0(requires_grad: bool = True) -> Tensor:
    x0 = torch.linspace(-1.0, 1.2, BATCH * DIM, dtype=torch.float64).reshape(BATCH, DIM)
    return x0.requires_grad_(requires_grad)


def _models(noise: str, seed: int = 0) -> tuple[NeuralSDE, NetworkCost]:
    torch.manual_seed(seed)
    return NeuralSDE(noise).double(), NetworkCost().double()


def _noise_source(source: str, grid: solvers.Grid, sde: NeuralSDE) -> dict:
    if source == "generator":
        return {"generator": torch.Generator().manual_seed(7)}
    lo, hi = sorted((grid.t0, grid.t1))
    return {"brownian": solvers.BrownianPath(lo, hi, (BATCH, sde.noise_size()), seed=7, dtype=torch.float64)}


def _loss(kind: str, sde, cost, grid, adjoint, x0, source) -> tuple[Tensor, solvers.Solution]:
    save = solvers.SaveAt(every=5) if kind == "saved" else solvers.SaveAt()
    sol = solvers.sdesolve(sde, x0, grid, adjoint=adjoint, save=save, cost=cost if kind == "cost" else None,
                           **_noise_source(source, grid, sde))
    if kind == "terminal":
        return torch.sin(sol.xs[-1]).pow(2).sum() + sol.xs[-1][:, 0].sum(), sol
    if kind == "cost":
        return sol.cost.mean() + 0.5 * sol.xs[-1].pow(2).sum(), sol
    weights = torch.linspace(0.5, 2.0, sol.xs.shape[0], dtype=sol.xs.dtype).reshape(-1, 1, 1)
    return (weights * torch.tanh(sol.xs - 0.2)).pow(2).sum(), sol


def _relative(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["terminal", "cost", "saved"])
@pytest.mark.parametrize("source", ["generator", "brownian"])
@pytest.mark.parametrize("grid_name", sorted(GRIDS))
@pytest.mark.parametrize("noise", NOISES)
def test_discrete_adjoint_equals_backprop(noise, grid_name, source, kind):
    grid = GRIDS[grid_name]
    sde, cost = _models(noise)
    wrt = [*sde.parameters(), *(cost.parameters() if kind == "cost" else ())]
    results = {}
    for adjoint in (solvers.DirectAdjoint(), solvers.DiscreteAdjoint()):
        x0 = _x0()
        loss, _ = _loss(kind, sde, cost, grid, adjoint, x0, source)
        results[type(adjoint).__name__] = (loss.detach(), torch.autograd.grad(loss, [x0, *wrt]))
    (loss_direct, grads_direct), (loss_discrete, grads_discrete) = results.values()
    assert abs(float(loss_discrete - loss_direct)) <= 1e-12 * abs(float(loss_direct))
    assert len(grads_discrete) == len(grads_direct) == 1 + len(wrt)
    for i, (gd, gr) in enumerate(zip(grads_discrete, grads_direct, strict=True)):
        assert float(gr.norm()) > 0, f"tensor {i} got no gradient from backprop"
        assert _relative(gd, gr) <= 1e-10, f"tensor {i}: relative difference {_relative(gd, gr):.2e}"


def test_discrete_adjoint_with_a_cost_and_saved_states_together():
    grid = GRIDS["power"]
    sde, cost = _models("diagonal", seed=3)
    wrt = [*sde.parameters(), *cost.parameters()]
    grads = []
    for adjoint in (solvers.DirectAdjoint(), solvers.DiscreteAdjoint()):
        x0 = _x0()
        save = solvers.SaveAt(t0=True, every=3)
        sol = solvers.sdesolve(sde, x0, grid, adjoint=adjoint, cost=cost, save=save,
                               generator=torch.Generator().manual_seed(1))
        loss = sol.cost.sum() + sol.xs.pow(3).sum()
        grads.append(torch.autograd.grad(loss, [x0, *wrt]))
    for gr, gd in zip(*grads, strict=True):
        assert _relative(gd, gr) <= 1e-10


class SharedCost(solvers.PathCost):
    """A cost that holds the SDE's own drift network: its parameters must be counted once."""

    def __init__(self, sde: NeuralSDE):
        super().__init__()
        self.drift_net = sde.drift_net

    def node(self, t, x):
        return self.drift_net(_with_time(t, 2 * x))

    def forward(self, step):
        return (step.extra1 * step.drift1).sum(1) * abs(step.dt)


def test_parameters_shared_by_the_sde_and_the_cost():
    sde, _ = _models("scalar", seed=4)
    cost = SharedCost(sde)
    grads = []
    for adjoint in (solvers.DirectAdjoint(), solvers.DiscreteAdjoint()):
        sol = solvers.sdesolve(sde, _x0(), GRIDS["reversed"], adjoint=adjoint, cost=cost,
                               generator=torch.Generator().manual_seed(2))
        grads.append(torch.autograd.grad(sol.cost.sum() + sol.xs.sum(), list(sde.parameters())))
    for gr, gd in zip(*grads, strict=True):
        assert _relative(gd, gr) <= 1e-10


# ------------------------------------------------------------------------------------ finite differences


class Tiny(solvers.SDE):
    """``dx = (A x + c tanh(x)) dt + (0.2 + 0.1 c x^2) dW`` with ``A = [[a, b], [-b, a]]``: three scalars."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(-0.6, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(1.3, dtype=torch.float64))
        self.c = nn.Parameter(torch.tensor(0.4, dtype=torch.float64))

    def drift(self, t, x):
        rotated = torch.stack([self.a * x[:, 0] + self.b * x[:, 1], -self.b * x[:, 0] + self.a * x[:, 1]], 1)
        return rotated + self.c * torch.tanh(x)

    def diffusion(self, t, x):
        return 0.2 + 0.1 * self.c * x.pow(2)


class KineticCost(solvers.PathCost):
    def forward(self, step):
        return 0.5 * step.drift1.pow(2).sum(1) * abs(step.dt)


def test_discrete_adjoint_matches_central_finite_differences():
    grid = solvers.PowerGrid(0.0, 1.0, 20, exponent=0.7)
    path = solvers.BrownianPath(0.0, 1.0, (3, 2), seed=11, dtype=torch.float64)
    sde, cost = Tiny(), KineticCost()
    x0 = torch.tensor([[0.5, -0.3], [1.0, 0.2], [-0.4, 0.8]], dtype=torch.float64)

    def loss_of(x0: Tensor, adjoint=None) -> Tensor:
        sol = solvers.sdesolve(sde, x0, grid, brownian=path, cost=cost, adjoint=adjoint,
                               save=solvers.SaveAt(every=7))
        return sol.cost.sum() + torch.cos(sol.xs).sum()

    x0_leaf = x0.clone().requires_grad_(True)
    params = [sde.a, sde.b, sde.c]
    grads = torch.autograd.grad(loss_of(x0_leaf, solvers.DiscreteAdjoint()), [x0_leaf, *params])
    h = 1e-6
    with torch.no_grad():
        for p, g in zip(params, grads[1:], strict=True):
            base = p.item()
            p.fill_(base + h)
            up = loss_of(x0).item()
            p.fill_(base - h)
            down = loss_of(x0).item()
            p.fill_(base)
            fd = (up - down) / (2 * h)
            assert abs(fd - g.item()) <= 1e-6 * abs(g.item()), (fd, g.item())
        fd_x0 = torch.zeros_like(x0)
        for index in np.ndindex(*x0.shape):
            shifted = x0.clone()
            shifted[index] += h
            up = loss_of(shifted).item()
            shifted[index] -= 2 * h
            down = loss_of(shifted).item()
            fd_x0[index] = (up - down) / (2 * h)
    assert _relative(grads[0], fd_x0) <= 1e-6


# ------------------------------------------------------------------------------------------- closed form


class LinearAdditive(solvers.SDE):
    """``dx = a x dt + b dW``."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def drift(self, t, x):
        return self.a * x

    def diffusion(self, t, x):
        return self.b.expand_as(x)


@pytest.mark.parametrize("grid", [solvers.UniformGrid(0.0, 1.0, 25), solvers.PowerGrid(0.01, 2.0, 25, 0.5)],
                         ids=["uniform", "power"])
def test_discrete_adjoint_matches_the_closed_form_derivative(grid):
    """Euler–Maruyama gives ``x_N = P_0 x_0 + b sum_k P_{k+1} dW_k`` with
    ``P_k = prod_{j >= k} (1 + a dt_j)``, so ``dx_N/db = sum_k P_{k+1} dW_k``, ``dx_N/dx_0 = P_0`` and, as
    ``dP_k/da = P_k sum_{j >= k} dt_j / (1 + a dt_j)``, ``dx_N/da = dP_0/da x_0 + b sum_k dP_{k+1}/da dW_k``.
    """
    a, b = -0.8, 0.45
    sde = LinearAdditive(a, b)
    path = solvers.BrownianPath(grid.t0, grid.t1, (6, 1), seed=5, dtype=torch.float64)
    x0 = torch.linspace(-1.0, 1.5, 6, dtype=torch.float64).reshape(6, 1).requires_grad_(True)
    sol = solvers.sdesolve(sde, x0, grid, brownian=path, adjoint=solvers.DiscreteAdjoint())
    da, db, dx0 = torch.autograd.grad(sol.xs[-1].sum(), [sde.a, sde.b, x0])

    nodes = grid.nodes()
    dts = np.diff(nodes)
    n = len(dts)
    dws = [path(float(nodes[k]), float(nodes[k + 1])).detach().numpy()[:, 0] for k in range(n)]
    factors = 1 + a * dts
    tail = [float(np.prod(factors[k:])) for k in range(n + 1)]  # P_k; P_n = 1
    tail_da = [tail[k] * float(np.sum(dts[k:] / factors[k:])) for k in range(n + 1)]
    x0_np = x0.detach().numpy()[:, 0]
    xn_np = tail[0] * x0_np + b * sum(tail[k + 1] * dws[k] for k in range(n))
    expected_da = np.sum(tail_da[0] * x0_np + b * sum(tail_da[k + 1] * dws[k] for k in range(n)))
    expected_db = np.sum(sum(tail[k + 1] * dws[k] for k in range(n)))
    assert np.allclose(sol.xs[-1].detach().numpy()[:, 0], xn_np, rtol=1e-13, atol=1e-13)
    assert math.isclose(da.item(), expected_da, rel_tol=1e-12)
    assert math.isclose(db.item(), expected_db, rel_tol=1e-12)
    assert torch.allclose(dx0, torch.full_like(dx0, tail[0]), rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------- gradient plumbing


def test_every_parameter_receives_a_gradient():
    sde, cost = _models("general")
    sol = solvers.sdesolve(sde, _x0(), GRIDS["uniform"], adjoint=solvers.DiscreteAdjoint(), cost=cost,
                           generator=torch.Generator().manual_seed(0))
    (sol.cost.mean() + sol.xs[-1].pow(2).sum()).backward()
    for name, p in [*sde.named_parameters(), *cost.named_parameters()]:
        assert p.grad is not None, f"{name} got no gradient"
        assert float(p.grad.abs().sum()) > 0, f"{name} got a zero gradient"


def test_an_initial_state_without_grad_is_fine():
    sde, cost = _models("diagonal")
    grads = []
    for adjoint in (solvers.DirectAdjoint(), solvers.DiscreteAdjoint()):
        x0 = _x0(requires_grad=False)
        sol = solvers.sdesolve(sde, x0, GRIDS["power"], adjoint=adjoint, cost=cost,
                               generator=torch.Generator().manual_seed(0))
        grads.append(torch.autograd.grad(sol.cost.sum() + sol.xs.sum(), list(sde.parameters())))
        assert x0.grad is None
    for gr, gd in zip(*grads, strict=True):
        assert _relative(gd, gr) <= 1e-10


def test_nothing_requires_grad_gives_a_plain_solution():
    sde, _ = _models("diagonal")
    sde.requires_grad_(False)
    sol = solvers.sdesolve(sde, _x0(requires_grad=False), GRIDS["uniform"], adjoint=solvers.DiscreteAdjoint(),
                           generator=torch.Generator().manual_seed(0))
    assert not sol.xs.requires_grad


def test_backward_frees_the_stored_trajectory():
    sde, cost = _models("diagonal")
    sol = solvers.sdesolve(sde, _x0(), GRIDS["uniform"], adjoint=solvers.DiscreteAdjoint(), cost=cost,
                           generator=torch.Generator().manual_seed(0))
    loss = sol.cost.sum() + sol.xs.sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def _stored_tensor_refs(run) -> tuple[list[weakref.ref], object]:
    """Run ``run()`` while recording a weak reference to every tensor saved for backward."""
    refs: list[weakref.ref] = []

    def pack(t: Tensor) -> Tensor:
        refs.append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return refs, out


@pytest.mark.parametrize("backward", [True, False], ids=["after-backward", "unused"])
def test_no_reference_cycle_keeps_the_trajectory_alive(backward):
    sde, cost = _models("diagonal")
    x0 = _x0()

    def run():
        sol = solvers.sdesolve(sde, x0, GRIDS["uniform"], adjoint=solvers.DiscreteAdjoint(), cost=cost,
                               generator=torch.Generator().manual_seed(0), save=solvers.SaveAt(every=4))
        return sol, sol.cost.sum() + sol.xs.sum()

    refs, (sol, loss) = _stored_tensor_refs(run)
    stored = [r for r in refs if r() is not None and r() is not x0]
    assert len(stored) >= 2 * STEPS  # at least the states x_1 .. x_N and the increments (x_0 is the caller's)
    if backward:
        loss.backward()
    gc.disable()  # dying without the cycle collector proves that no cycle holds them
    try:
        del sol, loss
        alive = sum(r() is not None for r in stored)
    finally:
        gc.enable()
    gc.collect()
    assert alive == 0, f"{alive} stored tensors outlive the solution"


def test_the_trajectory_is_stored_in_two_allocations():
    """States and increments go into two buffers allocated before the loop: 2N small tensors allocated one per
    step between the networks' large temporaries fragment the C heap, and peak memory grows with N."""
    sde, cost = _models("general")
    x0 = _x0()

    def run():
        return solvers.sdesolve(sde, x0, GRIDS["uniform"], adjoint=solvers.DiscreteAdjoint(), cost=cost,
                                generator=torch.Generator().manual_seed(0))

    refs, sol = _stored_tensor_refs(run)
    stored = [r() for r in refs if r() is not None and r() is not x0 and r().dim() == 2]  # not xs, cost
    assert len(stored) >= 2 * STEPS + 1
    assert len({t.untyped_storage().data_ptr() for t in stored}) == 2


# ------------------------------------------------------------------------------------------------ memory


class WideSDE(solvers.SDE):
    """A drift MLP of width 128: its activations dwarf the state (dimension 2)."""

    def __init__(self):
        super().__init__()
        self.drift_net = nn.Sequential(nn.Linear(DIM + 1, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                       nn.Linear(128, DIM))
        self.log_sigma = nn.Parameter(torch.tensor(-1.0))

    def drift(self, t, x):
        return self.drift_net(_with_time(t, x))

    def diffusion(self, t, x):
        return self.log_sigma.exp() * (1 + 0.1 * torch.tanh(x))


def _saved_bytes(adjoint: solvers.Adjoint, steps: int) -> tuple[int, int]:
    """Bytes saved for backward by the forward solve, and the peak of saved bytes alive at once over forward
    *and* backward (a saved tensor counts from its packing until autograd drops it)."""
    torch.manual_seed(0)
    sde, cost = WideSDE().double(), KineticCost()
    x0 = torch.randn(16, DIM, dtype=torch.float64, requires_grad=True)
    live = {"now": 0, "peak": 0}

    class Saved:
        """What autograd keeps instead of the tensor; its lifetime is that of the saved tensor."""

        def __init__(self, t: Tensor):
            self.t, self.nbytes = t, t.numel() * t.element_size()
            live["now"] += self.nbytes
            live["peak"] = max(live["peak"], live["now"])

        def __del__(self):
            live["now"] -= self.nbytes

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda saved: saved.t):
        sol = solvers.sdesolve(sde, x0, solvers.UniformGrid(0.0, 1.0, steps), adjoint=adjoint, cost=cost,
                               generator=torch.Generator().manual_seed(0))
        after_forward = live["now"]
        (sol.cost.sum() + sol.xs.pow(2).sum()).backward()
    return after_forward, live["peak"]


def test_memory_saved_for_backward_does_not_grow_with_steps_beyond_the_states():
    state = 16 * DIM * 8  # bytes of one state (or one increment)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared machine
    try:
        discrete = {n: _saved_bytes(solvers.DiscreteAdjoint(), n) for n in (10, 50)}
        direct = {n: _saved_bytes(solvers.DirectAdjoint(), n) for n in (10, 50)}
    finally:
        torch.set_num_threads(threads)
    # the discrete adjoint's forward stores exactly x_0 .. x_N and dW_0 .. dW_{N-1}
    assert discrete[10][0] == (2 * 10 + 1) * state
    assert discrete[50][0] == (2 * 50 + 1) * state
    # its peak over the backward walk adds one node's activations, whatever N
    one_node = discrete[10][1] - discrete[10][0]
    assert one_node > 0
    assert discrete[50][1] - discrete[50][0] == one_node
    # backprop keeps every step's activations: ~N times one node's
    assert direct[50][1] >= 0.9 * 50 * one_node
    assert direct[50][1] / direct[10][1] > 4
    assert direct[50][1] / discrete[50][1] > 20


# ------------------------------------------------------------------------------------------------ errors


class Stratonovich(solvers.SDE):
    sde_type = solvers.SDEType.STRATONOVICH

    def drift(self, t, x):
        return -x

    def diffusion(self, t, x):
        return 0.1 * x


@pytest.mark.parametrize("solver, sde", [(solvers.Heun(), Stratonovich()), (solvers.TorchsdeEuler(), Tiny())],
                         ids=["Heun", "TorchsdeEuler"])
def test_discrete_adjoint_refuses_other_solvers_by_name(solver, sde):
    name = type(solver).__name__
    with pytest.raises(TypeError, match=f"DiscreteAdjoint is the exact adjoint of EulerMaruyama; got {name}"):
        solvers.sdesolve(sde, torch.ones(2, 2, dtype=torch.float64), solvers.UniformGrid(0.0, 1.0, 4),
                         solver=solver, adjoint=solvers.DiscreteAdjoint(),
                         generator=torch.Generator().manual_seed(0))
