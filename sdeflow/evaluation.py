"""The final report of a model trained on images: bits/dim from the bound and the ODE, samples, FD-CNN.

Bits/dim of ``L``-level images from the NLL of the dequantised data in ``[-1, 1]`` coordinates
(:func:`sdeflow.images.bits_per_dim_from_nll`)::

    bpd = (nll + D log(L / 2)) / (D ln 2)

- ``bound_bpd``: the discrete path bound (DiffFlow, DDPM) on the family's grid with the final ``N``.
- ``ode_bpd``: the exact NLL through the ODE with Hutchinson's trace estimator (one Rademacher probe per
  image, Dopri5 at ``rtol = atol = 1e-5``); its Monte-Carlo standard error over images (which includes the
  probe noise) is reported beside it as ``ode_bpd_se``.
- ``fd_cnn``: the Fréchet distance in the features of the shipped MNIST classifier
  (:mod:`sdeflow.fdcnn`) between samples and test images, beside its floor (training images against the
  same test images), and k-NN precision / recall in the same feature space.
"""

from __future__ import annotations

import math
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
        steps: ``N`` for the bound and for sampling (the family's grid).
        n_samples: samples drawn (backward SDE) and scored; ``samples`` ``(n_samples, C, H, W)`` in [-1, 1].
        ode: also compute the ODE bits/dim (the slowest part).
        samples_png: where to write a grid of the first 100 samples (``None``: nowhere).
        batch: images per forward pass.
    """
    device = next(model.parameters()).device
    pool = images.test if len(images.test) else images.train
    g = torch.Generator().manual_seed(seed)
    x = dequantize(pool[:n_eval], images.levels, g)
    dim, levels = images.dim, images.levels
    gd = torch.Generator(device=device).manual_seed(seed)
    metrics: dict[str, Any] = {"images": images.name, "levels": levels, "dim": dim, "eval_images": len(x),
                               "steps": steps}
    with torch.no_grad():
        bounds = [family.bound_nll(model, chunk.to(device), steps, gd) for chunk in x.split(batch)]
    if bounds[0] is not None:
        nll = torch.cat([b.cpu() for b in bounds if b is not None]).double()
        metrics["bound_bpd"] = float(bits_per_dim_from_nll(nll.mean(), dim, levels))
        metrics["bound_bpd_se"] = float(nll.std() / math.sqrt(len(nll)) / (dim * math.log(2)))
    if ode:
        trace = solvers.HutchinsonTrace(generator=gd)
        nll = torch.cat([family.exact_nll(model, chunk.to(device), trace=trace).cpu()
                         for chunk in x.split(batch)]).double()
        metrics["ode_bpd"] = float(bits_per_dim_from_nll(nll.mean(), dim, levels))
        metrics["ode_bpd_se"] = float(nll.std() / math.sqrt(len(nll)) / (dim * math.log(2)))
    with torch.no_grad():
        samples = torch.cat([family.sample(model, min(batch, n_samples - i), images.shape, steps, gd).cpu()
                             for i in range(0, n_samples, batch)])
    samples = samples.float().clamp(-1, 1)
    metrics["samples"] = len(samples)
    metrics.update(_fd_cnn(samples, images, n_samples, seed))
    if samples_png is not None:
        # show the samples as the stored levels would look: quantise, then back to bin centres
        shown = (quantize(samples[:100], levels).float() + 0.5) * (2.0 / levels) - 1.0
        save_image_grid(shown, samples_png, nrow=10)
    return metrics, samples


def _fd_cnn(samples: Tensor, images: ImageData, n: int, seed: int) -> dict[str, Any]:
    """FD-CNN and k-NN precision/recall of ``samples`` against test images, and the floor of each."""
    from .fdcnn import image_quality

    g = torch.Generator().manual_seed(seed + 1)
    pool = images.test if len(images.test) >= n else images.train
    test = dequantize(pool[:n], images.levels, g)
    other = images.train[torch.randperm(len(images.train), generator=g)[:n]]
    floor = dequantize(other, images.levels, g)
    return image_quality(samples, test, floor)
