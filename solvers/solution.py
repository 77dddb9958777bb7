"""What a solve is asked for and what it returns: :class:`SaveAt`, :class:`Solution`, path costs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SaveAt", "Solution", "SolveStats", "Transition", "PathCost"]


@dataclass(frozen=True)
class SaveAt:
    """Which grid nodes a solve returns.

    ``SaveAt()`` keeps the final state only, so memory does not grow with the number of steps;
    ``SaveAt(t0=True, steps=True)`` keeps every node (a whole trajectory); ``every=k`` keeps every k-th node.
    """

    t0: bool = False
    t1: bool = True
    steps: bool = False
    every: int = 0

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ValueError(f"SaveAt.every must be >= 0, got {self.every}")
        if not (self.t0 or self.t1 or self.steps or self.every):
            raise ValueError("SaveAt saves nothing: set t0, t1, steps or every")

    def indices(self, steps: int) -> tuple[int, ...]:
        """Indices of the saved nodes among ``0 .. steps``, increasing."""
        keep = set()
        if self.t0:
            keep.add(0)
        if self.t1:
            keep.add(steps)
        if self.steps:
            keep.update(range(1, steps + 1))
        if self.every:
            keep.update(range(0, steps + 1, self.every))
        return tuple(sorted(keep))


@dataclass(frozen=True)
class SolveStats:
    """Work a solve did: accepted steps, rejected steps (adaptive solvers), network evaluations."""

    steps: int
    rejected_steps: int = 0
    drift_evals: int = 0
    diffusion_evals: int = 0


@dataclass(frozen=True)
class Solution:
    """Result of :func:`solvers.sdesolve` or :func:`solvers.odesolve`.

    Attributes:
        ts: saved times, shape ``(S,)``.
        xs: saved states, shape ``(S, batch, *dims)``; ``xs[-1]`` is the last saved state.
        cost: the path cost summed over the steps, shape ``(batch,)``, or ``None`` when no cost was given.
        stats: the work done (:class:`SolveStats`).
    """

    ts: Tensor
    xs: Tensor
    cost: Tensor | None
    stats: SolveStats


@dataclass(frozen=True)
class Transition:
    """One step ``x0 -> x1`` of a fixed-grid solve, as a path cost sees it.

    ``drift1`` and ``diffusion1`` are the SDE's values at the *later* node ``(t1, x1)`` (which the solver
    needs for its next step anyway), ``extra1`` is :meth:`PathCost.node` at that node, and ``dw`` is the
    Brownian increment that drove the step. ``dt = t1 - t0`` is negative on a reversed grid.
    """

    t0: Tensor
    t1: Tensor
    dt: float
    x0: Tensor
    x1: Tensor
    dw: Tensor
    drift1: Tensor
    diffusion1: Tensor
    extra1: Any


class PathCost(nn.Module):
    """A cost summed along a fixed-grid path, ``C = sum_k c_k(transition_k)``, each term of shape ``(batch,)``.

    Each term sees the step's end points and the solver's evaluations at the later node (see
    :class:`Transition`), so a cost that needs the drift there costs no extra network evaluation.
    :meth:`node` computes further per-node quantities (a score network, say) once per node; every adjoint
    differentiates through both. Parameters of the cost receive gradients like the SDE's.
    """

    def node(self, t: Tensor, x: Tensor) -> Any:
        """Per-node quantities the cost needs at ``(t, x)``, passed on as ``Transition.extra1``."""
        return None

    def forward(self, step: Transition) -> Tensor:
        """The term ``c_k`` of one step, shape ``(batch,)``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(step)")


def check_state(x0: Any, name: str = "x0") -> Tensor:
    """Validate an initial state: a floating tensor of shape ``(batch, *dims)`` with finite values."""
    if not isinstance(x0, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x0.dtype}")
    if x0.dim() < 2:
        raise ValueError(f"{name} must have shape (batch, *dims) with at least 2 dimensions, got {tuple(x0.shape)}")
    if not bool(torch.isfinite(x0).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    return x0
