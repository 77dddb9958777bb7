"""Sample quality in 2D: against held-out data (MMD, k-NN, binned KL) and against the exact density.

Scores between a reference sample ``x`` (held-out data, ``(n, D)``) and model samples ``y`` (``(m, D)``):

- :func:`mmd2`: the unbiased estimate of the squared maximum mean discrepancy (Gretton et al. 2012) with
  the Gaussian (RBF) kernel ``k(a, b) = exp(-|a - b|^2 / (2 h^2))``::

      MMD^2 = mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean_{i,j} k(x_i, y_j)

  The bandwidth ``h`` is the median pairwise distance of the *reference* (of its first 1000 points), so
  the score does not depend on the samples it judges. Unbiased: it can be slightly negative.
- :func:`histogram_kl`: ``KL(P || Q)`` in nats between 2D histograms of the reference (``P``) and the
  samples (``Q``) on ``bins x bins`` cells over the reference's bounding box, plus one cell for
  everything outside it (so mass leaking off the data's support counts), each count plus ½ (add-½ smoothing
  keeps the KL finite). It is biased upward by the finite counts.
- :func:`knn_quality`: k-nearest-neighbour precision, recall, density and coverage (Kynkäänniemi et al.
  2019; Naeem et al. 2020) from the ``prdc`` package: precision/density say whether samples fall inside the
  data's k-NN balls (fidelity), recall/coverage whether the data is covered by the samples (diversity).

For the built-in data sets :mod:`sdeflow.densities` knows the exact density ``p``, which removes the
reference's own noise from the comparison (all points in raw data coordinates):

- :func:`binned_kl`: ``KL(P || Q)`` with ``P`` the *exact* probabilities of ``bins x bins`` cells over a box
  holding the support (plus an overflow cell: everything outside the box) and ``Q`` the add-½ smoothed
  histogram of the samples. :func:`excess_binned_kl` subtracts what a perfect sampler of the same size
  scores (mean over seeded generator draws), so a perfect model gets 0 up to ``floor_sd``.
- :func:`nll_gap`: a model's test NLL minus the true entropy ``H = -E log p``; 0 for the true density.

Every score is ≈ 0 (or its ideal) only up to sampling noise. :func:`sample_quality` and
:func:`quality_report_2d` therefore also score a *second*, independent held-out sample of the same size:
that *noise floor* is what a perfect model would get. A score near its floor means the samples are
indistinguishable from data at this sample size.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> data, other, shifted = torch.randn(3, 500, 2, generator=g).unbind(0)
    >>> q = sample_quality(data, shifted + 1.0, other)
    >>> q.mmd2 > 10 * abs(q.mmd2_floor), q.hist_kl > q.hist_kl_floor
    (True, True)
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from . import densities
from .data import DATASETS
from .densities import Box

__all__ = [
    "median_bandwidth",
    "mmd2",
    "histogram_kl",
    "SampleQuality",
    "sample_quality",
    "binned_kl",
    "BinnedKL",
    "excess_binned_kl",
    "nll_gap",
    "nll_gap_floor",
    "knn_quality",
    "QualityReport2D",
    "QualityScorer2D",
    "quality_report_2d",
]

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
    return _mmd2(x, y, gamma, _within_mean(x, gamma))


def _within_mean(x: Tensor, gamma: float) -> float:
    """``mean_{i != j} k(x_i, x_j)``: the within-sample term of the unbiased MMD^2."""
    n = len(x)
    return (_kernel_sum(x, x, gamma) - n) / (n * (n - 1))


def _mmd2(x: Tensor, y: Tensor, gamma: float, kxx: float) -> float:
    """Unbiased MMD^2 given the reference's within-sample term ``kxx`` (computed once per reference)."""
    return kxx + _within_mean(y, gamma) - 2.0 * _kernel_sum(x, y, gamma) / (len(x) * len(y))


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


# ---------------------------------------------------------------------------------------------------------
# scores against the exact density of a built-in data set


