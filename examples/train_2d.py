"""Train a DiffFlow on a 2D toy dataset with the sdeflow Python API, one readable loop.

Each iteration draws a batch of data points, draws a random time grid (stratified around DiffFlow's power
grid), simulates the forward SDE from the batch and scores the paths with the path-KL loss (an upper bound
on the negative log-likelihood, in nats per point), then takes an Adam step. The settings come from
`TrainConfig.quick()`; this script overrides only those it exposes as flags.

At the end it reports the held-out bound NLL and the sample quality (MMD and histogram KL, each beside the
score of a second held-out set: the floor a perfect model would reach), and writes to --out:

    samples.npy        backward-SDE samples in data coordinates, (n, 2) float32
    samples.png        data beside samples
    trajectories.png   the forward (data -> noise) and backward (noise -> data) processes over time

`sdeflow.train.Trainer` (and the `sdeflow train` command) run the same iteration with checkpoints,
resuming, periodic evaluation and NaN roll-back; this script leaves those out so the loop stays visible.

Run:  python examples/train_2d.py --iterations 20       (a smoke test, well under a minute)
      python examples/train_2d.py --data two_spirals    (300 iterations: about 1.5 minutes on one core)
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch

from sdeflow import TrainConfig, bound_nll, path_kl, sample, sample_quality
from sdeflow.data import Scaler, dataset_names
from sdeflow.plots import plot_samples, plot_trajectories
from sdeflow.train import build_model, load_split

# -- defaults (each one is also a command-line flag) -----------------------------------------------------
DATA = "moons"  # a name from sdeflow.data.dataset_names(), or a .npy/.csv file of 2D points
OUT = "runs/train_2d"  # output directory (created if missing; files in it are overwritten)
ITERATIONS = 300  # Adam steps; TrainConfig.quick() itself trains 1000 (a few minutes on 2 cores)
BATCH = 512  # data points per step (each simulated twice, with opposite noise: antithetic paths)
STEPS = 10  # grid steps N while training; the power grid on [0.001, 0.05] is redrawn at random each step
SAMPLE_STEPS = 30  # grid steps N for sampling and the held-out bound (the published 2D setting)
TRAIN_SIZE = 20_000  # training points drawn from the dataset (ignored for a file: it has what it has)
EVAL_SIZE = 2000  # points in each of the two held-out sets, and samples drawn
SEED = 0  # seeds the data, the initialisation, the batches, the grids and the noise
THREADS = 1  # torch CPU threads; batches this small run best on one (0: torch's default)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=DATA, help=f"one of {', '.join(dataset_names())}, or a .npy/.csv file")
    p.add_argument("--out", type=Path, default=Path(OUT), help="output directory")
    p.add_argument("--iterations", type=int, default=ITERATIONS, help="Adam steps")
    p.add_argument("--batch", type=int, default=BATCH, help="data points per step")
    p.add_argument("--steps", type=int, default=STEPS, help="grid steps while training")
    p.add_argument("--sample-steps", type=int, default=SAMPLE_STEPS, help="grid steps for sampling")
    p.add_argument("--train-size", type=int, default=TRAIN_SIZE, help="training points")
    p.add_argument("--eval-size", type=int, default=EVAL_SIZE, help="held-out points and samples")
    p.add_argument("--seed", type=int, default=SEED, help="seed of every random draw")
    p.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads (0: torch's default)")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    config = TrainConfig.quick(iterations=args.iterations, batch_size=args.batch, steps=args.steps,
                               train_size=args.train_size, eval_size=args.eval_size, seed=args.seed)
    g = torch.Generator().manual_seed(config.seed)  # every random draw below, except the init, comes from g

    # -- data: training points and two independent held-out sets (data coordinates) -------------------
    split = load_split(args.data, config.train_size, config.eval_size, g)  # a file is shuffled and split
    heldout, labels, reference = split.heldout, split.heldout_labels, split.reference
    # the model works in scaled coordinates (max |x| = 0.85, then zero mean and unit variance per axis)
    scaler = Scaler.fit(split.train)
    x_train = scaler.transform(split.train).float()

    # -- model and optimiser ------------------------------------------------------------------------
    torch.manual_seed(config.seed)  # the networks' initialisation draws from torch's global generator
    model = build_model(config)  # DiffFlow: drift f and score s, each a TimeMLP(2), and g = 0.2
    optimizer = torch.optim.Adam([
        {"params": model.drift.parameters(), "lr": config.drift_lr},
        {"params": model.score.parameters(), "lr": config.score_lr},
    ])
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, config.lr_decay_every, config.lr_decay)
    ema = copy.deepcopy(model).requires_grad_(False)  # a moving average of the weights: sample from it

    # -- training -------------------------------------------------------------------------------------
    print(f"training on {args.data}: {len(x_train)} points, {config.iterations} iterations, batch "
          f"{config.batch_size}, N = {config.steps} (random power grids on [{config.t0}, {config.T}])")
    start = time.perf_counter()
    report_every = max(config.iterations // 10, 1)
    running = 0.0
    for it in range(1, config.iterations + 1):
        batch = x_train[torch.randint(0, len(x_train), (config.batch_size,), generator=g)]
        grid = config.grid(config.steps).stratified().sample(g)  # a fresh random grid, same end points
        loss = path_kl(model, batch, grid, generator=g, antithetic=config.antithetic).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # through the discrete adjoint: memory does not grow with N
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        schedule.step()
        decay = min(config.ema_decay, it / (it + 9))  # warm-up: a short run does not keep the random init
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(p, 1.0 - decay)
        running += loss.item()
        if it % report_every == 0 or it == config.iterations:
            count = it % report_every or report_every
            print(f"  iteration {it:5d}  loss {running / count:7.4f} nats  ({time.perf_counter() - start:.0f} s)")
            running = 0.0

    # -- evaluation, samples, figures -----------------------------------------------------------------
    trained = ema
    grid = config.grid(args.sample_steps)
    eval_g = torch.Generator().manual_seed(config.seed + 1)  # its own stream: the same noise for every run
    with torch.no_grad():
        bound = bound_nll(trained, scaler.transform(heldout).float(), grid, generator=eval_g).mean().item()
        samples = scaler.inverse(sample(trained, len(reference), (2,), grid, generator=eval_g).double()).float()
    quality = sample_quality(heldout, samples, reference)
    print(f"held-out bound NLL {bound:.4f} nats per point (model coordinates, N = {grid.steps})")
    print(f"sample quality: {quality}")

    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "samples.npy", samples.numpy())
    plot_samples(samples, heldout, args.out / "samples.png",
                 title=f"{args.data}: {config.iterations} iterations, sampled with N = {grid.steps}")
    plot_trajectories(trained, scaler.transform(heldout).float(), labels, grid, args.out / "trajectories.png",
                      generator=torch.Generator().manual_seed(config.seed))
    print(f"wrote {args.out / 'samples.npy'}, {args.out / 'samples.png'}, {args.out / 'trajectories.png'}")


if __name__ == "__main__":
    main()
