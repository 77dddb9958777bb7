"""Training DiffFlow on 2D data: configuration, a resumable trainer, and the final evaluation.

One iteration: draw a batch of training points (model coordinates, see :class:`sdeflow.data.Scaler`), draw
a random grid with the current number of steps ``N`` (stratified around the power grid, method note §5),
evaluate the path-KL loss with the discrete adjoint, clip the gradient norm, take an Adam step (drift and
score are separate parameter groups), step the learning-rate schedule, update the EMA copy.

Reproducibility: every random draw of training (data split, batches, grids, noise) comes from the
trainer's own ``torch.Generator``; the global RNG is only used, forked, to initialise the networks. A
checkpoint holds everything that changes (weights, EMA, Adam moments, schedule, generator state, counter,
history), so training ``k`` iterations, saving, loading and training ``k`` more gives parameters
bit-identical to ``2k`` uninterrupted iterations. The time grid is not model state (method note §5
pitfall): it is rebuilt from the config and the iteration every time.

Example:
    >>> import tempfile, pathlib
    >>> config = TrainConfig(width=16, depth=2, batch_size=32, steps=3, iterations=2, train_size=256,
    ...                      eval_size=64, eval_every=0, checkpoint_every=0)
    >>> trainer = Trainer(config, "moons")
    >>> trainer.train(progress=False)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "checkpoint.pt"
    >>> trainer.save(path)
    >>> Trainer.from_checkpoint(path).iteration
    2
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

import solvers

from .data import Scaler, dataset_names, load_points, make_dataset
from .likelihood import bound_nll, ode_nll, scaler_log_det
from .loss import path_kl
from .metrics import sample_quality
from .model import DiffFlow
from .nets import TimeMLP
from .sample import sample

__all__ = [
    "TrainConfig",
    "DataSplit",
    "Trainer",
    "build_model",
    "load_split",
    "evaluate_model",
    "atomic_write",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "sdeflow-trainer/1"
DIM = 2  # the trainer is for 2D point data (sdeflow.data)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the published 2D setting (method note §7).

    Model: ``diffusion`` (g), ``width``/``depth`` of both :class:`TimeMLP` networks.
    Time grid: power grid on ``[t0, T]`` with ``grid_exponent``, ``steps`` (N) steps, redrawn at random
    (stratified) for every batch when ``random_grid``. ``steps_schedule``: progressive N as
    ``((iteration, N), ...)``; from each listed iteration on, N is that value (before the first entry and
    without a schedule, N = ``steps``). Evaluation always uses the final N (:attr:`final_steps`).
    Loss: ``antithetic`` pairs every data point's path with one driven by the opposite noise
    (:func:`sdeflow.loss.path_kl`: same expectation, lower variance, twice the paths; ``False`` is the
    reference's estimator).
    Optimisation: Adam with ``drift_lr``/``score_lr`` (separate parameter groups), learning rates times
    ``lr_decay`` every ``lr_decay_every`` iterations, gradient-norm clipping at ``grad_clip`` (``None``: off),
    EMA of the weights with ``ema_decay`` (with ``ema_warmup`` the effective decay is
    ``min(ema_decay, (1 + k) / (10 + k))`` after ``k`` updates, so short runs do not keep the random init).
    Data: ``train_size`` training points; two independent held-out sets of ``eval_size`` points (one to
    score against, one for the metrics' noise floor).
    Bookkeeping: bound-NLL evaluation every ``eval_every`` and a checkpoint every ``checkpoint_every``
    iterations (0: never; :meth:`Trainer.train` still saves at the end), ``seed``, and the NaN policy:
    state snapshots every ``snapshot_every`` iterations, a failed iteration is retried ``max_nan_retries``
    times with fresh noise after rolling back.
    """

    diffusion: float = 0.2
    width: int = 128
    depth: int = 3
    t0: float = 0.001
    T: float = 0.05
    grid_exponent: float = 0.9
    steps: int = 30
    steps_schedule: tuple[tuple[int, int], ...] = ()
    random_grid: bool = True
    antithetic: bool = True
    batch_size: int = 5000
    drift_lr: float = 1e-2
    score_lr: float = 1e-2
    lr_decay: float = 0.95
    lr_decay_every: int = 200
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    ema_warmup: bool = True
    iterations: int = 3000
    train_size: int = 100_000
    eval_size: int = 2000
    eval_every: int = 500
    checkpoint_every: int = 500
    seed: int = 0
    max_nan_retries: int = 3
    snapshot_every: int = 1

    def __post_init__(self) -> None:
        # JSON and checkpoints hand lists back: normalise to a tuple of int pairs, then validate
        schedule = tuple((int(i), int(n)) for i, n in self.steps_schedule)
        object.__setattr__(self, "steps_schedule", schedule)
        positive_ints = ("width", "depth", "steps", "batch_size", "lr_decay_every", "iterations",
                         "train_size", "eval_size", "snapshot_every")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "checkpoint_every", "max_nan_retries", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        for name in ("diffusion", "drift_lr", "score_lr", "grid_exponent"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"TrainConfig.{name} must be finite and positive, got {value!r}")
        if not 0 <= self.t0 < self.T:
            raise ValueError(f"TrainConfig needs 0 <= t0 < T, got t0={self.t0}, T={self.T}")
        if not 0 < self.lr_decay <= 1 or not 0 <= self.ema_decay < 1:
            raise ValueError(f"need 0 < lr_decay <= 1 and 0 <= ema_decay < 1, got {self.lr_decay}, "
                             f"{self.ema_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip}")
        starts = [i for i, _ in schedule]
        if starts != sorted(set(starts)) or any(i < 0 or n < 1 for i, n in schedule):
            raise ValueError(f"steps_schedule must be ((iteration >= 0, N >= 1), ...) with increasing "
                             f"iterations, got {schedule}")

    @classmethod
    def quick(cls, **overrides: Any) -> TrainConfig:
        """The quick CPU run of the README (about 3-5 minutes on 2 cores): batch 512 (1024 antithetic paths),
        N = 10 on random grids (the model still samples well at N = 30 or 100), 1000 iterations with the
        learning rate times 0.9 every 100 iterations, EMA 0.99.

        Example:
            >>> TrainConfig.quick().steps_at(0), TrainConfig.quick(iterations=10).iterations
            (10, 10)
        """
        preset: dict[str, Any] = dict(
            batch_size=512, iterations=1000, steps=10, lr_decay=0.9, lr_decay_every=100, ema_decay=0.99,
            eval_every=250, checkpoint_every=250,
        )
        preset.update(overrides)
        return cls(**preset)

    def steps_at(self, iteration: int) -> int:
        """N for (0-based) ``iteration``: the last schedule entry at or before it, else :attr:`steps`."""
        n = self.steps
        for start, steps in self.steps_schedule:
            if start <= iteration:
                n = steps
        return n

    @property
    def final_steps(self) -> int:
        """N at the end of the schedule (the evaluation grid's N)."""
        return self.steps_schedule[-1][1] if self.steps_schedule else self.steps

    def grid(self, steps: int | None = None) -> solvers.PowerGrid:
        """The fixed power grid on ``[t0, T]`` with ``steps`` steps (default :attr:`final_steps`)."""
        return solvers.PowerGrid(self.t0, self.T, self.final_steps if steps is None else steps,
                                 self.grid_exponent)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python values (the schedule as a list of lists), for JSON and checkpoints."""
        d = dataclasses.asdict(self)
        d["steps_schedule"] = [list(pair) for pair in self.steps_schedule]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a checkpoint of another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields {unknown}")
        return cls(**d)


def build_model(config: TrainConfig) -> DiffFlow:
    """A fresh DiffFlow with two ``TimeMLP(2, width, depth)`` nets (time features scaled to ``[0, T]``)."""
    def net() -> TimeMLP:
        return TimeMLP(DIM, width=config.width, depth=config.depth, t_scale=1.0 / config.T)

    return DiffFlow(net(), net(), diffusion=config.diffusion)


@dataclass(frozen=True)
class DataSplit:
    """Points in data coordinates: ``train`` ``(n, 2)``; ``heldout`` ``(m, 2)`` with ``heldout_labels``
    ``(m,)`` (mode labels; zeros for files); ``reference`` ``(m, 2)``, a second held-out set (floors)."""

    train: Tensor
    heldout: Tensor
    heldout_labels: Tensor
    reference: Tensor

    def state_dict(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> DataSplit:
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls)})


def load_split(data: str, train_size: int, eval_size: int, generator: torch.Generator) -> DataSplit:
    """Training and two held-out sets from a registry name or a ``.npy``/``.csv`` file.

    A registry dataset is sampled three times independently. A file is shuffled and split without overlap:
    each held-out set gets ``min(eval_size, len // 5)`` points, training gets the rest (``train_size`` is
    then ignored: a file has what it has). Raises ``ValueError`` for unknown names and bad files.
    """
    if data in dataset_names():
        train, _ = make_dataset(data, train_size, generator)
        heldout, labels = make_dataset(data, eval_size, generator)
        reference, _ = make_dataset(data, eval_size, generator)
        return DataSplit(train, heldout, labels, reference)
    path = Path(data)
    if path.suffix.lower() not in (".npy", ".csv"):
        raise ValueError(f"unknown dataset '{data}'; available: {', '.join(dataset_names())} "
                         f"(or a path to a .npy/.csv file)")
    points = load_points(path)
    k = min(eval_size, len(points) // 5)
    if k < 2:
        raise ValueError(f"{path}: {len(points)} points are too few to hold out two evaluation sets; "
                         f"need >= 10")
    perm = torch.randperm(len(points), generator=generator)
    heldout = points[perm[:k]]
    return DataSplit(points[perm[2 * k:]], heldout, torch.zeros(k, dtype=torch.long), points[perm[k:2 * k]])


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file so that ``path`` holds either its old content or the complete new one, never a part.

    ``write(f)`` fills a temporary file in the same directory; it is flushed and fsync'ed, then renamed over
    ``path`` (``os.replace`` is atomic within a filesystem). On any error the temporary file is removed and
    ``path`` is untouched.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.bin"
        >>> atomic_write(p, lambda f: f.write(b"hello"))
        >>> p.read_bytes()
        b'hello'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # plain open: the file gets the usual umask permissions
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # make the rename itself durable; directories cannot be opened for fsync on some platforms
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class _Snapshot:
    """In-memory copy of everything a NaN roll-back restores (not the generator: retries get fresh noise)."""

    iteration: int
    ema_updates: int
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    n_losses: int
    n_evals: int


@dataclass
class History:
    """``losses``: the training loss of every iteration; ``evals``: one dict per periodic evaluation;
    ``nan_events``: ``{"iteration", "attempt", "reason"}`` for every failed attempt."""

    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    nan_events: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Owns a DiffFlow, its EMA copy, Adam, the learning-rate schedule, the data and a generator.

    Args:
        config: the run's settings.
        data: a registry name (:func:`sdeflow.data.dataset_names`) or a ``.npy``/``.csv`` path.
        split: the data, already split (default: :func:`load_split` from ``data`` with the trainer's
            generator, so the seed fixes the split too).

    Attributes:
        model, ema: the trained DiffFlow and its exponential moving average (use ``ema`` for sampling).
        scaler: data → model coordinates, fitted to the training points.
        generator: every random draw of training comes from it.
        iteration: completed iterations.
        history: losses, evaluations, NaN events.

    Example:
        >>> t = Trainer(TrainConfig(width=16, depth=2, batch_size=16, steps=3, train_size=64, eval_size=32),
        ...             "8gaussians")
        >>> loss = t.step()
        >>> t.iteration, math.isfinite(loss)
        (1, True)
    """

    def __init__(self, config: TrainConfig, data: str, *, split: DataSplit | None = None):
        self.config = config
        self.data = str(data)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.split = load_split(self.data, config.train_size, config.eval_size, self.generator) \
            if split is None else split
        self.scaler = Scaler.fit(self.split.train)
        self.train_x = self.scaler.transform(self.split.train).to(torch.float32)
        # the networks' init draws from the global RNG: fork it so the seed fixes the init and the caller's
        # global stream is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = build_model(config)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.ema_updates = 0
        self.optimizer = torch.optim.Adam([
            {"params": list(self.model.drift.parameters()), "lr": config.drift_lr, "name": "drift"},
            {"params": list(self.model.score.parameters()), "lr": config.score_lr, "name": "score"},
        ])
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay)
        self.iteration = 0
        self.train_time = 0.0
        self.history = History()
        self._failures = 0  # consecutive failed attempts
        self._failed_at = -1  # the furthest iteration that failed; success past it resets the count
        self._snapshot = self._take_snapshot()

    # -- one iteration ------------------------------------------------------------------------------

    def _grid(self, steps: int) -> solvers.Grid:
        grid = self.config.grid(steps)
        return grid.stratified().sample(self.generator) if self.config.random_grid else grid

    def _attempt(self) -> tuple[float | None, str]:
        """One optimisation step; ``(loss, "")`` on success, ``(None, reason)`` if anything was not finite.

        Failures are detected before the state changes where possible (loss, gradients); the parameter
        check after the step catches the rest, and the caller rolls back.
        """
        cfg = self.config
        idx = torch.randint(0, len(self.train_x), (cfg.batch_size,), generator=self.generator)
        grid = self._grid(cfg.steps_at(self.iteration))
        self.optimizer.zero_grad(set_to_none=True)
        try:
            out = path_kl(self.model, self.train_x[idx], grid, generator=self.generator,
                          antithetic=cfg.antithetic)
        except FloatingPointError as err:  # sdesolve refuses NaN/inf states and names the step
            return None, f"simulation: {err}"
        loss = out.loss
        if not bool(torch.isfinite(loss)):
            return None, f"loss is {float(loss.detach())}"
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        # max_norm=inf leaves the gradients as they are (factor 1.0) but still returns the total norm
        max_norm = float("inf") if cfg.grad_clip is None else cfg.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not bool(torch.isfinite(norm)):
            return None, f"gradient norm is {float(norm)}"
        self.optimizer.step()
        self.scheduler.step()
        self._update_ema()
        if not bool(torch.isfinite(torch.stack([p.detach().sum() for p in params])).all()):
            return None, "parameters became non-finite after the step"
        return float(loss.detach()), ""

    def _update_ema(self) -> None:
        decay = self.config.ema_decay
        if self.config.ema_warmup:
            decay = min(decay, (1 + self.ema_updates) / (10 + self.ema_updates))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.model.parameters(), strict=True):
                e.lerp_(p, 1.0 - decay)
        self.ema_updates += 1

    def step(self) -> float:
        """Run one iteration (with NaN roll-back and retries); returns its loss in nats per sample.

        On a non-finite loss, gradient or parameter, the model, EMA, optimizer and schedule are restored
        from the last in-memory snapshot (taken every ``snapshot_every`` iterations; with the default 1 it is
        the state after the previous iteration, and costs a copy of ~4x the weights, negligible next to a
        simulated batch), and the iteration is retried with fresh noise from the generator.

        Raises:
            FloatingPointError: after ``1 + max_nan_retries`` consecutive failures, naming the iteration.
                Nothing is written to disk, so the last checkpoint stays as it was.
        """
        while True:
            iteration = self.iteration
            loss, reason = self._attempt()
            if loss is not None:
                self.iteration += 1
                self.history.losses.append(loss)
                if self.iteration > self._failed_at:
                    self._failures = 0
                if self.iteration % self.config.snapshot_every == 0:
                    self._snapshot = self._take_snapshot()
                return loss
            self._failures += 1
            self._failed_at = max(self._failed_at, iteration)
            self.history.nan_events.append(
                {"iteration": iteration, "attempt": self._failures, "reason": reason})
            self._restore(self._snapshot)
            if self._failures > self.config.max_nan_retries:
                raise FloatingPointError(
                    f"training diverged at iteration {iteration}: {reason} on {self._failures} consecutive "
                    f"attempts (max_nan_retries={self.config.max_nan_retries}), each after rolling back to "
                    f"iteration {self._snapshot.iteration}; the last checkpoint on disk is unchanged"
                )

    def _take_snapshot(self) -> _Snapshot:
        def clone(state: dict[str, Tensor]) -> dict[str, Tensor]:
            return {k: v.detach().clone() for k, v in state.items()}

        return _Snapshot(self.iteration, self.ema_updates, clone(self.model.state_dict()),
                         clone(self.ema.state_dict()), copy.deepcopy(self.optimizer.state_dict()),
                         copy.deepcopy(self.scheduler.state_dict()), len(self.history.losses),
                         len(self.history.evals))

    def _restore(self, snap: _Snapshot) -> None:
        self.model.load_state_dict(snap.model)
        self.ema.load_state_dict(snap.ema)
        # load_state_dict copies: the snapshot stays valid for further roll-backs
        self.optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        self.scheduler.load_state_dict(snap.scheduler)
        self.iteration, self.ema_updates = snap.iteration, snap.ema_updates
        del self.history.losses[snap.n_losses:]
        del self.history.evals[snap.n_evals:]

    # -- the loop -----------------------------------------------------------------------------------

    def train(self, until: int | None = None, *, checkpoint: str | Path | None = None,
              progress: bool = True) -> None:
        """Train until ``until`` iterations are done (default ``config.iterations``), with a tqdm bar.

        Evaluates every ``eval_every`` iterations and, when ``checkpoint`` is a path, saves there every
        ``checkpoint_every`` iterations and at the end.
        """
        from tqdm.auto import tqdm

        cfg = self.config
        until = cfg.iterations if until is None else int(until)
        bar = tqdm(total=until, initial=self.iteration, disable=not progress, unit="it", dynamic_ncols=True)
        try:
            while self.iteration < until:
                start = time.perf_counter()
                loss = self.step()
                self.train_time += time.perf_counter() - start
                bar.n = self.iteration  # a roll-back past a snapshot can move the counter back
                bar.set_postfix(loss=f"{loss:.3f}", N=cfg.steps_at(self.iteration - 1), refresh=False)
                bar.update(0)
                if cfg.eval_every and self.iteration % cfg.eval_every == 0:
                    record = self.evaluate()
                    bar.write(f"iteration {record['iteration']}: train loss {record['train_loss']:.4f}, "
                              f"held-out bound NLL {record['bound_nll']:.4f} nats (EMA)")
                every = cfg.checkpoint_every
                if checkpoint is not None and every and self.iteration % every == 0:
                    self.save(checkpoint)
        finally:
            bar.close()
        if checkpoint is not None:
            self.save(checkpoint)

    def evaluate(self) -> dict[str, float]:
        """Bound NLL of the EMA model on the held-out set (final N, fixed power grid); appended to history.

        Its noise comes from a generator seeded with ``seed + 1`` at every call, not from the training
        generator: evaluating then leaves the training stream alone, and every evaluation sees the same noise
        (common random numbers make successive values comparable).
        """
        x = self.scaler.transform(self.split.heldout).to(torch.float32)
        g = torch.Generator().manual_seed(self.config.seed + 1)
        value = float(bound_nll(self.ema, x, self.config.grid(), generator=g).mean())
        recent = self.history.losses[-max(self.config.eval_every, 1):]
        record = {"iteration": self.iteration, "bound_nll": value,
                  "train_loss": sum(recent) / len(recent) if recent else float("nan"),
                  "train_time_s": self.train_time}
        self.history.evals.append(record)
        return record

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (plain containers and tensors: loads with weights_only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "data": self.data,
            "split": self.split.state_dict(),
            "scaler": self.scaler.state_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_updates": self.ema_updates,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "iteration": self.iteration,
            "train_time_s": self.train_time,
            "history": dataclasses.asdict(self.history),
            "nan_state": [self._failures, self._failed_at],
        }

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (see :func:`atomic_write`)."""
        state = self.state_dict()
        atomic_write(path, lambda f: torch.save(state, f))

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, restore_global_rng: bool = True) -> Trainer:
        """Rebuild a trainer from :meth:`save`'s file, ready to continue exactly where it stopped.

        ``restore_global_rng`` also restores torch's global RNG as it was at saving time.

        Raises:
            ValueError: if the file is missing or is not a trainer checkpoint.
        """
        state = load_checkpoint(path)
        config = TrainConfig.from_dict(state["config"])
        trainer = cls(config, state["data"], split=DataSplit.from_state_dict(state["split"]))
        trainer.scaler = Scaler.from_state_dict(state["scaler"])
        trainer.train_x = trainer.scaler.transform(trainer.split.train).to(torch.float32)
        trainer.model.load_state_dict(state["model"])
        trainer.ema.load_state_dict(state["ema"])
        trainer.ema_updates = int(state["ema_updates"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
        trainer.generator.set_state(state["generator"])
        if restore_global_rng:
            torch.set_rng_state(state["torch_rng"])
        trainer.iteration = int(state["iteration"])
        trainer.train_time = float(state["train_time_s"])
        trainer.history = History(**state["history"])
        trainer._failures, trainer._failed_at = (int(v) for v in state["nan_state"])
        trainer._snapshot = trainer._take_snapshot()
        return trainer


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw dict of a trainer checkpoint (tensors on the CPU), loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file: torch raises many types
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an sdeflow trainer checkpoint (expected format {CHECKPOINT_FORMAT})")
    return state


def evaluate_model(
    model: DiffFlow,
    config: TrainConfig,
    scaler: Scaler,
    heldout: Tensor,
    reference: Tensor,
    *,
    seed: int = 0,
    steps: int | None = None,
) -> tuple[dict[str, Any], Tensor]:
    """The final report of a trained model on held-out data; returns ``(metrics, samples)``.

    ``heldout`` and ``reference`` are two independent held-out sets ``(m, 2)`` in data coordinates. Metrics:

    - ``bound_nll``: mean discrete bound (:func:`bound_nll`) on ``heldout`` on the power grid with ``steps``
      (default ``config.final_steps``) steps; ``ode_nll``: mean exact NLL through the probability-flow
      ODE (:func:`ode_nll`, Dopri5 at 1e-5). Both in nats per point **in model coordinates** (after
      the scaler); the ``*_data`` variants are in data coordinates:
      ``nll_data = nll_model - log|det dy/dx|`` (:func:`scaler_log_det`).
    - sample quality (:func:`sdeflow.metrics.sample_quality`): ``m`` backward-SDE samples, mapped back to
      data coordinates, against ``heldout``; the floor scores ``reference`` instead.

    ``samples`` ``(m, 2)`` are in data coordinates. ``seed`` fixes the bound's noise and the samples.
    """
    x = scaler.transform(heldout).to(torch.float32)
    grid = config.grid(steps)
    g = torch.Generator().manual_seed(seed)
    bound = float(bound_nll(model, x, grid, generator=g).mean())
    exact = float(ode_nll(model, x, t0=config.t0, T=config.T).mean())
    log_det = scaler_log_det(scaler)
    with torch.no_grad():
        samples = scaler.inverse(sample(model, len(reference), (DIM,), grid, generator=g).to(torch.float64))
    quality = sample_quality(heldout, samples, reference)
    metrics = {
        "bound_nll": bound,
        "ode_nll": exact,
        "bound_nll_data": bound - log_det,
        "ode_nll_data": exact - log_det,
        "scaler_log_det": log_det,
        "nll_note": "nats per point; *_nll in model (scaled) coordinates, *_nll_data in data coordinates "
                    "(= model - scaler_log_det); densities at t0 with the N(0, I) prior at T",
        "bound_grid": f"PowerGrid(t0={config.t0}, T={config.T}, steps={grid.steps}, "
                      f"exponent={config.grid_exponent})",
        "heldout_points": len(heldout),
        "samples": quality.m,
        "mmd2": quality.mmd2,
        "mmd2_floor": quality.mmd2_floor,
        "mmd_bandwidth": quality.bandwidth,
        "hist_kl": quality.hist_kl,
        "hist_kl_floor": quality.hist_kl_floor,
        "quality_note": "samples vs heldout; floor = reference (a second held-out set, same size) vs "
                        "heldout; "
                        "MMD^2 unbiased, RBF kernel, bandwidth = median pairwise distance of heldout; "
                        "hist_kl = KL(heldout || samples) on 50x50 bins over heldout's bounding box + 1 "
                        "overflow bin, add-1/2 smoothing",
    }
    return metrics, samples.to(torch.float32)