@lru_cache(maxsize=64)
def _cached_masses(name: str, bins: int, box: Box) -> np.ndarray:
    masses = densities.bin_masses(name, np.linspace(box[0], box[1], bins + 1), np.linspace(box[2], box[3], bins + 1))
    masses.setflags(write=False)  # shared by every caller through the cache
    return masses


def _check_box(box: Box | tuple | list) -> Box:
    if len(box) != 4:
        raise ValueError(f"box must be (x_min, x_max, y_min, y_max), got {box!r}")
    b = tuple(float(v) for v in box)
    if not all(math.isfinite(v) for v in b) or not (b[0] < b[1] and b[2] < b[3]):
        raise ValueError(f"box must be finite with x_min < x_max and y_min < y_max, got {box!r}")
    return b  # type: ignore[return-value]


def _points_2d(points: Tensor | np.ndarray, name: str) -> np.ndarray:
    x = _as_f64(points, name).numpy()
    if x.shape[1] != 2:
        raise ValueError(f"{name} must be 2D points of shape (n, 2), got {tuple(x.shape)}")
    return x


def _cell_counts(points: np.ndarray, box: Box, bx: int, by: int) -> np.ndarray:
    """Counts of ``points`` in ``bx x by`` equal cells of ``box`` (row-major), then the overflow count."""
    x0, x1, y0, y1 = box
    inside = (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)
    p = points[inside]
    # the upper edges belong to the last cells, as in np.histogram2d
    ix = np.minimum(((p[:, 0] - x0) * (bx / (x1 - x0))).astype(np.int64), bx - 1)
    iy = np.minimum(((p[:, 1] - y0) * (by / (y1 - y0))).astype(np.int64), by - 1)
    counts = np.bincount(ix * by + iy, minlength=bx * by).astype(np.float64)
    return np.append(counts, len(points) - len(p))


def _masses_and_box(name_or_masses: str | np.ndarray, bins: int, box: Box | None) -> tuple[np.ndarray, Box]:
    if isinstance(name_or_masses, str):
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        box = densities.default_box(name_or_masses) if box is None else _check_box(box)
        return _cached_masses(name_or_masses, int(bins), box), box
    if box is None:
        raise ValueError("bin masses given without their box: pass box=(x_min, x_max, y_min, y_max)")
    masses = np.asarray(name_or_masses, dtype=np.float64)
    if masses.ndim != 2:
        raise ValueError(f"bin masses must have shape (bins_x, bins_y), got {masses.shape}")
    if not np.isfinite(masses).all() or (masses < 0).any() or masses.sum() > 1.0 + 1e-9:
        raise ValueError("bin masses must be finite, >= 0 and sum to at most 1")
    return masses, _check_box(box)


def _binned_kl(masses: np.ndarray, box: Box, points: np.ndarray) -> float:
    bx, by = masses.shape
    p = np.append(masses.ravel(), max(0.0, 1.0 - float(masses.sum())))
    q = _cell_counts(points, box, bx, by) + 0.5
    q /= q.sum()
    keep = p > 0  # 0 log 0 = 0: cells without data mass add nothing
    return float(np.sum(p[keep] * (np.log(p[keep]) - np.log(q[keep]))))


