"""Ordinary differential equations through torchdiffeq, and log-densities of neural ODEs.

An ODE on states ``x`` of shape ``(batch, *dims)``::

    dx/dt = v(t, x)

is an :class:`ODE` subclass implementing ``velocity(t, x)``, or any callable ``(t, x) -> dx/dt``.
:func:`odesolve` integrates it over a grid (:mod:`solvers.grids`) with a solver object:

================  =====  ===========================================================================
solver            order  steps
================  =====  ===========================================================================
``Euler()``       1      exactly on the grid nodes, one velocity evaluation per step
``Midpoint()``    2      exactly on the grid nodes, two evaluations per step
``RK4()``         4      exactly on the grid nodes (the 3/8 rule), four evaluations per step
``AdaptiveHeun``  2      adaptive, error-controlled by ``rtol``/``atol``; the grid gives the output times
``Bosh3``         3      adaptive (Bogacki–Shampine)
``Dopri5``        5      adaptive (Dormand–Prince)
================  =====  ===========================================================================

Gradients are taken by backprop through the solver's operations (the default) or, with
``adjoint=ODEAdjoint(...)``, by ``torchdiffeq.odeint_adjoint``: a second ODE solved backward in time, whose
memory does not grow with the number of steps (Chen et al. 2018, "Neural Ordinary Differential Equations").

:func:`log_density` integrates the instantaneous change of variables alongside the state, for continuous
normalizing flows (FFJORD, Grathwohl et al. 2019) and probability-flow likelihoods.

A decreasing grid (``grid.reversed()``) solves backward in time. torchdiffeq would flip such a solve itself,
but its adjoint then hands the fixed-grid step placement (the ``grid_constructor``) times in two different
sign conventions; so we flip ourselves: in ``s = -t`` the solve always runs forward, on ``-nodes``.
torchdiffeq's method strings live only in this module.

Example:
    >>> import solvers
    >>> sol = solvers.odesolve(lambda t, x: -x, torch.ones(2, 3), solvers.UniformGrid(0.0, 1.0, 20),
    ...                        solver=solvers.RK4(), save=solvers.SaveAt(t0=True, steps=True))
    >>> sol.xs.shape, sol.stats.drift_evals
    (torch.Size([21, 2, 3]), 80)
    >>> round(float(sol.xs[-1, 0, 0]), 6) == round(math.exp(-1.0), 6)
    True
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torchdiffeq
from torch import Tensor, nn

from .grids import Grid, StratifiedGrid
from .solution import SaveAt, Solution, SolveStats, check_state

__all__ = [
    "ODE",
    "FunctionODE",
    "as_ode",
    "ODESolver",
    "FixedGridODESolver",
    "AdaptiveODESolver",
    "Euler",
    "Midpoint",
    "RK4",
    "AdaptiveHeun",
    "Bosh3",
    "Dopri5",
    "ODEAdjoint",
    "odesolve",
    "TraceEstimator",
    "ExactTrace",
    "HutchinsonTrace",
    "LogDensity",
    "log_density",
]


# ----------------------------------------------------------------------------------------------------------
# The equation
# ----------------------------------------------------------------------------------------------------------


class ODE(nn.Module):
    """Base class of ODEs ``dx/dt = velocity(t, x)``.

    ``t`` is a 0-dim tensor of the state's dtype and device; ``x`` has shape ``(batch, *dims)`` and the
    velocity must have the same shape. Parameters of the module receive gradients from every solve.

    Example:
        >>> class Decay(ODE):
        ...     def velocity(self, t, x):
        ...         return -x
        >>> Decay().velocity(torch.tensor(0.0), torch.ones(3, 2)).shape
        torch.Size([3, 2])
    """

    def velocity(self, t: Tensor, x: Tensor) -> Tensor:
        """``v(t, x)``, shape ``x.shape``."""
        raise NotImplementedError(f"{type(self).__name__} must implement velocity(t, x)")


class FunctionODE(ODE):
    """A callable ``fn(t, x) -> dx/dt`` seen as an :class:`ODE`.

    When ``fn`` is an ``nn.Module`` it is registered as a submodule, so its parameters are this ODE's (the
    adjoint finds them). The tensors a plain function captures are invisible to ``odeint_adjoint``, so
    :class:`ODEAdjoint` refuses plain functions; backprop (the default) differentiates them fine.
    """

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def velocity(self, t: Tensor, x: Tensor) -> Tensor:
        return self.fn(t, x)


def as_ode(ode: Any) -> ODE:
    """Return ``ode`` as an :class:`ODE`: ours pass through, callables ``(t, x) -> dx/dt`` are wrapped.

    Raises:
        TypeError: if ``ode`` is not callable, or is a module without a ``forward`` (an SDE, say).
    """
    if isinstance(ode, ODE):
        return ode
    if isinstance(ode, nn.Module) and type(ode).forward is nn.Module.forward:
        raise TypeError(
            f"{type(ode).__name__} is a module without forward(t, x); subclass solvers.ODE and implement "
            f"velocity(t, x), or pass a callable (t, x) -> dx/dt"
        )
    if not callable(ode):
        raise TypeError(
            f"expected a solvers.ODE or a callable (t, x) -> dx/dt, got a {type(ode).__name__}"
        )
    return FunctionODE(ode)


def _positive(value: Any) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


def _check_velocity(v: Any, x: Tensor) -> Tensor:
    if not isinstance(v, Tensor):
        raise TypeError(f"the velocity must return a tensor, got {type(v).__name__}")
    if v.shape != x.shape:
        raise ValueError(
            f"the velocity returned shape {tuple(v.shape)} for a state of shape {tuple(x.shape)}; "
            f"dx/dt must have the state's shape"
        )
    return v


# ----------------------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------------------


class ODESolver(ABC):
    """Base of ODE solvers. Each declares its ``order`` (the global error is ``O(h^order)``; tests fit it)."""

    order: ClassVar[int]
    adaptive: ClassVar[bool]
    _method: ClassVar[str]  # torchdiffeq's name for the method

    @abstractmethod
    def _options(self, nodes: Tensor, outputs: Tensor) -> dict[str, Any]:
        """torchdiffeq ``options`` for a solve on the grid ``nodes`` returning states at ``outputs`` (both
        increasing, in the solve's own time)."""

    @abstractmethod
    def _tolerances(self) -> tuple[float, float]:
        """``(rtol, atol)`` handed to torchdiffeq (ignored by fixed-grid methods)."""


class _NodesBetween:
    """torchdiffeq ``grid_constructor``: the steps of a fixed-grid solve are the grid nodes between the first
    and last requested times, in their order, so every step lands exactly on a node.

    Called with the requested output times ``t`` (the forward solve) or with one interval ``[t_i, t_{i-1}]``
    (each backward solve of the adjoint), always in the solve's own increasing time ``s``. The output times
    are themselves nodes, picked from the same tensor, so torchdiffeq's exact end point check holds and its
    output "interpolation" returns the step's end state unchanged.
    """

    def __init__(self, nodes: Tensor):
        self.nodes = nodes

    def __call__(self, func: Any, y0: Tensor, t: Tensor) -> Tensor:
        lo, hi = torch.minimum(t[0], t[-1]), torch.maximum(t[0], t[-1])
        inside = self.nodes[(self.nodes >= lo) & (self.nodes <= hi)]
        return inside if bool(t[0] <= t[-1]) else inside.flip(0)


class FixedGridODESolver(ODESolver):
    """A Runge–Kutta method that steps exactly from grid node to grid node (no error control)."""

    adaptive: ClassVar[bool] = False

    def _options(self, nodes: Tensor, outputs: Tensor) -> dict[str, Any]:
        return {"grid_constructor": _NodesBetween(nodes)}

    def _tolerances(self) -> tuple[float, float]:
        return 0.0, 0.0


@dataclass(frozen=True)
class Euler(FixedGridODESolver):
    """Explicit Euler, ``x_{k+1} = x_k + h_k v(t_k, x_k)``: order 1, one evaluation per step."""

    order: ClassVar[int] = 1
    _method: ClassVar[str] = "euler"


@dataclass(frozen=True)
class Midpoint(FixedGridODESolver):
    """Explicit midpoint, ``x_{k+1} = x_k + h v(t_k + h/2, x_k + (h/2) v(t_k, x_k))``: order 2."""

    order: ClassVar[int] = 2
    _method: ClassVar[str] = "midpoint"


@dataclass(frozen=True)
class RK4(FixedGridODESolver):
    """Classical fourth-order Runge–Kutta (torchdiffeq's 3/8-rule variant): order 4, four evaluations."""

    order: ClassVar[int] = 4
    _method: ClassVar[str] = "rk4"


@dataclass(frozen=True)
class AdaptiveODESolver(ODESolver):
    """An embedded Runge–Kutta pair with step-size control.

    A step is accepted when ``rms(err_i / (atol + rtol * max(|x_i|, |x'_i|))) <= 1``. The grid gives only
    the interval and the output times (the nodes :class:`SaveAt` keeps); the steps are the solver's own,
    shortened where needed to land exactly on each output time.

    Attributes:
        rtol, atol: relative and absolute tolerances.
        max_steps: most steps between two consecutive output times (``None``: unbounded).
    """

    adaptive: ClassVar[bool] = True

    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if not _positive(value):
                raise ValueError(f"{type(self).__name__}.{name} must be finite and positive, got {value!r}")
        steps = self.max_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"{type(self).__name__}.max_steps must be a positive int or None, got {steps!r}")

    def _options(self, nodes: Tensor, outputs: Tensor) -> dict[str, Any]:
        # Steps are clipped to land on every output time (torchdiffeq's step_t), so saved states are solver
        # steps under error control, not dense-output interpolants: Bosh3's and AdaptiveHeun's interpolants
        # are only second order and would dominate the error at tight tolerances.
        options: dict[str, Any] = {"step_t": outputs}
        if self.max_steps is not None:
            options["max_num_steps"] = self.max_steps
        return options

    def _tolerances(self) -> tuple[float, float]:
        return float(self.rtol), float(self.atol)


