"""Sample-quality metrics: exact formulas on small sets, ≈ 0 within the floor for one distribution, growth
with a shift."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from sdeflow import metrics
from sdeflow.metrics import histogram_kl, median_bandwidth, mmd2, sample_quality


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