def binned_kl(
    name_or_masses: str | np.ndarray,
    samples: Tensor | np.ndarray,
    bins: int = 50,
    box: Box | None = None,
) -> float:
    """``KL(P || Q^)`` in nats between exact cell probabilities ``P`` and the samples' histogram ``Q^``.

    ``KL = sum_c P_c log(P_c / Q^_c)`` over ``bins x bins`` equal cells of ``box`` plus one overflow cell
    (everything outside the box; its ``P`` is ``1 - sum of the cell masses``), with
    ``Q^_c = (count_c + 1/2) / (m + cells / 2)`` (add-½ smoothing keeps it finite). ``samples``: ``(m, 2)`` in raw
    data coordinates.

    ``name_or_masses``: a built-in data set (:func:`sdeflow.densities.supported`; its masses are computed
    once per ``(name, bins, box)`` and cached; ``box`` defaults to :func:`sdeflow.densities.default_box`,
    mass outside < 1e-4), or precomputed masses ``(bins_x, bins_y)`` of the cells of ``box`` (``bins`` is then
    ignored). The 50 x 50 default resolves what sets the data apart at the bin scale: cells are 0.05-0.4
    units wide (0.054 for 8gaussians with sigma 0.08, 0.135 x 0.067 for olympic_rings, whose rings are
    0.04 thick), so structure thinner than a cell (e.g. a ring's width) is seen only through its mass per
    cell. The estimate is biased upward by about ``cells / (2 m)``: compare to :func:`excess_binned_kl`.

    Example:
        >>> x, _ = DATASETS["8gaussians"](20000, torch.Generator().manual_seed(0))
        >>> binned_kl("8gaussians", x) < binned_kl("8gaussians", x + 0.1)
        True
    """
    masses, box = _masses_and_box(name_or_masses, bins, box)
    return _binned_kl(masses, box, _points_2d(samples, "samples"))


@dataclass(frozen=True)
class BinnedKL:
    """Binned KL of samples minus a perfect sampler's mean score, and that score's spread.

    ``value = binned_kl(samples) - perfect`` (≈ 0 within a few ``floor_sd`` for a perfect model);
    ``perfect``: mean binned KL of ``repeats`` seeded generator draws of the same size; ``floor_sd``: their
    standard deviation.
    """

    value: float
    floor_sd: float
    perfect: float


def excess_binned_kl(
    name: str,
    samples: Tensor | np.ndarray,
    bins: int = 50,
    seed: int = 0,
    repeats: int = 8,
    *,
    box: Box | None = None,
) -> BinnedKL:
    """:func:`binned_kl` of ``samples`` ``(m, 2)`` beyond what a perfect sampler of the same size gets.

    ``value = KL(P || Q^_samples) - mean_r KL(P || Q^_r)``, where ``Q^_r`` are histograms of ``repeats``
    independent draws of ``m`` points from the data set's own generator (``torch.Generator`` seeded with
    ``seed``); ``floor_sd`` is the standard deviation of those ``repeats`` scores. This removes the
    finite-sample bias of the binned KL, so the value is comparable across sample sizes.

    Example:
        >>> g = torch.Generator().manual_seed(1)
        >>> good, _ = DATASETS["moons"](5000, g)
        >>> r = excess_binned_kl("moons", good)
        >>> abs(r.value) < 5 * r.floor_sd, excess_binned_kl("moons", good + 0.3).value > 50 * r.floor_sd
        (True, True)
    """
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to estimate the floor's spread, got {repeats}")
    masses, box = _masses_and_box(name, bins, box)
    points = _points_2d(samples, "samples")
    m = len(points)
    draws, _ = DATASETS[name](m * repeats, torch.Generator().manual_seed(seed))
    draws = draws.to(torch.float64).numpy().reshape(repeats, m, 2)
    perfect = np.array([_binned_kl(masses, box, d) for d in draws])
    return BinnedKL(
        value=_binned_kl(masses, box, points) - float(perfect.mean()),
        floor_sd=float(perfect.std(ddof=1)),
        perfect=float(perfect.mean()),
    )


def nll_gap(name: str, nll_nats: float) -> float:
    """Model test NLL minus the true entropy of data set ``name``: ``gap = NLL - H``, in nats per point.

    ``H = -E_p log p`` (:func:`sdeflow.densities.entropy`) is the least NLL any model can reach in
    expectation (``E_p[-log q] = H + KL(p || q)``), so the gap estimates ``KL(p || q)``: 0 for a perfect
    model, up to the test set's sampling noise. The NLL must be in raw data coordinates (undo any scaling:
    add ``log |det|`` of the data-to-model map).

    Example:
        >>> round(nll_gap("checkerboard", math.log(8.0) + 0.1), 6)
        0.1
    """
    value = float(nll_nats)
    if not math.isfinite(value):
        raise ValueError(f"nll_nats must be finite, got {nll_nats}")
    return value - densities.entropy(name)


