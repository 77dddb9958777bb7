"""Model families: what the trainer, the evaluation and the command line need to know of a generative model.

A family turns networks into a model and tells how to train, sample and score it. Three share one trainer:

========== ============================ ======================================= ==========================
family     model                        training loss                           sampling with N steps
========== ============================ ======================================= ==========================
diffflow   learned drift f and score s  path KL on a random power grid          backward SDE, power grid
ddpm       fixed VP drift, learned s    denoising score matching                reverse SDE, uniform grid
ffjord     learned drift, g = 0         maximum likelihood (Hutchinson, RK4)    ODE, RK4 on a uniform grid
========== ============================ ======================================= ==========================

Every family also gives a held-out NLL: the discrete path bound (diffflow, ddpm) and the exact NLL through
an ODE (the probability flow of diffflow and ddpm; the flow itself for ffjord).

Example:
    >>> from sdeflow.nets import TimeMLP
    >>> family = DiffFlowFamily()
    >>> model = family.build(lambda role: TimeMLP(2, width=16, t_scale=family.t_scale))
    >>> x = torch.zeros(4, 2)
    >>> family.loss(model, x, steps=3, generator=torch.Generator().manual_seed(0)).shape
    torch.Size([])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

import solvers

from .cnf import CNF, maximum_likelihood_loss
from .ddpm import DDPM, NoisePredictionScore, VPSchedule, denoising_score_matching
from .likelihood import bound_nll, ode_nll
from .loss import path_kl
from .model import DiffFlow
from .sample import Samples, prior_sample, sample, sample_ode, sample_trajectory

__all__ = ["ModelFamily", "DiffFlowFamily", "DDPMFamily", "FFJORDFamily", "family_names", "make_family"]

NetFactory = Callable[[str], nn.Module]
"""Makes one learned field given its role, ``"drift"`` or ``"score"``."""


class ModelFamily(ABC):
    """How to build, train, sample and score one kind of model on ``(batch, *event_shape)`` data.

    ``t0`` and ``T`` are the ends of the family's time interval (data at ``t0``, the ``N(0, I)`` prior at
    ``T``); ``t_scale = 1 / T`` maps it onto ``[0, 1]`` for the networks' time features. ``stochastic``:
    whether :meth:`sample` with ``ode=False`` simulates an SDE (diffflow, ddpm); a deterministic family
    (ffjord) samples with its ODE whatever ``ode`` says.
    """

    name: ClassVar[str]
    stochastic: ClassVar[bool]
    t0: float
    T: float

    @property
    def t_scale(self) -> float:
        return 1.0 / self.T

    @abstractmethod
    def build(self, net: NetFactory) -> nn.Module:
        """A fresh model whose learned fields are made by ``net(role)``, role ``"drift"`` or ``"score"``."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Adam parameter groups (one per learned field, named)."""
        return [{"params": list(model.parameters()), "lr": lr, "name": "model"}]

    @abstractmethod
    def loss(self, model: nn.Module, x: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        """The scalar training loss (mean over the batch) on data ``x`` with ``steps`` time steps."""

    @abstractmethod
    def grid(self, steps: int) -> solvers.Grid:
        """The increasing sampling and evaluation grid with ``steps`` steps on ``[t0, T]``."""

    @abstractmethod
    def sample(self, model: nn.Module, n: int, event_shape: Sequence[int], steps: int,
               generator: torch.Generator, *, ode: bool = False, solver: solvers.ODESolver | None = None) -> Tensor:
        """``n`` samples ``(n, *event_shape)`` with ``steps`` steps on :meth:`grid`. ``ode``: the deterministic
        sampler, with ``solver`` (default RK4 on the grid's nodes; an adaptive one takes its own steps)."""

    def bound_nll(self, model: nn.Module, x: Tensor, steps: int, generator: torch.Generator) -> Tensor | None:
        """The discrete upper bound on the NLL, nats per point ``(batch,)``; ``None`` where there is none."""
        return None

    @abstractmethod
    def exact_nll(self, model: nn.Module, x: Tensor, *, trace: solvers.TraceEstimator | None = None,
                  solver: solvers.ODESolver | None = None) -> Tensor:
        """The NLL through an ODE, nats per point ``(batch,)`` (default: exact trace, Dopri5 at 1e-5)."""

    @abstractmethod
    def forward_trajectory(self, model: nn.Module, x: Tensor, steps: int,
                           generator: torch.Generator) -> Samples:
        """The data-to-noise path of ``x`` on :meth:`grid`: ``ts`` ``(steps + 1,)`` increasing, ``xs``
        ``(steps + 1, *x.shape)``."""

    @abstractmethod
    def sample_trajectory(self, model: nn.Module, n: int, event_shape: Sequence[int], steps: int,
                          generator: torch.Generator) -> Samples:
        """The noise-to-data path of ``n`` samples: ``ts`` decreasing from ``T``, ``xs`` ``(S, n, *event_shape)``
        with ``xs[-1]`` the samples (as :meth:`sample` draws them)."""


class _DiffusionFamily(ModelFamily):
    """What DiffFlow and DDPM share: a :class:`DiffFlow` sampled by its backward SDE or probability flow on
    :meth:`grid`, scored by the discrete path bound and the probability-flow ODE."""

    stochastic: ClassVar[bool] = True

    def sample(self, model: nn.Module, n: int, event_shape: Sequence[int], steps: int,
               generator: torch.Generator, *, ode: bool = False, solver: solvers.ODESolver | None = None) -> Tensor:
        assert isinstance(model, DiffFlow)
        where = dict(generator=generator, device=_device(model), dtype=_dtype(model))
        if ode:
            return sample_ode(model, n, tuple(event_shape), self.grid(steps), solver=solver, **where)
        return sample(model, n, tuple(event_shape), self.grid(steps), **where)

    def bound_nll(self, model: nn.Module, x: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        assert isinstance(model, DiffFlow)
        return bound_nll(model, x, self.grid(steps), generator=generator)

    def exact_nll(self, model: nn.Module, x: Tensor, *, trace: solvers.TraceEstimator | None = None,
                  solver: solvers.ODESolver | None = None) -> Tensor:
        assert isinstance(model, DiffFlow)
        return ode_nll(model, x, t0=self.t0, T=self.T, trace=trace, solver=solver)

    def forward_trajectory(self, model: nn.Module, x: Tensor, steps: int,
                           generator: torch.Generator) -> Samples:
        assert isinstance(model, DiffFlow)
        with torch.no_grad():
            path = solvers.sdesolve(model.forward_sde(), x, self.grid(steps), generator=generator,
                                    save=solvers.SaveAt(t0=True, steps=True))
        return Samples(path.ts, path.xs)

    def sample_trajectory(self, model: nn.Module, n: int, event_shape: Sequence[int], steps: int,
                          generator: torch.Generator) -> Samples:
        assert isinstance(model, DiffFlow)
        return sample_trajectory(model, n, tuple(event_shape), self.grid(steps), generator=generator,
                                 save=solvers.SaveAt(t0=True, steps=True), device=_device(model),
                                 dtype=_dtype(model))


@dataclass(frozen=True)
class DiffFlowFamily(_DiffusionFamily):
    """DiffFlow (:class:`sdeflow.model.DiffFlow`): path KL on the power grid ``[t0, T]`` (method note §5).

    ``random_grid``: train on a stratified random draw around the grid; ``antithetic``: opposite-noise
    path pairs (:func:`sdeflow.loss.path_kl`); ``profile``: the image profile grid
    (:class:`solvers.ProfileGrid`, method note §5) instead of the power grid.
    """

    name: ClassVar[str] = "diffflow"
    t0: float = 0.001
    T: float = 0.05
    diffusion: float = 0.2
    grid_exponent: float = 0.9
    random_grid: bool = True
    antithetic: bool = True
    profile: bool = False

    def build(self, net: NetFactory) -> DiffFlow:
        return DiffFlow(net("drift"), net("score"), diffusion=self.diffusion)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        assert isinstance(model, DiffFlow)
        return [{"params": list(model.drift.parameters()), "lr": lr, "name": "drift"},
                {"params": list(model.score.parameters()), "lr": lr, "name": "score"}]

    def grid(self, steps: int) -> solvers.Grid:
        if self.profile:
            return solvers.ProfileGrid(self.t0, self.T, steps)
        return solvers.PowerGrid(self.t0, self.T, steps, self.grid_exponent)

    def loss(self, model: nn.Module, x: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        assert isinstance(model, DiffFlow)
        grid = self.grid(steps)
        if self.random_grid:
            grid = grid.stratified().sample(generator)
        return path_kl(model, x, grid, generator=generator, antithetic=self.antithetic).loss


@dataclass(frozen=True)
class DDPMFamily(_DiffusionFamily):
    """DDPM as the variance-preserving score SDE (:class:`sdeflow.ddpm.DDPM`): the drift is fixed, only the
    score is learned, by denoising score matching at random times (``steps`` plays no part in training);
    sampled and scored on the uniform grid over ``[t0, T]`` as in Song et al. (2021).

    ``predict_noise`` (default): the network predicts the noise and the score is ``-eps / sigma(t)``
    (:class:`sdeflow.ddpm.NoisePredictionScore`, Ho et al. 2020); ``False``: the network is the score itself,
    which must then reach ``~1 / sigma(t0) ~ 100`` near the data and trains far slower.
    """

    name: ClassVar[str] = "ddpm"
    t0: float = 1e-3
    T: float = 1.0
    beta_min: float = 0.1
    beta_max: float = 20.0
    predict_noise: bool = True

    def build(self, net: NetFactory) -> DDPM:
        schedule = VPSchedule(self.beta_min, self.beta_max)
        score = NoisePredictionScore(net("score"), schedule) if self.predict_noise else net("score")
        return DDPM(score, schedule, t0=self.t0, T=self.T)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        assert isinstance(model, DDPM)
        return [{"params": list(model.score.parameters()), "lr": lr, "name": "score"}]

    def grid(self, steps: int) -> solvers.Grid:
        return solvers.UniformGrid(self.t0, self.T, steps)

    def loss(self, model: nn.Module, x: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        assert isinstance(model, DDPM)
        return denoising_score_matching(model, x, generator)


@dataclass(frozen=True)
class FFJORDFamily(ModelFamily):
    """A continuous normalizing flow (:class:`sdeflow.cnf.CNF`, ``g = 0``): maximum likelihood through the
    ODE's log-density with Hutchinson's trace in training; sampled by RK4 on the uniform grid ``[0, T]``
    (``ode`` is implied; ``solver`` replaces RK4); exact NLL with the exact trace and Dopri5.

    ``train_tol``: 0 trains with RK4 on ``steps`` equal steps (a fixed cost per iteration, but the flow can
    learn to exploit the grid's error and diverge, docs/results.md); ``> 0`` with the adaptive Dopri5 at
    ``rtol = atol = train_tol`` (FFJORD's training; ``steps`` plays no part).
    """

    name: ClassVar[str] = "ffjord"
    stochastic: ClassVar[bool] = False
    t0: float = 0.0
    T: float = 1.0
    train_tol: float = 0.0

    def build(self, net: NetFactory) -> CNF:
        return CNF(net("drift"), T=self.T)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        assert isinstance(model, CNF)
        return [{"params": list(model.drift.parameters()), "lr": lr, "name": "drift"}]

    def grid(self, steps: int) -> solvers.Grid:
        return solvers.UniformGrid(self.t0, self.T, steps)

    def loss(self, model: nn.Module, x: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        assert isinstance(model, CNF)
        if self.train_tol:
            solver = solvers.Dopri5(rtol=self.train_tol, atol=self.train_tol)
            return maximum_likelihood_loss(model, x, 1, generator, solver=solver)
        return maximum_likelihood_loss(model, x, steps, generator)

    def sample(self, model: nn.Module, n: int, event_shape: Sequence[int], steps: int,
               generator: torch.Generator, *, ode: bool = False, solver: solvers.ODESolver | None = None) -> Tensor:
        assert isinstance(model, CNF)
        return model.sample(n, tuple(event_shape), steps, generator, solver=solver, dtype=_dtype(model),
                            device=_device(model))

    def exact_nll(self, model: nn.Module, x: Tensor, *, trace: solvers.TraceEstimator | None = None,
                  solver: solvers.ODESolver | None = None) -> Tensor:
        assert isinstance(model, CNF)
        with torch.no_grad():
            return -model.log_prob(x, solver=solver, trace=trace)

    def forward_trajectory(self, model: nn.Module, x: Tensor, steps: int,
                           generator: torch.Generator) -> Samples:
        assert isinstance(model, CNF)
        return Samples(*model.trajectory(x, steps))

    def sample_trajectory(self, model: nn.Module, n: int, event_shape: Sequence[int], steps: int,
                          generator: torch.Generator) -> Samples:
        assert isinstance(model, CNF)
        x_T = prior_sample(n, tuple(event_shape), generator=generator, dtype=_dtype(model), device=_device(model))
        with torch.no_grad():
            path = solvers.odesolve(model.probability_flow(), x_T, self.grid(steps).reversed(),
                                    solver=solvers.RK4(), save=solvers.SaveAt(t0=True, steps=True))
        return Samples(path.ts, path.xs)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


_FAMILIES: dict[str, Callable[..., ModelFamily]] = {"diffflow": DiffFlowFamily, "ddpm": DDPMFamily,
                                                    "ffjord": FFJORDFamily}


def family_names() -> list[str]:
    """The registered family names, for ``--model``."""
    return sorted(_FAMILIES)


def make_family(name: str, **settings: Any) -> ModelFamily:
    """The family called ``name`` with its ``settings`` (fields of its dataclass).

    Raises:
        ValueError: for an unknown name, naming the known ones.
    """
    if name not in _FAMILIES:
        raise ValueError(f"unknown model '{name}'; available: {', '.join(family_names())}")
    return _FAMILIES[name](**settings)
