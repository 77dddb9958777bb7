"""Higher-order and adaptive SDE solvers, and continuous and reversible adjoints, delegated to torchsde.

Each solver is an object (no method strings): it names a torchsde stepping rule, declares the SDE types,
noise types and Brownian information it needs, and its convergence orders.

========================  ============  ==========================  ==================  ====  ==========
solver                    calculus      noise types                 strong order        weak  Lévy area
========================  ============  ==========================  ==================  ====  ==========
``TorchsdeEuler``         Itô           all                         1 additive, else ½  1     no
``Milstein``              Itô or Strat  diagonal, scalar, additive  1                   1     no
``SRK``                   Itô           diagonal, scalar, additive  1.5                 1.5   space-time
``Heun``                  Stratonovich  all                         1, ½ general        1     no
``StratonovichMidpoint``  Stratonovich  all                         1, ½ general        1     no
``EulerHeun``             Stratonovich  all                         1, ½ general        1     no
``ReversibleHeun``        Stratonovich  all                         1 additive, else ½  1     no
========================  ============  ==========================  ==================  ====  ==========

(``StratonovichMidpoint`` is torchsde's ``midpoint``; the name keeps it apart from the ODE solver
``solvers.Midpoint``.)

Orders are torchsde's declarations; the strong orders are measured in ``tests/solvers/test_adaptive.py``.

**Diagonal noise** here means what torchsde assumes: ``g_i`` depends on ``x_i`` (and ``t``) only. Milstein's
correction ``g dg/dx``, the Itô form of :class:`BacksolveAdjoint` and the order 1 of the Stratonovich
methods (commuting noise) rely on it; a diffusion whose ``i``-th entry reads other coordinates is general
noise in disguise (write it as ``general`` with an ``m = d`` diagonal matrix to solve it correctly).

**Steps.** With ``adaptive=None`` a solver takes exactly one step per grid interval, between the grid's
float64 nodes (no accumulated time, no interpolation, no sliver steps). With ``adaptive=AdaptiveSteps(...)``
each interval is crossed by as many steps as the error control asks for: a step of size ``h`` is compared
with two steps of size ``h/2`` (torchsde's estimate), accepted when

    sqrt(mean(((y_h - y_{h/2}) / (atol + rtol max(|y_h|, |y_{h/2}|)))^2)) <= 1,

the two half steps are kept, and ``h`` is updated by torchsde's PI controller. A step never crosses a grid
node: the last one is clipped to land on it (and when between one and two steps remain, the rest is
halved rather than leave a sliver), so the solution is the solver's own value at every node, never an
interpolant, and ``SolveStats`` counts the accepted and rejected steps.

**Reversed grids** (decreasing nodes) are solved forward in ``s = -t`` through
:class:`solvers.sde.TimeReversedSDE`, driven by ``W'(s) = W(-s)``: for a Stratonovich SDE a backward solve
on the same Brownian path retraces the forward one.

**Brownian motion.** ``brownian`` may be a :class:`solvers.BrownianPath` or any ``torchsde.BaseBrownian``
(e.g. ``torchsde.BrownianInterval``); the same path queried on nested grids gives nested increments, which
is what the strong-order tests need. Without one, a ``torchsde.BrownianInterval`` is built with an integer
seed drawn from the solve's generator, so the same generator seed gives the same result. :class:`SRK` needs
the path's space-time Lévy area.

**Pinned internals.** The loop here drives torchsde's stepping classes (``torchsde._core.methods``),
``ForwardSDE``, ``AdjointSDE`` and ``adaptive_stepping.update_step_size`` directly: torchsde's own loop
accumulates ``t += dt`` and interpolates at output times, which would move the solution off non-uniform
grids. These are private torchsde APIs, written against torchsde 0.2.6 (pin ``torchsde>=0.2.6,<0.3``).

Example:
    >>> import solvers
    >>> class GBM(solvers.SDE):
    ...     def drift(self, t, x): return 0.5 * x
    ...     def diffusion(self, t, x): return 0.3 * x
    >>> grid = solvers.UniformGrid(0.0, 1.0, 20)
    >>> sol = solvers.sdesolve(GBM(), torch.ones(8, 1, dtype=torch.float64), grid,
    ...                        solver=SRK(adaptive=AdaptiveSteps(rtol=1e-3, atol=1e-5)),
    ...                        generator=torch.Generator().manual_seed(0), save=solvers.SaveAt(steps=True))
    >>> bool(torch.equal(sol.ts, grid.times()[1:])), sol.stats.steps >= 20
    (True, True)
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torchsde
from torch import Tensor
from torchsde._core import adaptive_stepping
from torchsde._core import methods as _methods
from torchsde._core.adjoint_sde import AdjointSDE
from torchsde._core.base_sde import ForwardSDE
from torchsde._core.base_solver import BaseSDESolver

from .adjoint import Adjoint, trainable_parameters
from .brownian import BrownianPath
from .euler import EulerMaruyama, Problem, SDESolver, Trajectory
from .sde import SDE, NoiseType, SDEType, TimeReversedSDE, check_diffusion_shape
from .solution import Solution, SolveStats

__all__ = [
    "AdaptiveSteps",
    "TorchsdeSolver",
    "TorchsdeEuler",
    "Milstein",
    "SRK",
    "Heun",
    "StratonovichMidpoint",
    "EulerHeun",
    "ReversibleHeun",
    "BacksolveAdjoint",
    "ReversibleAdjoint",
]

_TESTED_TORCHSDE = "0.2"
if not torchsde.__version__.startswith(_TESTED_TORCHSDE + "."):
    warnings.warn(
        f"solvers.adaptive drives torchsde internals written against torchsde 0.2.6; found "
        f"{torchsde.__version__}. Pin torchsde>=0.2.6,<0.3.",
        stacklevel=2,
    )

# torchsde's method names. They appear in this module only; everything else holds solver objects.
_EULER, _MILSTEIN, _SRK = "euler", "milstein", "srk"
_HEUN, _MIDPOINT, _EULER_HEUN = "heun", "midpoint", "euler_heun"
_REVERSIBLE_HEUN, _ADJOINT_REVERSIBLE_HEUN = "reversible_heun", "adjoint_reversible_heun"
_GRAD_FREE = "grad_free"
_NO_LEVY_AREA = "none"
_SPACE_TIME = "space-time"
_LEVY_AREAS_WITH_U = ("space-time", "davie", "foster")

_ALL_NOISE = frozenset(NoiseType)
_COMMUTING_NOISE = frozenset({NoiseType.DIAGONAL, NoiseType.SCALAR, NoiseType.ADDITIVE})


@dataclass(frozen=True)
class AdaptiveSteps:
    """Error-controlled step sizes between the grid nodes (see the module docstring).

    Args:
        rtol, atol: relative and absolute tolerance of the step-doubling error estimate.
        dt0: first step size tried; ``None``: the first grid step, at most 1 % of the interval.
        dt_min: smallest step; a step this small is accepted whatever its error (with a warning).

    Example:
        >>> AdaptiveSteps(rtol=1e-4, atol=1e-6).rtol
        0.0001
    """

    rtol: float = 1e-3
    atol: float = 1e-4
    dt0: float | None = None
    dt_min: float = 1e-5

    def __post_init__(self) -> None:
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError(f"AdaptiveSteps needs rtol, atol >= 0, not both 0; got {self.rtol}, {self.atol}")
        if self.dt0 is not None and not (math.isfinite(self.dt0) and self.dt0 > 0):
            raise ValueError(f"AdaptiveSteps.dt0 must be positive, got {self.dt0}")
        if not (math.isfinite(self.dt_min) and self.dt_min > 0):
            raise ValueError(f"AdaptiveSteps.dt_min must be positive, got {self.dt_min}")


@dataclass(frozen=True)
class TorchsdeSolver(SDESolver):
    """Base of the solvers whose steps are torchsde's (abstract; the concrete solvers below are final).

    Subclasses set the torchsde method they step with, the SDE types, noise types and Lévy area they need,
    and declare their orders; this class checks problems and runs the loop described in the module docstring.
    """

    adaptive: AdaptiveSteps | None = None

    _method: ClassVar[str]
    _sde_types: ClassVar[frozenset[SDEType]]
    _noise_types: ClassVar[frozenset[NoiseType]]
    _needs_levy_area: ClassVar[bool] = False
    # declared orders: the strong order for each supported noise type (a default and its exceptions), weak order
    _strong: ClassVar[float]
    _strong_exceptions: ClassVar[dict[NoiseType, float]] = {}
    _weak: ClassVar[float] = 1.0

    def __post_init__(self) -> None:
        if self.adaptive is not None and not isinstance(self.adaptive, AdaptiveSteps):
            raise TypeError(f"adaptive must be an AdaptiveSteps or None, got {type(self.adaptive).__name__}")

    def strong_order(self, noise_type: NoiseType | str) -> float:
        noise_type = self._supported(noise_type)
        return self._strong_exceptions.get(noise_type, self._strong)

    def weak_order(self, noise_type: NoiseType | str) -> float:
        self._supported(noise_type)
        return self._weak

    def _supported(self, noise_type: NoiseType | str) -> NoiseType:
        noise_type = NoiseType(noise_type)
        if noise_type not in self._noise_types:
            names = ", ".join(sorted(n.value for n in self._noise_types))
            raise ValueError(f"{type(self).__name__} supports {names} noise, not {noise_type.value}")
        return noise_type

    def check(self, problem: Problem) -> None:
        """Raise ``ValueError`` (or ``TypeError``) for an SDE type, noise type, path or cost it cannot use."""
        name = type(self).__name__
        if problem.cost is not None:
            raise ValueError(
                f"{name} cannot sum a PathCost (torchsde's steps do not expose their transitions); "
                f"use EulerMaruyama for a solve with a cost"
            )
        sde_type = SDEType(problem.sde.sde_type)
        if sde_type not in self._sde_types:
            wanted = " or ".join(sorted(s.value for s in self._sde_types))
            hint = (
                "; write the SDE in Stratonovich form (sde_type = SDEType.STRATONOVICH, drift corrected by "
                "-1/2 g dg/dx) or use an Itô method (EulerMaruyama, TorchsdeEuler, Milstein, SRK)"
                if sde_type is SDEType.ITO
                else "; use a Stratonovich method (Heun, StratonovichMidpoint, EulerHeun, ReversibleHeun, "
                "Milstein)"
            )
            raise ValueError(f"{name} integrates {wanted} SDEs; this SDE is {sde_type.value}{hint}")
        self._supported(problem.noise_type)
        _check_path(problem, name, self._needs_levy_area)

    def integrate(self, problem: Problem, *, record: bool = False) -> Trajectory:
        """Solve ``problem`` on its grid; ``record`` also keeps every node's state and interval's ``dW``."""
        run = _Run(self, problem)
        stepper = _Stepper(self.adaptive, run.first_step())
        return run.forward(stepper, run.y0(), None, record=record)


@dataclass(frozen=True)
class TorchsdeEuler(TorchsdeSolver):
    """torchsde's Itô Euler–Maruyama, ``x_{k+1} = x_k + f(t_k, x_k) dt + g(t_k, x_k) dW_k``.

    The same scheme as :class:`solvers.EulerMaruyama`, stepped by torchsde and driven by a Brownian path:
    useful for comparisons, adaptive Euler, and under :class:`BacksolveAdjoint`.

    Example:
        >>> TorchsdeEuler().strong_order("additive"), TorchsdeEuler().strong_order("diagonal")
        (1.0, 0.5)
    """

    _method: ClassVar[str] = _EULER
    _sde_types: ClassVar[frozenset[SDEType]] = frozenset({SDEType.ITO})
    _noise_types: ClassVar[frozenset[NoiseType]] = _ALL_NOISE

    _strong: ClassVar[float] = 0.5
    _strong_exceptions: ClassVar[dict[NoiseType, float]] = {NoiseType.ADDITIVE: 1.0}


@dataclass(frozen=True)
class Milstein(TorchsdeSolver):
    """Milstein's method for commuting noise, Itô or Stratonovich (diagonal index-wise)::

        x_{k+1} = x_k + f dt + g dW_k + 1/2 g (dg/dx) (dW_k^2 - c dt),    c = 1 (Itô), 0 (Stratonovich)

    Strong and weak order 1. ``grad_free=True`` replaces ``g dg/dx`` by a finite difference of ``g``
    (no autograd through the diffusion).

    Example:
        >>> Milstein().strong_order("diagonal"), Milstein(grad_free=True).grad_free
        (1.0, True)
    """

    grad_free: bool = False

    _method: ClassVar[str] = _MILSTEIN
    _sde_types: ClassVar[frozenset[SDEType]] = frozenset({SDEType.ITO, SDEType.STRATONOVICH})
    _noise_types: ClassVar[frozenset[NoiseType]] = _COMMUTING_NOISE

    _strong: ClassVar[float] = 1.0


@dataclass(frozen=True)
class SRK(TorchsdeSolver):
    """Rößler's stochastic Runge–Kutta methods (SRID2 for diagonal and scalar noise, SRA1 for additive),
    Itô, strong order 1.5.

    They use the space-time Lévy area ``U = int_{t_k}^{t_{k+1}} (W(s) - W(t_k)) ds`` besides ``dW``: pass a
    ``BrownianPath(..., levy_area="space-time")`` (or let the solve build its own path).

    Reference: A. Rößler, Runge–Kutta methods for the strong approximation of solutions of stochastic
    differential equations, SIAM J. Numer. Anal. 48 (2010).

    Example:
        >>> SRK().strong_order("diagonal")
        1.5
    """

    _method: ClassVar[str] = _SRK
    _sde_types: ClassVar[frozenset[SDEType]] = frozenset({SDEType.ITO})
    _noise_types: ClassVar[frozenset[NoiseType]] = _COMMUTING_NOISE
    _needs_levy_area: ClassVar[bool] = True

    _strong: ClassVar[float] = 1.5
    _weak: ClassVar[float] = 1.5


@dataclass(frozen=True)
class Heun(TorchsdeSolver):
    """Stratonovich Heun (trapezoidal predictor–corrector)::

        x' = x_k + f(t_k, x_k) dt + g(t_k, x_k) dW_k
        x_{k+1} = x_k + (f(t_k, x_k) + f(t_{k+1}, x')) dt / 2 + (g(t_k, x_k) + g(t_{k+1}, x')) dW_k / 2

    Strong order 1 for commuting noise, 1/2 for general noise; weak order 1.

    Example:
        >>> Heun().strong_order("general")
        0.5
    """

    _method: ClassVar[str] = _HEUN
    _sde_types: ClassVar[frozenset[SDEType]] = frozenset({SDEType.STRATONOVICH})
    _noise_types: ClassVar[frozenset[NoiseType]] = _ALL_NOISE

    _strong: ClassVar[float] = 1.0
    _strong_exceptions: ClassVar[dict[NoiseType, float]] = {NoiseType.GENERAL: 0.5}


@dataclass(frozen=True)
class StratonovichMidpoint(TorchsdeSolver):
    """Stratonovich midpoint method::

        x' = x_k + f(t_k, x_k) dt / 2 + g(t_k, x_k) dW_k / 2
        x_{k+1} = x_k + f(t_k + dt/2, x') dt + g(t_k + dt/2, x') dW_k

    Strong order 1 for commuting noise, 1/2 for general noise; weak order 1.

    Example:
        >>> StratonovichMidpoint().strong_order("scalar")
        1.0
    """

    _method: ClassVar[str] = _MIDPOINT
    _sde_types: ClassVar[frozenset[SDEType]] = frozenset({SDEType.STRATONOVICH})
    _noise_types: ClassVar[frozenset[NoiseType]] = _ALL_NOISE

    _strong: ClassVar[float] = 1.0
    _strong_exceptions: ClassVar[dict[NoiseType, float]] = {NoiseType.GENERAL: 0.5}


@dataclass(frozen=True)
class EulerHeun(TorchsdeSolver):
    """Euler–Heun: Euler in the drift, Heun in the diffusion (Stratonovich)::

        x_{k+1} = x_k + f(t_k, x_k) dt + (g(t_k, x_k) + g(t_{k+1}, x_k + g(t_k, x_k) dW_k)) dW_k / 2

    One drift evaluation per step. Strong order 1 for commuting noise, 1/2 for general; weak order 1.

    Example:
        >>> EulerHeun().weak_order("diagonal")
        1.0
    """

    _method: ClassVar[str] = _EULER_HEUN
    _sde_types: ClassVar[frozenset[SDEType]] = frozenset({SDEType.STRATONOVICH})
    _noise_types: ClassVar[frozenset[NoiseType]] = _ALL_NOISE

    _strong: ClassVar[float] = 1.0
    _strong_exceptions: ClassVar[dict[NoiseType, float]] = {NoiseType.GENERAL: 0.5}


@dataclass(frozen=True)
class ReversibleHeun(TorchsdeSolver):
    """The algebraically reversible Heun method (Stratonovich), carrying an auxiliary state ``z``::

        z_{k+1} = 2 x_k - z_k + f_k dt + g_k dW_k,       f_k = f(t_k, z_k),  g_k = g(t_k, z_k)
        x_{k+1} = x_k + (f_k + f_{k+1}) dt / 2 + (g_k + g_{k+1}) dW_k / 2

    with ``z_0 = x_0``. One drift and one diffusion evaluation per step, and each step can be undone exactly,
    which :class:`ReversibleAdjoint` uses for exact gradients in constant memory. Strong order 1 for additive
    noise, 1/2 otherwise (the proven bound); weak order 1.

    Reference: P. Kidger, J. Foster, X. Li, T. Lyons, Efficient and accurate gradients for neural SDEs,
    NeurIPS 2021.

    Example:
        >>> ReversibleHeun().strong_order("additive")
        1.0
    """

    _method: ClassVar[str] = _REVERSIBLE_HEUN
    _sde_types: ClassVar[frozenset[SDEType]] = frozenset({SDEType.STRATONOVICH})
    _noise_types: ClassVar[frozenset[NoiseType]] = _ALL_NOISE

    _strong: ClassVar[float] = 0.5
    _strong_exceptions: ClassVar[dict[NoiseType, float]] = {NoiseType.ADDITIVE: 1.0}


# --------------------------------------------------------------------------------------------------------
# Adjoints.


@dataclass(frozen=True)
class BacksolveAdjoint(Adjoint):
    """Gradients by torchsde's continuous stochastic adjoint: after the forward solve, the augmented SDE for
    ``(x(t), a(t) = dL/dx(t), dL/dtheta)``, in Stratonovich form

        dx = f dt + g o dW
        da = -a (df/dx) dt - a (dg/dx) o dW
        d(dL/dtheta) = -a (df/dtheta) dt - a (dg/dtheta) o dW,

    is solved backward from the last node on the same Brownian path (torchsde's ``AdjointSDE``; Itô SDEs
    get its Itô–Stratonovich correction terms, which assume diagonal noise in the sense of the module
    docstring). Memory does not grow with the number of steps: only the saved states are kept, and ``x`` is
    reconstructed by the backward solve (and reset to the stored value at every saved node). The backward
    pass steps exactly on the reversed grid nodes, like the forward one. No double backward.

    The gradient is *approximate*: it is the gradient of the exact solution map, not of the discretized
    forward solve, so it matches :class:`solvers.DirectAdjoint` only as ``dt -> 0`` (at the backward
    method's strong order). For exact gradients in constant memory use :class:`ReversibleAdjoint`.

    The forward solve may use any torchsde-backed solver, or :class:`solvers.EulerMaruyama`, which is then
    stepped as :class:`TorchsdeEuler`: the same scheme, driven by a Brownian path (the backward solve must
    query the same noise again). Given the same path it gives the same forward values; given only a
    generator, its noise differs from the fresh draws EulerMaruyama makes under DirectAdjoint. No path cost.

    Args:
        solver: method of the backward solve: ``TorchsdeEuler``/``EulerMaruyama`` or ``Milstein`` (diagonal
            noise) for Itô SDEs; ``StratonovichMidpoint``, ``Heun``, ``EulerHeun`` or ``Milstein`` (diagonal
            noise) for Stratonovich SDEs. ``None``: torchsde's default (Milstein for Itô diagonal noise,
            TorchsdeEuler for other Itô noise, StratonovichMidpoint for Stratonovich).
        adaptive: step control of the backward solve; ``None``: one step per grid interval.

    Example:
        >>> import solvers
        >>> class Lin(solvers.SDE):
        ...     sde_type = solvers.SDEType.STRATONOVICH
        ...     def __init__(self): super().__init__(); self.a = torch.nn.Parameter(torch.tensor(-1.0))
        ...     def drift(self, t, x): return self.a * x
        ...     def diffusion(self, t, x): return 0.1 * x
        >>> sde = Lin()
        >>> sol = solvers.sdesolve(sde, torch.ones(4, 2), solvers.UniformGrid(0.0, 1.0, 10), solver=Heun(),
        ...                        adjoint=BacksolveAdjoint(), generator=torch.Generator().manual_seed(0))
        >>> sol.xs[-1].sum().backward()
        >>> sde.a.grad is not None
        True
    """

    solver: TorchsdeSolver | EulerMaruyama | None = None
    adaptive: AdaptiveSteps | None = None

    def __post_init__(self) -> None:
        if self.solver is not None and not isinstance(self.solver, (TorchsdeSolver, EulerMaruyama)):
            raise TypeError(f"BacksolveAdjoint.solver must be a solver, got {type(self.solver).__name__}")
        if isinstance(self.solver, TorchsdeSolver) and self.solver.adaptive is not None:
            raise ValueError("set the backward solve's step control with BacksolveAdjoint(adaptive=...), "
                             "not on its solver")

    def _backward_method(self, problem: Problem) -> tuple[str, dict[str, Any]]:
        sde_type, noise_type = SDEType(problem.sde.sde_type), problem.noise_type
        solver = self.solver
        if solver is None:
            if sde_type is SDEType.STRATONOVICH:
                return _MIDPOINT, {}
            return (_MILSTEIN, {_GRAD_FREE: False}) if noise_type is NoiseType.DIAGONAL else (_EULER, {})
        if isinstance(solver, EulerMaruyama):
            solver = TorchsdeEuler()
        name = type(solver).__name__
        allowed: tuple[type, ...] = (TorchsdeEuler, Milstein)
        if sde_type is SDEType.STRATONOVICH:
            allowed = (StratonovichMidpoint, Heun, EulerHeun, Milstein)
        if not isinstance(solver, allowed):
            names = ", ".join(cls.__name__ for cls in allowed)
            raise ValueError(f"the backward solve of a {sde_type.value} SDE can use {names}; not {name}")
        if isinstance(solver, Milstein):
            if noise_type is not NoiseType.DIAGONAL:
                raise ValueError(f"Milstein solves adjoints of diagonal noise only, not {noise_type.value}")
            if solver.grad_free:
                raise ValueError("the adjoint SDE has no diffusion to difference: use Milstein()")
        return solver._method, _method_options(solver)

    def solve(self, solver: SDESolver, problem: Problem) -> Solution:
        forward = _forward_solver(solver, "BacksolveAdjoint")
        forward.check(problem)
        method, options = self._backward_method(problem)
        run = _Run(forward, problem)
        params = trainable_parameters(problem.sde)
        job = _BacksolveJob(run, forward.adaptive, self.adaptive, method, options, params)
        ys = _AdjointFunction.apply(job, run.y0(), *params)
        return _solution(problem, ys, job.stats)


@dataclass(frozen=True)
class ReversibleAdjoint(Adjoint):
    """Exact gradients of :class:`ReversibleHeun` in constant memory (Stratonovich SDEs).

    The backward pass undoes each reversible Heun step algebraically, from the last state back to the first,
    and backpropagates through each reconstructed step locally (torchsde's ``adjoint_reversible_heun``).
    Only the final state, the saved states and the step times are kept. The gradient equals
    :class:`solvers.DirectAdjoint`'s through ``ReversibleHeun`` up to the rounding of the reconstruction
    (about 1e-15 relative in float64 on small problems), also with adaptive steps, whose accepted step
    times are replayed in reverse. No path cost, no double backward.

    Example:
        >>> import solvers
        >>> class Lin(solvers.SDE):
        ...     sde_type = solvers.SDEType.STRATONOVICH
        ...     def __init__(self): super().__init__(); self.a = torch.nn.Parameter(torch.tensor(-1.0))
        ...     def drift(self, t, x): return self.a * x
        ...     def diffusion(self, t, x): return 0.1 * x
        >>> sol = solvers.sdesolve(Lin(), torch.ones(4, 2), solvers.UniformGrid(0.0, 1.0, 10),
        ...                        solver=ReversibleHeun(), adjoint=ReversibleAdjoint(),
        ...                        generator=torch.Generator().manual_seed(0))
        >>> sol.xs[-1].sum().backward()
    """

    def solve(self, solver: SDESolver, problem: Problem) -> Solution:
        if not isinstance(solver, ReversibleHeun):
            raise TypeError(
                f"ReversibleAdjoint is the exact adjoint of ReversibleHeun; got {type(solver).__name__} "
                f"(use BacksolveAdjoint for other torchsde solvers)"
            )
        solver.check(problem)
        run = _Run(solver, problem)
        params = trainable_parameters(problem.sde)
        y0 = run.y0()
        # (f_0, g_0, z_0 = x_0) are computed outside the autograd function, with their graph: the backward
        # pass returns their adjoints, which autograd then carries into x_0 and the parameters.
        extra0 = run.method.init_extra_solver_state(run.times[0], y0)
        job = _ReversibleJob(run, solver.adaptive, len(extra0), params)
        ys = _AdjointFunction.apply(job, y0, *extra0, *params)
        return _solution(problem, ys, job.stats)


# --------------------------------------------------------------------------------------------------------
# Machinery (private).


def _forward_solver(solver: SDESolver, adjoint: str) -> TorchsdeSolver:
    if isinstance(solver, EulerMaruyama):
        return TorchsdeEuler()
    if not isinstance(solver, TorchsdeSolver):
        raise TypeError(f"{adjoint} needs EulerMaruyama or a torchsde solver, got {type(solver).__name__}")
    return solver


def _method_options(solver: TorchsdeSolver) -> dict[str, Any]:
    # torchsde's per-method options; only Milstein has one.
    return {_GRAD_FREE: solver.grad_free} if isinstance(solver, Milstein) else {}


def _solution(problem: Problem, ys: Tensor, stats: SolveStats) -> Solution:
    xs = ys.reshape(ys.shape[0], *problem.x0.shape)
    return Solution(ts=problem.saved_times(), xs=xs, cost=None, stats=stats)


def _check_path(problem: Problem, name: str, needs_levy_area: bool) -> None:
    path = problem.brownian
    if path is None:
        return
    if isinstance(path, BrownianPath):
        lo, hi = float(np.min(problem.nodes)), float(np.max(problem.nodes))
        if path.t0 > lo or path.t1 < hi:
            raise ValueError(f"the Brownian path covers [{path.t0}, {path.t1}]; the grid spans [{lo}, {hi}]")
        levy = path.levy_area or _NO_LEVY_AREA
        fix = f"BrownianPath(..., levy_area={_SPACE_TIME!r})"
    elif isinstance(path, torchsde.BaseBrownian):
        levy = path.levy_area_approximation
        fix = f"torchsde.BrownianInterval(..., levy_area_approximation={_SPACE_TIME!r})"
    else:
        raise TypeError(
            f"{name} is driven by a solvers.BrownianPath or a torchsde Brownian motion (BrownianInterval), "
            f"got {type(path).__name__}: torchsde's steps query the path themselves"
        )
    if needs_levy_area and levy not in _LEVY_AREAS_WITH_U:
        raise ValueError(f"{name} needs the Brownian path's space-time Lévy area; pass {fix}")


def _time(t: float) -> Tensor:
    # Times are float64 CPU scalars: the Brownian path is queried at exactly the grid's float64 nodes, and
    # _FlatSDE hands the SDE a copy in the state's dtype and device.
    return torch.tensor(t, dtype=torch.float64)


class _FlatSDE:
    """The SDE on flat ``(batch, D)`` states with torchsde's ``f``/``g`` shapes; counts evaluations."""

    def __init__(self, sde: SDE, shape: torch.Size):
        self.sde = sde
        self.noise_type = NoiseType(sde.noise_type).value  # torchsde compares plain strings
        self.sde_type = SDEType(sde.sde_type).value
        self.shape = shape
        self.drift_evals = 0
        self.diffusion_evals = 0
        self._checked_f = self._checked_g = False

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        x = y.reshape(self.shape)
        f = self.sde.drift(t.to(dtype=y.dtype, device=y.device), x)
        self.drift_evals += 1
        if not self._checked_f:
            if not isinstance(f, Tensor) or f.shape != x.shape:
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"drift must return a tensor of shape {tuple(x.shape)}; got {got}")
            self._checked_f = True
        return f.reshape(y.shape)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        x = y.reshape(self.shape)
        g = self.sde.diffusion(t.to(dtype=y.dtype, device=y.device), x)
        self.diffusion_evals += 1
        noise_type = NoiseType(self.noise_type)
        if not self._checked_g:
            check_diffusion_shape(noise_type, g, x)
            self._checked_g = True
        if noise_type is NoiseType.DIAGONAL:
            return g.expand(x.shape).reshape(y.shape)  # torchsde wants the exact (batch, D) shape
        return g.reshape(*y.shape, g.shape[-1])


