"""Exact densities of the built-in sets: bin masses sum to 1 and match generator draws, quadrature converged,
log-densities integrate to 1, entropies match closed forms and Monte Carlo, clear errors."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from sdeflow import densities
from sdeflow.data import DATASETS
from sdeflow.densities import bin_masses, default_box, entropy, log_density, supported

QUADRATURE_SETS = ["olympic_rings", "four_rings", "two_spirals", "swiss_roll", "moons"]


def draws(name: str, n: int, seed: int) -> np.ndarray:
    x, _ = DATASETS[name](n, torch.Generator().manual_seed(seed))
    return x.double().numpy()


def grid_edges(box: tuple[float, float, float, float], bins: int, pad: float = 0.0) -> tuple[np.ndarray, ...]:
    return (np.linspace(box[0] - pad, box[1] + pad, bins + 1), np.linspace(box[2] - pad, box[3] + pad, bins + 1))


def test_supported_sets():
    assert supported() == [n for n in DATASETS if n != "pinwheel"]


@pytest.mark.parametrize("name", supported())
def test_bin_masses_sum_to_one(name):
    # a box 1 unit beyond the default one holds all but ~Phi(-12) of the mass
    masses = bin_masses(name, *grid_edges(default_box(name), 40, pad=1.0))
    assert masses.shape == (40, 40) and masses.dtype == np.float64 and (masses >= 0).all()
    assert abs(masses.sum() - 1.0) < 1e-6
    inner = bin_masses(name, *grid_edges(default_box(name), 40)).sum()
    assert 1.0 - 1e-4 < inner <= 1.0 + 1e-9  # the default box leaves < 1e-4 outside


@pytest.mark.parametrize("name", supported())
def test_bin_masses_match_generator_histogram(name):
    n, box = 200_000, default_box(name)
    edges = grid_edges(box, 50)
    masses = bin_masses(name, *edges)
    x = draws(name, n, seed=11)
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=edges)
    cells = np.append(masses.ravel(), 1.0 - masses.sum())
    observed = np.append(counts.ravel(), n - counts.sum())
    expected = n * cells
    used = expected > 20  # the normal approximation of a binomial count
    z = (observed - expected)[used] / np.sqrt(expected[used] * (1.0 - cells[used]))
    # ~1000-2500 standardised counts: max |z| ~ 3.7 for a correct density; 5 allows for chance, not bias
    assert np.abs(z).max() < 5.0
    assert abs(np.mean(z**2) - 1.0) < 0.2  # chi-square per cell
    assert observed[~used].sum() < 20 * max(1, (~used).sum()) + 50  # no mass where the density says none


@pytest.mark.parametrize("name", QUADRATURE_SETS)
def test_quadrature_converged(name):
    edges = grid_edges(default_box(name), 50)
    assert np.abs(bin_masses(name, *edges, refine=2) - bin_masses(name, *edges)).max() < 1e-8


def test_ring_with_negative_radius_draws():
    # r / w = 1: a sixth of the radius draws are negative; they land on the far side at the same |radius|
    spec = densities._Rings(np.array([[0.3, -0.2]]), np.array([0.1]), np.array([1.0]), 0.1)
    gen = np.random.default_rng(0)
    n = 400_000
    theta, rho = gen.uniform(0, 2 * np.pi, n), 0.1 + 0.1 * gen.standard_normal(n)
    x = spec.centers[0] + rho[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    edges = (np.linspace(-0.5, 1.1, 17), np.linspace(-1.0, 0.6, 17))
    masses = np.clip(densities._ring_masses(spec, *edges, refine=1), 0, None)  # as bin_masses does
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=edges)
    assert masses.sum() == pytest.approx(1.0, abs=1e-9)
    se = np.sqrt(n * masses * (1 - masses)) + 1.0
    assert np.abs(counts - n * masses).max() < 5 * se.max()
    assert np.abs((counts - n * masses) / se).max() < 5
    assert np.abs(densities._ring_masses(spec, *edges, refine=2) - masses).max() < 1e-10
    # and the density integrates to 1: along a ray, int 2 pi d p(d) dd (without the mirrored term: 0.84)
    d, wd = np.polynomial.legendre.leggauss(200)
    d, wd = 0.75 * (d + 1), 0.75 * wd
    ray = spec.centers[0] + d[:, None] * np.array([[0.6, 0.8]])
    p = np.exp(densities._ring_log_density(spec, ray))
    assert np.sum(wd * 2 * np.pi * d * p) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("name", "h"), [("moons", 0.015), ("olympic_rings", 0.005), ("8gaussians", 0.01),
                                         ("checkerboard", 0.05)])
def test_log_density_integrates_to_one(name, h):
    box = default_box(name)
    gx, gy = np.meshgrid(np.arange(box[0] - 0.2, box[1] + 0.2, h) + h / 2,
                         np.arange(box[2] - 0.2, box[3] + 0.2, h) + h / 2, indexing="ij")
    logp = log_density(name, np.stack([gx.ravel(), gy.ravel()], axis=1))
    assert logp.shape == (gx.size,)
    assert np.exp(logp).sum() * h * h == pytest.approx(1.0, abs=1e-4)


def test_log_density_values():
    assert log_density("checkerboard", np.array([[-1.5, -1.5], [-0.5, -1.5], [3.0, 0.0]])).tolist() == [
        pytest.approx(-math.log(8)), -math.inf, -math.inf]
    x = torch.tensor([[1.0, 0.0]])  # on a centre of 8gaussians: (1 / 8) N(0; 0, 0.08^2 I)
    assert log_density("8gaussians", x)[0] == pytest.approx(math.log(1 / 8 / (2 * math.pi * 0.08**2)), rel=1e-9)
    # a point on olympic ring 2 (centre (0, 0.5)), away from the crossings: one ring's radial peak
    on_ring = log_density("olympic_rings", np.array([[0.0, 1.5]]))[0]
    assert on_ring == pytest.approx(math.log(0.2 / (0.04 * math.sqrt(2 * math.pi)) / (2 * math.pi)), rel=1e-9)
    # the curve sets' latent quadrature against adaptive quadrature over the upper moon's angle (1/pi density;
    # the lower moon is > 7 sigma away from (0.2, 0.9): e^-28)
    def upper(s: float) -> float:
        return math.exp(-((0.2 - math.cos(s)) ** 2 + (0.9 - math.sin(s)) ** 2) / (2 * 0.06**2))

    integral, _ = quad(upper, 0, math.pi, points=[math.atan2(0.9, 0.2)], epsabs=0, epsrel=1e-13, limit=200)
    p = 0.5 / math.pi * integral / (2 * math.pi * 0.06**2)
    assert log_density("moons", np.array([[0.2, 0.9]]))[0] == pytest.approx(math.log(p), abs=1e-10)


def test_entropy_closed_forms():
    # the 8 modes are 9.6 sigma apart: entropy = ln 8 + ln(2 pi e sigma^2) up to < 1e-6
    assert entropy("8gaussians") == pytest.approx(math.log(8) + math.log(2 * math.pi * math.e * 0.08**2), abs=1e-5)
    assert entropy("checkerboard") == pytest.approx(math.log(8), abs=1e-12)  # uniform on 8 unit squares
    dark = densities._darkness("carpet").numpy()
    p = dark[dark > 0] / dark.sum()
    assert entropy("carpet") == pytest.approx(-np.sum(p * np.log(p / (2 / dark.shape[0]) ** 2)), rel=1e-12)


@pytest.mark.parametrize("name", ["olympic_rings", "four_rings", "moons"])
def test_entropy_matches_monte_carlo_and_is_converged(name):
    logp = log_density(name, draws(name, 40_000, seed=3))
    se = logp.std() / math.sqrt(len(logp))
    assert abs(-logp.mean() - entropy(name)) < 4 * se
    assert abs(entropy(name, refine=2) - entropy(name)) < 1e-5


def test_errors():
    with pytest.raises(ValueError, match="unknown data set 'spiral'.*8gaussians"):
        bin_masses("spiral", np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    with pytest.raises(NotImplementedError, match="pinwheel.*supported"):
        log_density("pinwheel", np.zeros((3, 2)))
    with pytest.raises(NotImplementedError, match="pinwheel"):
        entropy("pinwheel")
    with pytest.raises(ValueError, match="strictly increasing"):
        bin_masses("moons", np.array([0.0, 1.0, 0.5]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="edges_y contains NaN"):
        bin_masses("moons", np.array([0.0, 1.0]), np.array([0.0, np.nan]))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        log_density("moons", np.zeros((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        log_density("moons", np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="refine"):
        bin_masses("moons", np.array([0.0, 1.0]), np.array([0.0, 1.0]), refine=0)