@dataclass(frozen=True)
class AdaptiveHeun(AdaptiveODESolver):
    """Heun's method with an Euler error estimate: order 2 (see :class:`AdaptiveODESolver`)."""

    order: ClassVar[int] = 2
    _method: ClassVar[str] = "adaptive_heun"


@dataclass(frozen=True)
class Bosh3(AdaptiveODESolver):
    """Bogacki–Shampine 3(2): order 3 (see :class:`AdaptiveODESolver`)."""

    order: ClassVar[int] = 3
    _method: ClassVar[str] = "bosh3"


@dataclass(frozen=True)
class Dopri5(AdaptiveODESolver):
    """Dormand–Prince 5(4): order 5; the usual choice for likelihoods (see :class:`AdaptiveODESolver`).

    Example:
        >>> Dopri5(rtol=1e-7, atol=1e-9).order
        5
    """

    order: ClassVar[int] = 5
    _method: ClassVar[str] = "dopri5"


@dataclass(frozen=True)
class ODEAdjoint:
    """Gradients by the continuous adjoint (``torchdiffeq.odeint_adjoint``): memory constant in the steps.

    The forward solve keeps no graph; the backward pass solves the adjoint ODE
    ``da/dt = -a^T dv/dx``, ``dL/dtheta = -int a^T dv/dtheta dt`` from the last output time to the first,
    re-solving ``x`` backward alongside. Gradients match backprop's up to the two solves' errors.

    Attributes:
        rtol, atol: tolerances of the backward solve (default: the forward solver's). Only for an adaptive
            backward solver.
        solver: the backward solver (default: the forward one). A fixed-grid backward solver steps on the
            forward grid's nodes.
        seminorm: leave the parameter-gradient integrals out of the backward error control (Kidger et al.
            2021, "Hey, that's not an ODE"): fewer backward steps, usually the same accuracy.

    Gradients reach the parameters of the :class:`ODE` module (and of modules wrapped by
    :class:`FunctionODE`) and the initial state; plain functions are refused (their captured tensors are
    invisible to the adjoint).
    """

    rtol: float | None = None
    atol: float | None = None
    solver: ODESolver | None = None
    seminorm: bool = False

    def __post_init__(self) -> None:
        if self.solver is not None and not isinstance(self.solver, ODESolver):
            raise TypeError(f"ODEAdjoint.solver must be an ODESolver, got {type(self.solver).__name__}")
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if value is not None and not _positive(value):
                raise ValueError(f"ODEAdjoint.{name} must be a finite positive number or None, got {value!r}")


