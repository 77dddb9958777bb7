"""Time discretizations as values.

A grid is an immutable description of the nodes ``t_0 < t_1 < ... < t_N`` a fixed-step solver visits.
It is passed to each solve and never stored in an SDE or a model, so the same model can be trained on one
grid and sampled on another. Nodes are computed in float64 from closed forms (never by accumulating
``t += dt``), so end points are exact and there are no sliver steps.

==========================  =========================================================================
grid                        nodes
==========================  =========================================================================
``UniformGrid``             ``t_i = t0 + (i/N)(t1 - t0)``
``PowerGrid``               ``t_i = (t0^e + (i/N)(t1^e - t0^e))^(1/e)``: uniform in ``u = t^e``
``ProfileGrid``             step sizes follow a smooth increasing profile, rescaled to end at ``t1``
``ExplicitGrid``            the given times
``grid.reversed()``         the same nodes walked from ``t_N`` down to ``t_0``
``StratifiedGrid(grid)``    a random grid: each interior node drawn uniformly in its own cell
==========================  =========================================================================

Example:
    >>> grid = PowerGrid(0.001, 0.05, steps=30, exponent=0.9)
    >>> ts = grid.times()
    >>> ts.shape, float(ts[0]), float(ts[-1])
    (torch.Size([31]), 0.001, 0.05)
    >>> grid.with_steps(10).steps
    10
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Grid",
    "UniformGrid",
    "PowerGrid",
    "ProfileGrid",
    "ExplicitGrid",
    "ReversedGrid",
    "StratifiedGrid",
]


def _check_interval(t0: float, t1: float, steps: int) -> None:
    if not (math.isfinite(t0) and math.isfinite(t1)):
        raise ValueError(f"grid end points must be finite, got t0={t0}, t1={t1}")
    if not t0 < t1:
        raise ValueError(f"grid must be strictly increasing: t0={t0} is not below t1={t1}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"a grid needs an integer number of steps >= 1, got {steps!r}")


def _check_nodes(nodes: np.ndarray) -> np.ndarray:
    if nodes.ndim != 1 or nodes.size < 2:
        raise ValueError(f"a grid needs a 1-D sequence of at least 2 times, got shape {nodes.shape}")
    bad = np.flatnonzero(~np.isfinite(nodes))
    if bad.size:
        raise ValueError(f"grid times must be finite; time {bad[0]} is {nodes[bad[0]]}")
    steps = np.diff(nodes)
    bad = np.flatnonzero(steps <= 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"grid times must be strictly increasing; "
            f"t[{i}]={float(nodes[i])!r} >= t[{i + 1}]={float(nodes[i + 1])!r}"
        )
    return nodes


class Grid(ABC):
    """A fixed time discretization ``t_0, ..., t_N`` (``N = steps``)."""

    steps: int
    t0: float  # first node visited
    t1: float  # last node visited

    @abstractmethod
    def nodes(self) -> np.ndarray:
        """The ``steps + 1`` times as a float64 numpy array, in the order a solver visits them."""

    def times(self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
        """The nodes as a tensor of shape ``(steps + 1,)``."""
        # a copy: as_tensor would alias ExplicitGrid's read-only array (a warning; writes would alter it)
        return torch.tensor(self.nodes(), dtype=dtype, device=device)

    @abstractmethod
    def with_steps(self, steps: int) -> Grid:
        """The same kind of grid on the same interval with another number of steps."""

    @property
    def increasing(self) -> bool:
        """Whether the solve runs forward in time."""
        return True

    def reversed(self) -> Grid:
        """The same nodes visited backward, from ``t_N`` down to ``t_0``."""
        return ReversedGrid(self)

    def warp(self, t: np.ndarray) -> np.ndarray:
        """Coordinate in which this grid's nodes are (roughly) equally spaced; random grids stratify in it."""
        return t

    def unwarp(self, u: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`warp`."""
        return u

    def stratified(self) -> StratifiedGrid:
        """A random version of this grid, drawn afresh with :meth:`StratifiedGrid.sample`."""
        return StratifiedGrid(self)


@dataclass(frozen=True)
class UniformGrid(Grid):
    """``steps`` equal steps from ``t0`` to ``t1``."""

    t0: float
    t1: float
    steps: int

    def __post_init__(self) -> None:
        _check_interval(self.t0, self.t1, self.steps)

    def nodes(self) -> np.ndarray:
        i = np.arange(self.steps + 1, dtype=np.float64)
        nodes = self.t0 + (i / self.steps) * (self.t1 - self.t0)
        nodes[-1] = self.t1  # exact end point whatever the rounding
        return _check_nodes(nodes)

    def with_steps(self, steps: int) -> UniformGrid:
        return dataclasses.replace(self, steps=steps)


@dataclass(frozen=True)
class PowerGrid(Grid):
    """Uniform in ``u = t**exponent``: ``t_i = (t0^e + (i/N)(t1^e - t0^e))^(1/e)``.

    With ``e < 1`` the steps grow with ``t``: DiffFlow's 2D setting is ``PowerGrid(0.001, 0.05, 30, 0.9)``,
    whose steps grow from 0.00127 to 0.00179. Needs ``t0 >= 0``.
    """

    t0: float
    t1: float
    steps: int
    exponent: float = 0.9

    def __post_init__(self) -> None:
        _check_interval(self.t0, self.t1, self.steps)
        if not (math.isfinite(self.exponent) and self.exponent > 0):
            raise ValueError(f"PowerGrid exponent must be finite and positive, got {self.exponent}")
        if self.t0 < 0:
            raise ValueError(f"PowerGrid needs t0 >= 0 (it takes t**exponent), got t0={self.t0}")

    def warp(self, t: np.ndarray) -> np.ndarray:
        return np.power(t, self.exponent)

    def unwarp(self, u: np.ndarray) -> np.ndarray:
        return np.power(u, 1.0 / self.exponent)

    def nodes(self) -> np.ndarray:
        u0, u1 = self.warp(np.float64(self.t0)), self.warp(np.float64(self.t1))
        i = np.arange(self.steps + 1, dtype=np.float64)
        nodes = self.unwarp(u0 + (i / self.steps) * (u1 - u0))
        nodes[0], nodes[-1] = self.t0, self.t1
        return _check_nodes(nodes)

    def with_steps(self, steps: int) -> PowerGrid:
        return dataclasses.replace(self, steps=steps)


# DiffFlow's image-setting profile: relative step size h at relative position s along the grid.
DIFFFLOW_PROFILE: tuple[tuple[float, float], ...] = (
    (0.0, 1e-4), (0.1, 0.05), (0.2, 0.10), (0.4, 0.6), (0.7, 0.93), (0.9, 0.98), (1.0, 1.0),
)


@dataclass(frozen=True)
class ProfileGrid(Grid):
    """Step sizes follow a smooth increasing profile ``h(s)``, ``s in [0, 1]``, rescaled to span the interval.

    ``h`` is the monotone cubic (PCHIP) interpolant through ``knots``; step ``i`` is proportional to
    ``h((i + 1/2) / N)`` and ``t_i = t0 + (t1 - t0) * sum_{j<i} h_j / sum_j h_j``. The default knots are
    DiffFlow's image profile (tiny steps near the data, large ones near the noise).
    """

    t0: float
    t1: float
    steps: int
    knots: tuple[tuple[float, float], ...] = field(default=DIFFFLOW_PROFILE)

    def __post_init__(self) -> None:
        _check_interval(self.t0, self.t1, self.steps)
        s, h = np.asarray(self.knots, dtype=np.float64).T
        if s[0] != 0.0 or s[-1] != 1.0 or np.any(np.diff(s) <= 0):
            raise ValueError("ProfileGrid knots must have strictly increasing positions from 0 to 1")
        if np.any(h <= 0) or not np.all(np.isfinite(h)):
            raise ValueError("ProfileGrid knot step sizes must be finite and positive")

    def nodes(self) -> np.ndarray:
        from scipy.interpolate import PchipInterpolator

        s, h = np.asarray(self.knots, dtype=np.float64).T
        sizes = PchipInterpolator(s, h)((np.arange(self.steps) + 0.5) / self.steps)
        cumulative = np.concatenate([[0.0], np.cumsum(sizes)])
        nodes = self.t0 + (self.t1 - self.t0) * cumulative / cumulative[-1]
        nodes[-1] = self.t1
        return _check_nodes(nodes)

    def with_steps(self, steps: int) -> ProfileGrid:
        return dataclasses.replace(self, steps=steps)


class ExplicitGrid(Grid):
    """The given strictly increasing times, e.g. ``ExplicitGrid([0.0, 0.1, 0.5, 1.0])``.

    :meth:`with_steps` resamples by linear interpolation in the node index, keeping both end points.
    """

    def __init__(self, ts: Any):
        if isinstance(ts, Tensor):
            ts = ts.detach().to("cpu", torch.float64).numpy()
        nodes = _check_nodes(np.array(ts, dtype=np.float64, copy=True))
        nodes.flags.writeable = False
        self._nodes = nodes
        self.steps = nodes.size - 1
        self.t0, self.t1 = float(nodes[0]), float(nodes[-1])

    def nodes(self) -> np.ndarray:
        return self._nodes

    def with_steps(self, steps: int) -> ExplicitGrid:
        _check_interval(self.t0, self.t1, steps)
        position = np.linspace(0.0, self.steps, steps + 1)
        return ExplicitGrid(np.interp(position, np.arange(self.steps + 1), self._nodes))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExplicitGrid) and np.array_equal(self._nodes, other._nodes)

    def __hash__(self) -> int:
        return hash(self._nodes.tobytes())

    def __repr__(self) -> str:
        return f"ExplicitGrid(steps={self.steps}, t0={self.t0}, t1={self.t1})"


@dataclass(frozen=True)
class ReversedGrid(Grid):
    """``base``'s nodes visited from the last to the first: a solve runs backward in time."""

    base: Grid

    @property
    def steps(self) -> int:  # type: ignore[override]
        return self.base.steps

    @property
    def t0(self) -> float:  # type: ignore[override]
        return self.base.t1

    @property
    def t1(self) -> float:  # type: ignore[override]
        return self.base.t0

    @property
    def increasing(self) -> bool:
        return not self.base.increasing

    def nodes(self) -> np.ndarray:
        return self.base.nodes()[::-1].copy()

    def with_steps(self, steps: int) -> ReversedGrid:
        return ReversedGrid(self.base.with_steps(steps))

    def reversed(self) -> Grid:
        return self.base

    def stratified(self) -> StratifiedGrid:
        raise ValueError("stratify the forward grid, then reverse the sample: grid.stratified().sample(g).reversed()")


@dataclass(frozen=True)
class StratifiedGrid:
    """A random grid around ``base``: end points fixed, interior node ``i`` drawn uniformly (in ``base``'s
    warped coordinate) between the midpoints to its neighbours. Every cell holds exactly one node, so the
    draw is always strictly increasing; its average is close to ``base``. Draw a fresh grid per batch.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> grid = PowerGrid(0.001, 0.05, 30).stratified().sample(g)
        >>> grid.steps
        30
    """

    base: Grid

    def __post_init__(self) -> None:
        if isinstance(self.base, ReversedGrid):
            raise ValueError("stratify the forward grid, then reverse the sample")

    @property
    def steps(self) -> int:
        return self.base.steps

    def with_steps(self, steps: int) -> StratifiedGrid:
        return StratifiedGrid(self.base.with_steps(steps))

    def sample(self, generator: torch.Generator | None = None) -> ExplicitGrid:
        """One random grid; the same generator state gives the same grid."""
        u = self.base.warp(self.base.nodes())
        if u.size > 2:
            device = generator.device if generator is not None else "cpu"
            r = torch.rand(u.size - 2, generator=generator, dtype=torch.float64, device=device).cpu().numpy()
            lo = 0.5 * (u[:-2] + u[1:-1])
            hi = 0.5 * (u[1:-1] + u[2:])
            u = u.copy()
            u[1:-1] = lo + r * (hi - lo)
        nodes = np.array(self.base.unwarp(u), dtype=np.float64)  # a copy: base nodes may be read-only
        ends = self.base.nodes()
        nodes[0], nodes[-1] = ends[0], ends[-1]
        return ExplicitGrid(nodes)
