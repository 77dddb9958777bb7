"""DiffFlow, DDPM and FFJORD side by side on one 2D data set, with one training budget and the same metrics.

:func:`compare_models` trains each model family (:mod:`sdeflow.families`) through the shared
:class:`sdeflow.train.Trainer` with the same budget (iterations, batch, network size, data split and seed:
:data:`BUDGET_FIELDS`), each at its own learning rates (:func:`default_configs`), then, for each model, each
of its samplers and each number of sampling steps ``N``:

- draws ``samples`` points (wall time measured), maps them back to data coordinates and scores them with a
  :class:`sdeflow.metrics.QualityScorer2D` against held-out data, every score beside its floor (the same
  score of a second, independent held-out sample);
- for the SDE samplers, the discrete bound on the test NLL on the same grid (diffflow, ddpm), minus the
  true entropy where the data set has an exact density (:mod:`sdeflow.densities`).

Once per model: the exact test NLL through the ODE (exact trace, Dopri5 at ``1e-5``) and its gap to the
entropy. "``N`` steps" is each family's own sampler on its own grid (:meth:`ModelFamily.grid`):

========== ======= ================================================================ ==========================
family     sampler what it integrates                                               grid
========== ======= ================================================================ ==========================
diffflow   sde     backward SDE ``dx = [f - g^2 s] dt + g dw``, Euler-Maruyama       PowerGrid(0.001, 0.05, N)
diffflow   ode     probability flow ``dx/dt = f - g^2 s / 2``, RK4                   the same
ddpm       sde     reverse VP SDE, Euler-Maruyama                                    UniformGrid(0.001, 1, N)
ddpm       ode     probability flow, RK4                                             the same
ffjord     ode     the flow ``dx/dt = f``, RK4                                       UniformGrid(0, 1, N)
========== ======= ================================================================ ==========================

The SDE samplers return the mean of their last step (no noise, method note §6). ``evaluations`` counts
network calls per sample: ``N`` per learned field for Euler-Maruyama, ``4 N`` for RK4 (DiffFlow has two
learned fields, the others one).

Outputs in ``out``: ``comparison.png`` (the paper's figure: each model's forward process from data to
noise, coloured by mode, and its samples), ``samples.png`` (samples of every sampler at every ``N``),
``table.md``, ``comparison.json`` and ``checkpoints/<model>.pt`` (a rerun with ``reuse=True`` loads them
instead of training; a shorter run is continued to the budget).

Example:
    >>> import tempfile
    >>> budget = Budget(iterations=2, batch_size=32, width=16, depth=2, train_size=256, samples=64)
    >>> result = compare_models("moons", default_configs(budget, ("ddpm",)), tempfile.mkdtemp(),
    ...                         steps=(2, 4), nll_points=16, figure_steps=4, progress=False)
    >>> [(s.sampler, s.steps) for s in result.model("ddpm").scores]
    [('sde', 2), ('sde', 4), ('ode', 2), ('ode', 4)]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import densities
from .data import check_source, dataset_names
from .families import ModelFamily, family_names
from .likelihood import scaler_log_det
from .metrics import QualityReport2D, QualityScorer2D, nll_gap_floor
from .train import DIM, TrainConfig, Trainer, atomic_write

__all__ = [
    "DEFAULT_STEPS",
    "BUDGET_FIELDS",
    "Budget",
    "default_configs",
    "SamplerScore",
    "ModelResult",
    "ComparisonResult",
    "compare_models",
    "add_compare_arguments",
    "run_compare",
]

DEFAULT_STEPS = (5, 10, 20, 30, 100)
"""Sampling steps ``N`` of the comparison table."""

BUDGET_FIELDS = ("iterations", "batch_size", "width", "depth", "train_size", "eval_size", "seed")
""":class:`TrainConfig` fields every model of one comparison must share."""

OUTPUTS = ("comparison.png", "samples.png", "table.md", "comparison.json")
_TRAJECTORY_POINTS = 2000  # forward paths drawn in the figure: enough to see the modes, few enough to see through
_CLI_MODELS = ("diffflow", "ddpm", "ffjord")


@dataclass(frozen=True)
class Budget:
    """What every model of a comparison gets alike.

    ``iterations`` Adam steps on batches of ``batch_size`` data points drawn from ``train_size`` training
    points; every learned field a :class:`sdeflow.nets.TimeMLP` of ``width`` and ``depth`` (the default,
    216 x 3, has 101,738 parameters: the ~100k of the paper's 2D networks); ``samples``: points drawn per
    sampler and ``N``, and the size of each of the two held-out sets; ``seed``: the data split, the
    initialisation, the batches and the noise.

    The default takes, with one torch thread on a 2-core CPU, about 4 minutes for DiffFlow, 15 for FFJORD
    (adaptive steps) and 10 seconds for DDPM, plus a few minutes of scoring.
    """

    iterations: int = 1000
    batch_size: int = 512
    width: int = 216
    depth: int = 3
    train_size: int = 100_000
    samples: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low = 0 if f.name == "seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Budget.{f.name} must be an int >= {low}, got {value!r}")


def default_configs(budget: Budget | None = None, models: Sequence[str] = _CLI_MODELS) -> dict[str, TrainConfig]:
    """One :class:`TrainConfig` per model in ``models``: the ``budget`` (default :class:`Budget()`), plus each
    family's own settings.

    Shared: Adam with gradient-norm clipping at 1, the learning rate times 0.9 every ``iterations / 10``
    iterations, EMA 0.99 with warm-up (sampling uses the EMA weights), checkpoints every quarter of the run,
    no periodic evaluation. Each family at its own learning rate (``docs/results.md`` has the checks):

    - ``diffflow``: drift and score ``1e-2`` (the published setting), ``g = 0.2`` on ``[0.001, 0.05]``,
      trained on random power grids with ``N = 10`` and antithetic paths (:meth:`TrainConfig.quick`);
    - ``ddpm``: score ``3e-3`` (denoising score matching at stratified random times);
    - ``ffjord``: drift ``3e-4``, one Rademacher probe per point, trained with the adaptive Dopri5 at
      ``rtol = atol = 1e-3`` (``ode_tol``) as FFJORD is. With RK4 on 10 steps instead (``ode_tol=0``) the
      training diverged at ``3e-3``, ``1e-3`` and ``3e-4`` (loss spikes past 1e6, then a training loss below
      the data's entropy while the exact NLL rose: the flow had learned to exploit the RK4 error).

    Raises:
        ValueError: for an unknown model name.
    """
    budget = Budget() if budget is None else budget
    shared: dict[str, Any] = dict(
        iterations=budget.iterations, batch_size=budget.batch_size, width=budget.width, depth=budget.depth,
        train_size=budget.train_size, eval_size=budget.samples, seed=budget.seed, eval_every=0,
        checkpoint_every=max(1, budget.iterations // 4), lr_decay=0.9,
        lr_decay_every=max(1, budget.iterations // 10), ema_decay=0.99, grad_clip=1.0,
    )
    own: dict[str, dict[str, Any]] = {
        "diffflow": dict(drift_lr=1e-2, score_lr=1e-2, steps=10),
        "ddpm": dict(score_lr=3e-3),
        "ffjord": dict(drift_lr=3e-4, steps=10, ode_tol=1e-3),
    }
    unknown = [m for m in models if m not in own]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; available: {', '.join(own)}")
    return {m: TrainConfig(model=m, **shared, **own[m]) for m in models}


@dataclass(frozen=True)
class SamplerScore:
    """One sampler of one model at one ``N``.

    ``sampler``: ``"sde"`` or ``"ode"`` (module table); ``evaluations``: network calls per sample;
    ``sample_time_s``: wall time of drawing the samples; ``non_finite``: samples that came out NaN or
    infinite (scored as a point mass far off the data: leaked mass); ``quality``: every score
    beside its floor, data coordinates; ``bound_nll``: mean discrete bound on the held-out points on this
    grid, nats per point in data coordinates (SDE samplers of diffflow and ddpm, else ``None``);
    ``bound_nll_gap``: it minus the true entropy (``None`` without an exact density).
    """

    sampler: str
    steps: int
    evaluations: int
    sample_time_s: float
    non_finite: int
    quality: QualityReport2D
    bound_nll: float | None
    bound_nll_gap: float | None

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "quality"},
                "quality": self.quality.as_dict()}


@dataclass(frozen=True)
class ModelResult:
    """One trained model and its scores.

    ``parameters``: learned parameters in all; ``fields``: learned networks (diffflow 2, the others 1);
    ``train_time_s``: wall time of the training iterations (over all sessions, when continued);
    ``final_loss``: mean training loss of the last tenth of the iterations (each family's own loss: not
    comparable across families); ``exact_nll``: mean exact NLL through the ODE on the held-out points
    (nats, data coordinates), ``exact_nll_gap`` it minus the entropy, ``exact_nll_time_s`` its wall time;
    ``reused``: loaded from a finished checkpoint instead of trained; ``scores``: one per sampler and ``N``.
    """

    name: str
    config: TrainConfig
    parameters: int
    fields: int
    iterations: int
    train_time_s: float
    final_loss: float
    exact_nll: float
    exact_nll_gap: float | None
    exact_nll_time_s: float
    reused: bool
    scores: tuple[SamplerScore, ...]

    def score(self, sampler: str, steps: int) -> SamplerScore:
        """The score of ``sampler`` at ``steps``; ``KeyError`` naming what exists if there is none."""
        for s in self.scores:
            if s.sampler == sampler and s.steps == steps:
                return s
        have = sorted({(s.sampler, s.steps) for s in self.scores})
        raise KeyError(f"{self.name} has no {sampler} score at N = {steps}; it has {have}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("config", "scores")}
        return {**d, "config": self.config.to_dict(), "scores": [s.to_dict() for s in self.scores]}


@dataclass(frozen=True)
class ComparisonResult:
    """Everything :func:`compare_models` measured; :meth:`markdown` is ``table.md``.

    ``data``: the data set; ``steps``: the ``N`` of the table; ``samples``: points per sampler and ``N``;
    ``nll_points``: held-out points of the NLLs; ``entropy``: the data's true entropy (nats, data
    coordinates; ``None`` without an exact density) and ``nll_floor`` the standard error of the true
    density's NLL on those points (the noise of every ``NLL - entropy``); ``models``: in training order;
    ``out``: the output directory.
    """

    data: str
    steps: tuple[int, ...]
    samples: int
    nll_points: int
    entropy: float | None
    nll_floor: float | None
    models: tuple[ModelResult, ...]
    out: Path

    def model(self, name: str) -> ModelResult:
        """The result of model ``name``; ``KeyError`` naming the models if there is none."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model {name!r} in this comparison; it has {[m.name for m in self.models]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain values for JSON (``comparison.json``)."""
        return {"data": self.data, "steps": list(self.steps), "samples": self.samples,
                "nll_points": self.nll_points, "entropy": self.entropy, "nll_floor": self.nll_floor,
                "sampler_notes": _sampler_notes(self.models), "models": [m.to_dict() for m in self.models]}

    def markdown(self) -> str:
        """The tables of ``table.md``: the models, then every score against ``N`` with the floors on top."""
        first = self.models[0]
        cfg = first.config
        lines = [f"# {self.data}: {' vs '.join(m.name for m in self.models)}", "",
                 f"Budget (every model): {cfg.iterations} iterations, batch {cfg.batch_size}, "
                 f"{cfg.train_size} training points, TimeMLP width {cfg.width} x {cfg.depth} hidden layers per "
                 f"learned network, seed {cfg.seed}. Scores: {self.samples} samples per row against "
                 f"{self.samples} held-out points, data coordinates.", ""]
        entropy = "" if self.entropy is None else f"; true entropy H = {self.entropy:.4f} nats"
        lines += ["| model | learned networks x parameters | learning rates | training | train time (s) | "
                  "s / iteration | exact NLL (nats) | exact NLL - H | exact NLL time (s) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in self.models:
            lines.append(f"| {m.name} | {m.fields} x {m.parameters // m.fields:,} | {_lrs(m)} | {_training(m.config)} "
                         f"| {m.train_time_s:.0f} | {m.train_time_s / max(m.iterations, 1):.3f} | "
                         f"{m.exact_nll:.3f} | {_maybe(m.exact_nll_gap, '.3f')} | {m.exact_nll_time_s:.1f} |")
        floor_se = "" if self.nll_floor is None else f" (noise: standard error {self.nll_floor:.3f})"
        lines += ["", f"Exact NLL: probability-flow ODE (the flow itself for ffjord), exact trace, Dopri5 at 1e-5, "
                      f"on {self.nll_points} held-out points{entropy}{floor_se}.", ""]
        q0 = first.scores[0].quality
        has_exact = q0.excess_kl is not None
        head = ["model", "sampler", "N", "evaluations"]
        head += ["excess KL (nats)"] if has_exact else []
        head += ["MMD^2", "precision", "recall", "density", "coverage"]
        head += ["bound NLL - H"] if has_exact else ["bound NLL"]
        head += ["sample time (s)"]
        floor = ["**floor** (second held-out sample)", "", "", ""]
        floor += [f"0 ± {q0.excess_kl_floor:.4f}"] if has_exact else []
        floor += [f"{q0.mmd2_floor:.2e}", *(f"{getattr(q0, k + '_floor'):.3f}" for k in _KNN)]
        floor += [f"0 ± {self.nll_floor:.3f}" if has_exact and self.nll_floor is not None else ""]
        floor += [""]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(floor) + " |"]
        for m in self.models:
            for s in m.scores:
                q = s.quality
                row = [m.name, s.sampler, str(s.steps), str(s.evaluations)]
                row += [f"{q.excess_kl:.4f}"] if has_exact else []
                row += [f"{q.mmd2:.2e}", *(f"{getattr(q, k):.3f}" for k in _KNN)]
                row += [_maybe(s.bound_nll_gap if has_exact else s.bound_nll, ".3f")]
                row += [f"{s.sample_time_s:.2f}" + (f" ({s.non_finite} non-finite)" if s.non_finite else "")]
                lines.append("| " + " | ".join(row) + " |")
        lines += ["", "Samplers (N steps of each family's own grid; 'evaluations' = network calls per sample):", ""]
        lines += [f"- {note}" for note in _sampler_notes(self.models)]
        lines += ["", "Floors: the score of a second held-out data sample of the same size (what a perfect "
                      "sampler gets). excess KL: binned KL to the exact density (50 x 50 cells) minus a perfect "
                      "sampler's mean, ± its standard deviation; MMD^2: unbiased, RBF kernel with the median "
                      f"pairwise distance of the held-out data (h = {q0.bandwidth:.3g}); k-NN precision, recall, "
                      f"density, coverage (k = {q0.k}, prdc, at most 5000 points per set); bound NLL: the "
                      "discrete path bound on the same grid (SDE rows)."]
        return "\n".join(lines) + "\n"


_KNN = ("precision", "recall", "density", "coverage")


def _maybe(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _lrs(m: ModelResult) -> str:
    cfg = m.config
    names = {"diffflow": f"drift {cfg.drift_lr:g}, score {cfg.score_lr:g}", "ddpm": f"score {cfg.score_lr:g}",
             "ffjord": f"drift {cfg.drift_lr:g}"}
    return names.get(m.name, f"drift {cfg.drift_lr:g}, score {cfg.score_lr:g}")


def _training(cfg: TrainConfig) -> str:
    if cfg.model == "diffflow":
        grid = "random power grid" if cfg.random_grid else "power grid"
        return f"path KL, {grid} N = {cfg.final_steps}, g = {cfg.diffusion:g}"
    if cfg.model == "ffjord":
        solver = f"Dopri5 tol {cfg.ode_tol:g}" if cfg.ode_tol else f"RK4 N = {cfg.final_steps}"
        return f"max. likelihood, {solver}, Hutchinson"
    return "denoising score matching"


def _sampler_notes(models: Sequence[ModelResult]) -> list[str]:
    notes = []
    for m in models:
        family = m.config.family()
        grid = re.sub(r"steps=\d+", "steps=N", repr(family.grid(m.scores[0].steps)))
        for kind in dict.fromkeys(s.sampler for s in m.scores):
            if kind == "sde":
                what = "reverse-time SDE, Euler-Maruyama, the last step its mean (no noise)"
            elif family.stochastic:
                what = "probability-flow ODE, RK4"
            else:
                what = "the flow's ODE, RK4"
            notes.append(f"{m.name} {kind}: {what} on {grid}")
    return notes


# -------------------------------------------------------------------------------------------------------------
# the comparison


def _check_configs(data: str, configs: Mapping[str, TrainConfig]) -> None:
    if not configs:
        raise ValueError("no models to compare: configs is empty")
    for name, cfg in configs.items():
        if cfg.model != name:
            raise ValueError(f"configs[{name!r}] is a {cfg.model!r} config: the key must be its model")
    first_name, first = next(iter(configs.items()))
    for name, cfg in configs.items():
        differ = [f"{f}: {getattr(cfg, f)} vs {getattr(first, f)}" for f in BUDGET_FIELDS
                  if getattr(cfg, f) != getattr(first, f)]
        if differ:
            raise ValueError(f"{name} and {first_name} must share the budget; they differ in {'; '.join(differ)}")
    check_source(data)


def _trainer(data: str, config: TrainConfig, path: Path, reuse: bool, progress: bool) -> tuple[Trainer, bool]:
    """A trainer of ``config`` trained to its budget (loaded from ``path`` if ``reuse`` and it is there);
    and whether the checkpoint already held the whole budget."""
    if reuse and path.is_file():
        trainer = Trainer.from_checkpoint(path, restore_global_rng=False)
        saved, wanted = trainer.config.to_dict(), config.to_dict()
        differ = sorted(k for k in wanted if k != "iterations" and saved.get(k) != wanted[k])
        if differ or trainer.data != data:
            what = ", ".join([f"{k}: {saved.get(k)!r} (saved) vs {wanted[k]!r}" for k in differ]
                             + ([f"data: {trainer.data} vs {data}"] if trainer.data != data else []))
            raise ValueError(f"{path} was trained with other settings ({what}); remove it or drop reuse")
        if trainer.iteration > config.iterations:
            raise ValueError(f"{path} has {trainer.iteration} iterations, more than the budget's "
                             f"{config.iterations}; remove it or raise the budget")
        done = trainer.iteration == config.iterations
        trainer.config = config
    else:
        trainer, done = Trainer(config, data), False
    if not done:
        trainer.train(checkpoint=path, progress=progress)
    return trainer, done


@torch.no_grad()
def _draw(family: ModelFamily, model: torch.nn.Module, n: int, steps: int, ode: bool,
          seed: int) -> tuple[Tensor, float]:
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    y = family.sample(model, n, (DIM,), steps, g, ode=ode)
    return y, time.perf_counter() - start


def _evaluate(trainer: Trainer, name: str, reused: bool, steps: Sequence[int], ode: bool, nll_points: int,
              scorer: QualityScorer2D, entropy: float | None, progress: bool
              ) -> tuple[ModelResult, dict[tuple[str, int], Tensor]]:
    """Scores of one trained model, and its samples (data coordinates) by ``(sampler, N)``."""
    cfg, family, model, scaler, split = trainer.config, trainer.family, trainer.ema, trainer.scaler, trainer.split
    x = scaler.transform(split.heldout[:nll_points]).to(torch.float32)
    log_det = scaler_log_det(scaler)  # nll_data = nll_model - log_det
    fields = len(family.param_groups(model, 1.0))  # one group per learned field
    kinds = ("sde", "ode") if family.stochastic and ode else ("sde",) if family.stochastic else ("ode",)
    scores, samples = [], {}
    for kind in kinds:
        for n_steps in steps:
            # common random numbers: every model and N starts from the same prior draws
            y, seconds = _draw(family, model, scorer.n_samples, n_steps, kind == "ode", cfg.seed + 1)
            y = scaler.inverse(y.to(torch.float64))
            bad = ~torch.isfinite(y).all(dim=1)
            # a sample that blew up is scored as a point mass far off the data: the binned KL's overflow cell,
            # zero kernel weight against the data, inside no data point's k-NN ball
            y[bad] = 1e12
            bound = bound_gap = None
            if kind == "sde":
                g = torch.Generator().manual_seed(cfg.seed + 2)
                b = family.bound_nll(model, x, n_steps, g)
                if b is not None:
                    bound = float(b.double().mean()) - log_det
                    bound_gap = None if entropy is None else bound - entropy
            evaluations = n_steps * (1 if kind == "sde" else 4) * fields
            scores.append(SamplerScore(kind, n_steps, evaluations, seconds, int(bad.sum()), scorer.report(y),
                                       bound, bound_gap))
            samples[(kind, n_steps)] = y.to(torch.float32)
            if progress:
                q = scores[-1].quality
                kl = "" if q.excess_kl is None else f"excess KL {q.excess_kl:.4f}, "
                print(f"  {name} {kind} N = {n_steps}: {kl}coverage {q.coverage:.3f}, {seconds:.2f} s", flush=True)
    start = time.perf_counter()
    exact = float(family.exact_nll(model, x).double().mean()) - log_det
    exact_time = time.perf_counter() - start
    losses = trainer.history.losses
    tail = losses[-max(1, len(losses) // 10):]
    result = ModelResult(
        name=name, config=cfg, parameters=sum(p.numel() for p in model.parameters()), fields=fields,
        iterations=trainer.iteration, train_time_s=trainer.train_time, final_loss=float(np.mean(tail)),
        exact_nll=exact, exact_nll_gap=None if entropy is None else exact - entropy, exact_nll_time_s=exact_time,
        reused=reused, scores=tuple(scores),
    )
    return result, samples


def compare_models(
    data: str,
    configs: Mapping[str, TrainConfig],
    out: str | Path,
    *,
    steps: Sequence[int] = DEFAULT_STEPS,
    ode: bool = True,
    nll_points: int = 2000,
    figure_steps: int = 30,
    reuse: bool = False,
    progress: bool = True,
) -> ComparisonResult:
    """Train every model of ``configs`` on ``data`` with one budget, score every sampler at every ``N``, and
    write the figures, the table and the JSON to ``out`` (module docstring).

    Args:
        data: a built-in data set (exact-density scores where :func:`sdeflow.densities.supported`) or a
            ``.npy``/``.csv`` file of 2D points (MMD and k-NN scores only).
        configs: model name -> its :class:`TrainConfig` (e.g. :func:`default_configs`); all must share
            :data:`BUDGET_FIELDS`. ``eval_size`` is the number of samples per row and of each held-out set.
        out: output directory (created; existing outputs are overwritten).
        steps: the numbers of sampling steps ``N`` (each family's own grid, module table).
        ode: also score the probability-flow ODE of the SDE families (diffflow, ddpm) at every ``N``.
        nll_points: held-out points for the NLLs (the exact one integrates an ODE per point).
        figure_steps: the ``N`` of the forward paths and samples in ``comparison.png`` (must be in ``steps``).
        reuse: load ``out/checkpoints/<model>.pt`` when it holds the same configuration instead of training
            (a checkpoint with fewer iterations is trained on to the budget).
        progress: progress bars and one line per score.

    Returns:
        The :class:`ComparisonResult`.

    Raises:
        ValueError: for a config whose key is not its model, configs that differ in the budget, an unknown
            data set, ``figure_steps`` not in ``steps``, or a checkpoint to reuse trained otherwise.
    """
    _check_configs(data, configs)
    steps = tuple(int(n) for n in steps)
    if not steps or any(n < 1 for n in steps) or len(set(steps)) != len(steps):
        raise ValueError(f"steps must be distinct positive ints, got {steps}")
    if figure_steps not in steps:
        raise ValueError(f"figure_steps {figure_steps} is not one of steps {steps}")
    first = next(iter(configs.values()))
    if not 1 <= nll_points <= first.eval_size:
        raise ValueError(f"nll_points must be in [1, eval_size = {first.eval_size}], got {nll_points}")
    out = Path(out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    exact = data in densities.supported()
    entropy = densities.entropy(data) if exact else None

    results: list[ModelResult] = []
    rows: list[tuple[str, Any, Tensor]] = []
    grid_rows: list[tuple[str, list[tuple[str, Tensor]]]] = []
    scorer: QualityScorer2D | None = None
    nll_floor: float | None = None
    for name, config in configs.items():
        if progress:
            print(f"{name}: {config.iterations} iterations on {data}", flush=True)
        trainer, reused = _trainer(data, config, out / "checkpoints" / f"{name}.pt", reuse, progress)
        split = trainer.split
        if scorer is None:  # the split is the same for every model (same seed): floors computed once
            scorer = QualityScorer2D(data if exact else None, split.heldout, split.reference, seed=config.seed)
            if exact:
                nll_floor = nll_gap_floor(data, split.heldout[:nll_points])
        result, samples = _evaluate(trainer, name, reused, steps, ode, nll_points, scorer, entropy, progress)
        results.append(result)
        keep = min(_TRAJECTORY_POINTS, len(split.heldout))
        x = trainer.scaler.transform(split.heldout[:keep]).to(torch.float32)
        forward = trainer.family.forward_trajectory(trainer.ema, x, figure_steps,
                                                    torch.Generator().manual_seed(config.seed + 3))
        main = "sde" if trainer.family.stochastic else "ode"
        rows.append((name, forward, samples[(main, figure_steps)]))
        grid_rows += [(f"{name} {kind}", [(f"N = {n}", samples[(kind, n)]) for n in steps])
                      for kind in dict.fromkeys(k for k, _ in samples)]

    assert scorer is not None
    split = trainer.split
    result = ComparisonResult(data, steps, scorer.n_samples, nll_points, entropy, nll_floor, tuple(results), out)
    _write_outputs(result, rows, grid_rows, split.heldout, split.heldout_labels, figure_steps)
    return result


def _write_outputs(result: ComparisonResult, rows: list[tuple[str, Any, Tensor]],
                   grid_rows: list[tuple[str, list[tuple[str, Tensor]]]], heldout: Tensor, labels: Tensor,
                   figure_steps: int) -> None:
    from .plots import plot_comparison, plot_sample_grid

    out = result.out
    keep = min(_TRAJECTORY_POINTS, len(heldout))
    plot_comparison(rows, labels[:keep], heldout, out / "comparison.png",
                    title=f"{result.data}: forward process from data to noise (colour: mode), and samples "
                          f"with N = {figure_steps}")
    plot_sample_grid(grid_rows, heldout, out / "samples.png", title=f"{result.data}: samples against N")
    text = result.markdown()
    atomic_write(out / "table.md", lambda f: f.write(text.encode()))
    payload = json.dumps(result.to_dict(), indent=2, allow_nan=True) + "\n"
    atomic_write(out / "comparison.json", lambda f: f.write(payload.encode()))


# -------------------------------------------------------------------------------------------------------------
# command line: `sdeflow compare`


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be >= 1, got {text!r}")
    return values


def _model_list(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in family_names()]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown or text!r}; "
                                         f"available: {', '.join(family_names())}")
    return names


def add_compare_arguments(c: argparse.ArgumentParser) -> None:
    """Add the arguments of ``sdeflow compare`` to its parser ``c``; run the parsed arguments with
    :func:`run_compare` (:data:`sdeflow.cli.COMMANDS` does both)."""
    b = Budget()
    c.add_argument("--data", required=True, help=f"dataset name ({', '.join(dataset_names())}) or a .npy/.csv "
                                                 f"file of 2D points")
    c.add_argument("--out", required=True, type=Path, help="output directory")
    c.add_argument("--models", type=_model_list, default=_CLI_MODELS,
                   help="comma-separated families (default diffflow,ddpm,ffjord)")
    c.add_argument("--iterations", type=int, default=b.iterations, help="training iterations of every model")
    c.add_argument("--batch", type=int, default=b.batch_size, help="batch size of every model")
    c.add_argument("--width", type=int, default=b.width, help="hidden width of every network")
    c.add_argument("--depth", type=int, default=b.depth, help="hidden layers of every network")
    c.add_argument("--train-size", type=int, default=b.train_size, help="training points")
    c.add_argument("--samples", type=int, default=b.samples, help="samples per row, and points per held-out set")
    c.add_argument("--steps", type=_int_list, default=DEFAULT_STEPS, help="sampling steps N, comma-separated")
    c.add_argument("--figure-steps", type=int, default=30, help="N of the figure's paths and samples")
    c.add_argument("--nll-points", type=int, default=2000, help="held-out points of the NLLs")
    c.add_argument("--no-ode", action="store_true", help="skip the probability-flow ODE rows of diffflow and ddpm")
    c.add_argument("--seed", type=int, default=b.seed, help="seed of the split, init, batches, noise, samples")
    c.add_argument("--reuse", action="store_true", help="load OUT/checkpoints/<model>.pt instead of training "
                                                        "(a shorter run is continued to the budget)")
    c.add_argument("--force", action="store_true", help="overwrite the outputs and checkpoints in OUT")
    c.add_argument("--quiet", action="store_true", help="no progress output")


def run_compare(args: argparse.Namespace) -> int:
    """Run ``sdeflow compare`` from parsed arguments; prints the table and returns the exit status (0 ok,
    1 a training diverged, 2 a usage error, printed in one line)."""
    out: Path = args.out
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"{out} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not (args.reuse or args.force):
            raise ValueError(f"{out} is not empty; pass --reuse to load its checkpoints or --force to start over")
        if args.force and args.reuse:
            raise ValueError("--reuse loads the checkpoints and --force trains over them: choose one")
        budget = Budget(iterations=args.iterations, batch_size=args.batch, width=args.width, depth=args.depth,
                        train_size=args.train_size, samples=args.samples, seed=args.seed)
        result = compare_models(args.data, default_configs(budget, args.models), out, steps=args.steps,
                                ode=not args.no_ode, nll_points=args.nll_points, figure_steps=args.figure_steps,
                                reuse=args.reuse, progress=not args.quiet)
    except ValueError as err:
        print(f"sdeflow compare: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"sdeflow compare: error: {err}", file=sys.stderr)
        return 1
    print(result.markdown())
    print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)} and {out / 'checkpoints'}")
    return 0