# ----------------------------------------------------------------------------------------------------------
# The solve
# ----------------------------------------------------------------------------------------------------------


class _Dynamics(nn.Module):
    """Right-hand side handed to torchdiffeq, in the solve's own time ``s = sign * t``:
    ``dx/ds = sign * v(sign * s, x)``. Counts evaluations (and, through torchdiffeq's callbacks, accepted
    and rejected steps of adaptive solvers). Its parameters are exactly the ODE's."""

    def __init__(self, ode: ODE, sign: float):
        super().__init__()
        self.ode = ode
        self.sign = sign
        self.evals = 0
        self.accepted = 0
        self.rejected = 0

    def count_steps(self) -> None:
        # Instance attributes, not methods: torchdiffeq warns when a fixed-grid method meets these callbacks.
        self.callback_accept_step = self._accept
        self.callback_reject_step = self._reject

    def _accept(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.accepted += 1

    def _reject(self, t0: Tensor, y0: Tensor, dt: Tensor) -> None:
        self.rejected += 1

    def time(self, s: Tensor) -> Tensor:
        return s if self.sign > 0 else -s

    def forward(self, s: Tensor, x: Tensor) -> Tensor:
        self.evals += 1
        v = _check_velocity(self.ode.velocity(self.time(s), x), x)
        return v if self.sign > 0 else -v


@dataclass(frozen=True)
class _Run:
    """What :func:`_integrate` did: states at the requested nodes (a tensor, or a tuple for a tuple state),
    the requested node indices, and the work."""

    ys: Any
    indices: tuple[int, ...]
    stats: SolveStats


def _check_grid(grid: Any) -> Grid:
    if isinstance(grid, StratifiedGrid):
        raise TypeError("a StratifiedGrid is a distribution over grids: pass grid.sample(generator)")
    if not isinstance(grid, Grid):
        raise TypeError(f"grid must be a solvers.Grid (UniformGrid, PowerGrid, ...): {type(grid).__name__}")
    return grid


def _check_solver(solver: Any) -> ODESolver:
    if solver is None:
        return Dopri5()
    if not isinstance(solver, ODESolver):
        raise TypeError(
            f"solver must be an ODE solver object (Euler(), Midpoint(), RK4(), Dopri5(), ...), got {solver!r}"
        )
    return solver


def _check_adjoint(adjoint: Any, ode: ODE) -> ODEAdjoint | None:
    if adjoint is not None and not isinstance(adjoint, ODEAdjoint):
        raise TypeError(
            f"adjoint must be None (backprop through the solver) or ODEAdjoint(...), got {adjoint!r}"
        )
    if adjoint is not None and isinstance(ode, FunctionODE) and not isinstance(ode.fn, nn.Module):
        # The adjoint differentiates only the parameters it is given; those a plain function closes over
        # would silently get no gradient (torchdiffeq refuses such functions too).
        raise TypeError(
            "ODEAdjoint needs the ODE's parameters: pass a solvers.ODE subclass or an nn.Module, not a plain "
            "function"
        )
    return adjoint


def _integrate(func: _Dynamics, y0: Any, grid: Grid, solver: ODESolver, save: tuple[int, ...],
               adjoint: ODEAdjoint | None, device: torch.device) -> _Run:
    """Solve from node 0 to the last saved node; return the states at node 0 and at every saved node."""
    nodes = grid.nodes()
    # Times in float64 whatever the state's dtype: torchdiffeq casts t to the state's dtype when it calls
    # the velocity, and keeps step sizes in the time's dtype.
    s_nodes = torch.as_tensor(func.sign * nodes, dtype=torch.float64, device=device)
    indices = tuple(sorted({0, *save}))
    if len(indices) == 1:  # nothing to integrate: only x(t0) is asked for
        ys = tuple(y[None] for y in y0) if isinstance(y0, tuple) else y0[None]
        return _Run(ys, indices, SolveStats(steps=0))
    t = s_nodes[list(indices)]
    if solver.adaptive:
        func.count_steps()
    rtol, atol = solver._tolerances()
    try:
        if adjoint is None:
            ys = torchdiffeq.odeint(func, y0, t, rtol=rtol, atol=atol, method=solver._method,
                                    options=solver._options(s_nodes, t))
        else:
            backward = solver if adjoint.solver is None else adjoint.solver
            if not backward.adaptive and (adjoint.rtol is not None or adjoint.atol is not None):
                raise ValueError(
                    f"ODEAdjoint has tolerances but its backward solver {type(backward).__name__} is "
                    f"fixed-grid; pass an adaptive ODEAdjoint.solver or drop rtol/atol"
                )
            back_rtol, back_atol = backward._tolerances()
            adjoint_options = backward._options(s_nodes, t)
            if adjoint.seminorm:
                adjoint_options["norm"] = "seminorm"
            ys = torchdiffeq.odeint_adjoint(
                func, y0, t, rtol=rtol, atol=atol, method=solver._method, options=solver._options(s_nodes, t),
                adjoint_rtol=back_rtol if adjoint.rtol is None else adjoint.rtol,
                adjoint_atol=back_atol if adjoint.atol is None else adjoint.atol,
                adjoint_method=backward._method, adjoint_options=adjoint_options,
                adjoint_params=tuple(func.parameters()),
            )
    except AssertionError as error:  # torchdiffeq reports step underflow and max_num_steps by assert
        raise RuntimeError(f"{type(solver).__name__} failed: {error}") from error
    steps = func.accepted if solver.adaptive else indices[-1]
    return _Run(ys, indices, SolveStats(steps=steps, rejected_steps=func.rejected, drift_evals=func.evals))


def _saved(ys: Tensor, indices: Sequence[int], save: Sequence[int]) -> Tensor:
    position = {index: k for k, index in enumerate(indices)}
    return ys[[position[i] for i in save]]


def odesolve(
    ode: Any,
    x0: Tensor,
    grid: Grid,
    *,
    solver: ODESolver | None = None,
    save: SaveAt | None = None,
    adjoint: ODEAdjoint | None = None,
    check_finite: bool = True,
) -> Solution:
    """Solve ``dx/dt = v(t, x)``, ``x(t_0) = x0``, over ``grid``.

    Args:
        ode: an :class:`ODE`, or a callable ``(t, x) -> dx/dt`` (an ``nn.Module`` keeps its parameters).
        x0: initial state, shape ``(batch, *dims)``, floating dtype, on the device the solve runs on.
        grid: the time grid; a reversed grid (``grid.reversed()``) solves backward in time. Fixed-grid
            solvers step exactly on its nodes; adaptive ones use it for the interval and output times.
        solver: :class:`Euler`, :class:`Midpoint`, :class:`RK4`, :class:`AdaptiveHeun`, :class:`Bosh3` or
            :class:`Dopri5` (default ``Dopri5()``, ``rtol = atol = 1e-5``).
        save: which nodes to return (default: the final state only).
        adjoint: ``None`` backpropagates through the solver's operations; :class:`ODEAdjoint` takes
            gradients by the continuous adjoint in constant memory.
        check_finite: raise a ``FloatingPointError`` when a saved state is NaN or infinite.

    Returns:
        a :class:`Solution` with ``ts`` ``(S,)`` (the saved grid times, exactly), ``xs``
        ``(S, batch, *dims)``, ``cost`` ``None`` and ``stats`` (``steps``: grid steps, or accepted adaptive
        steps; ``rejected_steps``; ``drift_evals``: velocity evaluations of the forward solve).

    Example:
        >>> import solvers
        >>> grid = solvers.UniformGrid(0.0, 1.0, 10)
        >>> dopri = solvers.Dopri5(rtol=1e-8, atol=1e-8)
        >>> x1 = solvers.odesolve(lambda t, x: x, torch.ones(1, 1), grid, solver=dopri).xs[-1]
        >>> back = solvers.odesolve(lambda t, x: x, x1, grid.reversed(), solver=dopri)
        >>> round(float(x1), 5), round(float(back.xs[-1]), 5)
        (2.71828, 1.0)
    """
    ode = as_ode(ode)
    x0 = check_state(x0)
    grid = _check_grid(grid)
    solver = _check_solver(solver)
    adjoint = _check_adjoint(adjoint, ode)
    nodes = grid.nodes()
    save_indices = (SaveAt() if save is None else save).indices(len(nodes) - 1)
    func = _Dynamics(ode, 1.0 if grid.increasing else -1.0)
    run = _integrate(func, x0, grid, solver, save_indices, adjoint, x0.device)
    xs = _saved(run.ys, run.indices, save_indices)
    if check_finite and not bool(torch.isfinite(xs).all()):
        raise FloatingPointError(
            f"the {type(solver).__name__} solve produced NaN or infinite states; the velocity blew up or the "
            f"steps are too large"
        )
    ts = grid.times(dtype=x0.dtype, device=x0.device)[list(save_indices)]
    return Solution(ts=ts, xs=xs, cost=None, stats=run.stats)


# ----------------------------------------------------------------------------------------------------------
# Log-density
# ----------------------------------------------------------------------------------------------------------


class TraceEstimator(ABC):
    """How ``tr(dv/dx)`` is computed inside :func:`log_density`, per batch element.

    The velocity must act on each batch element separately (no mixing across the batch, e.g. batch
    norm in training mode): the trace is read from derivatives of batch sums.
    """

    @abstractmethod
    def draw(self, x: Tensor) -> Tensor | None:
        """Random probes for one solve, drawn once and kept along the trajectory (``None``: none needed)."""

    @abstractmethod
    def estimate(self, v: Tensor, x: Tensor, probes: Tensor | None, create_graph: bool) -> Tensor:
        """``tr(dv/dx)`` (or an unbiased estimate), shape ``(batch,)``, of ``v = v(t, x)`` built on ``x``."""


def _grad(v: Tensor, x: Tensor, weight: Tensor, create_graph: bool, retain_graph: bool) -> Tensor:
    """``weight^T dv/dx`` (one vector-Jacobian product), zero where ``v`` does not depend on ``x``."""
    if not v.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(v, x, weight, create_graph=create_graph, retain_graph=retain_graph,
                               allow_unused=True)
    return torch.zeros_like(x) if g is None else g


@dataclass(frozen=True)
class ExactTrace(TraceEstimator):
    """``tr(dv/dx) = sum_i d v_i / d x_i`` by one vector-Jacobian product per state dimension.

    Exact and deterministic; costs ``D = prod(dims)`` backward passes per evaluation, so it is for low
    dimension (2-D toys, tests). Use :class:`HutchinsonTrace` for images.
    """

    def draw(self, x: Tensor) -> Tensor | None:
        return None

    def estimate(self, v: Tensor, x: Tensor, probes: Tensor | None, create_graph: bool) -> Tensor:
        batch, dim = x.shape[0], x[0].numel()
        trace = x.new_zeros(batch)
        for i in range(dim):
            # e_i^T dv/dx for every batch element at once (elements are independent), then its i-th entry.
            # A fresh basis vector each time: with create_graph it becomes part of the graph.
            basis = x.new_zeros(batch, dim)
            basis[:, i] = 1.0
            g = _grad(v, x, basis.reshape(x.shape), create_graph, create_graph or i < dim - 1)
            trace = trace + g.reshape(batch, dim)[:, i]
        return trace


@dataclass(frozen=True)
class HutchinsonTrace(TraceEstimator):
    """Hutchinson's estimator ``tr(J) = E[eps^T J eps]`` for probes with ``E[eps eps^T] = I``.

    One vector-Jacobian product per probe instead of ``D``. The probes (``probes`` per batch element) are
    drawn once per solve and held fixed along the trajectory, as FFJORD does, so the integrated estimate
    is unbiased for the integrated trace and the dynamics stay a smooth ODE the adaptive solver can step.
    Rademacher probes (``+-1``) have the lower variance, ``2 * sum_{i!=j} J_ij^2`` per probe, against
    Gaussian's ``||J + J^T||_F^2 / 2``.

    Attributes:
        distribution: ``"rademacher"`` or ``"gaussian"``.
        probes: number of probes averaged per batch element.
        generator: source of the probes (``None``: torch's global generator); same state, same probes.
    """

    distribution: Literal["rademacher", "gaussian"] = "rademacher"
    probes: int = 1
    generator: torch.Generator | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {self.distribution!r}")
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ValueError(f"probes must be a positive int, got {self.probes!r}")

    def draw(self, x: Tensor) -> Tensor:
        if self.generator is not None and self.generator.device.type != x.device.type:
            raise ValueError(f"generator is on {self.generator.device}, the state on {x.device}: use one")
        shape = (self.probes, *x.shape)
        if self.distribution == "gaussian":
            return torch.randn(shape, generator=self.generator, dtype=x.dtype, device=x.device)
        bits = torch.randint(0, 2, shape, generator=self.generator, device=x.device)
        return bits.to(x.dtype).mul_(2.0).sub_(1.0)

    def estimate(self, v: Tensor, x: Tensor, probes: Tensor | None, create_graph: bool) -> Tensor:
        assert probes is not None
        batch = x.shape[0]
        total = x.new_zeros(batch)
        for k, eps in enumerate(probes):
            g = _grad(v, x, eps, create_graph, create_graph or k < len(probes) - 1)
            total = total + (g * eps).reshape(batch, -1).sum(1)
        return total / len(probes)


class _LogDensityDynamics(_Dynamics):
    """The augmented right-hand side ``(dx/ds, dl/ds) = sign * (v, tr dv/dx)`` at ``t = sign * s``.

    A module whose parameters are the ODE's, so ``odeint_adjoint`` differentiates through it. Gradients
    are enabled inside whatever the caller's mode (the trace needs a vector-Jacobian product); the graph of
    that product is kept only when the caller records gradients (maximum-likelihood training, or the
    adjoint's backward pass), otherwise the outputs are detached.
    """

    def __init__(self, ode: ODE, sign: float, trace: TraceEstimator, probes: Tensor | None):
        super().__init__(ode, sign)
        self.trace = trace
        self.probes = probes

    def forward(self, s: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        self.evals += 1
        x = state[0]
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            x = x if x.requires_grad else x.detach().requires_grad_(True)
            v = _check_velocity(self.ode.velocity(self.time(s), x), x)
            trace = self.trace.estimate(v, x, self.probes, create_graph)
        if not create_graph:
            v, trace = v.detach(), trace.detach()
        if self.sign < 0:
            v, trace = -v, -trace
        return v, trace


@dataclass(frozen=True)
class LogDensity:
    """Result of :func:`log_density`.

    Attributes:
        x_end: ``x(t1)``, the input pushed through the flow to the grid's last node, ``(batch, *dims)``.
        delta_logp: ``int_{t0}^{t1} tr(dv/dx)(t, x(t)) dt = log p_{t0}(x) - log p_{t1}(x_end)``, ``(batch,)``.
        log_prob: ``log p_{t0}(x) = base_log_prob(x_end) + delta_logp``, ``(batch,)``; ``None`` if no base.
        stats: the work done (``drift_evals``: evaluations of the augmented dynamics in the forward solve).
    """

    x_end: Tensor
    delta_logp: Tensor
    log_prob: Tensor | None
    stats: SolveStats

    @property
    def nfe(self) -> int:
        """Number of evaluations of the augmented dynamics (each one velocity evaluation plus its trace)."""
        return self.stats.drift_evals


def log_density(
    ode: Any,
    x: Tensor,
    grid: Grid,
    *,
    trace: TraceEstimator | None = None,
    base_log_prob: Callable[[Tensor], Tensor] | None = None,
    solver: ODESolver | None = None,
    adjoint: ODEAdjoint | None = None,
    check_finite: bool = True,
) -> LogDensity:
    """Log-density of ``x`` under the flow of ``dx/dt = v(t, x)``, by the instantaneous change of variables.

    Let ``t0 = grid.t0`` (the first node visited) and ``t1 = grid.t1`` (the last). Starting from
    ``x(t0) = x`` (the data), the solve integrates the augmented state

        dx/dt = v(t, x),    dl/dt = tr(dv/dx)(t, x(t)),    l(t0) = 0,

    up to ``t1``. If ``x(t)`` is distributed as ``p_t``, then ``d/dt log p_t(x(t)) = -tr(dv/dx)``
    (Chen et al. 2018), hence

        log p_{t0}(x) = log p_{t1}(x(t1)) + int_{t0}^{t1} tr(dv/dx)(t, x(t)) dt
                      = base_log_prob(x_end) + delta_logp.

    Sign and direction: ``delta_logp = l(t1)`` is the *signed* integral in the grid's direction, so the
    formula holds for increasing and reversed grids alike: the density at the start of the grid equals
    the density at its end plus ``delta_logp``. ``base_log_prob`` is the density at the grid's *end*. A
    flow that expands volume (``tr > 0`` going forward) makes ``p_{t0}`` larger than ``p_{t1}`` at the
    image point. (FFJORD's ``delta_logp`` integrates ``-tr``: it is the negative of this one.)

    For a probability-flow ODE with data at ``t = 0`` and a known prior at ``t = T``, pass an increasing
    grid from 0 to T and the prior as ``base_log_prob``.

    Args:
        ode: an :class:`ODE` or a callable ``(t, x) -> dx/dt``; it must treat batch elements independently.
        x: the points, shape ``(batch, *dims)``, at time ``grid.t0``.
        grid: the time grid (see :func:`odesolve`).
        trace: :class:`ExactTrace` (default) or :class:`HutchinsonTrace`.
        base_log_prob: ``log p_{t1}``, a callable ``(batch, *dims) -> (batch,)``; gives ``log_prob``.
        solver, adjoint, check_finite: as for :func:`odesolve`; with :class:`ODEAdjoint` the augmented ODE is
            differentiated by the continuous adjoint.

    Works under ``torch.no_grad()`` (gradients are enabled inside for the trace, outputs carry no graph;
    ``torch.inference_mode()`` forbids this and is refused); with gradients enabled the log-density is
    differentiable in ``x`` and the ODE's parameters, for maximum-likelihood training of continuous
    normalizing flows (keep evaluation under ``no_grad``: with gradients enabled the trace's graph is kept).

    Returns:
        a :class:`LogDensity` (``x_end``, ``delta_logp``, ``log_prob``, ``stats``; ``nfe``).

    Example:
        >>> import solvers
        >>> # dx/dt = -x contracts volume: tr = -D, so delta_logp = -D * (t1 - t0).
        >>> grid = solvers.UniformGrid(0.0, 1.0, 5)
        >>> with torch.no_grad():  # evaluation only: no graph is kept
        ...     out = solvers.log_density(lambda t, x: -x, torch.zeros(4, 2), grid, solver=solvers.RK4())
        >>> out.delta_logp
        tensor([-2., -2., -2., -2.])
        >>> torch.allclose(out.x_end, torch.zeros(4, 2)), out.nfe
        (True, 20)
    """
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "log_density differentiates the velocity for its trace, which torch.inference_mode() forbids; "
            "call it under torch.no_grad() instead"
        )
    ode = as_ode(ode)
    x = check_state(x, "x")
    if x.is_inference():  # made under inference_mode: a normal copy can be marked for differentiation
        x = x.clone()
    grid = _check_grid(grid)
    solver = _check_solver(solver)
    adjoint = _check_adjoint(adjoint, ode)
    trace = ExactTrace() if trace is None else trace
    if not isinstance(trace, TraceEstimator):
        raise TypeError(f"trace must be ExactTrace() or HutchinsonTrace(...), got {trace!r}")
    steps = len(grid.nodes()) - 1
    func = _LogDensityDynamics(ode, 1.0 if grid.increasing else -1.0, trace, trace.draw(x))
    y0 = (x, x.new_zeros(x.shape[0]))
    run = _integrate(func, y0, grid, solver, (steps,), adjoint, x.device)
    xs, ls = run.ys
    x_end, delta_logp = xs[-1], ls[-1]
    if check_finite and not (bool(torch.isfinite(x_end).all()) and bool(torch.isfinite(delta_logp).all())):
        raise FloatingPointError(
            f"the {type(solver).__name__} solve of the log-density produced NaN or infinite values"
        )
    log_prob = None
    if base_log_prob is not None:
        base = base_log_prob(x_end)
        if not isinstance(base, Tensor) or base.shape != delta_logp.shape:
            shape = tuple(base.shape) if isinstance(base, Tensor) else type(base).__name__
            raise ValueError(f"base_log_prob must return shape {tuple(delta_logp.shape)}, got {shape}")
        log_prob = base + delta_logp
    return LogDensity(x_end=x_end, delta_logp=delta_logp, log_prob=log_prob, stats=run.stats)
