"""Memory and time of a gradient through a neural-SDE solve, for each adjoint, as the number of steps grows.

Problem (the issue's): drift an MLP of ``(x, t)`` (2 + 1 -> 512 -> 512 -> 2, SiLU), learnable constant
diagonal diffusion, batch 1024, dimension 2, float32, ``N`` Euler steps on [0, 1]. Loss: the path cost
``sum_k 1/2 |f(t_{k+1}, x_{k+1})|^2 |dt_k|`` (a :class:`solvers.PathCost` reading the drift the solver
computes anyway) plus the terminal ``1/2 |x_N|^2``, averaged over the batch; ``backward()`` fills the
gradients of ``x0`` and every parameter.

==================  ==========================================================================
adjoint             solve
==================  ==========================================================================
direct              EulerMaruyama + DirectAdjoint: backprop through the unrolled loop
discrete            EulerMaruyama + DiscreteAdjoint: exact, stores states and increments only
backsolve           EulerMaruyama (stepped by torchsde) + BacksolveAdjoint: continuous adjoint,
                    approximate; terminal loss only (no path cost)
reversible          ReversibleHeun + ReversibleAdjoint (the diffusion does not depend on x, so the
                    SDE is the same in Stratonovich form); terminal loss only (no path cost)
==================  ==========================================================================

Each (adjoint, N) runs in a fresh subprocess. The child takes a baseline of its peak resident memory
(``ru_maxrss``) after imports, model and data creation, runs forward + backward once, and reports the
growth of the peak over the baseline: the memory the gradient needs. Then it repeats forward + backward
``--repeats`` times or until ``--budget`` seconds have passed (the first run counts only if no other fits),
and reports the best wall time and the best CPU time (``time.process_time``, all threads: less sensitive
than wall time to other load on a shared machine). ``ratio`` is the time over DirectAdjoint's at the same
N, measured in another process. ``states`` is what the discrete adjoint must store, ``(2N + 1) x batch x 2`` floats.

Run: ``python benchmarks/adjoint_memory.py --steps 10 100 1000`` (DirectAdjoint needs ~8 GiB at N = 1000;
``--skip-direct-above 100`` avoids that). ``--profile discrete 100`` prints where the discrete adjoint's
time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch
from torch import Tensor, nn

import solvers

BATCH = 1024  # samples per solve
DIM = 2  # state dimension
HIDDEN = 512  # width of the drift MLP
SIGMA = 0.5  # initial diffusion (learnable, one per dimension)
STEPS = (10, 100, 1000)  # numbers of Euler steps on [0, 1]
REPEATS = 3  # timed forward + backward runs per configuration, after a first one that measures memory
BUDGET = 60.0  # stop repeating once a configuration has run this many seconds
SEED = 0
ADJOINTS = ("direct", "discrete", "backsolve", "reversible")

try:  # the torchsde-backed adjoints live in solvers.adaptive; benchmark them when it is there
    from solvers.adaptive import BacksolveAdjoint, ReversibleAdjoint, ReversibleHeun
except ImportError:  # pragma: no cover - depends on the checkout
    BacksolveAdjoint = ReversibleAdjoint = ReversibleHeun = None


class NeuralSDE(solvers.SDE):
    """``dx = f_theta(t, x) dt + diag(sigma) dW``: an MLP drift and a learnable constant diffusion."""

    noise_type = solvers.NoiseType.DIAGONAL

    def __init__(self, sde_type: solvers.SDEType = solvers.SDEType.ITO):
        super().__init__()
        self.sde_type = sde_type  # sigma does not depend on x: Itô and Stratonovich forms coincide
        self.drift_net = nn.Sequential(nn.Linear(DIM + 1, HIDDEN), nn.SiLU(), nn.Linear(HIDDEN, HIDDEN),
                                       nn.SiLU(), nn.Linear(HIDDEN, DIM))
        self.sigma = nn.Parameter(torch.full((DIM,), SIGMA))

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.drift_net(torch.cat([x, t.expand(x.shape[0], 1)], dim=1))

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        return self.sigma.expand_as(x)


class KineticCost(solvers.PathCost):
    """``1/2 |f(t_{k+1}, x_{k+1})|^2 |dt_k|``: uses the drift the solver evaluates anyway."""

    def forward(self, step: solvers.Transition) -> Tensor:
        return 0.5 * step.drift1.pow(2).sum(1) * abs(step.dt)


def available(adjoint: str) -> bool:
    return adjoint in ("direct", "discrete") or BacksolveAdjoint is not None


def uses_cost(adjoint: str) -> bool:
    return adjoint in ("direct", "discrete")


def make_step(adjoint: str, steps: int):
    """Model, data and a closure running forward + backward once."""
    torch.manual_seed(SEED)
    reversible = adjoint == "reversible"
    sde = NeuralSDE(solvers.SDEType.STRATONOVICH if reversible else solvers.SDEType.ITO)
    x0 = torch.randn(BATCH, DIM, requires_grad=True)
    grid = solvers.UniformGrid(0.0, 1.0, steps)
    options: dict = {
        "direct": {"adjoint": solvers.DirectAdjoint(), "cost": KineticCost()},
        "discrete": {"adjoint": solvers.DiscreteAdjoint(), "cost": KineticCost()},
        "backsolve": {"adjoint": BacksolveAdjoint() if BacksolveAdjoint else None},
        "reversible": {"adjoint": ReversibleAdjoint() if ReversibleAdjoint else None,
                       "solver": ReversibleHeun() if ReversibleHeun else None},
    }[adjoint]

    def step() -> float:
        sde.zero_grad(set_to_none=True)
        x0.grad = None
        sol = solvers.sdesolve(sde, x0, grid, generator=torch.Generator().manual_seed(SEED), **options)
        loss = 0.5 * sol.xs[-1].pow(2).sum(1).mean()
        if sol.cost is not None:
            loss = loss + sol.cost.mean()
        loss.backward()
        return float(loss.detach())

    return step


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(adjoint: str, steps: int, repeats: int, budget: float) -> None:
    """One configuration: print a JSON line with the peak memory growth (MiB) and the best time (s)."""
    step = make_step(adjoint, steps)
    baseline = peak_rss_mib()
    times, cpu_times = [], []
    while not times or (len(times) < repeats + 1 and sum(times) < budget):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if len(times) == 1:
            peak = peak_rss_mib() - baseline
    if len(times) > 1:  # the first run measured memory and warmed up (lazy initialisation, allocator)
        times, cpu_times = times[1:], cpu_times[1:]
    print(json.dumps({"peak_mib": peak, "time_s": min(times), "cpu_s": min(cpu_times), "runs": len(times),
                      "loss": loss}))


def profile(adjoint: str, steps: int) -> None:
    """Where the time of one forward + backward goes (torch.profiler, operators sorted by self CPU time)."""
    step = make_step(adjoint, steps)
    step()  # warm up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def run_child(adjoint: str, steps: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", adjoint, str(steps),
               "--repeats", str(args.repeats), "--budget", str(args.budget)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {out.returncode}: {tail}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--adjoints", nargs="+", default=list(ADJOINTS), choices=ADJOINTS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--budget", type=float, default=BUDGET, help="seconds of repeats per configuration")
    parser.add_argument("--skip-direct-above", type=int, default=None, metavar="N",
                        help="do not run DirectAdjoint with more than N steps (its memory grows with N)")
    parser.add_argument("--child", nargs=2, metavar=("ADJOINT", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--profile", nargs=2, metavar=("ADJOINT", "N"), help="profile one configuration")
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.repeats, args.budget)
        return
    if args.profile:
        profile(args.profile[0], int(args.profile[1]))
        return

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads; batch {BATCH}, dim {DIM}, MLP width {HIDDEN}, float32, "
          f"best of <= {args.repeats} runs after a warm-up (<= {args.budget:.0f} s each config)")
    header = (f"{'adjoint':<12}{'loss':<15}{'N':>6}{'peak (MiB)':>12}{'states (MiB)':>14}{'time (s)':>10}"
              f"{'ratio':>7}{'cpu (s)':>10}{'ratio':>7}")
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, int], dict] = {}
    skip_above = args.skip_direct_above if args.skip_direct_above is not None else max(args.steps)
    for steps in args.steps:
        for adjoint in args.adjoints:
            loss = "cost+terminal" if uses_cost(adjoint) else "terminal only"
            if not available(adjoint):
                row = {"error": "not available (solvers.adaptive missing)"}
            elif adjoint == "direct" and steps > skip_above:
                row = {"error": f"skipped (--skip-direct-above {args.skip_direct_above})"}
            else:
                row = run_child(adjoint, steps, args)
            results[adjoint, steps] = row
            states = (2 * steps + 1) * BATCH * DIM * 4 / 2**20
            if "error" in row:
                print(f"{adjoint:<12}{loss:<15}{steps:>6}  {row['error']}", flush=True)
                continue
            direct = results.get(("direct", steps), {})
            ratio = cpu_ratio = f"{'-':>7}"
            if "time_s" in direct:
                ratio = f"{row['time_s'] / direct['time_s']:7.2f}"
                cpu_ratio = f"{row['cpu_s'] / direct['cpu_s']:7.2f}"
            print(f"{adjoint:<12}{loss:<15}{steps:>6}{row['peak_mib']:12.1f}{states:14.1f}{row['time_s']:10.2f}"
                  f"{ratio}{row['cpu_s']:10.2f}{cpu_ratio}", flush=True)

    lo, hi = min(args.steps), max(args.steps)
    small, large = results.get(("discrete", lo), {}), results.get(("discrete", hi), {})
    if lo < hi and "peak_mib" in small and "peak_mib" in large:
        states = (2 * hi + 1) * BATCH * DIM * 4 / 2**20
        bound = 1.2 * small["peak_mib"] + states
        verdict = "met" if large["peak_mib"] <= bound else "MISSED"
        print(f"\ntarget: discrete peak at N={hi} <= 1.2 x peak at N={lo} + states = {bound:.1f} MiB: "
              f"{large['peak_mib']:.1f} MiB, {verdict}")
    for steps in args.steps:
        d, e = results.get(("direct", steps), {}), results.get(("discrete", steps), {})
        if "time_s" in d and "time_s" in e:
            ratio, cpu = e["time_s"] / d["time_s"], e["cpu_s"] / d["cpu_s"]
            print(f"target: discrete time <= 1.5 x direct at N={steps}: {ratio:.2f}x wall, {cpu:.2f}x cpu, "
                  f"{'met' if max(ratio, cpu) <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
