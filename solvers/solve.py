"""The one entry point for SDEs: :func:`sdesolve`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .adjoint import Adjoint, DirectAdjoint
from .euler import EulerMaruyama, Problem, SDESolver
from .grids import Grid, StratifiedGrid
from .sde import as_sde
from .solution import PathCost, SaveAt, Solution, check_state

__all__ = ["sdesolve"]


def sdesolve(
    sde: Any,
    x0: Tensor,
    grid: Grid,
    *,
    solver: SDESolver | None = None,
    brownian: Callable[[float, float], Tensor] | None = None,
    generator: torch.Generator | None = None,
    adjoint: Adjoint | None = None,
    save: SaveAt | None = None,
    cost: PathCost | None = None,
    check_finite: bool = True,
) -> Solution:
    """Solve ``dx = f(t, x) dt + g(t, x) dW`` from ``x0`` over ``grid``.

    Args:
        sde: a :class:`solvers.SDE`, or a torchsde-style module (``f``, ``g``, ``noise_type``, ``sde_type``).
        x0: initial state, shape ``(batch, *dims)``, floating dtype, on the device the solve runs on.
        grid: the time grid (:mod:`solvers.grids`); a reversed grid solves backward in time.
        solver: :class:`EulerMaruyama` (default) or a torchsde-backed solver (:mod:`solvers.adaptive`).
        brownian: a Brownian path ``(ta, tb) -> W(tb) - W(ta)`` (e.g. :class:`BrownianPath` or a
            ``torchsde.BrownianInterval``) to drive the solve; by default increments are drawn fresh.
        generator: source of the fresh increments (``None``: torch's global generator). Same seed, same result.
        adjoint: how gradients are taken (:class:`DirectAdjoint` by default).
        save: which nodes to return (default: the final state only).
        cost: a :class:`PathCost` summed over the steps; returned as ``Solution.cost``.
        check_finite: raise a ``FloatingPointError`` naming the first step whose state is not finite.

    Returns:
        a :class:`Solution` with ``ts`` ``(S,)``, ``xs`` ``(S, batch, *dims)``, ``cost`` and ``stats``.

    Example:
        >>> import solvers
        >>> class GBM(solvers.SDE):
        ...     def drift(self, t, x): return 0.1 * x
        ...     def diffusion(self, t, x): return 0.2 * x
        >>> sol = solvers.sdesolve(GBM(), torch.ones(4, 1), solvers.UniformGrid(0.0, 1.0, 100),
        ...                        save=solvers.SaveAt(t0=True, steps=True),
        ...                        generator=torch.Generator().manual_seed(0))
        >>> sol.ts.shape, sol.xs.shape
        (torch.Size([101]), torch.Size([101, 4, 1]))
    """
    sde = as_sde(sde)
    x0 = check_state(x0)
    if isinstance(grid, StratifiedGrid):
        raise TypeError("a StratifiedGrid is a distribution over grids: pass grid.sample(generator)")
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a solvers.Grid (UniformGrid, PowerGrid, ...), got {type(grid).__name__}")
    if generator is not None and brownian is not None:
        raise ValueError("pass either a Brownian path or a generator for fresh increments, not both")
    if generator is not None and generator.device.type != x0.device.type:
        raise ValueError(f"generator is on {generator.device}, the state on {x0.device}: put them on one device")
    solver = EulerMaruyama() if solver is None else solver
    adjoint = DirectAdjoint() if adjoint is None else adjoint
    nodes = grid.nodes()
    save = SaveAt() if save is None else save
    problem = Problem(sde, x0, nodes, save.indices(len(nodes) - 1), brownian, generator, cost)
    solver.check(problem)
    rng_state = _rng_state(generator, x0.device) if check_finite else None
    solution = adjoint.solve(solver, problem)
    if check_finite:
        _check_finite(solution, solver, problem, rng_state)
    return solution


def _rng_state(generator: torch.Generator | None, device: torch.device) -> Tensor | None:
    if generator is not None:
        return generator.get_state()
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _check_finite(solution: Solution, solver: SDESolver, problem: Problem, rng_state: Tensor | None) -> None:
    # One synchronisation after the loop instead of one per step: NaN and inf propagate to the end, and
    # only when they show up do we replay the solve (same noise) to name the first step that produced them.
    ok = bool(torch.isfinite(solution.xs).all())
    if solution.cost is not None:
        ok = ok and bool(torch.isfinite(solution.cost).all())
    if ok:
        return
    generator = problem.generator
    if generator is not None:
        generator = torch.Generator(device=generator.device)
        generator.set_state(rng_state)
    elif problem.x0.device.type == "cuda":
        torch.cuda.set_rng_state(rng_state, problem.x0.device)
    else:
        torch.set_rng_state(rng_state)
    steps = len(problem.nodes) - 1
    replay = Problem(problem.sde, problem.x0, problem.nodes, tuple(range(steps + 1)), problem.brownian,
                     generator, None)
    with torch.no_grad():
        states = solver.integrate(replay).saved
    for k, x in enumerate(states):
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                f"the state became NaN or infinite at step {k} (t={float(problem.nodes[k]):.6g}); "
                f"the drift or diffusion blew up or the step is too large"
            )
    raise FloatingPointError("the path cost became NaN or infinite while every state stayed finite")
