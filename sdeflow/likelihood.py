"""Likelihoods of a DiffFlow: the discrete bound (the training loss) and the exact probability-flow NLL.

Two numbers per data point ``x``, both negative log-likelihoods in nats of the density at time ``t_0``
(the data end of the grid, ``t_0 = 0.001`` in the 2D setting), with the standard-normal prior at ``T``:

- :func:`bound_nll`: the path-KL loss of :mod:`sdeflow.loss` per sample, an upper bound on the NLL of the
  discrete-time model (a single-sample estimate of ``-ELBO``; average ``repeats`` noise draws to cut its
  variance). It depends on the grid.
- :func:`ode_nll`: the exact NLL of the continuous model through the probability-flow ODE
  ``dx/dt = f - g^2 s / 2`` (method note §6), integrated from ``t_0`` to ``T`` with the instantaneous
  change of variables::

      log p_{t0}(x) = log N(x(T); 0, I) + int_{t0}^{T} tr(dv/dx)(t, x(t)) dt

  It is not a bound and does not depend on any grid, only on the solver's tolerance.

Both are computed in the model's (scaled) coordinates; :func:`scaler_log_det` converts to the data's:
for ``y = A x + b``, ``-log p_X(x) = -log p_Y(y) - log|det A|``. :func:`bits_per_dim` converts nats.

Example:
    >>> import solvers
    >>> from sdeflow.model import DiffFlow
    >>> from sdeflow.nets import TimeMLP
    >>> model = DiffFlow(TimeMLP(2, width=16), TimeMLP(2, width=16))
    >>> x = torch.randn(8, 2)
    >>> grid = solvers.PowerGrid(0.001, 0.05, 10)
    >>> bound = bound_nll(model, x, grid, generator=torch.Generator().manual_seed(0))
    >>> exact = ode_nll(model, x, t0=0.001, T=0.05)
    >>> bound.shape, exact.shape
    (torch.Size([8]), torch.Size([8]))
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

import solvers

from .data import Scaler
from .loss import path_kl, standard_normal_log_prob
from .model import DiffFlow

__all__ = ["bound_nll", "ode_nll", "bits_per_dim", "scaler_log_det"]


@torch.no_grad()
def bound_nll(
    model: DiffFlow,
    x: Tensor,
    grid: solvers.Grid | solvers.StratifiedGrid,
    *,
    generator: torch.Generator | None = None,
    repeats: int = 1,
) -> Tensor:
    """The discrete bound ``-ELBO(x)`` in nats per point, shape ``(batch,)``, averaged over ``repeats`` draws.

    Args:
        model: the DiffFlow (use the EMA copy for evaluation).
        x: data in model coordinates, ``(batch, *dims)``.
        grid: an increasing grid, or a :class:`solvers.StratifiedGrid` (a fresh random grid per repeat: the
            bound of a model trained on random grids, averaged over grids too).
        generator: source of the forward noise (and of the random grids). Same state, same value.
        repeats: independent noise draws averaged; each is an upper bound in expectation, so is the mean.

    Example:
        >>> import solvers
        >>> from sdeflow.model import DiffFlow
        >>> from sdeflow.nets import TimeMLP
        >>> model = DiffFlow(TimeMLP(2, width=16), TimeMLP(2, width=16))
        >>> grid = solvers.PowerGrid(0.001, 0.05, 5).stratified()
        >>> g = torch.Generator().manual_seed(0)
        >>> bound_nll(model, torch.zeros(3, 2), grid, generator=g, repeats=2).shape
        torch.Size([3])
    """
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    total = x.new_zeros(x.shape[0])
    for _ in range(repeats):
        drawn = grid.sample(generator) if isinstance(grid, solvers.StratifiedGrid) else grid
        # DirectAdjoint: no graph is built under no_grad, so the plain solve is the cheapest one
        total += path_kl(model, x, drawn, generator=generator, adjoint=solvers.DirectAdjoint()).per_sample
    return total / repeats


def ode_nll(
    model: DiffFlow,
    x: Tensor,
    *,
    t0: float,
    T: float,
    solver: solvers.ODESolver | None = None,
    trace: solvers.TraceEstimator | None = None,
) -> Tensor:
    """Exact NLL ``-log p_{t0}(x)`` in nats, ``(batch,)``, through the probability-flow ODE (see the module).

    Args:
        model: the DiffFlow (use the EMA copy for evaluation).
        x: data in model coordinates, ``(batch, *dims)``; every point is integrated, so chunk huge sets.
        t0, T: the data and prior ends of the time interval (the training grid's end points).
        solver: default ``Dopri5(rtol=1e-5, atol=1e-5)``; a fixed-grid solver (``RK4``) is faster, inexact.
        trace: default :class:`solvers.ExactTrace` (right for 2D); ``HutchinsonTrace`` for images.

    Runs under ``torch.no_grad()``: the result carries no graph (the trace's vector-Jacobian products
    are taken inside the solve).

    Example:
        >>> from sdeflow.model import DiffFlow
        >>> from sdeflow.nets import TimeMLP
        >>> model = DiffFlow(TimeMLP(2, width=16), TimeMLP(2, width=16))
        >>> ode_nll(model, torch.zeros(4, 2), t0=0.001, T=0.05).shape
        torch.Size([4])
    """
    if not 0 <= t0 < T:
        raise ValueError(f"need 0 <= t0 < T, got t0={t0}, T={T}")
    solver = solvers.Dopri5(rtol=1e-5, atol=1e-5) if solver is None else solver
    # One grid step: the adaptive solver picks its own steps inside [t0, T]; only the end points matter.
    grid = solvers.UniformGrid(float(t0), float(T), 1)
    with torch.no_grad():
        out = solvers.log_density(model.probability_flow(), x, grid, trace=trace,
                                  base_log_prob=standard_normal_log_prob, solver=solver)
    assert out.log_prob is not None
    return -out.log_prob


def bits_per_dim(nll_nats: Tensor | float, dim: int) -> Tensor | float:
    """Convert an NLL in nats per point to bits per dimension: ``nll / (dim * ln 2)``.

    Example:
        >>> bits_per_dim(2 * math.log(2), 2)
        1.0
    """
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    return nll_nats / (dim * math.log(2))


def scaler_log_det(scaler: Scaler) -> float:
    """``log|det dy/dx|`` of the scaler's map ``y = (x * scale - mean) / std``: ``sum_i log(scale / std_i)``.

    An NLL computed in model coordinates ``y`` converts to data coordinates ``x`` by
    ``nll_x = nll_y - scaler_log_det(scaler)`` (change of variables: ``p_X(x) = p_Y(y) |det dy/dx|``).

    Example:
        >>> s = Scaler(0.5, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
        >>> round(scaler_log_det(s), 6) == round(2 * math.log(0.5), 6)
        True
    """
    return float(torch.log(scaler.scale / scaler.std.to(torch.float64)).sum())
