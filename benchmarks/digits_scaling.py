"""Data-parallel scaling of the digits setting: one process against two (gloo), training and sampling.

The setting is ``TrainConfig.preset("digits")`` (DiffFlow, g = 1, T = 0.05, two U-Nets of 16 base channels on
scikit-learn's 8x8 digits), at a fixed N so that every timed iteration costs the same. Every configuration runs
in fresh processes started by ``torch.multiprocessing`` (the 1-process row too, so both pay the same start-up),
each process with ``--threads`` torch threads:

  train   the Trainer's iterations, global batch ``--batch`` split over the processes exactly as under
          ``torchrun`` (DistributedDataParallel, gradients all-reduced over gloo); ``--warmup`` untimed
          iterations, then ``--iterations`` timed ones between two barriers
  sample  ``--samples`` samples with N steps of the backward SDE (the EMA model of the same trainer), split
          evenly over the processes, each with its own seeded generator, timed between two barriers

Output: iterations/s and samples/s of each, side by side, and the ratio of two processes over one. Two
processes on a 2-core machine can reach at most 2x; a gap comes from the all-reduce of the ~0.6M gradients
per iteration, the barrier waiting for the slower process, and any other load on the cores (give the load
average beside the numbers).

Run:  python benchmarks/digits_scaling.py                 (about 2-4 minutes on a 2-core CPU)
      python benchmarks/digits_scaling.py --iterations 3 --samples 64 --warmup 1   (a smoke check)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sdeflow.train import TrainConfig, Trainer

BATCH = 128  # the digits preset's global batch
STEPS = 5  # N during timing (the preset's first N; the cost of an iteration grows about linearly with N)
SAMPLE_STEPS = 5  # N for sampling (the preset's N)
ITERATIONS = 20  # timed training iterations per configuration
WARMUP = 2  # untimed iterations first (allocator, lazy initialisation, DDP bucket set-up)
SAMPLES = 1024  # samples drawn per configuration (split over the processes)
SAMPLE_BATCH = 256  # samples per sampler call in each process
THREADS = 1  # torch threads per process: two processes x one thread fill a 2-core machine
SEED = 0


def _worker(rank: int, world: int, init_file: str, out: str, args: dict) -> None:
    torch.set_num_threads(args["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def barrier() -> None:
        if world > 1:
            dist.barrier()

    try:
        config = TrainConfig.preset("digits", batch_size=args["batch"], steps=args["steps"], steps_schedule=(),
                                    eval_every=0, checkpoint_every=0, seed=SEED)
        trainer = Trainer(config, "digits")
        for _ in range(args["warmup"]):
            trainer.step()
        barrier()
        start = time.perf_counter()
        for _ in range(args["iterations"]):
            trainer.step()
        barrier()
        train_s = time.perf_counter() - start

        share = args["samples"] // world  # every process draws its share with its own generator
        g = torch.Generator().manual_seed(SEED * 1000 + rank)
        barrier()
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, share, args["sample_batch"]):
                trainer.family.sample(trainer.ema, min(args["sample_batch"], share - i), (1, 8, 8),
                                      args["sample_steps"], g)
        barrier()
        sample_s = time.perf_counter() - start
        if rank == 0:
            result = {"train_s": train_s, "sample_s": sample_s, "samples": share * world,
                      "params": sum(p.numel() for p in trainer.model.parameters())}
            Path(out).write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


def measure(world: int, args: dict) -> dict:
    """Run the worker in ``world`` fresh processes; rank 0's timings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out, args), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS)
    parser.add_argument("--sample-batch", type=int, default=SAMPLE_BATCH)
    parser.add_argument("--threads", type=int, default=THREADS)
    a = parser.parse_args()
    if a.batch % 2 or a.samples % 2:
        parser.error("--batch and --samples must be even (they are split over two processes)")
    args = {"iterations": a.iterations, "warmup": a.warmup, "batch": a.batch, "steps": a.steps,
            "samples": a.samples, "sample_steps": a.sample_steps, "sample_batch": a.sample_batch,
            "threads": a.threads}
    load_before = os.getloadavg()
    results = {world: measure(world, args) for world in (1, 2)}
    load_after = os.getloadavg()

    one, two = results[1], results[2]
    rows = [
        (f"train it/s (batch {a.batch}, N = {a.steps})", a.iterations / one["train_s"], a.iterations / two["train_s"]),
        (f"sample samples/s (N = {a.sample_steps})", one["samples"] / one["sample_s"],
         two["samples"] / two["sample_s"]),
    ]
    print(f"digits setting: DiffFlow, 2 U-Nets ({one['params'] / 1e6:.2f}M parameters), {a.iterations} timed "
          f"iterations after {a.warmup} warm-up, {a.samples} samples; {a.threads} torch thread(s) per process; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print()
    print(f"| {'':38s} | {'1 process':>10s} | {'2 processes (gloo)':>18s} | {'ratio':>6s} |")
    print(f"|{'-' * 40}|{'-' * 12}|{'-' * 20}|{'-' * 8}|")
    for name, x1, x2 in rows:
        print(f"| {name:38s} | {x1:10.3f} | {x2:18.3f} | {x2 / x1:5.2f}x |")


if __name__ == "__main__":
    main()
