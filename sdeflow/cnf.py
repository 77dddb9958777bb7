"""A continuous normalizing flow (FFJORD, Grathwohl et al. 2019) as the ``g = 0`` setting of DiffFlow.

With no noise, DiffFlow's forward SDE becomes the ODE ``dx/dt = f(x, t)`` with a learned drift, from the
data at ``t = 0`` to the N(0, I) prior at ``T``. The flow is invertible, and the instantaneous change of
variables (Chen et al. 2018) gives the exact log-density::

    log p_0(x) = log N(x(T); 0, I) + int_0^T tr(df/dx)(x(t), t) dt,     x(0) = x

computed by :func:`solvers.log_density`. Training maximises it directly (:func:`maximum_likelihood_loss`);
in training the trace is Hutchinson's estimate ``eps^T (df/dx) eps`` with one Rademacher probe per point,
held along the trajectory (unbiased, one vector-Jacobian product per evaluation instead of ``D``), and the
ODE is integrated by fixed-step RK4 (a fixed cost per iteration, backprop through the steps). Evaluation
uses the exact trace and the adaptive Dopri5.

Example:
    >>> from sdeflow.nets import TimeMLP
    >>> cnf = CNF(TimeMLP(2, width=16, t_scale=1.0))
    >>> g = torch.Generator().manual_seed(0)
    >>> maximum_likelihood_loss(cnf, torch.randn(8, 2, generator=g), steps=4, generator=g).shape
    torch.Size([])
    >>> cnf.sample(5, (2,), steps=4, generator=g).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

import solvers

from .loss import standard_normal_log_prob
from .sample import prior_sample

__all__ = ["CNF", "CNFVelocity", "maximum_likelihood_loss", "EVAL_SOLVER"]

# Evaluation default: the tolerance of sdeflow.likelihood.ode_nll, so CNF and DiffFlow NLLs are comparable.
EVAL_SOLVER = solvers.Dopri5(rtol=1e-5, atol=1e-5)


class CNFVelocity(solvers.ODE):
    """The CNF's ODE for :mod:`solvers`: ``velocity(t, x) = drift(x, t)``."""

    def __init__(self, model: CNF):
        super().__init__()
        self.model = model

    def velocity(self, t: Tensor, x: Tensor) -> Tensor:
        return self.model.drift(x, t)


