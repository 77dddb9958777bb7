"""The final report of a model trained on images: bits/dim from the bound and the ODE, samples, FD-CNN.

Bits/dim of ``L``-level images from the NLL of the dequantised data in ``[-1, 1]`` coordinates
(:func:`sdeflow.images.bits_per_dim_from_nll`)::

    bpd = (nll + D log(L / 2)) / (D ln 2)

- ``bound_bpd``: the discrete path bound (DiffFlow, DDPM) on the family's grid with the final ``N``.
- ``ode_bpd``: the exact NLL through the ODE with Hutchinson's trace estimator (one Rademacher probe per
  image, Dopri5 at ``rtol = atol = 1e-5``); its Monte-Carlo standard error over images (which includes the
  probe noise) is reported beside it as ``ode_bpd_se``.
- ``fd_cnn``: the Fréchet distance in the features of the shipped digit classifier for the image size
  (:mod:`sdeflow.fdcnn`: 8x8 digits or 28x28 MNIST) between samples and test images, beside its floor
  (training images against the same test images), and k-NN precision / recall in the same feature space.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import solvers

from .families import ModelFamily
from .images import ImageData, bits_per_dim_from_nll, dequantize, quantize, save_image_grid

__all__ = ["evaluate_images"]


def evaluate_images(
    model: nn.Module,
    family: ModelFamily,
    images: ImageData,
    *,
    steps: int,
    n_eval: int = 256,
    n_samples: int = 256,
    seed: int = 0,
    ode: bool = True,
    samples_png: str | Path | None = None,
    batch: int = 256,
) -> tuple[dict[str, Any], Tensor]:
    """Bits/dim, samples and sample quality of an image model; returns ``(metrics, samples)``.

    Args:
        model: the trained model (the EMA copy), on its device.
        family: its :class:`sdeflow.families.ModelFamily`.
        images: the data; the first ``n_eval`` test images (training images if there is no test set) are
            scored, dequantised with ``seed``.
        steps: ``N`` for the bound and for sampling (the family's fixed grid, :meth:`ModelFamily.grid`).
        n_eval: test images whose bits/dim are computed.
        n_samples: samples drawn (backward SDE) and scored; ``samples`` ``(n_samples, C, H, W)`` in [-1, 1]
            (clamped). FD-CNN compares ``m = min(n_samples, test images)`` of them with ``m`` test images and
            its floor ``m`` training images with the same test images (equal sizes: the statistic is biased
            by ``m``).
        seed: fixes the dequantisation, the bound's noise, Hutchinson's probes and the samples.
        ode: also compute the ODE bits/dim (the slowest part).
        samples_png: where to write a grid of the first 100 samples (``None``: nowhere), shown at their levels
            and upscaled to at least 64 pixels a side.
        batch: images per forward pass.

    Returns:
        ``metrics``: ``bound_bpd`` and ``bound_bpd_se`` (absent for a family without a bound), ``ode_bpd`` and
        ``ode_bpd_se`` (with ``ode``), the keys of :func:`sdeflow.fdcnn.image_quality` (``fd_cnn``,
        ``fd_cnn_floor``, ``knn_precision``, ``knn_recall``, ... and their ``_floor``; ``fd_cnn`` is ``None``
        with an ``fd_cnn_note`` for image shapes without a shipped classifier), ``uniform_bpd``
        (``log2 L``, the cost of the raw levels), the counts and ``*_time_s`` of each part.
    """
    device = next(model.parameters()).device
    pool = images.test if len(images.test) else images.train
    g = torch.Generator().manual_seed(seed)
    x = dequantize(pool[:n_eval], images.levels, g)
    dim, levels = images.dim, images.levels
    gd = torch.Generator(device=device).manual_seed(seed)
    metrics: dict[str, Any] = {"images": images.name, "shape": list(images.shape), "levels": levels, "dim": dim,
                               "eval_images": len(x), "steps": steps, "grid": f"{type(family).__name__}.grid({steps})",
                               "uniform_bpd": math.log2(levels)}
    start = time.perf_counter()
    with torch.no_grad():
        bounds = [family.bound_nll(model, chunk.to(device), steps, gd) for chunk in x.split(batch)]
    if bounds[0] is not None:
        nll = torch.cat([b.cpu() for b in bounds if b is not None]).double()
        metrics["bound_bpd"], metrics["bound_bpd_se"] = _bpd_and_se(nll, dim, levels)
        metrics["bound_time_s"] = time.perf_counter() - start
    if ode:
        start = time.perf_counter()
        trace = solvers.HutchinsonTrace(generator=gd)
        nll = torch.cat([family.exact_nll(model, chunk.to(device), trace=trace).cpu()
                         for chunk in x.split(batch)]).double()
        metrics["ode_bpd"], metrics["ode_bpd_se"] = _bpd_and_se(nll, dim, levels)
        metrics["ode_time_s"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        samples = torch.cat([family.sample(model, min(batch, n_samples - i), images.shape, steps, gd).cpu()
                             for i in range(0, n_samples, batch)])
    metrics["sample_time_s"] = time.perf_counter() - start
    samples = samples.float().clamp(-1, 1)
    metrics["samples"] = len(samples)
    start = time.perf_counter()
    metrics.update(_fd_cnn(samples, images, seed))
    metrics["quality_time_s"] = time.perf_counter() - start
    if samples_png is not None:
        # show the samples as the stored levels would look: quantise, then back to bin centres
        shown = (quantize(samples[:100], levels).float() + 0.5) * (2.0 / levels) - 1.0
        save_image_grid(shown, samples_png, nrow=10, scale=max(1, 64 // min(images.shape[1:])))
    return metrics, samples


def _bpd_and_se(nll: Tensor, dim: int, levels: int) -> tuple[float, float]:
    """Mean bits/dim of per-image NLLs (nats, dequantised [-1, 1] coordinates) and its standard error over
    images (the conversion is affine with slope ``1 / (D ln 2)``, so the error scales by that slope)."""
    se = float(nll.std() / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    return float(bits_per_dim_from_nll(nll.mean(), dim, levels)), se / (dim * math.log(2))


def _fd_cnn(samples: Tensor, images: ImageData, seed: int) -> dict[str, Any]:
    """FD-CNN and k-NN precision/recall of ``samples`` against test images, and the floor of each (training
    images in place of the samples), all sets of one size ``m``; without a test set the training images are
    split in two disjoint halves (reference and floor)."""
    from .fdcnn import CLASSIFIERS, image_quality

    if tuple(images.shape) not in CLASSIFIERS.values():
        return {"fd_cnn": None, "fd_cnn_note": f"no shipped FD-CNN classifier reads {tuple(images.shape)} images "
                                               f"(only {', '.join(f'{s} ({n})' for n, s in CLASSIFIERS.items())})"}
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(len(images.train), generator=g)
    if len(images.test):
        reference, others = images.test, images.train[perm]
    else:
        half = len(perm) // 2
        reference, others = images.train[perm[:half]], images.train[perm[half:]]
    m = min(len(samples), len(reference), len(others))
    test = dequantize(reference[:m], images.levels, g)
    floor = dequantize(others[:m], images.levels, g)
    return {"fd_cnn_images": m, **image_quality(samples[:m], test, floor)}
