"""How much does the solver add to the network's own cost? Native Euler–Maruyama against torchsde.

Reference problem (the issue's): drift an MLP (2 + 1 -> 128 -> 128 -> 2, SiLU) of (x, t), constant diagonal
diffusion 0.5, batch 1024, 100 steps on [0, 1], float32, no grad, torch's default threads. Each row is the
best of ``--repeats`` timed runs after ``--warmup`` untimed ones, the rows taking turns:

  bare            100 drift evaluations on the same input at the grid's times: what the network costs
  native          solvers.sdesolve(EulerMaruyama, UniformGrid, generator)
  torchsde        torchsde.sdeint(method="euler", dt=0.01), its own default BrownianInterval
  torchsde+hint   torchsde.sdeint with torchsde.BrownianInterval(..., dt=0.01): its best configuration
  python loop     x = x + f dt + 0.5 sqrt(dt) randn, written out by hand

``wall`` is ``time.perf_counter``; ``cpu`` is this process's CPU time (``time.process_time``), which on a
shared machine leaves out the time slices other processes take (with several threads it adds theirs up).

Then: where the native solver's time beyond the network goes, per step (the same solve with a free drift,
and its parts), and the peak resident memory (``ru_maxrss``, a fresh subprocess) of a final-state-only solve
at 100 and 1000 steps, which should not grow with the number of steps.

Run: ``python benchmarks/solver_overhead.py`` (about a minute on a laptop CPU).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchsde
from torch import nn

import solvers

BATCH = 1024  # samples solved at once
STEPS = 100  # Euler steps on [0, 1]
REPEATS = 20  # timed runs per row; the best is reported
WARMUP = 3  # untimed runs first (allocator, lazy init, caches)
HIDDEN = 128  # width of the drift MLP
SIGMA = 0.5  # the constant diffusion
SEED = 0

Timing = tuple[float, float]  # best (wall, cpu) seconds


class Drift(nn.Module):
    """f(x, t): an MLP on [x, t]."""

    def __init__(self, dim: int = 2, hidden: int = HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))


class ReferenceSDE(solvers.SDE):
    """dx = f(x, t) dt + 0.5 dW. Being a solvers.SDE it also speaks torchsde's f/g protocol, so both libraries
    integrate this very object."""

    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, drift: nn.Module):
        super().__init__()
        self.drift_net = drift
        self.register_buffer("sigma", torch.tensor(SIGMA))

    def drift(self, t, x):
        return self.drift_net(x, t)

    def diffusion(self, t, x):
        return self.sigma.expand_as(x)  # a view: no allocation per step


class FreeDrift(nn.Module):
    """A drift that costs (almost) nothing: what is left of a solve is the solver's own work."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x


def best_times(runs: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, Timing]:
    """Best wall and CPU times; the rows take turns, so a burst of load elsewhere hits them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    best = {name: (math.inf, math.inf) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def timings(batch: int, steps: int, repeats: int, warmup: int) -> dict[str, Timing]:
    torch.manual_seed(SEED)
    sde = ReferenceSDE(Drift())
    x0 = torch.randn(batch, 2)
    grid = solvers.UniformGrid(0.0, 1.0, steps)
    ts = grid.times(torch.float32).unbind(0)
    dt = 1.0 / steps
    torchsde_ts = torch.tensor([0.0, 1.0])

    def bare():
        for k in range(steps):
            sde.drift(ts[k], x0)

    def native():
        return solvers.sdesolve(sde, x0, grid, generator=torch.Generator().manual_seed(SEED))

    def torchsde_default():
        return torchsde.sdeint(sde, x0, torchsde_ts, method="euler", dt=dt)

    def torchsde_hint():
        bm = torchsde.BrownianInterval(0.0, 1.0, size=(batch, 2), dtype=x0.dtype, device=x0.device, dt=dt,
                                       entropy=SEED)
        return torchsde.sdeint(sde, x0, torchsde_ts, bm=bm, method="euler", dt=dt)

    def python_loop():
        g = torch.Generator().manual_seed(SEED)
        x, scale = x0, SIGMA * math.sqrt(dt)
        for k in range(steps):
            x = x + sde.drift(ts[k], x) * dt + scale * torch.randn(x.shape, generator=g)
        return x

    rows = {"bare": bare, "native": native, "torchsde": torchsde_default, "torchsde+hint": torchsde_hint,
            "python loop": python_loop}
    with torch.no_grad():
        return best_times(rows, repeats, warmup)


def breakdown(batch: int, steps: int, repeats: int, warmup: int) -> dict[str, Timing]:
    """The native solve with a free drift, and the per-step pieces it is made of (each ``steps`` times)."""
    free = ReferenceSDE(FreeDrift())
    x0, f, z = torch.randn(batch, 2), torch.randn(batch, 2), torch.randn(batch, 2)
    g, t = free.diffusion(None, x0), torch.tensor(0.5)
    grid = solvers.UniformGrid(0.0, 1.0, steps)
    generator = torch.Generator().manual_seed(SEED)

    def solve():
        solvers.sdesolve(free, x0, grid, generator=torch.Generator().manual_seed(SEED))

    def draw():
        for _ in range(steps):
            torch.randn((batch, 2), generator=generator)

    def update():
        for _ in range(steps):
            torch.add(x0, f, alpha=0.01).addcmul_(g, z, value=0.05)

    def calls():
        for _ in range(steps):
            free.drift(t, x0), free.diffusion(t, x0)

    with torch.no_grad():
        return best_times({"solve, free drift": solve, "randn of dW": draw, "update x+f dt+g dW": update,
                           "f, g calls": calls}, 5 * repeats, warmup)


PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch, torchsde, solvers
    sys.path.insert(0, {here!r})
    from solver_overhead import Drift, ReferenceSDE
    library, batch = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    sde, x0 = ReferenceSDE(Drift()), torch.randn(batch, 2)

    def solve(steps):
        with torch.no_grad():
            if library == "native":
                grid = solvers.UniformGrid(0.0, 1.0, steps)
                return solvers.sdesolve(sde, x0, grid, generator=torch.Generator().manual_seed(0)).xs[-1]
            return torchsde.sdeint(sde, x0, torch.tensor([0.0, 1.0]), method="euler", dt=1.0 / steps)[-1]

    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux

    solve(10)
    solve(10)
    base = peak()
    solve(100)
    at_100 = peak()
    solve(1000)
    print(base, at_100 - base, peak() - base)
    """
)