class _Noise(torchsde.BaseBrownian):
    """The Brownian path seen in a solve's own time, reshaped to torchsde's ``(batch, D)`` / ``(batch, m)``.

    A query ``[a, b]`` returns ``sign * W`` with ``W`` the path's increment over ``[a, b]``, or over
    ``[-b, -a]`` when ``flip``. The flipped process has space-time Lévy area
    ``int_a^b (W'(s) - W'(a)) ds = sign * (h W - U)`` (``U`` the path's over ``[-b, -a]``, ``h = b - a``).

    ==========================  =====  ======  =================================================
    use                         flip   sign    increment over ``[a, b]``
    ==========================  =====  ======  =================================================
    forward, increasing grid    no     +1      ``W(b) - W(a)``
    forward, decreasing grid    yes    -1      ``W(-b) - W(-a)``: ``W'(s) = W(-s)``
    adjoint of either           flips  same    the forward noise over ``[-b, -a]``, unnegated
    ==========================  =====  ======  =================================================
    """

    def __init__(self, source: Any, shape: tuple[int, ...], dtype: torch.dtype, flip: bool, sign: float):
        super().__init__()
        self.source, self._shape, self._dtype = source, torch.Size(shape), dtype
        self.flip, self.sign = flip, sign

    def __call__(self, ta: Any, tb: Any = None, return_U: bool = False, return_A: bool = False) -> Any:
        if tb is None or return_A:
            raise NotImplementedError("solvers.adaptive queries increments (and U) over intervals only")
        a, b = float(ta), float(tb)
        if self.flip:
            a, b = -b, -a
        out = self.source(a, b, return_U=return_U)
        w, u = out if return_U else (out, None)
        w = w.reshape(self._shape).to(self._dtype)
        if u is None:
            return self.sign * w
        u = u.reshape(self._shape).to(self._dtype)
        if self.flip:
            u = (b - a) * w - u
        return self.sign * w, self.sign * u

    def __repr__(self) -> str:
        return f"_Noise(flip={self.flip}, sign={self.sign}, source={self.source!r})"

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self.source.device

    @property
    def shape(self) -> torch.Size:
        return self._shape

    @property
    def levy_area_approximation(self) -> str:
        return self.source.levy_area_approximation


