"""Training the model families of :mod:`sdeflow.families`: configuration, a resumable trainer, evaluation.

One iteration: draw the global batch's indices, split them into shards (``world_size * accumulate``: one
per process and micro-batch), and for each of this process's shards draw its data in model coordinates
and evaluate the family's loss (DiffFlow: the path KL on a random grid with the current ``N``); backward,
average the gradients over all shards (DistributedDataParallel across processes, accumulation within one),
clip the gradient norm, take an Adam step, step the learning-rate schedule, update the EMA copy.

Reproducibility: every random draw of an iteration comes from generators seeded by counters, not carried
from iteration to iteration: the batch indices from ``(seed, iteration, attempt, 0)`` and everything of
shard ``j`` (its random grid, noise, dequantisation and dropout) from ``(seed, iteration, attempt, 1 + j)``.
Hence the result does not depend on how the shards are spread over processes (one process with
``accumulate=2`` equals two processes with ``accumulate=1``), a NaN retry (``attempt`` > 0) gets fresh
noise, and resuming needs no generator state. A checkpoint holds everything that changes (weights, EMA,
Adam moments, schedule, counter, history), so training ``k`` iterations, saving, loading and training
``k`` more gives parameters bit-identical to ``2k`` uninterrupted iterations. The time grid is not model
state (method note §5 pitfall): it is rebuilt from the config and the iteration every time.

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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import solvers

from ._files import atomic_write
from .data import Scaler, check_source, dataset_names, load_points, make_dataset
from .families import DiffFlowFamily, ModelFamily, make_family
from .images import IMAGE_SOURCES, ImageData, bits_per_dim_from_nll, dequantize, load_images
from .likelihood import scaler_log_det
from .metrics import sample_quality
from .nets import TimeMLP

__all__ = [
    "TrainConfig",
    "DataSplit",
    "PointData",
    "ImageTrainData",
    "is_image_data",
    "stream_generator",
    "Trainer",
    "build_model",
    "TrainedModel",
    "load_trained",
    "load_split",
    "evaluate_model",
    "atomic_write",
    "CHECKPOINT_FORMAT",
]

CHECKPOINT_FORMAT = "sdeflow-trainer/2"
DIM = 2  # the trainer is for 2D point data (sdeflow.data)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the published 2D setting (method note §7).

    Model: ``model``, the family (``diffflow``, ``ddpm``, ``ffjord``: :mod:`sdeflow.families`);
    ``width``/``depth`` of every :class:`TimeMLP` field. DiffFlow only: ``diffusion`` (g), the grid
    settings ``t0``, ``T``, ``grid_exponent``, ``random_grid`` and ``antithetic`` (the other families have
    their own time intervals). FFJORD only: ``ode_tol``, 0 to train with RK4 on ``steps`` equal steps, or
    the tolerance (``rtol = atol``) of the adaptive Dopri5 it trains with instead (FFJORD's own training: the
    solver refines where the flow stiffens, so training cannot exploit a fixed grid's error).
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
    Scale: ``batch_size`` is the global batch, split evenly into ``world_size * accumulate`` shards (one
    per process and micro-batch; see the module docstring); ``precision`` ``"bf16"`` runs the fields under
    ``torch.autocast`` in bfloat16 (no loss scaling needed; the solver state stays float32).
    Images (:mod:`sdeflow.images`): the fields are :class:`sdeflow.unet.UNet` s of preset ``unet``
    (``digits``, ``mnist``, ``cifar10``; ``auto`` picks by image size), with ``unet_channels`` base
    channels (0: the preset's) and ``score_channels`` for DiffFlow's score (0: same as the drift);
    ``grid_kind`` ``"profile"`` is the image profile grid (method note §5) instead of ``"power"``; ``data_root``
    is where ``mnist``/``cifar10`` files are (never downloaded).
    Bookkeeping: bound-NLL evaluation every ``eval_every`` and a checkpoint every ``checkpoint_every``
    iterations (0: never; :meth:`Trainer.train` still saves at the end), ``seed``, and the NaN policy:
    state snapshots every ``snapshot_every`` iterations, a failed iteration is retried ``max_nan_retries``
    times with fresh noise after rolling back.
    """

    model: str = "diffflow"
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
    accumulate: int = 1
    precision: str = "fp32"
    grid_kind: str = "power"
    unet: str = "auto"
    unet_channels: int = 0
    score_channels: int = 0
    data_root: str = ""
    ode_tol: float = 0.0

    def __post_init__(self) -> None:
        # JSON and checkpoints hand lists back: normalise to a tuple of int pairs, then validate
        schedule = tuple((int(i), int(n)) for i, n in self.steps_schedule)
        object.__setattr__(self, "steps_schedule", schedule)
        positive_ints = ("width", "depth", "steps", "batch_size", "lr_decay_every", "iterations",
                         "train_size", "eval_size", "snapshot_every", "accumulate")
        for name in positive_ints:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "checkpoint_every", "max_nan_retries", "seed", "unet_channels",
                     "score_channels"):
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
        make_family(self.model) if self.model != "diffflow" else None  # raises for unknown names
        if self.grid_kind not in ("power", "profile"):
            raise ValueError(f"TrainConfig.grid_kind must be 'power' or 'profile', got {self.grid_kind!r}")
        if self.unet not in ("auto", *UNET_PRESETS):
            raise ValueError(f"TrainConfig.unet must be 'auto' or one of {UNET_PRESETS}, got {self.unet!r}")
        if not (math.isfinite(self.ode_tol) and self.ode_tol >= 0):
            raise ValueError(f"TrainConfig.ode_tol must be finite and >= 0, got {self.ode_tol!r}")
        if self.ode_tol and self.model != "ffjord":
            raise ValueError(f"TrainConfig.ode_tol is for model 'ffjord' (an adaptive training solver), not "
                             f"{self.model!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"TrainConfig.precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accumulate {self.accumulate}")
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

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named configuration: ``paper`` (the published 2D setting, the defaults), ``quick`` (:meth:`quick`),
        ``digits`` (CPU-sized DiffFlow on scikit-learn's 8x8 digits: 1300 iterations at N = 5: 29 minutes of
        training and 1 of evaluation with 2 threads on a 2-core CPU),
        ``mnist`` and ``cifar10`` (the published image settings, method note §7, for a GPU: g = 1,
        T = 0.05, random power / profile grid, progressive N 5 → 30 / 5 → 75, batch 64 / 100, Adam 2e-4,
        EMA 0.999, clipping 1.0, bfloat16 autocast).

        Example:
            >>> TrainConfig.preset("mnist").final_steps, TrainConfig.preset("cifar10").grid_kind
            (30, 'profile')
        """
        image = dict(diffusion=1.0, T=0.05, t0=0.001, drift_lr=2e-4, score_lr=2e-4, lr_decay=1.0, ema_decay=0.999,
                     grad_clip=1.0, eval_every=5000, checkpoint_every=5000, eval_size=256)
        presets: dict[str, dict[str, Any]] = {
            "paper": {},
            "quick": dataclasses.asdict(cls.quick()),
            # sized to train and evaluate in half an hour with 2 threads on a 2-core CPU (measured 1.33 s per iteration)
            "digits": {**image, "unet": "digits", "batch_size": 128, "iterations": 1300, "drift_lr": 1e-3,
                       "score_lr": 1e-3, "lr_decay": 0.5, "lr_decay_every": 800, "steps": 5, "steps_schedule": (),
                       "ema_decay": 0.995, "eval_every": 650, "checkpoint_every": 500, "eval_size": 256},
            "mnist": {**image, "unet": "mnist", "batch_size": 64, "iterations": 100_000, "precision": "bf16",
                      "steps_schedule": ((0, 5), (20_000, 10), (40_000, 20), (60_000, 30))},
            "cifar10": {**image, "unet": "cifar10", "score_channels": 64, "batch_size": 100, "iterations": 50_000,
                        "precision": "bf16", "grid_kind": "profile",
                        "steps_schedule": ((0, 5), (5000, 10), (15_000, 20), (20_000, 30), (25_000, 50),
                                           (30_000, 75))},
        }
        if name not in presets:
            raise ValueError(f"unknown preset '{name}'; available: {', '.join(presets)}")
        return cls(**{**presets[name], **overrides})

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

    def family(self) -> ModelFamily:
        """The model family with this config's settings."""
        if self.model == "diffflow":
            return DiffFlowFamily(t0=self.t0, T=self.T, diffusion=self.diffusion,
                                  grid_exponent=self.grid_exponent, random_grid=self.random_grid,
                                  antithetic=self.antithetic, profile=self.grid_kind == "profile")
        if self.model == "ffjord":
            return make_family("ffjord", train_tol=self.ode_tol)
        return make_family(self.model)

    def grid(self, steps: int | None = None) -> solvers.Grid:
        """The family's fixed evaluation grid with ``steps`` steps (default :attr:`final_steps`)."""
        return self.family().grid(self.final_steps if steps is None else steps)

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


UNET_PRESETS = ("digits", "mnist", "cifar10")


def build_model(config: TrainConfig, event_shape: tuple[int, ...] = (DIM,)) -> nn.Module:
    """A fresh model of ``config.family()`` with time features scaled to the family's interval.

    Points ``(dim,)``: every field is a ``TimeMLP(dim, width, depth)``. Images ``(C, H, W)``: every field is
    a :class:`sdeflow.unet.UNet` of preset ``config.unet`` (``auto``: by size, 8 → digits, 28 → mnist,
    32 → cifar10, else the digits layout at this size), with ``unet_channels`` and ``score_channels``, and
    attention at the second level (half resolution, rounded up) as in every preset at its own size.
    """
    family = config.family()
    if len(event_shape) == 1:
        def net(role: str) -> nn.Module:
            return TimeMLP(event_shape[0], width=config.width, depth=config.depth, t_scale=family.t_scale)

        return family.build(net)
    if len(event_shape) != 3:
        raise ValueError(f"data must be points (dim,) or images (C, H, W), got event shape {event_shape}")
    from .unet import UNet

    c, h, w = event_shape
    presets = {"digits": UNet.digits, "mnist": UNet.mnist, "cifar10": UNet.cifar10}
    preset = config.unet
    if preset == "auto":
        preset = {8: "digits", 28: "mnist", 32: "cifar10"}.get(h, "digits") if h == w else "digits"
    # every preset attends at its second level (half the resolution: 4 of 8, 14 of 28, 16 of 32); say so
    # by level, so that the layout carries over to any image size (a 12x12 set attends at 6)
    half = (min(h, w) + 1) // 2

    def image_net(role: str) -> nn.Module:
        overrides: dict[str, Any] = dict(image_size=(h, w), in_channels=c, t_scale=family.t_scale,
                                         attention_resolutions=(half,))
        channels = config.score_channels if role == "score" and config.score_channels else config.unet_channels
        if channels:
            overrides["base_channels"] = channels
        return presets[preset](**overrides)

    return family.build(image_net)


def stream_generator(seed: int, iteration: int, attempt: int, stream: int,
                     device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded by the counters ``(seed, iteration, attempt, stream)`` (module docstring).

    The counters are mixed by :class:`numpy.random.SeedSequence`, so nearby counters give unrelated streams.

    Example:
        >>> a = torch.rand(2, generator=stream_generator(0, 5, 0, 1))
        >>> torch.equal(a, torch.rand(2, generator=stream_generator(0, 5, 0, 1)))
        True
    """
    words = np.random.SeedSequence([seed, iteration, attempt, stream]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed((int(words[0]) << 31) ^ int(words[1]))


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
    check_source(data)
    points = load_points(data)
    k = min(eval_size, len(points) // 5)
    if k < 2:
        raise ValueError(f"{data}: {len(points)} points are too few to hold out two evaluation sets; "
                         f"need >= 10")
    perm = torch.randperm(len(points), generator=generator)
    heldout = points[perm[:k]]
    return DataSplit(points[perm[2 * k:]], heldout, torch.zeros(k, dtype=torch.long), points[perm[k:2 * k]])


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


class PointData:
    """2D point data for training: the split, the scaler fitted to its training points, and batches.

    ``event_shape`` ``(2,)``; :meth:`batch` returns training points in model coordinates (float32).
    """

    event_shape = (DIM,)

    def __init__(self, split: DataSplit, scaler: Scaler | None = None):
        self.split = split
        self.scaler = Scaler.fit(split.train) if scaler is None else scaler
        self.train = self.scaler.transform(split.train).to(torch.float32)

    def __len__(self) -> int:
        return len(self.train)

    def batch(self, indices: Tensor, generator: torch.Generator, device: torch.device) -> Tensor:
        """Training points ``indices`` in model coordinates (``generator``: unused, points need no noise)."""
        return self.train[indices].to(device)

    def heldout(self) -> Tensor:
        """The held-out set in model coordinates."""
        return self.scaler.transform(self.split.heldout).to(torch.float32)


class ImageTrainData:
    """Images for training: integer levels (:class:`sdeflow.images.ImageData`), dequantised per batch.

    ``event_shape`` ``(C, H, W)``; :meth:`batch` returns ``2 (k + u) / L - 1`` with fresh uniform ``u`` from
    the shard's stream (a new dequantisation every time an image is drawn).
    """

    def __init__(self, images: ImageData):
        self.images = images
        self.event_shape = images.shape

    def __len__(self) -> int:
        return len(self.images.train)

    def batch(self, indices: Tensor, generator: torch.Generator, device: torch.device) -> Tensor:
        if generator.device.type != "cpu":  # dequantize draws on the CPU: a CPU stream derived from the shard's
            seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
            generator = torch.Generator().manual_seed(seed)
        return dequantize(self.images.train[indices], self.images.levels, generator).to(device)

    def heldout(self, n: int, seed: int) -> Tensor:
        """The first ``n`` test images (training images if there is no test set), dequantised with ``seed``."""
        pool = self.images.test if len(self.images.test) else self.images.train
        return dequantize(pool[:n], self.images.levels, torch.Generator().manual_seed(seed))


def is_image_data(data: str) -> bool:
    """Whether ``data`` names an image set: one of :data:`sdeflow.images.IMAGE_SOURCES`, a folder (of PNGs), or
    a ``.npy`` array with 3 or more dimensions (``(n, 2)`` arrays are 2D points).

    Example:
        >>> is_image_data("digits"), is_image_data("moons")
        (True, False)
    """
    if data in IMAGE_SOURCES:
        return True
    path = Path(data)
    if path.is_dir():
        return True
    if path.suffix.lower() == ".npy" and path.is_file():
        try:  # only the header is read (memory map); a broken file is left to the loader, which names the problem
            return np.load(path, mmap_mode="r", allow_pickle=False).ndim >= 3
        except (OSError, ValueError):
            return False
    return False


class _LossModule(nn.Module):
    """The family's loss as a module's forward, so that DistributedDataParallel sees the forward pass.

    A simulation that raises ``FloatingPointError`` (a NaN state, named by ``sdesolve``) returns a NaN loss
    that still touches every parameter: every process then backpropagates, the all-reduce completes, and
    all processes see the same non-finite gradient and roll back together. The message is kept in
    :attr:`error`.
    """

    def __init__(self, family: ModelFamily, model: nn.Module):
        super().__init__()
        self.family, self.model = family, model
        self.error = ""

    def forward(self, x: Tensor, steps: int, generator: torch.Generator) -> Tensor:
        try:
            return self.family.loss(self.model, x, steps, generator)
        except FloatingPointError as err:
            self.error = f"simulation: {err}"
            return torch.stack([p.sum() for p in self.model.parameters()]).sum() * float("nan")


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class Trainer:
    """Owns a model of the config's family, its EMA copy, Adam, the learning-rate schedule and the data.

    Args:
        config: the run's settings.
        data: a registry name (:func:`sdeflow.data.dataset_names`) or a ``.npy``/``.csv`` path of 2D points, or an
            image source (:func:`is_image_data`: :data:`sdeflow.images.IMAGE_SOURCES`, a PNG folder, an image
            ``.npy``).
        split: the 2D data, already split (default: :func:`load_split` from ``data`` with a generator seeded by
            ``config.seed``, so the seed fixes the split too).
        images: the image data, already loaded (default: :func:`sdeflow.images.load_images` of ``data`` with
            ``root=config.data_root`` and ``seed=config.seed``).
        device: where the model lives and the loss is computed (default: the CPU).

    Under ``torchrun`` (an initialised ``torch.distributed`` process group) the model is wrapped in
    DistributedDataParallel; every process holds the same data split, computes its own shards of the
    global batch, and only rank 0 writes checkpoints and prints.

    Attributes:
        model, ema: the trained model and its exponential moving average (use ``ema`` for sampling).
        family: the :class:`sdeflow.families.ModelFamily` of ``config.model``.
        scaler: data → model coordinates, fitted to the training points.
        iteration: completed iterations.
        history: losses, evaluations, NaN events.
        rank, world_size: this process's place in the process group.

    Example:
        >>> t = Trainer(TrainConfig(width=16, depth=2, batch_size=16, steps=3, train_size=64, eval_size=32),
        ...             "8gaussians")
        >>> loss = t.step()
        >>> t.iteration, math.isfinite(loss)
        (1, True)
    """

    def __init__(self, config: TrainConfig, data: str, *, split: DataSplit | None = None,
                 images: ImageData | None = None, device: torch.device | str = "cpu"):
        self.config = config
        self.data = str(data)
        self.device = torch.device(device)
        self.rank, self.world_size = _distributed()
        shards = self.world_size * config.accumulate
        if config.batch_size % shards:
            raise ValueError(f"batch_size {config.batch_size} does not split into {self.world_size} processes "
                             f"x {config.accumulate} micro-batches")
        self.train_data: PointData | ImageTrainData
        if images is not None:
            self.train_data = ImageTrainData(images)
        elif split is None and is_image_data(self.data):
            self.train_data = ImageTrainData(load_images(self.data, root=config.data_root or None, seed=config.seed))
        else:
            if split is None:
                split = load_split(self.data, config.train_size, config.eval_size,
                                   torch.Generator().manual_seed(config.seed))
            self.train_data = PointData(split)
        self.family = config.family()
        # the networks' init draws from the global RNG: fork it so the seed fixes the init and the caller's
        # global stream is left alone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = build_model(config, self.train_data.event_shape).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        self.ema_updates = 0
        lrs = {"drift": config.drift_lr, "score": config.score_lr}
        groups = self.family.param_groups(self.model, config.drift_lr)
        for group in groups:
            group["lr"] = lrs.get(group["name"], group["lr"])
        self.optimizer = torch.optim.Adam(groups)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=config.lr_decay_every, gamma=config.lr_decay)
        self._loss_module = _LossModule(self.family, self.model)
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        if self.world_size > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self._ddp = nn.parallel.DistributedDataParallel(self._loss_module, device_ids=ids,
                                                            broadcast_buffers=False)
        self.iteration = 0
        self.train_time = 0.0
        self.history = History()
        self._failures = 0  # consecutive failed attempts
        self._failed_at = -1  # the furthest iteration that failed; success past it resets the count
        self._snapshot = self._take_snapshot()

    @property
    def images(self) -> bool:
        """Whether the trainer holds image data (else 2D points)."""
        return isinstance(self.train_data, ImageTrainData)

    @property
    def split(self) -> DataSplit:
        """The point data's split (points only)."""
        if not isinstance(self.train_data, PointData):
            raise AttributeError("image data has no point split: see trainer.train_data.images")
        return self.train_data.split

    @property
    def scaler(self) -> Scaler:
        """The point data's scaler (points only)."""
        if not isinstance(self.train_data, PointData):
            raise AttributeError("image data has no scaler: images are scaled to [-1, 1] by dequantisation")
        return self.train_data.scaler

    def heldout(self) -> Tensor:
        """Held-out data in model coordinates (points: the held-out split; images: dequantised test images)."""
        if isinstance(self.train_data, PointData):
            return self.train_data.heldout()
        return self.train_data.heldout(self.config.eval_size, self.config.seed + 2)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    # -- one iteration ------------------------------------------------------------------------------

    def _generator(self, stream: int, attempt: int, device: torch.device | str = "cpu") -> torch.Generator:
        return stream_generator(self.config.seed, self.iteration, attempt, stream, device)

    @contextlib.contextmanager
    def _shard_rng(self, generator: torch.Generator) -> Iterator[None]:
        """Global-RNG draws inside (dropout) come from the shard's stream; the caller's RNG is left alone."""
        seed = int(torch.randint(2**62, (1,), generator=generator, device=generator.device))
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield

    def _attempt(self, attempt: int) -> tuple[float | None, str]:
        """One optimisation step; ``(loss, "")`` on success, ``(None, reason)`` if anything was not finite.

        Failures are detected before the state changes where possible (loss, gradients); the parameter
        check after the step catches the rest, and the caller rolls back. Every process reaches the same
        verdict: the loss is averaged over processes and the gradients are all-reduced.
        """
        cfg = self.config
        steps = cfg.steps_at(self.iteration)
        indices = torch.randint(0, len(self.train_data), (cfg.batch_size,), generator=self._generator(0, attempt))
        shard_size = cfg.batch_size // (self.world_size * cfg.accumulate)
        runner = self._loss_module if self._ddp is None else self._ddp
        self._loss_module.error = ""
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(cfg.accumulate):
            shard = self.rank * cfg.accumulate + micro
            g = self._generator(1 + shard, attempt, self.device)
            x = self.train_data.batch(indices[shard * shard_size:(shard + 1) * shard_size], g, self.device)
            last = micro == cfg.accumulate - 1
            sync = contextlib.nullcontext() if self._ddp is None or last else self._ddp.no_sync()
            with sync, self._shard_rng(g), self._autocast():
                loss = runner(x, steps, g)
            (loss.float() / cfg.accumulate).backward()
            total += loss.detach().float() / cfg.accumulate
        if self.world_size > 1:
            torch.distributed.all_reduce(total)
            total /= self.world_size
        value = float(total)
        if not math.isfinite(value):
            return None, self._loss_module.error or f"loss is {value}"
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
        return value, ""

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
        simulated batch), and the iteration is retried with fresh noise (the next ``attempt`` stream).

        Raises:
            FloatingPointError: after ``1 + max_nan_retries`` consecutive failures, naming the iteration.
                Nothing is written to disk, so the last checkpoint stays as it was.
        """
        while True:
            iteration = self.iteration
            loss, reason = self._attempt(self._failures)
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
        ``checkpoint_every`` iterations and at the end (rank 0 only, in a process group).
        """
        from tqdm.auto import tqdm

        cfg = self.config
        until = cfg.iterations if until is None else int(until)
        bar = tqdm(total=until, initial=self.iteration, disable=not (progress and self.is_main), unit="it",
                   dynamic_ncols=True)
        try:
            while self.iteration < until:
                start = time.perf_counter()
                loss = self.step()
                self.train_time += time.perf_counter() - start
                bar.n = self.iteration  # a roll-back past a snapshot can move the counter back
                bar.set_postfix(loss=f"{loss:.3f}", N=cfg.steps_at(self.iteration - 1), refresh=False)
                bar.update(0)
                if cfg.eval_every and self.iteration % cfg.eval_every == 0 and self.is_main:
                    record = self.evaluate()
                    bar.write(f"iteration {record['iteration']}: train loss {record['train_loss']:.4f}, "
                              f"held-out {record['nll_kind']} NLL {record['nll']:.4f} nats (EMA)")
                every = cfg.checkpoint_every
                if checkpoint is not None and every and self.iteration % every == 0:
                    self.save(checkpoint)
        finally:
            bar.close()
        if checkpoint is not None:
            self.save(checkpoint)

    def evaluate(self) -> dict[str, Any]:
        """Held-out NLL of the EMA model (final N, fixed grid); appended to history.

        The discrete bound where the family has one, else the exact NLL through the ODE (``nll_kind``
        says which; ``bound_nll`` is kept as a name for the bound; images use Hutchinson's trace there, one
        Rademacher probe per image). Its noise comes from a generator seeded with ``seed + 1`` at every call,
        not from the training streams: every evaluation sees the same noise (common random numbers make
        successive values comparable). Images also get ``bpd``, the NLL in bits/dim of the discrete data
        (:func:`sdeflow.images.bits_per_dim_from_nll`).
        """
        x = self.heldout().to(self.device)
        g = torch.Generator(device=self.device).manual_seed(self.config.seed + 1)
        with torch.no_grad():
            bound = self.family.bound_nll(self.ema, x, self.config.final_steps, g)
        kind = "bound" if bound is not None else "exact"
        if bound is not None:
            nll = bound
        else:  # the exact trace costs one vector-Jacobian product per dimension: estimate it for images
            trace = solvers.HutchinsonTrace(generator=g) if self.images else None
            nll = self.family.exact_nll(self.ema, x, trace=trace)
        value = float(nll.mean())
        recent = self.history.losses[-max(self.config.eval_every, 1):]
        record: dict[str, Any] = {"iteration": self.iteration, "nll": value, "nll_kind": kind,
                                  "train_loss": sum(recent) / len(recent) if recent else float("nan"),
                                  "train_time_s": self.train_time}
        if bound is not None:
            record["bound_nll"] = value
        if isinstance(self.train_data, ImageTrainData):
            images = self.train_data.images
            record["bpd"] = float(bits_per_dim_from_nll(value, images.dim, images.levels))
        self.history.evals.append(record)
        return record

    # -- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly (plain containers and tensors: loads with weights_only)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "data": self.data,
            **self._data_state(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_updates": self.ema_updates,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "iteration": self.iteration,
            "train_time_s": self.train_time,
            "history": dataclasses.asdict(self.history),
            "nan_state": [self._failures, self._failed_at],
        }

    def _data_state(self) -> dict[str, Any]:
        """Points: the split and scaler (stored: a file may change). Images: only what identifies them (they
        are reloaded from their source on resume, and the digest checks that it still holds the same images);
        ``event_shape`` and ``levels`` let :func:`load_trained` sample without the data."""
        if isinstance(self.train_data, PointData):
            return {"split": self.split.state_dict(), "scaler": self.scaler.state_dict()}
        images = self.train_data.images
        return {"event_shape": list(images.shape), "levels": images.levels, "image_digest": images.digest()}

    def save(self, path: str | Path) -> None:
        """Write :meth:`state_dict` to ``path`` atomically (see :func:`atomic_write`); rank 0 only."""
        if not self.is_main:
            return
        state = self.state_dict()
        atomic_write(path, lambda f: torch.save(state, f))

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, restore_global_rng: bool = True,
                        device: torch.device | str = "cpu", data_root: str | None = None) -> Trainer:
        """Rebuild a trainer from :meth:`save`'s file, ready to continue exactly where it stopped.

        ``restore_global_rng`` also restores torch's global RNG as it was at saving time. Every process of a
        group loads the same file. Image data is reloaded from its source (the same seed gives the same split),
        from ``data_root`` if given (the files moved; it replaces ``config.data_root``), and must have the
        stored digest.

        Raises:
            ValueError: if the file is missing or is not a trainer checkpoint, or the image source no longer
                holds the images the run was trained on.
        """
        state = load_checkpoint(path)
        config = TrainConfig.from_dict(state["config"])
        if "split" in state:
            split = DataSplit.from_state_dict(state["split"])
            trainer = cls(config, state["data"], split=split, device=device)
            trainer.train_data = PointData(split, Scaler.from_state_dict(state["scaler"]))
        else:
            if data_root is not None:
                config = dataclasses.replace(config, data_root=data_root)
            images = load_images(state["data"], root=config.data_root or None, seed=config.seed)
            if images.digest() != state["image_digest"]:
                raise ValueError(f"{path}: the images of '{state['data']}' differ from those the run was trained on "
                                 f"(sha256 {images.digest()[:12]}... != {state['image_digest'][:12]}...)")
            trainer = cls(config, state["data"], images=images, device=device)
        trainer.model.load_state_dict(state["model"])
        trainer.ema.load_state_dict(state["ema"])
        trainer.ema_updates = int(state["ema_updates"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
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


@dataclass(frozen=True)
class TrainedModel:
    """The EMA model of a checkpoint and what sampling needs, without the data: see :func:`load_trained`.

    ``event_shape``: ``(2,)`` for points, ``(C, H, W)`` for images; ``scaler``: data → model coordinates
    (points; ``None`` for images, which live in [-1, 1]); ``levels``: intensity levels (images; ``None`` for
    points).
    """

    config: TrainConfig
    family: ModelFamily
    ema: nn.Module
    data: str
    iteration: int
    event_shape: tuple[int, ...]
    scaler: Scaler | None
    levels: int | None

    @property
    def images(self) -> bool:
        """Whether the model is of images."""
        return len(self.event_shape) == 3


def load_trained(path: str | Path, device: torch.device | str = "cpu") -> TrainedModel:
    """The EMA model of a trainer checkpoint, ready to sample, without loading the training data.

    Raises:
        ValueError: the file is missing or not a trainer checkpoint.

    Example:
        >>> import tempfile, pathlib
        >>> t = Trainer(TrainConfig(width=8, depth=1, batch_size=8, steps=2, train_size=32, eval_size=16), "moons")
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "checkpoint.pt"
        >>> t.save(p)
        >>> m = load_trained(p)
        >>> m.event_shape, m.family.sample(m.ema, 3, m.event_shape, 2, torch.Generator().manual_seed(0)).shape
        ((2,), torch.Size([3, 2]))
    """
    state = load_checkpoint(path)
    config = TrainConfig.from_dict(state["config"])
    images = "split" not in state
    shape = tuple(int(s) for s in state["event_shape"]) if images else (DIM,)
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: keep it off the caller's global RNG
        model = build_model(config, shape)
    model.load_state_dict(state["ema"])
    return TrainedModel(config, config.family(), model.requires_grad_(False).to(device), str(state["data"]),
                        int(state["iteration"]), shape, None if images else Scaler.from_state_dict(state["scaler"]),
                        int(state["levels"]) if images else None)


def evaluate_model(
    model: nn.Module,
    config: TrainConfig,
    scaler: Scaler,
    heldout: Tensor,
    reference: Tensor,
    *,
    seed: int = 0,
    steps: int | None = None,
) -> tuple[dict[str, Any], Tensor]:
    """The final report of a trained model of ``config.family()`` on held-out data; returns
    ``(metrics, samples)``.

    ``heldout`` and ``reference`` are two independent held-out sets ``(m, 2)`` in data coordinates. Metrics:

    - ``bound_nll``: mean discrete bound on ``heldout`` on the family's grid with ``steps`` (default
      ``config.final_steps``) steps (``None`` for a family without one: ffjord); ``ode_nll``: mean exact
      NLL through the ODE (exact trace, Dopri5 at 1e-5). Both in nats per point **in model coordinates**
      (after the scaler); the ``*_data`` variants are in data coordinates:
      ``nll_data = nll_model - log|det dy/dx|`` (:func:`scaler_log_det`).
    - sample quality (:func:`sdeflow.metrics.sample_quality`): ``m`` samples with ``steps`` steps, mapped
      back to data coordinates, against ``heldout``; the floor scores ``reference`` instead.

    ``samples`` ``(m, 2)`` are in data coordinates. ``seed`` fixes the bound's noise and the samples.
    """
    family = config.family()
    device = next(model.parameters()).device
    x = scaler.transform(heldout).to(device, torch.float32)
    steps = config.final_steps if steps is None else steps
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        bound_t = family.bound_nll(model, x, steps, g)
        samples = family.sample(model, len(reference), (DIM,), steps, g)
    bound = None if bound_t is None else float(bound_t.mean())
    exact = float(family.exact_nll(model, x).mean())
    samples = scaler.inverse(samples.cpu().to(torch.float64))
    quality = sample_quality(heldout, samples, reference)
    log_det = scaler_log_det(scaler)
    metrics = {
        "model": config.model,
        "bound_nll": bound,
        "ode_nll": exact,
        "bound_nll_data": None if bound is None else bound - log_det,
        "ode_nll_data": exact - log_det,
        "scaler_log_det": log_det,
        "nll_note": "nats per point; *_nll in model (scaled) coordinates, *_nll_data in data coordinates "
                    "(= model - scaler_log_det); densities at t0 with the N(0, I) prior at T",
        "grid": f"{type(family).__name__}.grid({steps})",
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