def peak_memory(library: str, batch: int) -> tuple[float, float, float]:
    """Peak RSS (MiB) of a warmed-up process, and its growth over a final-state-only solve at 100, then 1000
    steps."""
    script = PEAK_SCRIPT.format(here=str(Path(__file__).resolve().parent))
    out = subprocess.run([sys.executable, "-c", script, library, str(batch)], capture_output=True, text=True,
                         check=True)
    base, at_100, at_1000 = (int(v) / 1024 for v in out.stdout.split())
    return base, at_100, at_1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = args.steps

    print(f"torch {torch.__version__}, torchsde {torchsde.__version__}, threads {torch.get_num_threads()}, "
          f"batch {args.batch}, steps {steps}, float32, no grad, best of {args.repeats}")
    t = timings(args.batch, steps, args.repeats, args.warmup)
    (bare, bare_cpu), (native, native_cpu) = t["bare"], t["native"]
    print(f"\n{'':16}{'wall (ms)':>11}{'x bare':>9}{'us/step':>10}{'cpu (ms)':>11}{'x bare':>9}")
    for name, (wall, cpu) in t.items():
        print(f"{name:16}{wall * 1e3:11.2f}{wall / bare:9.3f}{wall / steps * 1e6:10.1f}"
              f"{cpu * 1e3:11.2f}{cpu / bare_cpu:9.3f}")
    print(f"\nnative over bare: {(native - bare) / steps * 1e6:+.1f} us per step wall "
          f"({native / bare - 1:+.1%}), {(native_cpu - bare_cpu) / steps * 1e6:+.1f} us cpu "
          f"({native_cpu / bare_cpu - 1:+.1%})")
    print(f"native vs torchsde default: {t['torchsde'][0] / native:.1f}x faster; "
          f"vs torchsde + dt hint: {t['torchsde+hint'][0] / native:.1f}x faster (wall)")
    targets = [("native <= 1.05 x bare", native <= 1.05 * bare),
               (">= 5x faster than torchsde default", t["torchsde"][0] >= 5 * native),
               ("faster than torchsde + hint", t["torchsde+hint"][0] > native)]
    for label, met in targets:
        print(f"  target {label:38} {'met' if met else 'MISSED'}")

    print("\nwhere the native solver's own time goes, per step (a free drift; best of many)")
    for name, (wall, cpu) in breakdown(args.batch, steps, args.repeats, args.warmup).items():
        print(f"  {name:22}{wall / steps * 1e6:8.1f} us wall{cpu / steps * 1e6:8.1f} us cpu")

    if not args.no_memory:
        print("\npeak RSS of a final-state-only solve, growth over a warmed-up process (MiB)")
        print(f"{'':16}{'warm':>10}{'100 steps':>12}{'1000 steps':>12}")
        for library in ("native", "torchsde"):
            base, at_100, at_1000 = peak_memory(library, args.batch)
            print(f"{library:16}{base:10.1f}{at_100:+12.2f}{at_1000:+12.2f}")


if __name__ == "__main__":
    main()