def _new_method(name: str, sde: Any, noise: _Noise, options: dict[str, Any]) -> BaseSDESolver:
    # dt, adaptive and the tolerances are stored by torchsde's base class for its own loop, which we never
    # run; only step() and init_extra_solver_state() are used.
    cls = _methods.select(method=name, sde_type=sde.sde_type)
    return cls(sde=sde, bm=noise, dt=1.0, adaptive=False, rtol=0.0, atol=0.0, dt_min=0.0,
               options=dict(options))


class _Run:
    """Everything one solve needs: flat SDE, solve-time nodes, the driving noise, torchsde's stepper."""

    def __init__(self, solver: TorchsdeSolver, problem: Problem):
        x0, nodes = problem.x0, problem.nodes
        self.problem = problem
        self.increasing = bool(nodes[-1] > nodes[0])
        # A decreasing grid is solved forward in s = -t (torchsde steps forward only).
        sde = problem.sde if self.increasing else TimeReversedSDE(problem.sde)
        self.taus = nodes if self.increasing else -nodes
        self.times = torch.tensor(self.taus, dtype=torch.float64).unbind(0)
        batch = x0.shape[0]
        self.flat = _FlatSDE(sde, x0.shape)
        self.forward_sde = ForwardSDE(self.flat)
        noise_type = problem.noise_type
        source = problem.brownian.interval if isinstance(problem.brownian, BrownianPath) else problem.brownian
        if noise_type is NoiseType.DIAGONAL:
            noise_shape: tuple[int, ...] = (batch, x0[0].numel())
        elif noise_type is NoiseType.SCALAR:
            noise_shape = (batch, 1)
        elif source is not None:
            noise_shape = (batch, math.prod(source.shape) // batch)
        else:
            noise_shape = (batch, self._brownian_dimension())
        if source is None:
            source = self._default_path(solver, noise_shape)
        if math.prod(source.shape) != math.prod(noise_shape):
            raise ValueError(
                f"the Brownian path has shape {tuple(source.shape)}; this {noise_type.value}-noise SDE needs "
                f"{math.prod(noise_shape)} Brownian motions, e.g. shape {noise_shape}"
            )
        self.source = source
        # Forward noise: W(s) on an increasing grid; W'(s) = W(-s) on a decreasing one.
        self.noise = _Noise(source, noise_shape, x0.dtype, flip=not self.increasing,
                            sign=1.0 if self.increasing else -1.0)
        self.method = _new_method(solver._method, self.forward_sde, self.noise, _method_options(solver))

    def _brownian_dimension(self) -> int:
        x0 = self.problem.x0
        with torch.no_grad():
            g = self.flat.sde.diffusion(self.times[0].to(dtype=x0.dtype, device=x0.device), x0)
        self.flat.diffusion_evals += 1
        check_diffusion_shape(self.problem.noise_type, g, x0)
        return int(g.shape[-1])

    def _default_path(self, solver: TorchsdeSolver, shape: tuple[int, ...]) -> torchsde.BrownianInterval:
        x0, generator, nodes = self.problem.x0, self.problem.generator, self.problem.nodes
        device = generator.device if generator is not None else x0.device
        # One integer drawn from the generator seeds the whole path: same generator seed, same solve.
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=device))
        return torchsde.BrownianInterval(
            t0=float(np.min(nodes)),
            t1=float(np.max(nodes)),
            size=shape,
            dtype=x0.dtype,
            device=x0.device,
            entropy=seed,
            dt=float(np.min(np.abs(np.diff(nodes)))),
            levy_area_approximation=_SPACE_TIME if solver._needs_levy_area else _NO_LEVY_AREA,
        )

    def y0(self) -> Tensor:
        return self.problem.x0.reshape(self.problem.x0.shape[0], -1)

    def first_step(self) -> float:
        taus = self.taus
        return float(min(taus[1] - taus[0], 0.01 * (taus[-1] - taus[0])))

    def forward(
        self,
        stepper: _Stepper,
        y: Tensor,
        extra: tuple[Tensor, ...] | None,
        *,
        record: bool = False,
        trace: list[list[float]] | None = None,
    ) -> Trajectory:
        """March over every grid interval; ``trace`` collects ``[ta, tb, node]`` of each step taken."""
        problem, x0, times, taus = self.problem, self.problem.x0, self.times, self.taus
        if extra is None:
            extra = self.method.init_extra_solver_state(times[0], y)
        save = set(problem.save)
        saved = [y.reshape(x0.shape)] if 0 in save else []
        states = [y.reshape(x0.shape)] if record else None
        increments: list[Tensor] | None = [] if record else None
        dw_shape = x0.shape if problem.noise_type is NoiseType.DIAGONAL else self.noise.shape
        for k in range(len(taus) - 1):
            y, extra = stepper.advance(self.method, y, extra, taus[k], taus[k + 1], times[k], times[k + 1],
                                       trace)
            if trace is not None:
                trace[-1][2] = k + 1
            if k + 1 in save:
                saved.append(y.reshape(x0.shape))
            if record:
                states.append(y.reshape(x0.shape))
                increments.append(self.noise(times[k], times[k + 1]).reshape(dw_shape))
        self.last = (y, extra)
        stats = SolveStats(steps=stepper.accepted, rejected_steps=stepper.rejected,
                           drift_evals=self.flat.drift_evals, diffusion_evals=self.flat.diffusion_evals)
        return Trajectory(saved, None, stats, states, increments)

    def adjoint_noise(self) -> _Noise:
        # The adjoint runs in r = -s and queries dW over [-r_b, -r_a] of the forward noise, unnegated
        # (torchsde's AdjointSDE negates its drift and diffusion instead).
        return _Noise(self.source, tuple(self.noise.shape), self.noise.dtype, flip=not self.noise.flip,
                      sign=self.noise.sign)


