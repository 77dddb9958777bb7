"""What does one DiffFlow training iteration cost over the network work it cannot avoid?

Published 2D configuration (method note §7): batch 5000, N = 30 steps of PowerGrid(0.001, 0.05, e = 0.9),
g = 0.2, drift and score each a TimeMLP(2) (width 128, 3 hidden layers), float32, 8 gaussians data.
One iteration = ``path_kl(...)`` forward + ``loss.backward()`` (``zero_grad`` included, the Adam step
excluded: the "+ adam" row adds it, to show it is negligible). Rows, taking turns, ``--warmup`` untimed
rounds then ``--repeats`` timed ones (``time.perf_counter``), best and median reported:

  bare        the network work alone: the N+1 drift evaluations f(x_i, t_i), i = 0..N, and the N score
              evaluations s(x_i, t_i), i = 1..N, on batch-5000 inputs (states of a real trajectory) at
              their grid times, outputs summed, one backward
  direct      path_kl(model, x, grid, adjoint=solvers.DirectAdjoint()): backprop through the unrolled loop
  discrete    path_kl(model, x, grid): the default solvers.DiscreteAdjoint (memory independent of N);
              it recomputes every node once in backward, so expect about one extra forward pass
  + adam      discrete, then optimizer.step() (Adam, lr 1e-2)
  no grad     path_kl under torch.no_grad(): the loss value alone, i.e. the forward simulation that the
              discrete adjoint runs before recomputing every node with grad (explains discrete - direct)

Targets: direct <= 1.3 x bare, discrete <= 1.6 x bare, and under half of the reference implementation's
25-36 s per iteration on a 2-core CPU (i.e. < 12.5 s).

Run: ``python benchmarks/train_step.py`` (a minute or two on a 2-core CPU); ``--profile`` adds a
torch.profiler table of the discrete-adjoint iteration. On a machine shared with other jobs, pass
``--threads 1``: two OpenMP threads that wait for each other at every op under load can make each row
several times slower (and the ratios meaningless); the CPU-time columns are the steadier measure there.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

import solvers
from sdeflow.data import Scaler, eight_gaussians
from sdeflow.loss import path_kl
from sdeflow.model import DiffFlow
from sdeflow.nets import TimeMLP

BATCH = 5000  # published 2D batch size
STEPS = 30  # published 2D number of steps
G = 0.2  # published 2D diffusion coefficient
REPEATS = 5  # timed rounds; best and median reported
WARMUP = 1  # untimed rounds first (allocator, lazy init)
REFERENCE_SECONDS = (25.0, 36.0)  # the reference implementation, one iteration on a 2-core CPU
SEED = 0


def setup(batch: int, steps: int) -> tuple[DiffFlow, torch.Tensor, solvers.Grid]:
    torch.manual_seed(SEED)
    model = DiffFlow(TimeMLP(2), TimeMLP(2), diffusion=G)
    points, _ = eight_gaussians(batch, torch.Generator().manual_seed(SEED))
    x0 = Scaler.fit(points).transform(points)
    return model, x0, solvers.PowerGrid(0.001, 0.05, steps, exponent=0.9)


def make_rows(model: DiffFlow, x0: torch.Tensor, grid: solvers.Grid) -> dict[str, Callable[[], object]]:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    # inputs of the bare row: the states of one real forward trajectory, at their grid times
    with torch.no_grad():
        states = solvers.sdesolve(model.forward_sde(), x0, grid, generator=torch.Generator().manual_seed(1),
                                  save=solvers.SaveAt(t0=True, steps=True)).xs
    ts = grid.times(x0.dtype).unbind(0)

    def bare():
        model.zero_grad(set_to_none=True)
        total = model.drift(states[0], ts[0]).sum()
        for i in range(1, grid.steps + 1):
            total = total + model.drift(states[i], ts[i]).sum() + model.score(states[i], ts[i]).sum()
        total.backward()

    def iteration(adjoint: solvers.Adjoint | None) -> Callable[[], object]:
        def run():
            model.zero_grad(set_to_none=True)
            generator = torch.Generator().manual_seed(2)
            path_kl(model, x0, grid, generator=generator, adjoint=adjoint).loss.backward()
        return run

    discrete = iteration(None)

    def with_adam():
        discrete()
        optimizer.step()

    def value_only():
        with torch.no_grad():
            path_kl(model, x0, grid, generator=torch.Generator().manual_seed(2))

    # Adam changes the weights; the other rows do not care (same network cost whatever the weights)
    return {"bare": bare, "direct": iteration(solvers.DirectAdjoint()), "discrete": discrete,
            "discrete + adam": with_adam, "no grad": value_only}


def measure(
    rows: dict[str, Callable[[], object]], repeats: int, warmup: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU times of each row; the rows take turns so that load elsewhere hits them alike.
    On a shared machine the CPU time (all of this process's threads) is the steadier measure of work."""
    for _ in range(warmup):
        for run in rows.values():
            run()
    wall: dict[str, list[float]] = {name: [] for name in rows}
    cpu: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(repeats):
        for name, run in rows.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def profile(run: Callable[[], object]) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table of a discrete iteration")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, x0, grid = setup(args.batch, args.steps)
    params = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"N {args.steps}, two TimeMLP(2) ({params} parameters), float32; "
          f"{args.warmup} warm-up + {args.repeats} timed rounds")
    rows = make_rows(model, x0, grid)
    times, cpu = measure(rows, args.repeats, args.warmup)
    best_bare, median_bare = min(times["bare"]), statistics.median(times["bare"])
    cpu_bare = min(cpu["bare"])
    print(f"\n{'':18}{'wall best (s)':>14}{'median (s)':>12}{'best/bare':>11}{'median/bare':>13}"
          f"{'CPU best (s)':>14}{'CPU/bare':>10}")
    for name, ts in times.items():
        best, median, best_cpu = min(ts), statistics.median(ts), min(cpu[name])
        print(f"{name:18}{best:14.3f}{median:12.3f}{best / best_bare:11.3f}{median / median_bare:13.3f}"
              f"{best_cpu:14.3f}{best_cpu / cpu_bare:10.3f}")

    ratio = {name: min(ts) / best_bare for name, ts in times.items()}
    half_reference = REFERENCE_SECONDS[0] / 2
    targets = [("direct <= 1.3 x bare", ratio["direct"] <= 1.3),
               ("discrete <= 1.6 x bare", ratio["discrete"] <= 1.6),
               (f"discrete < {half_reference:.1f} s (half the reference's {REFERENCE_SECONDS[0]:.0f} s)",
                min(times["discrete"]) < half_reference)]
    print()
    for label, met in targets:
        print(f"  target {label:52} {'met' if met else 'MISSED'}")
    speedup = REFERENCE_SECONDS[0] / min(times["discrete"]), REFERENCE_SECONDS[1] / min(times["discrete"])
    print(f"  discrete iteration vs the reference's {REFERENCE_SECONDS[0]:.0f}-{REFERENCE_SECONDS[1]:.0f} s: "
          f"{speedup[0]:.1f}-{speedup[1]:.1f}x faster")
    if not math.isfinite(best_bare) or best_bare <= 0:
        raise RuntimeError("bare timing failed")
    if args.profile:
        print("\ntorch.profiler, one discrete-adjoint iteration:")
        profile(rows["discrete"])


if __name__ == "__main__":
    main()
