"""Sample-quality metrics: exact formulas on small sets, ≈ 0 within the floor for one distribution, growth
with a shift or blur, a dropped mode caught, clear errors; exact-density scores for the built-in sets."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from sdeflow import densities, metrics
from sdeflow.data import DATASETS
from sdeflow.metrics import (
    BinnedKL,
    binned_kl,
    excess_binned_kl,
    histogram_kl,
    knn_quality,
    median_bandwidth,
    mmd2,
    nll_gap,
    quality_report_2d,
    sample_quality,
)


def draws(k: int, n: int, seed: int) -> list[torch.Tensor]:
    return list(torch.randn(k, n, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))


def test_median_bandwidth_is_median_pairwise_distance():
    (x,) = draws(1, 50, 0)
    assert median_bandwidth(x) == pytest.approx(float(np.median(pdist(x.numpy()))))
    with pytest.raises(ValueError, match="coincide"):
        median_bandwidth(torch.zeros(5, 2))


def test_mmd2_matches_brute_force_unbiased_formula(monkeypatch):
    monkeypatch.setattr(metrics, "_BLOCK", 7)  # exercise the blocked kernel sums
    x, y = draws(2, 30, 1)
    y = y[:23] + 0.5
    h = 0.8
    k = lambda a, b: torch.exp(-torch.cdist(a, b).pow(2) / (2 * h * h))  # noqa: E731
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    expected = ((kxx.sum() - kxx.trace()) / (n * (n - 1)) + (kyy.sum() - kyy.trace()) / (m * (m - 1))
                - 2 * k(x, y).mean())
    assert mmd2(x, y, h) == pytest.approx(float(expected), rel=1e-12)


def test_histogram_kl_formula_and_overflow():
    (x,) = draws(1, 1000, 2)
    assert histogram_kl(x, x) == 0.0
    far = x.clone()
    far[:100] += 100.0  # 10% of the samples off the data's bounding box: caught by the overflow cell
    assert histogram_kl(x, far) > 0.05
    with pytest.raises(ValueError, match="2D"):
        histogram_kl(torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        histogram_kl(x, torch.full((5, 2), float("nan")))


def test_same_distribution_within_floor_and_shift_grows():
    ref, other, same = draws(3, 1000, 3)
    q = sample_quality(ref, same, other)
    # two samples of one distribution: both scores are of the size of the floor
    assert abs(q.mmd2) < 5 * abs(q.mmd2_floor) + 1e-3
    assert q.hist_kl < 1.5 * q.hist_kl_floor
    shifts = (0.25, 0.5, 1.0)
    mmds = [mmd2(ref, same + shift, q.bandwidth) for shift in shifts]
    kls = [histogram_kl(ref, same + shift) for shift in shifts]
    assert mmds == sorted(mmds) and kls == sorted(kls)
    # 2500 cells for 1000 points: the binned KL's floor is large; a one-std shift clears it
    assert mmds[0] > 10 * abs(q.mmd2_floor) and kls[2] > q.hist_kl_floor + 0.1
    assert q.as_dict()["n"] == 1000 and "floor" in str(q)


def test_sample_quality_needs_equal_sizes():
    ref, other, same = draws(3, 100, 4)
    with pytest.raises(ValueError, match="equal sizes"):
        sample_quality(ref, same, other[:50])


# ---------------------------------------------------------------------------------------------------------
# scores against the exact density


def data(name: str, n: int, seed: int) -> torch.Tensor:
    return DATASETS[name](n, torch.Generator().manual_seed(seed))[0]


def test_binned_kl_formula_and_cached_masses():
    x = data("8gaussians", 3000, 5).double()
    box = (-1.5, 1.5, -1.2, 1.2)
    edges = (np.linspace(-1.5, 1.5, 21), np.linspace(-1.2, 1.2, 21))
    masses = densities.bin_masses("8gaussians", *edges)
    counts, _, _ = np.histogram2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=edges)
    p = np.append(masses.ravel(), 1 - masses.sum())
    q = np.append(counts.ravel(), len(x) - counts.sum()) + 0.5
    q /= q.sum()
    expected = np.sum(p[p > 0] * np.log(p[p > 0] / q[p > 0]))
    assert binned_kl("8gaussians", x, bins=20, box=box) == pytest.approx(expected, rel=1e-12)
    assert binned_kl(masses, x, box=box) == pytest.approx(expected, rel=1e-12)
    far = x.clone()
    far[:300] += 10.0  # 10% off the box: the overflow cell's exact mass is ~0, so Q^ loses 10% elsewhere
    assert binned_kl(masses, far, box=box) > expected + 0.09


@pytest.mark.parametrize("name", densities.supported())
def test_excess_binned_kl_of_perfect_samples_is_within_floor(name):
    r = excess_binned_kl(name, data(name, 10_000, 99))  # the floor's draws are seeded 0: independent
    assert isinstance(r, BinnedKL) and r.floor_sd > 0 and 0.05 < r.perfect < 0.2  # bias ~ cells / 2m = 0.125
    assert abs(r.value) < 4 * r.floor_sd


def test_excess_binned_kl_grows_with_shift_and_blur():
    x = data("two_spirals", 10_000, 1)
    shifted = [excess_binned_kl("two_spirals", x + torch.tensor([s, 0.0])) for s in (0.1, 0.3, 1.0)]
    assert shifted[0].value > 10 * shifted[0].floor_sd
    assert shifted[0].value < shifted[1].value < shifted[2].value
    y = data("moons", 10_000, 2)
    noise = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    blurred = [excess_binned_kl("moons", y + c * 0.06 * noise) for c in (0.5, 1.0, 2.0)]  # x the noise std
    assert blurred[0].value > 4 * blurred[0].floor_sd
    assert blurred[0].value < blurred[1].value < blurred[2].value


def test_dropped_mode_scores_far_above_floor():
    x, labels = DATASETS["8gaussians"](3000, torch.Generator().manual_seed(4))
    samples = x[labels != 0][:2000]  # 7 of the 8 modes
    reference, other = data("8gaussians", 2000, 5), data("8gaussians", 2000, 6)
    r = quality_report_2d("8gaussians", samples, reference, other)
    assert r.excess_kl > 15 * r.excess_kl_floor
    # an eighth of the data is missed: recall and coverage drop by about that much, precision does not
    assert r.recall < r.recall_floor - 0.08 and r.coverage < r.coverage_floor - 0.08
    assert abs(r.precision - r.precision_floor) < 0.03
    assert r.mmd2 > 10 * abs(r.mmd2_floor)


def test_mmd_and_knn_near_floor_for_one_distribution_and_grow_with_shift():
    reference, other, same = (data("moons", 1500, s) for s in (7, 8, 9))
    r = quality_report_2d(None, same, reference, other)
    assert r.excess_kl is None and r.nll_gap is None and r.entropy is None  # user data: no exact density
    assert abs(r.mmd2 - r.mmd2_floor) < 1e-3
    for key in ("precision", "recall", "density", "coverage"):
        assert abs(getattr(r, key) - getattr(r, key + "_floor")) < 0.05, key
    mmds, precisions, coverages = [], [], []
    for s in (0.1, 0.3, 1.0):
        q = knn_quality(reference, same + torch.tensor([s, 0.0]))
        mmds.append(mmd2(reference, same + torch.tensor([s, 0.0]), r.bandwidth))
        precisions.append(q["precision"])
        coverages.append(q["coverage"])
    # the median bandwidth (~1.1) is wide next to a 0.1 shift: MMD sees 0.3 clearly, 0.1 only just
    assert mmds == sorted(mmds) and mmds[0] > abs(r.mmd2_floor) and mmds[1] > 10 * abs(r.mmd2_floor)
    assert precisions == sorted(precisions, reverse=True) and precisions[1] < r.precision_floor - 0.2
    # a 1.0 shift lays part of one moon onto the other: coverage has bottomed out (~0.32) by then
    assert coverages[0] > coverages[1] and coverages[0] < r.coverage_floor - 0.1 and coverages[2] < 0.5


def test_knn_quality_of_a_set_against_itself():
    (x,) = draws(1, 300, 10)
    q = knn_quality(x, x, k=3)
    assert q["precision"] == q["recall"] == q["coverage"] == 1.0 and q["density"] >= 1.0
    assert knn_quality(x, x, k=3, max_points=300) == q  # no set above max_points: nothing subsampled
    q_sub = knn_quality(x, x, k=3, max_points=100)  # two different (seeded) subsets of 100 points
    assert q_sub == knn_quality(x, x, k=3, max_points=100) and q_sub != q


def test_nll_gap_and_report():
    assert nll_gap("checkerboard", math.log(8) + 0.25) == pytest.approx(0.25)
    reference, other, same = (data("olympic_rings", 1000, s) for s in (11, 12, 13))
    nll = float(-densities.log_density("olympic_rings", reference).mean())  # the true density's test NLL
    r = quality_report_2d("olympic_rings", same, reference, other, nll=nll)
    assert abs(r.nll_gap) < 4 * r.nll_gap_floor and r.entropy == pytest.approx(densities.entropy("olympic_rings"))
    d = r.as_dict()
    assert d["name"] == "olympic_rings" and d["n_samples"] == 1000 and set(d) >= {"excess_kl", "coverage_floor"}
    text = str(r)
    assert "floor" in text and "excess binned KL" in text and "NLL - entropy" in text
    assert "excess" not in str(quality_report_2d(None, same, reference, other))


def test_exact_metric_errors():
    x = data("moons", 100, 14)
    with pytest.raises(ValueError, match="unknown data set 'moon'"):
        binned_kl("moon", x)
    with pytest.raises(NotImplementedError, match="pinwheel"):
        excess_binned_kl("pinwheel", x)
    with pytest.raises(ValueError, match="without their box"):
        binned_kl(np.full((2, 2), 0.25), x)
    with pytest.raises(ValueError, match="x_min < x_max"):
        binned_kl("moons", x, box=(1.0, 0.0, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        binned_kl("moons", torch.zeros(10, 3))
    with pytest.raises(ValueError, match="NaN"):
        excess_binned_kl("moons", torch.full((10, 2), float("nan")))
    with pytest.raises(ValueError, match="repeats"):
        excess_binned_kl("moons", x, repeats=1)
    with pytest.raises(ValueError, match="finite"):
        nll_gap("moons", float("nan"))
    with pytest.raises(ValueError, match="coordinates"):
        knn_quality(x, torch.zeros(10, 3))
    with pytest.raises(ValueError, match="need more than k"):
        knn_quality(x, x[:6], k=5)
    with pytest.raises(ValueError, match="NaN"):
        knn_quality(x, torch.full((10, 2), float("inf")))
    with pytest.raises(ValueError, match="equal sizes"):
        quality_report_2d("moons", x, x, x[:50])
