"""What does one training iteration of each model family cost, at the same network size and batch?

Setting: the comparison budget of :mod:`sdeflow.compare` (:class:`sdeflow.compare.Budget`: every learned
network a TimeMLP of width 216 and 3 hidden layers, 101,738 parameters; batch 512 data points), each
family at its :func:`sdeflow.compare.default_configs` settings, olympic rings data, float32. One iteration
is :meth:`sdeflow.train.Trainer.step` (batch draw, loss, backward, clipping, Adam, EMA, NaN snapshot).
Rows take turns, ``--warmup`` untimed rounds then ``--repeats`` timed ones (``time.perf_counter`` and
process CPU time), best and median reported:

  bare      the unit: one forward and backward pass of one network on the batch (per-sample times)
  ddpm      denoising score matching: one score evaluation per point at a random time
  diffflow  path KL on a random power grid with N = 10 steps, antithetic path pairs (2 paths per point),
            the exact discrete adjoint: per path N + 1 drift and N score evaluations forward, all of
            them again with grad in the backward sweep
  ffjord    maximum likelihood with RK4 on N = 10 steps (40 drift evaluations per point, each with a
            Hutchinson vector-Jacobian product), backprop through the steps (second-order terms); the
            comparison's adaptive training (Dopri5 at 1e-3) averaged about twice this over a run

Columns: wall best and median (s), best over ddpm, best over bare, CPU best (s). The paper reports
DiffFlow training about 6x slower than DDPM on 2D data (method note §8); here the ratio also reflects that
DDPM's iteration is a single network call per point.

Run: ``python benchmarks/model_families.py`` (about a minute on a 2-core CPU); ``--threads 1`` (the
default) keeps the ratios meaningful on a machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Callable

import torch
from train_step import measure  # the same turn-taking timer (this script's folder is on sys.path)

from sdeflow.compare import Budget, default_configs
from sdeflow.nets import TimeMLP
from sdeflow.train import Trainer

DATA = "olympic_rings"  # any built-in set: the cost does not depend on the data
REPEATS = 5  # timed rounds; best and median reported
WARMUP = 2  # untimed rounds first (allocator, lazy init)
THREADS = 1  # torch intra-op threads
FAMILIES = ("ddpm", "diffflow", "ffjord")


def make_rows(budget: Budget) -> tuple[dict[str, Callable[[], object]], dict[str, int]]:
    """The timed callables, and the learned parameters of each model."""
    configs = default_configs(budget, FAMILIES)
    # FFJORD with RK4 on a fixed grid: a fixed cost per iteration. The comparison trains it with the adaptive
    # Dopri5 (ode_tol), whose cost grows with the flow's stiffness during training and is tiny at the
    # initialisation (a zero flow), so timing it here would say nothing.
    configs["ffjord"] = dataclasses.replace(configs["ffjord"], ode_tol=0.0)
    # a small training set: the cost of an iteration does not depend on it, the set-up time does
    trainers = {name: Trainer(dataclasses.replace(cfg, train_size=10_000, eval_size=16), DATA)
                for name, cfg in configs.items()}
    params = {name: sum(p.numel() for p in t.model.parameters()) for name, t in trainers.items()}
    torch.manual_seed(0)
    net = TimeMLP(2, width=budget.width, depth=budget.depth, t_scale=1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(budget.batch_size, 2, generator=g)
    t = torch.rand(budget.batch_size, generator=g)

    def bare() -> None:
        net.zero_grad(set_to_none=True)
        net(x, t).sum().backward()

    rows: dict[str, Callable[[], object]] = {"bare": bare}
    rows.update({name: trainer.step for name, trainer in trainers.items()})
    params["bare"] = sum(p.numel() for p in net.parameters())
    return rows, params


def main() -> None:
    b = Budget()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=b.batch_size)
    parser.add_argument("--width", type=int, default=b.width)
    parser.add_argument("--depth", type=int, default=b.depth)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = dataclasses.replace(b, batch_size=args.batch, width=args.width, depth=args.depth)
    rows, params = make_rows(budget)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {budget.batch_size}, TimeMLP "
          f"width {budget.width} x {budget.depth} ({params['bare']:,} parameters per network), {DATA}, float32; "
          f"{args.warmup} warm-up + {args.repeats} timed rounds, rows taking turns")
    wall, cpu = measure(rows, args.repeats, args.warmup)
    best = {name: min(ts) for name, ts in wall.items()}
    print(f"\n{'':10}{'parameters':>12}{'wall best (s)':>15}{'median (s)':>12}{'best/ddpm':>11}{'best/bare':>11}"
          f"{'CPU best (s)':>14}")
    for name, ts in wall.items():
        print(f"{name:10}{params[name]:>12,}{best[name]:15.4f}{statistics.median(ts):12.4f}"
              f"{best[name] / best['ddpm']:11.2f}{best[name] / best['bare']:11.1f}{min(cpu[name]):14.4f}")


if __name__ == "__main__":
    main()
