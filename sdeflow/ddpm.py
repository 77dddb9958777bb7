"""DDPM as a setting of DiffFlow: the variance-preserving score SDE with a fixed linear drift.

Song et al. (2021), "Score-Based Generative Modeling through Stochastic Differential Equations": DDPM is the
Euler discretisation of the variance-preserving (VP) SDE, t from ``t_0`` (data) to ``T`` (noise)::

    dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW,        beta(t) = beta_min + t (beta_max - beta_min)

i.e. DiffFlow (method note §1) with the drift fixed to ``f(x, t) = -beta(t) x / 2`` and ``g(t) = sqrt(beta(t))``;
only the score ``s(x, t)`` is learned. The transition kernel is Gaussian and known in closed form::

    p(x_t | x_0) = N(m(t) x_0, sigma(t)^2 I),   m(t) = exp(-B(t) / 2),   sigma(t)^2 = 1 - exp(-B(t)),
    B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2

so the score is trained by denoising score matching (Vincent 2011) at single random times instead of along
simulated paths. Everything built for DiffFlow then applies unchanged: :func:`sdeflow.sample.sample`,
:func:`sdeflow.sample.sample_ode`, :func:`sdeflow.likelihood.bound_nll` and
:func:`sdeflow.likelihood.ode_nll`, on any grid over ``[t_0, T]`` (e.g. ``UniformGrid(t0, T, N)``).

The N(0, I) prior at ``T`` is approximate. With the defaults (0.1, 20, ``T = 1``), ``B(1) = 10.05``:
``m(1) = exp(-5.025) = 6.6e-3`` (a data mean ``mu`` leaves ``6.6e-3 mu`` at ``T``) and
``sigma(1)^2 = 1 - 4.3e-5``, so ``p_T`` is N(0, I) to about 1e-2 in the mean coefficient, as in the paper.

Example:
    >>> import solvers
    >>> from sdeflow.nets import TimeMLP
    >>> model = DDPM(TimeMLP(2, t_scale=1.0))
    >>> g = torch.Generator().manual_seed(0)
    >>> denoising_score_matching(model, torch.randn(64, 2, generator=g), generator=g).shape
    torch.Size([])
    >>> from sdeflow.sample import sample
    >>> sample(model, 5, (2,), solvers.UniformGrid(model.t0, model.T, 20), generator=g).shape
    torch.Size([5, 2])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .model import DiffFlow

__all__ = ["VPSchedule", "VPDrift", "NoisePredictionScore", "DDPM", "denoising_score_matching"]


def _time(t: Tensor | float) -> Tensor:
    # a python float becomes a float64 0-dim tensor: 0-dim tensors do not promote float32 states
    return t if isinstance(t, Tensor) else torch.tensor(float(t), dtype=torch.float64)


def _per_sample(coef: Tensor, x: Tensor) -> Tensor:
    """``coef`` shaped to broadcast against ``x`` ``(B, *dims)``: 0-dim stays; ``(B,)``, ``(B, 1)`` -> ``(B, 1, ..)``"""
    if coef.ndim == 0:
        return coef
    if coef.numel() != x.shape[0]:
        raise ValueError(f"t has {coef.numel()} entries but x has batch size {x.shape[0]}")
    return coef.reshape(x.shape[0], *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class VPSchedule:
    """The linear noise schedule of the VP SDE (DDPM's ``beta_1 .. beta_N`` in continuous time).

    ``beta(t) = beta_min + t (beta_max - beta_min)``, ``B(t) = int_0^t beta``, ``m(t) = exp(-B/2)``,
    ``sigma(t) = sqrt(1 - exp(-B))``. Every method takes ``t`` as a tensor of any shape (element-wise, same
    dtype and device out) or a python float (a float64 0-dim tensor out).

    Example:
        >>> s = VPSchedule()
        >>> t = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
        >>> torch.allclose(s.mean_coeff(t) ** 2 + s.std(t) ** 2, torch.ones(3, dtype=torch.float64))
        True
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.beta_min) and math.isfinite(self.beta_max) and 0 < self.beta_min <= self.beta_max):
            raise ValueError(f"need 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    def beta(self, t: Tensor | float) -> Tensor:
        """``beta(t) = beta_min + t (beta_max - beta_min)``."""
        return self.beta_min + _time(t) * (self.beta_max - self.beta_min)

    def integral(self, t: Tensor | float) -> Tensor:
        """``B(t) = int_0^t beta(u) du = beta_min t + (beta_max - beta_min) t^2 / 2``."""
        t = _time(t)
        return t * (self.beta_min + 0.5 * (self.beta_max - self.beta_min) * t)

    def mean_coeff(self, t: Tensor | float) -> Tensor:
        """``m(t) = exp(-B(t) / 2)``: ``E[x_t | x_0] = m(t) x_0``."""
        return torch.exp(-0.5 * self.integral(t))

    def std(self, t: Tensor | float) -> Tensor:
        """``sigma(t) = sqrt(1 - exp(-B(t)))`` through ``expm1``: accurate at small ``t`` (``~ sqrt(beta_min t)``)."""
        return torch.sqrt(-torch.expm1(-self.integral(t)))

    def diffusion(self, t: Tensor | float) -> Tensor:
        """``g(t) = sqrt(beta(t))``, the VP SDE's diffusion coefficient."""
        return torch.sqrt(self.beta(t))


class VPDrift(nn.Module):
    """The fixed VP drift ``f(x, t) = -beta(t) x / 2``; no parameters.

    Called like the networks of :mod:`sdeflow.nets`: ``x`` ``(B, *dims)``, ``t`` a python float or a tensor
    of shape ``()``, ``(B,)`` or ``(B, 1)``; returns ``(B, *dims)``.

    Example:
        >>> VPDrift(VPSchedule())(torch.ones(2, 3), 0.0)
        tensor([[-0.0500, -0.0500, -0.0500],
                [-0.0500, -0.0500, -0.0500]])
    """

    def __init__(self, schedule: VPSchedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        beta = _per_sample(self.schedule.beta(t), x)
        return (-0.5 * beta).to(x.dtype) * x


class NoisePredictionScore(nn.Module):
    """A score network parameterised as a noise predictor (Ho et al. 2020): ``s(x, t) = -eps(x, t) / sigma(t)``.

    The score of the VP marginals grows like ``1 / sigma(t)`` near the data (``sigma(t0) ~ 0.01`` with the
    defaults), so a network that outputs the score itself must produce values ~100 at small ``t`` and tiny
    ones at ``T``; ``eps`` is O(1) at every ``t``. With this score the denoising score-matching loss
    ``1/2 |sigma s + eps|^2`` is DDPM's "simple" loss ``1/2 |eps - eps(x_t, t)|^2``.

    Args:
        net: the noise predictor ``eps(x, t)`` ``(B, *dims) -> (B, *dims)``, called like :mod:`sdeflow.nets`.
        schedule: the VP schedule whose ``sigma(t)`` divides it.

    Example:
        >>> from sdeflow.nets import TimeMLP
        >>> score = NoisePredictionScore(TimeMLP(2, t_scale=1.0), VPSchedule())
        >>> score(torch.zeros(3, 2), torch.full((3,), 0.5)).shape
        torch.Size([3, 2])
    """

    def __init__(self, net: nn.Module, schedule: VPSchedule):
        super().__init__()
        self.net = net
        self.schedule = schedule

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        sigma = _per_sample(self.schedule.std(_time(t)), x).to(x.dtype)
        return -self.net(x, t) / sigma


_DEFAULT_SCHEDULE = VPSchedule()  # frozen: one shared default instance is safe


class DDPM(DiffFlow):
    """DDPM / the VP score SDE as a :class:`DiffFlow` with drift :class:`VPDrift` and ``g = sqrt(beta)``.

    Args:
        score: network ``s(x, t)`` ``(B, *dims) -> (B, *dims)``, the score ``grad log p_t``. For ``t`` in
            ``[0, T]`` give :class:`sdeflow.nets.TimeMLP` ``t_scale=1/T`` (its default, 1/0.05, is fitted to
            DiffFlow's interval and makes the time features oscillate hundreds of times over ``[0, 1]``).
        schedule: the noise schedule (default ``beta`` from 0.1 to 20).
        t0: the data end of the time interval (the SDE is not integrated down to 0, where the score of a
            narrow data distribution blows up); ``1e-3`` as in Song et al.
        T: the noise end, where N(0, I) is the prior (see the module docstring for its accuracy).

    Attributes ``schedule``, ``t0`` and ``T``; sample and evaluate on grids over ``[t0, T]``.
    """

    def __init__(self, score: nn.Module, schedule: VPSchedule = _DEFAULT_SCHEDULE, t0: float = 1e-3, T: float = 1.0):
        if not 0 <= t0 < T:
            raise ValueError(f"need 0 <= t0 < T, got t0={t0}, T={T}")
        super().__init__(VPDrift(schedule), score, diffusion=schedule.diffusion)
        self.schedule = schedule
        self.t0, self.T = float(t0), float(T)

    def marginal(self, x0: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of ``p(x_t | x_0) = N(m(t) x_0, sigma(t)^2 I)``.

        ``x0`` ``(B, *dims)``; ``t`` a float or a tensor of shape ``()``, ``(B,)`` or ``(B, 1)``. Returns
        ``mean`` ``(B, *dims)`` and ``std`` broadcastable against it (0-dim, or ``(B, 1, ..., 1)``), both
        in ``x0``'s dtype, so ``x_t = mean + std * eps``.

        Example:
            >>> from sdeflow.nets import TimeMLP
            >>> mean, std = DDPM(TimeMLP(2)).marginal(torch.ones(4, 2), torch.full((4,), 0.5))
            >>> mean.shape, std.shape
            (torch.Size([4, 2]), torch.Size([4, 1]))
        """
        t = _time(t)
        mean = _per_sample(self.schedule.mean_coeff(t), x0).to(x0.dtype) * x0
        std = _per_sample(self.schedule.std(t), x0).to(x0.dtype)
        return mean, std


def denoising_score_matching(model: DDPM, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Denoising score matching loss of ``model.score`` on data ``x0`` ``(B, *dims)``; a scalar (nats-free).

    With ``lambda(t) = sigma(t)^2`` (the standard weighting of Song et al. / DDPM's "simple" loss)::

        L = E_{t, x_0, eps} [ 1/2 lambda(t) || s(x_t, t) + eps / sigma(t) ||^2 ]
          = E [ 1/2 || sigma(t) s(x_t, t) + eps ||^2 ],      x_t = m(t) x_0 + sigma(t) eps,

    summed over dimensions, averaged over the batch; ``eps ~ N(0, I)`` and ``t ~ U(t0, T)``. Its minimiser
    is the true score of ``p_t`` (``-eps / sigma`` is the score of ``p(x_t | x_0)``); the minimum value is not
    zero. The second form is the one computed (no division by a small ``sigma``).

    Times are stratified across the batch: one ``u ~ U(0, 1)`` and ``t_i = t0 + (T - t0) ((u + i/B) mod 1)``.
    Each ``t_i`` alone is uniform, so the estimate is unbiased whatever the order of the batch; together the
    times cover ``[t0, T]`` evenly, which removes most of the variance due to ``t``.

    Draws, in order, from ``generator`` (on ``x0``'s device): ``u``, then ``eps``.

    Example:
        >>> from sdeflow.nets import TimeMLP
        >>> model = DDPM(TimeMLP(2, t_scale=1.0))
        >>> loss = denoising_score_matching(model, torch.randn(32, 2), torch.Generator().manual_seed(0))
        >>> loss.backward()
    """
    batch = x0.shape[0]
    u = torch.rand((), generator=generator, dtype=x0.dtype, device=x0.device)
    offsets = torch.arange(batch, dtype=x0.dtype, device=x0.device) / batch
    t = model.t0 + (model.T - model.t0) * torch.remainder(u + offsets, 1.0)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    mean, std = model.marginal(x0, t)
    residual = std * model.score(mean + std * eps, t) + eps
    return 0.5 * residual.reshape(batch, -1).pow(2).sum(1).mean()
