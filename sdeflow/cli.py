"""Command line: ``sdeflow train | sample | evaluate`` (also ``python -m sdeflow``).

Examples::

    sdeflow train --data olympic_rings --out runs/rings --preset quick
    sdeflow train --data checkerboard --out runs/board-ddpm --model ddpm
    torchrun --nproc_per_node 2 -m sdeflow train --data olympic_rings --out runs/rings2
    sdeflow train --data olympic_rings --out runs/rings --resume --iterations 3000
    sdeflow sample runs/rings --n 10000 --out rings.npy
    sdeflow evaluate runs/rings --n 2000

``train`` writes ``DIR/checkpoint.pt`` (everything needed to resume), ``DIR/metrics.json``,
``DIR/samples.png`` and ``DIR/trajectories.png``. Usage errors (bad arguments, unknown dataset, missing
checkpoint, refusing to overwrite) print one line and exit with status 2; a diverged training exits with 1.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) ``train`` joins the process group (gloo on the
CPU, NCCL with ``--device cuda``) and trains data-parallel; rank 0 alone writes and prints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import solvers

from .data import dataset_names, load_points, make_dataset
from .families import family_names
from .train import (
    DIM,
    DataSplit,
    TrainConfig,
    Trainer,
    atomic_write,
    evaluate_model,
)

__all__ = ["main", "build_parser"]

OUTPUTS = ("checkpoint.pt", "metrics.json", "samples.png", "trajectories.png")


class UsageError(Exception):
    """A mistake in the command line or its files: reported in one line, exit status 2."""


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
    """The argparse parser of all three commands."""
    parser = argparse.ArgumentParser(prog="sdeflow", description="Diffusion Normalizing Flow on 2D data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,sample,evaluate}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=_positive,
                        help="torch CPU threads (default: 1, which is fastest for the 2D networks and small "
                             "batches here; raise it for --preset paper or bigger networks)")

    t = sub.add_parser("train", parents=[common],
                       help="train a DiffFlow, write checkpoint, metrics and plots to --out")
    t.add_argument("--data", help=f"dataset name ({', '.join(dataset_names())}) or a .npy/.csv file of "
                                  f"2D points (optional with --resume)")
    t.add_argument("--out", required=True, type=Path, help="output directory")
    t.add_argument("--preset", choices=("paper", "quick"), default=None,
                   help="quick: a run of a few minutes on a 2-core CPU (default); paper: the published 2D "
                        "setting (batch 5000, N = 30, 3000 iterations: hours on a CPU)")
    t.add_argument("--model", choices=family_names(), default=None,
                   help="the model family (default diffflow): diffflow, ddpm (VP score SDE, denoising score "
                        "matching) or ffjord (continuous normalizing flow, maximum likelihood)")
    t.add_argument("--iterations", type=_positive, help="total iterations (with --resume: the new total)")
    t.add_argument("--batch", type=_positive, help="batch size")
    t.add_argument("--steps", type=_positive, help="fixed number of grid steps N (replaces the preset's "
                                                   "progressive schedule)")
    t.add_argument("--width", type=_positive, help="hidden width of both networks")
    t.add_argument("--depth", type=_positive, help="hidden layers of both networks")
    t.add_argument("--eval-size", type=_positive, help="points in each held-out set (and samples scored)")
    t.add_argument("--seed", type=_non_negative, help="seed of the data split, init, batches and noise")
    t.add_argument("--eval-every", type=_non_negative, help="held-out bound NLL every K iterations (0: off)")
    t.add_argument("--checkpoint-every", type=_non_negative, help="checkpoint every K iterations (0: only "
                                                                  "at the end)")
    t.add_argument("--accumulate", type=_positive,
                   help="micro-batches per process and iteration (the batch is split evenly; same result)")
    t.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: autocast the networks (GPU)")
    t.add_argument("--device", default=None,
                   help="cpu (default) or cuda; under torchrun with cuda each process takes cuda:LOCAL_RANK")
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    t.add_argument("--force", action="store_true", help="overwrite the outputs in an existing OUT")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", parents=[common],
                       help="draw samples (data coordinates) from a trained run into a .npy file")
    s.add_argument("dir", type=Path, help="a training output directory (holds checkpoint.pt)")
    s.add_argument("--n", type=_positive, required=True, help="number of samples")
    s.add_argument("--steps", type=_positive, help="grid steps (default: the training's final N); with "
                                                   "--ode: fixed-step RK4 instead of adaptive Dopri5")
    s.add_argument("--seed", type=_non_negative, default=0, help="seed of the prior draws and noise")
    s.add_argument("--ode", action="store_true", help="deterministic: the probability-flow ODE")
    s.add_argument("--out", type=Path, required=True, help="output .npy file, shape (n, 2), float32")
    s.add_argument("--force", action="store_true", help="overwrite --out if it exists")

    e = sub.add_parser("evaluate", parents=[common],
                       help="bound and ODE NLL, sample quality; writes DIR/evaluation.json")
    e.add_argument("dir", type=Path, help="a training output directory (holds checkpoint.pt)")
    e.add_argument("--data", help="evaluate on this dataset/file instead of the run's stored held-out sets")
    e.add_argument("--n", type=_positive, help="held-out points (default: all stored, or 2000 with --data)")
    e.add_argument("--steps", type=_positive, help="grid steps for the bound and sampling (default: final N)")
    e.add_argument("--seed", type=_non_negative, default=0,
                   help="seed of the noise, samples and --data draws")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 training diverged, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed its message; hand back the status instead of exiting
        return int(exit_.code or 0)
    command = {"train": _train, "sample": _sample, "evaluate": _evaluate}[args.command]
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if args.threads is None else args.threads)
    try:
        with _process_group(args):
            return command(args)
    except UsageError as err:
        print(f"sdeflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:  # main() may run inside a bigger program (tests): leave the setting as it was
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _process_group(args: argparse.Namespace) -> Any:
    """Join torchrun's process group for ``train`` (``WORLD_SIZE`` > 1), and leave it afterwards."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.command != "train" or world <= 1:
        yield
        return
    if args.command == "train" and (args.device or "cpu").startswith("cuda"):
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


