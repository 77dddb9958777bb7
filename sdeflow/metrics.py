"""Sample quality in 2D against held-out data: MMD and a binned KL, each beside its noise floor.

Two metrics between a reference sample ``x`` (held-out data, ``(n, D)``) and model samples ``y`` (``(m, D)``):

- :func:`mmd2`: the unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012) with
  the Gaussian (RBF) kernel ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``::

      MMD^2 = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)

  The bandwidth ``h`` is the median pairwise distance of the *reference* (of its first 1000 points), so
  the score does not depend on the samples it judges. Unbiased: it can be slightly negative.
- :func:`histogram_kl`: ``KL(P || Q)`` in nats between 2D histograms of the reference (``P``) and the
  samples (``Q``) on ``bins x bins`` cells over the reference's bounding box, plus one cell for
  everything outside it (so mass leaking off the data's support counts), each count plus ½ (add-½ smoothing
  keeps the KL finite). It is biased upward by the finite counts.

Both are ≈ 0 only up to sampling noise. :func:`sample_quality` therefore also scores a *second*, independent
held-out sample of the same size against the reference: that *noise floor* is what a perfect model would
get. A score near its floor means the samples are indistinguishable from data at this sample size.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> data, other, shifted = torch.randn(3, 500, 2, generator=g).unbind(0)
    >>> q = sample_quality(data, shifted + 1.0, other)
    >>> q.mmd2 > 10 * abs(q.mmd2_floor), q.hist_kl > q.hist_kl_floor
    (True, True)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["median_bandwidth", "mmd2", "histogram_kl", "SampleQuality", "sample_quality"]

_BANDWIDTH_POINTS = 1000  # median over the first 1000 reference points: 500k distances, ample for a median
_BLOCK = 2048  # rows of the kernel matrix formed at once: memory ~ _BLOCK * n doubles


def _as_f64(points: Tensor | np.ndarray, name: str) -> Tensor:
    t = torch.as_tensor(points).detach().to("cpu", torch.float64)
    if t.ndim != 2 or len(t) < 2:
        raise ValueError(f"{name} must have shape (n >= 2, D), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def median_bandwidth(reference: Tensor | np.ndarray) -> float:
    """Median pairwise Euclidean distance among the first 1000 points of ``reference`` ``(n, D)``."""
    x = _as_f64(reference, "reference")[:_BANDWIDTH_POINTS]
    d = torch.pdist(x)
    h = float(d.median())
    if not h > 0:
        raise ValueError("the reference points coincide: the median pairwise distance is 0")
    return h


def _kernel_sum(a: Tensor, b: Tensor, gamma: float) -> float:
    """``sum_{i,j} exp(-gamma |a_i - b_j|^2)`` in row blocks (never the full matrix for large sets)."""
    total = 0.0
    for start in range(0, len(a), _BLOCK):
        d2 = torch.cdist(a[start:start + _BLOCK], b).pow_(2)
        total += float(torch.exp(d2.mul_(-gamma)).sum())
    return total


def mmd2(
    reference: Tensor | np.ndarray, samples: Tensor | np.ndarray, bandwidth: float | None = None
) -> float:
    """Unbiased squared MMD with an RBF kernel between ``reference`` ``(n, D)`` and ``samples`` ``(m, D)``.

    ``bandwidth`` defaults to :func:`median_bandwidth` of the reference. The diagonal terms ``k(a, a) = 1``
    are excluded from the within-sample means (that is what makes the estimate unbiased).

    Example:
        >>> x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
        >>> mmd2(x, x + 3.0) > 0.5
        True
    """
    x, y = _as_f64(reference, "reference"), _as_f64(samples, "samples")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"reference has {x.shape[1]} coordinates, samples {y.shape[1]}")
    h = median_bandwidth(x) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    gamma = 1.0 / (2.0 * h * h)
    n, m = len(x), len(y)
    kxx = (_kernel_sum(x, x, gamma) - n) / (n * (n - 1))
    kyy = (_kernel_sum(y, y, gamma) - m) / (m * (m - 1))
    kxy = _kernel_sum(x, y, gamma) / (n * m)
    return kxx + kyy - 2.0 * kxy


def histogram_kl(reference: Tensor | np.ndarray, samples: Tensor | np.ndarray, bins: int = 50) -> float:
    """``KL(P || Q)`` in nats between add-½ smoothed 2D histograms of ``reference`` (P) and ``samples`` (Q).

    Cells: ``bins x bins`` over the reference's bounding box, plus one overflow cell for points outside it.

    Example:
        >>> x = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
        >>> histogram_kl(x, x) == 0.0
        True
    """
    x, y = _as_f64(reference, "reference").numpy(), _as_f64(samples, "samples").numpy()
    if x.shape[1] != 2 or y.shape[1] != 2:
        raise ValueError(f"histogram_kl is for 2D points, got {x.shape[1]} and {y.shape[1]} coordinates")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    lo, hi = x.min(axis=0), x.max(axis=0)
    edges = [np.linspace(lo[k], hi[k], bins + 1) for k in range(2)]

    def counts(points: np.ndarray) -> np.ndarray:
        inside, _, _ = np.histogram2d(points[:, 0], points[:, 1], bins=edges)
        outside = len(points) - inside.sum()  # histogram2d drops points outside the edges
        return np.append(inside.ravel(), outside) + 0.5

    p, q = counts(x), counts(y)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


@dataclass(frozen=True)
class SampleQuality:
    """Scores of samples against the reference and the noise floor (a second held-out sample's scores).

    ``n`` and ``m``: reference and sample sizes; ``bandwidth``: the RBF bandwidth used (median distance).
    """

    mmd2: float
    mmd2_floor: float
    hist_kl: float
    hist_kl_floor: float
    bandwidth: float
    n: int
    m: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain floats and ints, for JSON."""
        return asdict(self)

    def __str__(self) -> str:
        return (f"MMD^2 (RBF, h={self.bandwidth:.3g}) = {self.mmd2:.5f} (floor {self.mmd2_floor:.5f}); "
                f"histogram KL = {self.hist_kl:.4f} nats (floor {self.hist_kl_floor:.4f})")


def sample_quality(
    reference: Tensor | np.ndarray,
    samples: Tensor | np.ndarray,
    second_reference: Tensor | np.ndarray,
    bins: int = 50,
) -> SampleQuality:
    """Both metrics for ``samples`` against ``reference``, and for ``second_reference`` (the floor).

    ``second_reference`` must be held-out data independent of ``reference``, the same size as ``samples``
    (the floor of both metrics depends on the sample size). All ``(n, 2)``, in the same coordinates.
    """
    m = len(samples)
    if len(second_reference) != m:
        raise ValueError(f"second_reference has {len(second_reference)} points, samples {m}: use equal sizes "
                         f"(the noise floor depends on the sample size)")
    h = median_bandwidth(reference)
    return SampleQuality(
        mmd2=mmd2(reference, samples, h),
        mmd2_floor=mmd2(reference, second_reference, h),
        hist_kl=histogram_kl(reference, samples, bins),
        hist_kl_floor=histogram_kl(reference, second_reference, bins),
        bandwidth=h,
        n=len(reference),
        m=m,
    )