def nll_gap_floor(name: str, points: Tensor | np.ndarray) -> float:
    """The noise of :func:`nll_gap` on test ``points`` ``(n, 2)`` (raw coordinates): the standard error of the
    true density's NLL on them, ``std(log p) / sqrt(n)``, i.e. how far a perfect model's gap strays from 0.

    Example:
        >>> nll_gap_floor("checkerboard", torch.tensor([[0.5, 0.5], [-1.5, 0.5]]))  # uniform on its support
        0.0
    """
    logp = densities.log_density(name, points)
    return float(np.std(logp) / math.sqrt(len(logp)))


def knn_quality(
    reference: Tensor | np.ndarray,
    samples: Tensor | np.ndarray,
    k: int = 5,
    *,
    max_points: int | None = 5000,
    seed: int = 0,
) -> dict[str, float]:
    """k-NN precision, recall, density and coverage of ``samples`` ``(m, D)`` against ``reference`` ``(n, D)``.

    From the ``prdc`` package (``pip install prdc``). With ``B_k(x)`` the ball around ``x`` reaching its
    k-th nearest neighbour in its own set:

    - precision = share of samples inside some ``B_k(reference_i)``;
    - recall = share of reference points inside some ``B_k(sample_j)``;
    - density = ``(1 / (k m)) sum_j #{i : sample_j in B_k(reference_i)}`` (≈ 1 for matching distributions);
    - coverage = share of reference points whose ``B_k`` holds at least one sample.

    prdc forms full distance matrices (``n x m`` doubles), so sets larger than ``max_points`` are first
    subsampled without replacement (seeded by ``seed``); ``None`` keeps everything. Both sets need more
    than ``k + 1`` points.

    Example:
        >>> x, y = torch.randn(2, 400, 2, generator=torch.Generator().manual_seed(0)).unbind(0)
        >>> q = knn_quality(x, y + 20.0)
        >>> q["precision"], q["coverage"]
        (0.0, 0.0)
    """
    x, y = _as_f64(reference, "reference").numpy(), _as_f64(samples, "samples").numpy()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"reference has {x.shape[1]} coordinates, samples {y.shape[1]}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    for label, pts in (("reference", x), ("samples", y)):
        if len(pts) <= k + 1:
            raise ValueError(f"{label} has {len(pts)} points: k-NN metrics with k={k} need more than k + 1")
    try:
        from prdc import compute_prdc
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("knn_quality needs the prdc package: pip install prdc") from err
    rng = np.random.default_rng(seed)
    if max_points is not None:
        if len(x) > max_points:
            x = x[rng.choice(len(x), max_points, replace=False)]
        if len(y) > max_points:
            y = y[rng.choice(len(y), max_points, replace=False)]
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        scores = compute_prdc(real_features=x, fake_features=y, nearest_k=k)
    return {key: float(scores[key]) for key in ("precision", "recall", "density", "coverage")}