# -- train --------------------------------------------------------------------------------------------

def _check_data(data: str) -> None:
    if data in dataset_names():
        return
    path = Path(data)
    if path.suffix.lower() not in (".npy", ".csv"):
        raise UsageError(f"unknown dataset '{data}'; available: {', '.join(dataset_names())} "
                         f"(or a path to a .npy/.csv file)")
    if not path.is_file():
        raise UsageError(f"{path}: file not found")


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    overrides: dict[str, Any] = {}
    for flag, name in (("iterations", "iterations"), ("batch", "batch_size"), ("width", "width"),
                       ("depth", "depth"), ("eval_size", "eval_size"), ("seed", "seed"),
                       ("eval_every", "eval_every"), ("checkpoint_every", "checkpoint_every"),
                       ("model", "model"), ("accumulate", "accumulate"), ("precision", "precision")):
        if getattr(args, flag) is not None:
            overrides[name] = getattr(args, flag)
    if args.steps is not None:
        overrides.update(steps=args.steps, steps_schedule=())
    base = TrainConfig() if args.preset == "paper" else TrainConfig.quick()
    try:
        return TrainConfig.from_dict({**base.to_dict(), **overrides})
    except ValueError as err:
        raise UsageError(str(err)) from None


def _resumed_trainer(args: argparse.Namespace) -> Trainer:
    path = args.out / "checkpoint.pt"
    if args.force:
        raise UsageError("--resume continues a run and --force starts one over: choose one")
    frozen = ("preset", "batch", "steps", "width", "depth", "eval_size", "seed", "model", "accumulate")
    fixed = [f"--{name.replace('_', '-')}" for name in frozen if getattr(args, name) is not None]
    if fixed:
        raise UsageError(f"{', '.join(fixed)} cannot change when resuming (the run keeps its configuration)")
    try:
        trainer = Trainer.from_checkpoint(path, device=args.device or "cpu")
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.data is not None and args.data != trainer.data:
        raise UsageError(f"--data {args.data} differs from the checkpoint's dataset {trainer.data}")
    overrides = {name: getattr(args, flag) for flag, name in (("iterations", "iterations"),
                 ("eval_every", "eval_every"), ("checkpoint_every", "checkpoint_every"),
                 ("precision", "precision"))
                 if getattr(args, flag) is not None}
    if overrides:
        trainer.config = TrainConfig.from_dict({**trainer.config.to_dict(), **overrides})
    return trainer


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
        if args.data is None:
            raise UsageError("--data is required (unless --resume)")
        if out.is_dir() and any(out.iterdir()) and not args.force and _is_main():
            raise UsageError(f"{out} is not empty; pass --force to overwrite its outputs or --resume to "
                             f"continue its checkpoint")
        _check_data(args.data)
        config = _config_from_args(args)
        try:
            trainer = Trainer(config, args.data, device=args.device or "cpu")
        except ValueError as err:  # a malformed file: load_points names the problem
            raise UsageError(str(err)) from None
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


# -- sample and evaluate --------------------------------------------------------------------------------

def _load(directory: Path) -> Trainer:
    if not directory.is_dir():
        raise UsageError(f"{directory}: no such directory")
    try:
        return Trainer.from_checkpoint(directory / "checkpoint.pt", restore_global_rng=False)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _sample(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix != ".npy":
        raise UsageError(f"--out must end in .npy, got {out}")
    if out.exists() and not args.force:
        raise UsageError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UsageError(f"{out.parent}: no such directory")
    trainer = _load(args.dir)
    cfg, model = trainer.config, trainer.ema
    g = torch.Generator().manual_seed(args.seed)
    steps, solver = (args.steps or cfg.final_steps), None
    if args.ode and args.steps is None:  # adaptive: one grid step, the solver picks its own inside
        steps, solver = 1, solvers.Dopri5(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y = trainer.family.sample(model, args.n, (DIM,), steps, g, ode=args.ode, solver=solver)
    points = trainer.scaler.inverse(y.to(torch.float64)).to(torch.float32).numpy()
    atomic_write(out, lambda f: np.save(f, points))
    how = "ODE" if args.ode else "SDE"
    print(f"wrote {args.n} samples ({how}) to {out}")
    return 0


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
    _check_data(args.data)
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
    trainer = _load(args.dir)
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

