"""DiffFlow: a learnable drift ``f`` and score ``s`` with a diffusion coefficient ``g(t)``.

Forward SDE (data to noise, ``t`` from ``t_0`` up to ``T``)::

    dx = f(x, t) dt + g(t) dW

Backward SDE (noise to data, ``t`` from ``T`` down to ``t_0``)::

    dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dW

and, for ``lambda`` in [0, 1], the marginal-preserving family
``dx = [f - (1 + lambda^2)/2 g^2 s] dt + lambda g dW``: ``lambda = 1`` is the backward SDE, ``lambda = 0``
the probability-flow ODE ``dx/dt = f - g^2 s / 2``.

The model owns no time grid: every solve takes one (see :mod:`solvers.grids`).

Example:
    >>> from sdeflow.nets import TimeMLP
    >>> model = DiffFlow(TimeMLP(2), TimeMLP(2), diffusion=0.2)
    >>> model.forward_sde().drift(torch.tensor(0.01), torch.zeros(3, 2)).shape
    torch.Size([3, 2])
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

import solvers

__all__ = ["DiffFlow", "ForwardSDE", "BackwardSDE", "ProbabilityFlowODE"]


class DiffFlow(nn.Module):
    """Diffusion normalizing flow (Zhang & Chen, 2021).

    Args:
        drift: network ``f(x, t)`` mapping ``(batch, *dims)`` and a time to ``(batch, *dims)``.
        score: network ``s(x, t)`` of the same signature.
        diffusion: the coefficient ``g``: a constant (0.2 for 2D data, 1.0 for images) or a function
            ``t -> g(t)`` of a 0-dim tensor returning a positive 0-dim tensor.
    """

    def __init__(
        self,
        drift: nn.Module,
        score: nn.Module,
        diffusion: float | Callable[[Tensor], Tensor] = 0.2,
    ):
        super().__init__()
        self.drift = drift
        self.score = score
        if callable(diffusion):
            self._g_fn: Callable[[Tensor], Tensor] | None = diffusion
            self.g_const: float | None = None
        else:
            if not float(diffusion) > 0:
                raise ValueError(f"the diffusion coefficient g must be positive, got {diffusion}")
            self._g_fn, self.g_const = None, float(diffusion)
        self._g_cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def g(self, t: Tensor) -> Tensor:
        """``g(t)`` as a 0-dim tensor of ``t``'s dtype and device."""
        if self._g_fn is not None:
            return self._g_fn(t)
        key = (t.dtype, t.device)
        if key not in self._g_cache:  # one tensor per dtype/device instead of one per step
            self._g_cache[key] = torch.tensor(self.g_const, dtype=t.dtype, device=t.device)
        return self._g_cache[key]

    def forward_sde(self) -> ForwardSDE:
        """``dx = f dt + g dW``, to be solved on an increasing grid."""
        return ForwardSDE(self)

    def backward_sde(self, lam: float = 1.0) -> BackwardSDE:
        """``dx = [f - (1 + lam^2)/2 g^2 s] dt + lam g dW``, to be solved on a reversed grid."""
        return BackwardSDE(self, lam)

    def probability_flow(self) -> ProbabilityFlowODE:
        """``dx/dt = f - g^2 s / 2``: same marginals as the SDEs, deterministic, invertible."""
        return ProbabilityFlowODE(self)


class ForwardSDE(solvers.SDE):
    """DiffFlow's forward SDE as a :class:`solvers.SDE` (diagonal noise; ``g`` broadcasts)."""

    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, model: DiffFlow):
        super().__init__()
        self.model = model

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.model.drift(x, t)

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        return self.model.g(t)


class BackwardSDE(solvers.SDE):
    """The marginal-preserving family member ``lam`` (1: DiffFlow's backward SDE), for reversed grids."""

    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, model: DiffFlow, lam: float = 1.0):
        super().__init__()
        if not 0.0 < lam:
            raise ValueError(f"lam must be positive for an SDE (lam = 0 is the probability-flow ODE), got {lam}")
        self.model = model
        self.lam = float(lam)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        g = self.model.g(t)
        weight = 0.5 * (1.0 + self.lam**2) * g * g
        return self.model.drift(x, t) - weight * self.model.score(x, t)

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        return self.lam * self.model.g(t)


class ProbabilityFlowODE(nn.Module):
    """``v(t, x) = f(x, t) - g(t)^2 s(x, t) / 2`` as a velocity field ``(t, x) -> dx/dt``."""

    def __init__(self, model: DiffFlow):
        super().__init__()
        self.model = model

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        g = self.model.g(t)
        return self.model.drift(x, t) - 0.5 * g * g * self.model.score(x, t)