@dataclass(frozen=True)
class QualityReport2D:
    """Scores of 2D samples and their floors (the same score for an independent data sample of equal size).

    ``name``: the data set, or ``None`` for user points. ``mmd2`` uses the RBF kernel with the reference's
    median pairwise distance ``bandwidth``; ``precision``/``recall``/``density``/``coverage`` are the k-NN
    metrics of :func:`knn_quality` (ideal ≈ their floors, not 1). For a built-in set with an exact density
    (else ``None``): ``excess_kl`` (:func:`excess_binned_kl`; floor = its ``floor_sd``, ``perfect_kl`` the
    subtracted perfect-sampler score), ``entropy``, and with a model NLL ``nll_gap`` (:func:`nll_gap`;
    floor = standard error of an exact-density NLL estimated on ``n_reference`` points).
    """

    name: str | None
    n_samples: int
    n_reference: int
    bandwidth: float
    mmd2: float
    mmd2_floor: float
    k: int
    precision: float
    precision_floor: float
    recall: float
    recall_floor: float
    density: float
    density_floor: float
    coverage: float
    coverage_floor: float
    bins: int
    excess_kl: float | None = None
    excess_kl_floor: float | None = None
    perfect_kl: float | None = None
    entropy: float | None = None
    nll_gap: float | None = None
    nll_gap_floor: float | None = None

    def as_dict(self) -> dict[str, str | float | int | None]:
        """Plain Python values (``None`` where a score does not apply), for JSON."""
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            (f"MMD^2 (RBF, h={self.bandwidth:.3g})", f"{self.mmd2:.5f}", f"{self.mmd2_floor:.5f}"),
            *[(f"k-NN {key} (k={self.k})", f"{getattr(self, key):.3f}", f"{getattr(self, key + '_floor'):.3f}")
              for key in ("precision", "recall", "density", "coverage")],
        ]
        if self.excess_kl is not None:
            rows.append((f"excess binned KL ({self.bins}x{self.bins}), nats", f"{self.excess_kl:.4f}",
                         f"sd {self.excess_kl_floor:.4f}"))
        if self.nll_gap is not None:
            rows.append(("NLL - entropy, nats", f"{self.nll_gap:.4f}", f"se {self.nll_gap_floor:.4f}"))
        title = f"{self.name or 'user data'}: {self.n_samples} samples vs {self.n_reference} reference points"
        width = max(len(r[0]) for r in rows)
        lines = [title, f"  {'score':<{width}}  {'value':>10}  {'floor':>10}"]
        lines += [f"  {a:<{width}}  {b:>10}  {c:>10}" for a, b, c in rows]
        if self.entropy is not None:
            lines.append(f"  true entropy {self.entropy:.4f} nats")
        return "\n".join(lines)


class QualityScorer2D:
    """Scores 2D samples against fixed held-out data, with every floor computed once (:class:`QualityReport2D`).

    Scoring many samplers against one held-out set repeats work that depends on the data alone: the MMD's
    bandwidth and within-reference kernel sum (``n^2`` kernel values), the floors (the scores of
    ``second_reference``) and the exact-density floor. A scorer does that once; each :meth:`report` then
    costs the samples' own terms (for 10k points: ~4 s of MMD and ~2 s of k-NN on one core).

    Args:
        name_or_none: the data set (exact-density scores where :func:`sdeflow.densities.supported`), or
            ``None`` for user data.
        reference: held-out data ``(n, 2)``, raw data coordinates.
        second_reference: an independent data sample ``(m, 2)``; every scored sample must have ``m`` points
            too (the floors depend on the sample size).
        seed, k, bins, max_points: as in :func:`quality_report_2d`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> ref, other, good, bad = (DATASETS["moons"](1000, g)[0] for _ in range(4))
        >>> scorer = QualityScorer2D("moons", ref, other)
        >>> scorer.report(good).excess_kl < scorer.report(bad + 0.2).excess_kl
        True
    """

    def __init__(
        self,
        name_or_none: str | None,
        reference: Tensor | np.ndarray,
        second_reference: Tensor | np.ndarray,
        *,
        seed: int = 0,
        k: int = 5,
        bins: int = 50,
        max_points: int | None = 5000,
    ):
        self.name = name_or_none
        self.exact = name_or_none is not None and name_or_none in densities.supported()
        self.seed, self.k, self.bins, self.max_points = seed, k, bins, max_points
        self._x = torch.from_numpy(_points_2d(reference, "reference"))
        self._y2 = torch.from_numpy(_points_2d(second_reference, "second_reference"))
        self.bandwidth = median_bandwidth(self._x)
        self._gamma = 1.0 / (2.0 * self.bandwidth**2)
        self._kxx = _within_mean(self._x, self._gamma)
        self._mmd2_floor = _mmd2(self._x, self._y2, self._gamma, self._kxx)
        self._knn_floor = knn_quality(self._x, self._y2, k, max_points=max_points, seed=seed)
        self._nll_floor: float | None = None

    @property
    def n_samples(self) -> int:
        """The size every scored sample must have (that of ``second_reference``)."""
        return len(self._y2)

    def nll_floor(self) -> float:
        """Standard error of the exact density's test NLL on the reference: the noise of ``NLL - entropy``."""
        if not self.exact:
            raise ValueError(f"no exact density for {self.name!r}: NLL - entropy needs a built-in data set")
        if self._nll_floor is None:
            assert self.name is not None
            self._nll_floor = nll_gap_floor(self.name, self._x)
        return self._nll_floor

    def report(self, samples: Tensor | np.ndarray, *, nll: float | None = None) -> QualityReport2D:
        """Every score of ``samples`` ``(m, 2)`` (raw coordinates) beside its floor; ``nll``: the model's test
        NLL on the reference (nats per point, raw coordinates), for ``NLL - entropy``.

        Raises:
            ValueError: if ``samples`` has not :attr:`n_samples` points, or is not finite ``(m, 2)``.
        """
        y = _points_2d(samples, "samples")
        if len(y) != self.n_samples:
            raise ValueError(f"second_reference has {self.n_samples} points, samples {len(y)}: use equal sizes "
                             f"(the noise floor depends on the sample size)")
        knn = knn_quality(self._x, y, self.k, max_points=self.max_points, seed=self.seed)
        exact: dict[str, float | None] = {}
        if self.exact:
            assert self.name is not None
            kl = excess_binned_kl(self.name, y, self.bins, self.seed)
            exact = {"excess_kl": kl.value, "excess_kl_floor": kl.floor_sd, "perfect_kl": kl.perfect,
                     "entropy": densities.entropy(self.name)}
            if nll is not None:
                exact["nll_gap"] = nll_gap(self.name, nll)
                exact["nll_gap_floor"] = self.nll_floor()
        return QualityReport2D(
            name=self.name,
            n_samples=len(y),
            n_reference=len(self._x),
            bandwidth=self.bandwidth,
            mmd2=_mmd2(self._x, torch.from_numpy(y), self._gamma, self._kxx),
            mmd2_floor=self._mmd2_floor,
            k=self.k,
            **knn,
            **{f"{key}_floor": value for key, value in self._knn_floor.items()},
            bins=self.bins,
            **exact,
        )