class _Stepper:
    """Crosses one grid interval at a time: one step, or error-controlled steps clipped to the node."""

    def __init__(self, adaptive: AdaptiveSteps | None, first_step: float):
        self.adaptive = adaptive
        self.h = adaptive.dt0 if adaptive is not None and adaptive.dt0 is not None else first_step
        self.prev_ratio: float | None = None
        self.accepted = 0
        self.rejected = 0
        self.warned = False

    def advance(
        self,
        method: BaseSDESolver,
        y: Tensor,
        extra: tuple[Tensor, ...],
        ta: float,
        tb: float,
        ta_t: Tensor,
        tb_t: Tensor,
        trace: list[list[float]] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        if self.adaptive is None:
            y, extra = method.step(ta_t, tb_t, y, extra)
            self.accepted += 1
            if trace is not None:
                trace.append([ta, tb, -1])
            return y, extra
        rtol, atol, dt_min = self.adaptive.rtol, self.adaptive.atol, self.adaptive.dt_min
        cur, cur_t = ta, ta_t
        while cur < tb:
            h = self.h
            remaining = tb - cur
            if remaining <= h:
                nxt, nxt_t = tb, tb_t
            else:
                # Between one and two steps from the node: halve the rest rather than leave a sliver.
                # Steps never exceed h, so a rejection (new h < step) always shrinks the next try.
                nxt = cur + (0.5 * remaining if remaining < 2 * h else h)
                nxt_t = _time(nxt)
            step = nxt - cur
            mid = cur + 0.5 * step
            mid_t = _time(mid)
            y_full, _ = method.step(cur_t, nxt_t, y, extra)
            y_mid, extra_mid = method.step(cur_t, mid_t, y, extra)
            y_two, extra_two = method.step(mid_t, nxt_t, y_mid, extra_mid)
            error = _error_norm(y_full, y_two, rtol, atol)
            new_h, ratio = adaptive_stepping.update_step_size(
                error_estimate=error, prev_step_size=step, prev_error_ratio=self.prev_ratio
            )
            self.prev_ratio = ratio
            # Compare the proposal h, not nxt - cur: after rounding, cur + dt_min - cur can exceed dt_min.
            if error <= 1.0 or min(h, step) <= dt_min:
                y, extra = y_two, extra_two
                if trace is not None:
                    trace.append([cur, mid, -1])
                    trace.append([mid, nxt, -1])
                cur, cur_t = nxt, nxt_t
                self.accepted += 1
                # A step shortened to land on a node says nothing against the longer proposal.
                self.h = max(new_h, h) if step < h else new_h
            else:
                self.rejected += 1
                self.h = new_h
            if self.h < dt_min:
                if not self.warned:
                    warnings.warn(f"adaptive steps hit dt_min={dt_min} near t={cur:.6g}; accepting steps of "
                                  f"that size whatever their error", stacklevel=4)
                    self.warned = True
                self.h = dt_min
                self.prev_ratio = None
        return y, extra


def _error_norm(y_full: Tensor, y_two: Tensor, rtol: float, atol: float) -> float:
    with torch.no_grad():
        scale = atol + rtol * torch.maximum(y_full.abs(), y_two.abs())
        error = float(((y_full - y_two) / scale).pow(2).mean().sqrt())
    if not math.isfinite(error):
        return 1e10  # reject and shrink (an infinite error would divide by zero in the controller)
    return max(error, 1e-7)


def _flatten(parts: list[Tensor]) -> Tensor:
    return torch.cat([p.reshape(-1) for p in parts]).unsqueeze(0)  # torchsde's adjoint has a batch of 1


def _unflatten(flat: Tensor, shapes: list[torch.Size]) -> list[Tensor]:
    pieces = flat.reshape(-1).split([s.numel() for s in shapes])
    return [p.reshape(s) for p, s in zip(pieces, shapes, strict=True)]


class _AdjointFunction(torch.autograd.Function):
    """Forward: the job's solve without a graph. Backward: the job's adjoint pass."""

    @staticmethod
    def forward(ctx, job, y0, *inputs):  # type: ignore[override]
        ys = job.forward(y0.detach(), tuple(x.detach() for x in inputs[: job.n_extra]))
        ctx.job = job
        return ys

    @staticmethod
    def backward(ctx, grad_ys):  # type: ignore[override]
        with torch.no_grad():
            grads = ctx.job.backward(grad_ys)
        return (None, *grads)


@dataclass(eq=False)
class _BacksolveJob:
    run: _Run
    forward_adaptive: AdaptiveSteps | None
    backward_adaptive: AdaptiveSteps | None
    method: str
    options: dict[str, Any]
    params: list[Tensor]
    n_extra: int = 0
    stats: SolveStats = field(default_factory=lambda: SolveStats(steps=0))
    saved: list[Tensor] = field(default_factory=list)

    def forward(self, y0: Tensor, extra0: tuple[Tensor, ...]) -> Tensor:
        run = self.run
        trajectory = run.forward(_Stepper(self.forward_adaptive, run.first_step()), y0, None)
        self.stats = trajectory.stats
        self.saved = [x.reshape(y0.shape) for x in trajectory.saved]
        self.final = run.last[0]
        return torch.stack(self.saved, 0)

    def backward(self, grad_ys: Tensor) -> list[Tensor]:
        run = self.run
        save = run.problem.save
        grad_at = dict(zip(save, grad_ys.unbind(0), strict=True))
        stored = dict(zip(save, self.saved, strict=True))
        n = len(run.taus) - 1
        y = self.final
        shapes = [y.shape, y.shape] + [p.shape for p in self.params]
        adj = grad_at[n] if n in grad_at else torch.zeros_like(y)
        aug = _flatten([y, adj] + [torch.zeros_like(p) for p in self.params])
        adjoint_sde = AdjointSDE(run.forward_sde, list(self.params), shapes)
        method = _new_method(self.method, adjoint_sde, run.adjoint_noise(), self.options)
        # The adjoint runs in r = -s over the reversed nodes.
        rs = -run.taus
        rtimes = torch.tensor(rs, dtype=torch.float64).unbind(0)
        stepper = _Stepper(self.backward_adaptive, float(min(rs[n - 1] - rs[n], 0.01 * (rs[0] - rs[n]))))
        extra = method.init_extra_solver_state(rtimes[n], aug)
        for k in range(n - 1, -1, -1):
            aug, extra = stepper.advance(method, aug, extra, rs[k + 1], rs[k], rtimes[k + 1], rtimes[k])
            if k in grad_at:
                parts = _unflatten(aug, shapes)
                parts[0] = stored[k]  # the stored state is exact; the backsolved one has drifted
                parts[1] = parts[1] + grad_at[k]
                aug = _flatten(parts)
        parts = _unflatten(aug, shapes)
        return [parts[1]] + parts[2:]


@dataclass(eq=False)
class _ReversibleJob:
    run: _Run
    adaptive: AdaptiveSteps | None
    n_extra: int
    params: list[Tensor]
    stats: SolveStats = field(default_factory=lambda: SolveStats(steps=0))
    saved: list[Tensor] = field(default_factory=list)

    def forward(self, y0: Tensor, extra0: tuple[Tensor, ...]) -> Tensor:
        run = self.run
        self.trace: list[list[float]] = []
        trajectory = run.forward(_Stepper(self.adaptive, run.first_step()), y0, extra0, trace=self.trace)
        self.stats = trajectory.stats
        self.saved = [x.reshape(y0.shape) for x in trajectory.saved]
        self.final = run.last
        return torch.stack(self.saved, 0)

    def backward(self, grad_ys: Tensor) -> list[Tensor]:
        run = self.run
        grad_at = dict(zip(run.problem.save, grad_ys.unbind(0), strict=True))
        n = len(run.taus) - 1
        y, extra = self.final
        state_shapes = [y.shape, y.shape] + [e.shape for e in extra]
        shapes = state_shapes + [p.shape for p in self.params]
        adj = grad_at[n] if n in grad_at else torch.zeros_like(y)
        zeros = [torch.zeros_like(t) for t in (*extra, *self.params)]
        aug = _flatten([y, adj, *zeros])
        adjoint_sde = AdjointSDE(run.forward_sde, list(self.params), shapes)
        method = _new_method(_ADJOINT_REVERSIBLE_HEUN, adjoint_sde, run.adjoint_noise(), {})
        # Undo the recorded steps in reverse order, in r = -s: negation and subtraction are exact in
        # float64, so each backward step sees exactly the forward step's dt and Brownian increment.
        for i in range(len(self.trace) - 1, -1, -1):
            ta, tb, _ = self.trace[i]
            aug, extra = method.step(_time(-tb), _time(-ta), aug, extra)
            node = self.trace[i - 1][2] if i > 0 else 0  # -1 between nodes
            if node in grad_at:
                parts = _unflatten(aug, shapes)
                parts[1] = parts[1] + grad_at[node]
                aug = _flatten(parts)
        parts = _unflatten(aug, shapes)
        # Gradients of (x_0, f_0, g_0, z_0, params), in the order the autograd function received them.
        return parts[1:]
