"""Sampling from a trained DiffFlow.

Stochastic: Euler–Maruyama on the backward SDE from ``x_N ~ N(0, I)`` at ``T`` down the grid. The last
step, from ``t_1`` to ``t_0``, returns the mean without noise (the denoising step)::

    x_{i} = x_{i+1} - [f(x_{i+1}, t_{i+1}) - g_{i+1}^2 s(x_{i+1}, t_{i+1})] dt_i + g_{i+1} sqrt(dt_i) dB_i

Any grid and number of steps works; a model trained on random grids transfers best to other grids.
Deterministic: the probability-flow ODE integrated from ``T`` to ``t_0``.

Example:
    >>> import solvers
    >>> from sdeflow.model import DiffFlow
    >>> from sdeflow.nets import TimeMLP
    >>> model = DiffFlow(TimeMLP(2), TimeMLP(2))
    >>> grid = solvers.PowerGrid(0.001, 0.05, 30)
    >>> x = sample(model, 100, (2,), grid, generator=torch.Generator().manual_seed(0))
    >>> x.shape
    torch.Size([100, 2])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import solvers

from .model import DiffFlow

__all__ = ["Samples", "sample", "sample_trajectory", "sample_ode", "prior_sample"]


def prior_sample(
    n: int, shape: Sequence[int], *, generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
) -> Tensor:
    """``n`` draws of ``N(0, I)`` with shape ``(n, *shape)``."""
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    return torch.randn((n, *shape), generator=generator, dtype=dtype, device=device)


@dataclass(frozen=True)
class Samples:
    """A backward trajectory: ``ts`` ``(S,)`` decreasing from ``T`` to ``t_0``, ``xs`` ``(S, n, *dims)``;
    ``xs[-1]`` are the samples."""

    ts: Tensor
    xs: Tensor


def sample_trajectory(
    model: DiffFlow,
    n: int,
    shape: Sequence[int],
    grid: solvers.Grid,
    *,
    generator: torch.Generator | None = None,
    save: solvers.SaveAt | None = None,
    denoise: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Samples:
    """Backward-SDE samples on ``grid`` (increasing; walked from ``T`` down), keeping the nodes in ``save``
    (default: the final samples only; ``SaveAt(t0=True, steps=True)`` keeps the whole path)."""
    _check_sampling_grid(grid)
    save = solvers.SaveAt() if save is None else save
    nodes = grid.nodes()
    x_T = prior_sample(n, shape, generator=generator, dtype=dtype, device=device)
    with torch.no_grad():
        stochastic = nodes[1:] if denoise else nodes
        steps = len(stochastic) - 1
        keep = save.indices(steps + (1 if denoise else 0))
        # backward-node index -> (time, state); the whole path is kept only when an inner node is asked for
        if steps >= 1:
            inner = any(i < steps for i in keep)
            sub_save = solvers.SaveAt(t0=True, steps=True) if inner else solvers.SaveAt()
            sub = solvers.ExplicitGrid(stochastic).reversed()
            path = solvers.sdesolve(model.backward_sde(), x_T, sub, generator=generator, save=sub_save)
            at = dict(zip(sub_save.indices(steps), zip(path.ts.unbind(0), path.xs.unbind(0), strict=True), strict=True))
        else:
            at = {0: (torch.tensor(nodes[1], dtype=dtype, device=device), x_T)}
        if denoise:
            t1, x1 = at[steps]
            x0 = x1 - model.backward_sde().drift(t1, x1) * float(nodes[1] - nodes[0])
            at[steps + 1] = (torch.tensor(nodes[0], dtype=dtype, device=device), x0)
    return Samples(torch.stack([at[i][0] for i in keep]), torch.stack([at[i][1] for i in keep]))


def sample(
    model: DiffFlow,
    n: int,
    shape: Sequence[int],
    grid: solvers.Grid,
    *,
    generator: torch.Generator | None = None,
    denoise: bool = True,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """``n`` samples ``(n, *shape)`` from the backward SDE on ``grid`` (see the module docstring)."""
    return sample_trajectory(model, n, shape, grid, generator=generator, denoise=denoise,
                             dtype=dtype, device=device).xs[-1]


def sample_ode(
    model: DiffFlow,
    n: int,
    shape: Sequence[int],
    grid: solvers.Grid,
    *,
    generator: torch.Generator | None = None,
    solver: solvers.ODESolver | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Deterministic samples: ``x_N ~ N(0, I)`` pushed by the probability-flow ODE ``dx/dt = f - g^2 s / 2``
    from ``T`` down to ``t_0`` along ``grid`` (increasing; walked backward). ``solver`` defaults to
    :class:`solvers.RK4` on the grid's nodes; an adaptive solver (``solvers.Dopri5``) uses them as output
    times only.

    Example:
        >>> from sdeflow.nets import TimeMLP
        >>> model = DiffFlow(TimeMLP(2), TimeMLP(2))
        >>> sample_ode(model, 10, (2,), solvers.PowerGrid(0.001, 0.05, 5),
        ...            generator=torch.Generator().manual_seed(0)).shape
        torch.Size([10, 2])
    """
    _check_sampling_grid(grid)
    x_T = prior_sample(n, shape, generator=generator, dtype=dtype, device=device)
    solver = solvers.RK4() if solver is None else solver
    with torch.no_grad():
        return solvers.odesolve(model.probability_flow(), x_T, grid.reversed(), solver=solver).xs[-1]


def _check_sampling_grid(grid: solvers.Grid) -> None:
    if isinstance(grid, solvers.StratifiedGrid):  # a distribution over grids has no nodes of its own
        raise TypeError("a StratifiedGrid is a distribution over grids: pass grid.sample(generator)")
    if not grid.increasing:
        raise ValueError("pass the increasing grid; sampling walks it from T down to t_0 itself")