def quality_report_2d(
    name_or_none: str | None,
    samples: Tensor | np.ndarray,
    reference: Tensor | np.ndarray,
    second_reference: Tensor | np.ndarray,
    *,
    nll: float | None = None,
    seed: int = 0,
    k: int = 5,
    bins: int = 50,
    max_points: int | None = 5000,
) -> QualityReport2D:
    """All 2D scores of ``samples`` ``(m, 2)``, each beside its floor, in raw data coordinates.

    ``reference``: held-out data ``(n, 2)``; ``second_reference``: an independent data sample of the same
    size as ``samples`` (the floors depend on the size). MMD² uses the median-distance bandwidth of the
    reference; k-NN metrics use ``k`` and at most ``max_points`` points per set (seeded subsample). If
    ``name_or_none`` is a set with an exact density (:func:`sdeflow.densities.supported`), also the excess
    binned KL on ``bins x bins`` cells (perfect-sampler draws seeded by ``seed``) and, given the model's test
    NLL ``nll`` (nats per point, raw coordinates), the gap to the true entropy; otherwise those are ``None``.
    To score several samples against the same data, build one :class:`QualityScorer2D` instead (this
    function is ``QualityScorer2D(...).report(samples, nll=nll)``).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> ref, other, good = (DATASETS["moons"](1000, g)[0] for _ in range(3))
        >>> r = quality_report_2d("moons", good, ref, other, nll=1.0)
        >>> r.coverage > 0.5 and abs(r.excess_kl) < 5 * r.excess_kl_floor and r.nll_gap > 0.4
        True
    """
    scorer = QualityScorer2D(name_or_none, reference, second_reference, seed=seed, k=k, bins=bins,
                             max_points=max_points)
    return scorer.report(samples, nll=nll)
