"""DiffFlow's loss: the KL divergence between the forward and backward path measures.

On a grid ``t_0 < ... < t_N`` with ``dt_i = t_{i+1} - t_i``, the forward Euler–Maruyama path
``x_{i+1} = x_i + f(x_i, t_i) dt_i + g_i sqrt(dt_i) dF_i`` from a data point ``x_0`` is scored by::

    L = -log N(x_N; 0, I) + sum_i 1/2 |dB_i|^2 - sum_i 1/2 |dF_i|^2 + D sum_i log(g_{i+1} / g_i)

    dB_i = (x_i - x_{i+1} + [f(x_{i+1}, t_{i+1}) - g_{i+1}^2 s(x_{i+1}, t_{i+1})] dt_i) / (g_{i+1} sqrt(dt_i))

where ``dB_i`` is the backward noise that reproduces the step. ``L`` is a single-sample estimate of the
negative ELBO, an upper bound on ``-log p(x_0)`` in nats (the last sum vanishes for constant ``g``).
The ``dF`` term has zero gradient but keeps the value a bound. ``f`` is evaluated once per node: its value
at ``(x_{i+1}, t_{i+1})`` serves both ``dB_i`` and the next forward step (N+1 drift and N score
evaluations per path).

Example:
    >>> import solvers
    >>> from sdeflow.model import DiffFlow
    >>> from sdeflow.nets import TimeMLP
    >>> model = DiffFlow(TimeMLP(2), TimeMLP(2), diffusion=0.2)
    >>> out = path_kl(model, torch.randn(16, 2), solvers.PowerGrid(0.001, 0.05, 10),
    ...               generator=torch.Generator().manual_seed(0))
    >>> out.loss.shape, out.per_sample.shape
    (torch.Size([]), torch.Size([16]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

import solvers

from .model import DiffFlow

__all__ = ["PathKL", "BackwardNoiseCost", "path_kl", "standard_normal_log_prob"]


def standard_normal_log_prob(x: Tensor) -> Tensor:
    """``log N(x; 0, I)`` over all non-batch dimensions, shape ``(batch,)``."""
    flat = x.reshape(x.shape[0], -1)
    return -0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)


class BackwardNoiseCost(solvers.PathCost):
    """The per-step term ``1/2 |dB_i|^2 - 1/2 |dF_i|^2 + D log(g_{i+1}/g_i)`` as a :class:`solvers.PathCost`.

    It reads ``f(x_{i+1}, t_{i+1})`` and ``g_{i+1}`` from the solver's evaluation at the later node and
    evaluates the score there once (:meth:`node`).
    """

    def __init__(self, model: DiffFlow):
        super().__init__()
        self.model = model

    def node(self, t: Tensor, x: Tensor) -> Tensor:
        return self.model.score(x, t)

    def forward(self, step: solvers.Transition) -> Tensor:
        g1 = step.diffusion1
        dt = step.dt
        mean_gap = step.x0 - step.x1 + (step.drift1 - g1 * g1 * step.extra1) * dt
        db = mean_gap / (g1 * math.sqrt(dt))
        batch = step.x0.shape[0]
        df_sq = step.dw.reshape(batch, -1).pow(2).sum(1) / dt  # |dF|^2, with dW = sqrt(dt) dF
        term = 0.5 * db.reshape(batch, -1).pow(2).sum(1) - 0.5 * df_sq
        if self.model.g_const is None:  # time-varying g: the transition densities' normalisers differ
            dim = step.x0[0].numel()
            term = term + dim * torch.log(g1 / self.model.g(step.t0))
        return term


@dataclass(frozen=True)
class PathKL:
    """The loss and its parts. ``loss`` is the batch mean of ``per_sample`` (nats per sample);
    ``terminal`` is ``-log N(x_N; 0, I)`` and ``path`` the summed step terms, both ``(batch,)``;
    ``x_end`` the states at ``T``."""

    loss: Tensor
    per_sample: Tensor
    path: Tensor
    terminal: Tensor
    x_end: Tensor


def path_kl(
    model: DiffFlow,
    x0: Tensor,
    grid: solvers.Grid,
    *,
    generator: torch.Generator | None = None,
    adjoint: solvers.Adjoint | None = None,
    antithetic: bool = True,
) -> PathKL:
    """DiffFlow's loss (module docstring) on data ``x0`` ``(batch, *dims)`` over an increasing ``grid``.

    ``adjoint`` defaults to :class:`solvers.DiscreteAdjoint` (memory independent of the number of steps);
    pass :class:`solvers.DirectAdjoint` for plain backprop. Both give the same value and gradients.

    ``antithetic`` (default) simulates two paths per data point, driven by opposite noise
    (:class:`solvers.AntitheticIncrements`), and averages them: the same expectation (still an upper bound
    on the NLL), but the terms odd in the noise, which dominate the variance of the loss and of its
    gradient at DiffFlow's small ``g``, cancel within each pair. The cost is two paths per data point.
    ``per_sample``, ``path`` and ``terminal`` are then pair averages, shape ``(batch,)``; ``x_end`` holds
    both paths, ``(2 * batch, *dims)``. With ``antithetic=False`` this is exactly the reference estimator.
    """
    if isinstance(grid, solvers.StratifiedGrid):  # a distribution over grids has no nodes of its own
        raise TypeError("a StratifiedGrid is a distribution over grids: pass grid.sample(generator)")
    if not grid.increasing:
        raise ValueError("the loss runs the forward SDE: pass an increasing grid (not grid.reversed())")
    adjoint = solvers.DiscreteAdjoint() if adjoint is None else adjoint
    sde, cost = model.forward_sde(), BackwardNoiseCost(model)
    if antithetic:
        x_start = torch.cat([x0, x0])
        noise = solvers.AntitheticIncrements(x_start.shape, generator, dtype=x0.dtype, device=x0.device)
        solution = solvers.sdesolve(sde, x_start, grid, brownian=noise, adjoint=adjoint, cost=cost)
    else:
        solution = solvers.sdesolve(sde, x0, grid, generator=generator, adjoint=adjoint, cost=cost)
    x_end = solution.xs[-1]
    path, terminal = solution.cost, -standard_normal_log_prob(x_end)
    if antithetic:
        path, terminal = _pair_mean(path), _pair_mean(terminal)
    per_sample = path + terminal
    return PathKL(per_sample.mean(), per_sample, path, terminal, x_end)


def _pair_mean(values: Tensor) -> Tensor:
    first, second = values.chunk(2)
    return 0.5 * (first + second)
