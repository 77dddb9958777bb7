"""Compare DiffFlow, DDPM and FFJORD on one 2D data set with one training budget, as in the paper's figure.

The three models share the trainer, the data split, the network size (every learned network a TimeMLP
of ~100k parameters), the batch, the number of iterations and the seed; each trains at its own learning
rate (`sdeflow.compare.default_configs` says which and why). Then every model samples with its own sampler
on its own grid at each N in --steps, and each set of samples is scored against held-out data: the excess
binned KL to the exact density (blur, leaking), MMD^2 and k-NN precision / recall / density / coverage
(dropped modes), the NLL bound and the exact NLL minus the true entropy, each beside its floor (what a
second sample of the data scores). Written to --out:

    comparison.png   each model's forward process from data to noise (colour: mode) and its samples
    samples.png      the samples of every sampler at every N
    table.md         the scores against N with wall times (also printed)
    comparison.json  everything measured
    checkpoints/     one trainer checkpoint per model (--reuse loads them instead of training)

The same runs from the command line as `sdeflow compare --data ... --out ...`.

Run:  python examples/compare_2d.py --iterations 20 --samples 2000     (a smoke test, about a minute)
      python examples/compare_2d.py --data checkerboard                  (the full budget: ~25 min, 1 core)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sdeflow.compare import DEFAULT_STEPS, Budget, compare_models, default_configs
from sdeflow.data import dataset_names

# -- defaults (each one is also a command-line flag) -----------------------------------------------------
DATA = "olympic_rings"  # a name from sdeflow.data.dataset_names(), or a .npy/.csv file of 2D points
OUT = "runs/compare_2d"  # output directory (created if missing; its outputs are overwritten)
MODELS = "diffflow,ddpm,ffjord"  # the families to compare, in this order
ITERATIONS = Budget.iterations  # Adam steps of every model (1000)
BATCH = Budget.batch_size  # data points per step of every model (512)
WIDTH = Budget.width  # hidden width of every network (216: 101,738 parameters with 3 hidden layers)
SAMPLES = Budget.samples  # samples per sampler and N, and points in each held-out set (10,000)
STEPS = ",".join(str(n) for n in DEFAULT_STEPS)  # the sampling steps N of the table
SEED = 0  # seeds the data, the initialisation, the batches, the noise and the samples
THREADS = 1  # torch CPU threads; these networks and batches run best on one (0: torch's default)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DATA, help=f"one of {', '.join(dataset_names())}, or a .npy/.csv file")
    p.add_argument("--out", type=Path, default=Path(OUT), help="output directory")
    p.add_argument("--models", default=MODELS, help="comma-separated families")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help="Adam steps of every model")
    p.add_argument("--batch", type=int, default=BATCH, help="data points per step")
    p.add_argument("--width", type=int, default=WIDTH, help="hidden width of every network")
    p.add_argument("--samples", type=int, default=SAMPLES, help="samples per row and held-out points")
    p.add_argument("--steps", default=STEPS, help="sampling steps N, comma-separated")
    p.add_argument("--seed", type=int, default=SEED, help="seed of every random draw")
    p.add_argument("--reuse", action="store_true", help="load the checkpoints in --out instead of training")
    p.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (0: torch's default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    # -- one budget for every model; each family brings its own learning rate and training grid ----------
    budget = Budget(iterations=args.iterations, batch_size=args.batch, width=args.width, samples=args.samples,
                    seed=args.seed)
    configs = default_configs(budget, args.models.split(","))
    for name, config in configs.items():
        print(f"{name}: drift lr {config.drift_lr:g}, score lr {config.score_lr:g}, training N {config.steps}")

    # -- train (or reuse), sample at every N, score, write the figures and the table ------------------------
    steps = tuple(int(n) for n in args.steps.split(","))
    figure_steps = 30 if 30 in steps else steps[-1]  # the paper's 2D setting, when it is in the table
    result = compare_models(args.data, configs, args.out, steps=steps, figure_steps=figure_steps,
                            nll_points=min(2000, args.samples), reuse=args.reuse)

    # -- the table, and where DiffFlow stands at the fewest steps ----------------------------------------------
    print()
    print(result.markdown())
    fewest = min(steps)
    for model in result.models:
        first = model.scores[0]
        assert first.steps == fewest
        kl = first.quality.excess_kl
        score = f"excess KL {kl:.4f}" if kl is not None else f"MMD^2 {first.quality.mmd2:.2e}"
        print(f"{model.name:9} {first.sampler} at N = {fewest}: {score}, coverage {first.quality.coverage:.3f} "
              f"(floor {first.quality.coverage_floor:.3f}); trained {model.train_time_s:.0f} s")
    print(f"\nwrote {args.out}/comparison.png, samples.png, table.md, comparison.json")


if __name__ == "__main__":
    main()
