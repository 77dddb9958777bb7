"""Native Euler–Maruyama on any fixed grid.

On nodes ``t_0, ..., t_N`` (increasing, or decreasing for a backward solve)::

    x_{k+1} = x_k + f(t_k, x_k) dt_k + g(t_k, x_k) dW_k,    dt_k = t_{k+1} - t_k,   dW_k ~ N(0, |dt_k| I)

Itô, strong order 1/2 (1 for additive noise), weak order 1. The loop evaluates the drift and the
diffusion once per node, draws one Gaussian per step, and keeps only the states asked for, so memory does
not grow with the number of steps. Times are taken from the grid (float64, exact), never accumulated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .sde import SDE, NoiseType, SDEType, check_diffusion_shape, diffusion_times_noise, noise_shape
from .solution import PathCost, SolveStats, Transition

__all__ = ["SDESolver", "EulerMaruyama", "Problem", "Trajectory"]


class SDESolver:
    """Base of SDE solvers. Each declares its convergence orders for a noise type (the tests assert them)."""

    def strong_order(self, noise_type: NoiseType | str) -> float:
        raise NotImplementedError

    def weak_order(self, noise_type: NoiseType | str) -> float:
        raise NotImplementedError

    def check(self, problem: Problem) -> None:
        """Raise a clear error when this solver cannot solve ``problem`` (SDE type, noise type, ...)."""

    def integrate(self, problem: Problem, *, record: bool = False) -> Trajectory:
        """Solve ``problem``; ``record`` (fixed-grid solvers) also returns every state and increment."""
        raise NotImplementedError


@dataclass(frozen=True)
class Problem:
    """Everything a solve is about, validated once by :func:`solvers.sdesolve`.

    ``nodes`` are the grid's float64 times in visiting order; ``save`` the indices of the nodes to return.
    ``brownian`` is a path ``(ta, tb) -> W(tb) - W(ta)``; without it increments are drawn from
    ``generator`` (``None``: torch's global generator).
    """

    sde: SDE
    x0: Tensor
    nodes: np.ndarray
    save: tuple[int, ...]
    brownian: Callable[[float, float], Tensor] | None
    generator: torch.Generator | None
    cost: PathCost | None

    @property
    def noise_type(self) -> NoiseType:
        return NoiseType(self.sde.noise_type)

    def saved_times(self) -> Tensor:
        """Times of the saved nodes, shape ``(S,)``: ``Solution.ts``."""
        return self.times()[list(self.save)]

    def times(self) -> Tensor:
        # a copy: as_tensor would alias ExplicitGrid's read-only nodes, and the drift receives views of these
        return torch.tensor(self.nodes, dtype=self.x0.dtype, device=self.x0.device)

    def increment(self, k: int, shape: tuple[int, ...]) -> tuple[Tensor, float]:
        """``(z, scale)`` with ``dW_k = scale * z`` for step ``k`` (``scale`` folds ``sqrt|dt|`` into one op)."""
        ta, tb = float(self.nodes[k]), float(self.nodes[k + 1])
        x0 = self.x0
        if self.brownian is None:
            z = torch.randn(shape, generator=self.generator, dtype=x0.dtype, device=x0.device)
            return z, math.sqrt(abs(tb - ta))
        dw = self.brownian(ta, tb) if ta < tb else -self.brownian(tb, ta)
        if dw.numel() != math.prod(shape):
            raise ValueError(
                f"the Brownian path returned an increment of shape {tuple(dw.shape)}; this SDE needs {shape}"
            )
        return dw.reshape(shape).to(x0.dtype), 1.0


@dataclass
class Trajectory:
    """Raw output of a fixed-grid integration (internal): saved states, summed cost, all states and
    increments when ``record`` was asked (the discrete adjoint stores them)."""

    saved: list[Tensor]
    cost: Tensor | None
    stats: SolveStats
    states: list[Tensor] | None = None
    increments: list[Tensor] | None = None


def euler_update(noise_type: NoiseType, x: Tensor, f: Tensor, g: Tensor, dt: float, z: Tensor, scale: float) -> Tensor:
    """``x + f dt + g (scale z)``: one Euler–Maruyama update, fused for diagonal noise."""
    if noise_type is NoiseType.DIAGONAL:
        # in place on the fresh sum: one allocation fewer per step, same arithmetic (bit-identical)
        return torch.add(x, f, alpha=dt).addcmul_(g, z, value=scale)
    return torch.add(x, f, alpha=dt) + diffusion_times_noise(noise_type, g, z if scale == 1.0 else z * scale)


class EulerMaruyama(SDESolver):
    """Itô Euler–Maruyama (see the module docstring). The method DiffFlow's loss is defined on.

    Example:
        >>> import solvers
        >>> class OU(solvers.SDE):
        ...     def drift(self, t, x): return -x
        ...     def diffusion(self, t, x): return torch.full_like(x, 0.3)
        >>> sol = solvers.sdesolve(OU(), torch.zeros(8, 2), solvers.UniformGrid(0.0, 1.0, 50),
        ...                        generator=torch.Generator().manual_seed(0))
        >>> sol.xs.shape
        torch.Size([1, 8, 2])
    """

    def strong_order(self, noise_type: NoiseType | str) -> float:
        return 1.0 if NoiseType(noise_type) is NoiseType.ADDITIVE else 0.5

    def weak_order(self, noise_type: NoiseType | str) -> float:
        return 1.0

    def check(self, problem: Problem) -> None:
        if SDEType(problem.sde.sde_type) is not SDEType.ITO:
            raise ValueError("EulerMaruyama integrates Itô SDEs; this SDE is Stratonovich (use a torchsde solver)")

    def integrate(self, problem: Problem, *, record: bool = False) -> Trajectory:
        """Run the loop; with ``record`` also keep every state and increment (detached use only)."""
        sde, cost, nodes = problem.sde, problem.cost, problem.nodes
        noise_type = problem.noise_type
        steps = len(nodes) - 1
        ts = problem.times().unbind(0)
        dts = np.diff(nodes).tolist()  # Python floats once, rather than NumPy scalar arithmetic every step
        save = set(problem.save)
        x = problem.x0
        saved = [x] if 0 in save else []
        states: list[Tensor] | None = None
        increments: list[Tensor] | None = None
        total: Tensor | None = None
        f = g = None
        shape: tuple[int, ...] = ()
        drift_evals = diffusion_evals = 0
        for k in range(steps):
            if f is None:
                f, g = sde.drift(ts[k], x), sde.diffusion(ts[k], x)
                drift_evals, diffusion_evals = drift_evals + 1, diffusion_evals + 1
                if k == 0:
                    _check_drift(f, x)
                    check_diffusion_shape(noise_type, g, x)
                    shape = noise_shape(noise_type, g, x)  # fixed by the checked shapes of step 0
                    if record:
                        # Two buffers allocated once rather than 2N small tensors kept one per step: small
                        # long-lived blocks between each step's large short-lived activations fragment the C
                        # heap (glibc), and the peak memory then grows with N far beyond the states themselves.
                        state_buffer = x.new_empty((steps + 1, *x.shape))
                        state_buffer[0] = x
                        increment_buffer = x.new_empty((steps, *shape))
            dt = dts[k]
            z, scale = problem.increment(k, shape)
            if record or cost is not None:
                dw = z * scale if scale != 1.0 else z
                z, scale = dw, 1.0
            x_next = euler_update(noise_type, x, f, g, dt, z, scale)
            if record:
                state_buffer[k + 1] = x_next
                increment_buffer[k] = dw
                x_next, dw = state_buffer[k + 1], increment_buffer[k]  # the fresh tensors are freed now
            f = g = None
            if cost is not None:
                f, g = sde.drift(ts[k + 1], x_next), sde.diffusion(ts[k + 1], x_next)
                drift_evals, diffusion_evals = drift_evals + 1, diffusion_evals + 1
                term = cost(Transition(ts[k], ts[k + 1], dt, x, x_next, dw, f, g, cost.node(ts[k + 1], x_next)))
                total = term if total is None else total + term
            x = x_next
            if k + 1 in save:
                saved.append(x)
        if record:
            states, increments = list(state_buffer.unbind(0)), list(increment_buffer.unbind(0))
        stats = SolveStats(steps=steps, drift_evals=drift_evals, diffusion_evals=diffusion_evals)
        return Trajectory(saved, total, stats, states, increments)


def _check_drift(f: Any, x: Tensor) -> None:
    if not isinstance(f, Tensor) or f.shape != x.shape:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(f"drift must return a tensor of the state's shape {tuple(x.shape)}, got {shape}")
    if f.dtype != x.dtype or f.device != x.device:
        raise ValueError(
            f"drift returned dtype {f.dtype} on {f.device}; the state is {x.dtype} on {x.device}"
        )