class CNF(nn.Module):
    """Continuous normalizing flow ``dx/dt = drift(x, t)``, data at ``t = 0``, N(0, I) prior at ``t = T``.

    Args:
        drift: network ``f(x, t)`` ``(B, *dims) -> (B, *dims)``, called like :mod:`sdeflow.nets` networks
            (for ``T = 1`` give :class:`sdeflow.nets.TimeMLP` ``t_scale=1.0``). It must treat batch
            elements independently (the trace is read from derivatives of batch sums).
        T: the prior end of the time interval.
    """

    def __init__(self, drift: nn.Module, T: float = 1.0):
        super().__init__()
        if not (math.isfinite(T) and T > 0):
            raise ValueError(f"T must be finite and positive, got {T}")
        self.drift = drift
        self.T = float(T)

    def probability_flow(self) -> CNFVelocity:
        """The ODE ``dx/dt = f(x, t)`` as a :class:`solvers.ODE` (the name matches :class:`DiffFlow`'s)."""
        return CNFVelocity(self)

    def grid(self, steps: int) -> solvers.UniformGrid:
        """``steps`` equal steps from 0 (data) to ``T`` (prior)."""
        return solvers.UniformGrid(0.0, self.T, steps)

    def log_prob(
        self,
        x: Tensor,
        *,
        steps: int | None = None,
        solver: solvers.ODESolver | None = None,
        trace: solvers.TraceEstimator | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``log p_0(x) = log N(x(T); 0, I) + int_0^T tr(df/dx) dt`` in nats, shape ``(B,)``, for ``x`` ``(B, *dims)``.

        Two sets of defaults:

        - ``steps`` given (training): ``RK4`` on ``steps`` equal steps and ``HutchinsonTrace`` with one
          Rademacher probe per point drawn from ``generator``: an unbiased estimate of the RK4 log-density.
        - ``steps=None`` (evaluation): :data:`EVAL_SOLVER` (Dopri5, ``rtol = atol = 1e-5``) over ``[0, T]``
          and the exact trace (``generator`` unused).

        ``solver`` and ``trace`` override the defaults (a fixed-grid solver needs ``steps``; pass either
        ``trace`` or ``generator``, not both: a given estimator carries its own generator). Differentiable
        when gradients are enabled (training); evaluate under ``torch.no_grad()`` to keep no graph.

        Example:
            >>> from sdeflow.nets import TimeMLP
            >>> cnf = CNF(TimeMLP(2, width=16, t_scale=1.0))
            >>> with torch.no_grad():
            ...     cnf.log_prob(torch.zeros(3, 2)).shape
            torch.Size([3])
        """
        if trace is not None and generator is not None:
            raise ValueError("pass either a trace estimator (with its own generator) or a generator, not both")
        if steps is None:
            solver = EVAL_SOLVER if solver is None else solver
            if not solver.adaptive:
                raise ValueError(f"the fixed-grid solver {type(solver).__name__} needs steps")
            trace = solvers.ExactTrace() if trace is None else trace
            grid = self.grid(1)  # an adaptive solver takes its own steps; only the end points matter
        else:
            solver = solvers.RK4() if solver is None else solver
            trace = solvers.HutchinsonTrace("rademacher", generator=generator) if trace is None else trace
            grid = self.grid(steps)
        out = solvers.log_density(self.probability_flow(), x, grid, trace=trace,
                                  base_log_prob=standard_normal_log_prob, solver=solver)
        assert out.log_prob is not None
        return out.log_prob

    @torch.no_grad()
    def sample(
        self,
        n: int,
        event_shape: Sequence[int],
        steps: int,
        generator: torch.Generator | None = None,
        *,
        solver: solvers.ODESolver | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``n`` samples ``(n, *event_shape)``: ``x(T) ~ N(0, I)`` (from ``generator``) integrated from ``T``
        back to 0 by ``solver`` (default ``RK4`` on ``steps`` equal steps; an adaptive one picks its own).

        Example:
            >>> from sdeflow.nets import TimeMLP
            >>> CNF(TimeMLP(2, t_scale=1.0)).sample(4, (2,), 8, torch.Generator().manual_seed(0)).shape
            torch.Size([4, 2])
        """
        x_T = prior_sample(n, event_shape, generator=generator, dtype=dtype, device=device)
        solver = solvers.RK4() if solver is None else solver
        return solvers.odesolve(self.probability_flow(), x_T, self.grid(steps).reversed(), solver=solver).xs[-1]

    @torch.no_grad()
    def trajectory(self, x0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """The flow of data ``x0`` ``(B, *dims)`` to noise by RK4 on ``steps`` equal steps: ``times``
        ``(steps + 1,)`` from 0 to ``T`` and ``states`` ``(steps + 1, B, *dims)``, ``states[0] = x0``.

        Example:
            >>> from sdeflow.nets import TimeMLP
            >>> ts, xs = CNF(TimeMLP(2, t_scale=1.0)).trajectory(torch.zeros(3, 2), 5)
            >>> ts.shape, xs.shape
            (torch.Size([6]), torch.Size([6, 3, 2]))
        """
        out = solvers.odesolve(self.probability_flow(), x0, self.grid(steps), solver=solvers.RK4(),
                               save=solvers.SaveAt(t0=True, steps=True))
        return out.ts, out.xs


def maximum_likelihood_loss(
    model: CNF,
    x: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    *,
    solver: solvers.ODESolver | None = None,
) -> Tensor:
    """``-mean_i log p_0(x_i)`` in nats per sample, a scalar: the CNF's training loss.

    The log-density is :meth:`CNF.log_prob` with its training defaults: RK4 on ``steps`` equal steps and
    Hutchinson's trace with one Rademacher probe per point from ``generator``, so the value is an unbiased
    estimate of the NLL *of the RK4-discretised flow*, and its gradient of that NLL's gradient (backprop
    through the steps). ``solver`` replaces RK4 (``Dopri5(...)``: FFJORD's adaptive training, the ``steps``
    nodes then only being output times).

    Watch the gap to the continuous model: with few steps and a large learning rate, training can learn
    dynamics whose RK4 log-density is no longer that of the flow (and no longer normalised): the loss
    then falls below the data's entropy while :meth:`CNF.log_prob` with its evaluation defaults rises.
    Compare the two on held-out data now and then.

    Example:
        >>> from sdeflow.nets import TimeMLP
        >>> cnf = CNF(TimeMLP(2, width=16, t_scale=1.0))
        >>> maximum_likelihood_loss(cnf, torch.randn(8, 2), 4, torch.Generator().manual_seed(0)).backward()
    """
    return -model.log_prob(x, steps=steps, solver=solver, generator=generator).mean()
