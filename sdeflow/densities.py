"""Exact densities of the built-in 2D data sets (:mod:`sdeflow.data`), in raw data coordinates.

Sample quality can then be scored against the truth instead of a finite held-out sample: exact bin
probabilities for a binned KL (:func:`sdeflow.metrics.binned_kl`), exact log-densities for the test NLL of
samples, and the true differential entropy, the floor of any model's test NLL.

Every set is one of three kinds, each read off its generator in :mod:`sdeflow.data`:

- **isotropic Gaussians along a curve** (``8gaussians``, ``moons``, ``two_spirals``, ``swiss_roll``):
  ``x = mu(s) + sigma * eps`` with a 1-D latent ``s`` of density ``q(s)`` (or 8 discrete centres), so
  ``p(x) = int q(s) N(x; mu(s), sigma^2 I) ds``. The latent integral is replaced by composite Gauss-Legendre
  nodes, panels of equal arc length ``2 sigma`` along the curve, 8 nodes each. Each node's Gaussian is
  integrated over a rectangle exactly (a product of two normal-CDF differences).
- **rings** (``olympic_rings``, ``four_rings``): angle ``theta ~ U[0, 2 pi)``, radius
  ``rho = r + w z`` with ``z ~ N(0, 1)``, ``x = c + rho (cos theta, sin theta)``. The map
  ``(rho, theta) -> x`` has Jacobian ``|rho|``, and a negative radius draw lands on the opposite side, so
  with ``d = |x - c|``::

      p(x) = [N(d; r, w^2) + N(-d; r, w^2)] / (2 pi d)

  exactly. Bin probabilities integrate over the radius the exact angular measure of the circle of radius
  ``rho`` inside a quadrant (closed form), so only a 1-D integral over ``rho`` is numerical. That measure has
  square-root kinks at the radii where the circle touches a side line or passes the corner: the integral is
  split there, with pieces shrinking geometrically towards each kink, and done by Gauss-Legendre (after a
  cosine substitution, which makes the square roots smooth, on the pieces next to a kink). Radii beyond
  ``r +- 12 w`` are dropped: mass < 1e-32.
- **piecewise constant** (``checkerboard``, ``tree``, ``carpet``): uniform within cells of a grid; bin
  probabilities are exact rectangle-overlap areas.

``pinwheel`` is not supported: its tangential noise lives in a frame that turns with the radius, so a bin's
probability is a genuinely 2-D integral with kinks and near-jumps that fixed quadrature does not resolve to
1e-8; the functions here raise ``NotImplementedError`` for it.

Accuracy (checked in ``tests/sdeflow/test_densities.py``): bin probabilities change < 1e-8 when the
quadrature nodes are doubled, and sum to 1 within 1e-6 over a box covering the support.

Example:
    >>> edges = np.linspace(-2.0, 2.0, 5)
    >>> float(bin_masses("checkerboard", edges, edges).sum())
    1.0
    >>> round(entropy("checkerboard"), 4)  # uniform on 8 unit squares: ln 8
    2.0794
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import torch
from scipy.spatial import cKDTree
from scipy.special import logsumexp, ndtr

from .data import DATASETS, _darkness

__all__ = ["bin_masses", "default_box", "entropy", "log_density", "supported"]

Box = tuple[float, float, float, float]  # (x_min, x_max, y_min, y_max)

_GL_ORDER = 8  # Gauss-Legendre nodes per curve panel
_PANEL_SIGMAS = 2.0  # curve panel length in units of the noise std: the integrand is smooth on that scale
_BOX_SIGMAS = 4.5  # default box margin: mass outside < 4 * Phi(-4.5) ~ 1.4e-5
_RING_SIGMAS = 12.0  # radial truncation of a ring: dropped mass ~ 2 Phi(-12) ~ 4e-33
_RING_PIECES = 16  # equal radial pieces (1.5 w each) before splitting at the kinks
_RING_ORDER = 10  # Gauss-Legendre nodes per radial piece
_RING_GRADING, _RING_LEVELS = 6.0, 4  # pieces shrink by 6x, 4 times, towards each kink of the integrand
_LOG_2PI = math.log(2.0 * math.pi)
_UNSUPPORTED = {
    "pinwheel": "its tangential noise is in a frame that rotates with the radius, so bin probabilities need a "
                "2-D integral that fixed quadrature does not resolve to 1e-8"
}


# ---------------------------------------------------------------------------------------------------------
# the three kinds of density


@dataclass(frozen=True)
class _Curve:
    """Curve ``mu(s)`` (s in [lo, hi]) with speed ``|mu'(s)|``, latent density ``q(s)`` and mixture weight."""

    mean: Callable[[np.ndarray], np.ndarray]
    speed: Callable[[np.ndarray], np.ndarray]
    pdf: Callable[[np.ndarray], np.ndarray]
    lo: float
    hi: float
    weight: float


@dataclass(frozen=True, eq=False)
class _Nodes:
    """Mixture of isotropic Gaussians: means (J, 2), weights (J,) summing to 1, common std ``sigma``."""

    means: np.ndarray
    weights: np.ndarray
    sigma: float

    @cached_property
    def tree(self) -> cKDTree:
        return cKDTree(self.means)


@dataclass(frozen=True)
class _Rings:
    """Rings: centres (K, 2), radii (K,), mixture weights (K,), radial noise std ``width``."""

    centers: np.ndarray
    radii: np.ndarray
    weights: np.ndarray
    width: float


@dataclass(frozen=True)
class _Grid:
    """Piecewise constant: cell edges (nx + 1,), (ny + 1,) and cell probabilities (nx, ny) summing to 1."""

    edges_x: np.ndarray
    edges_y: np.ndarray
    probs: np.ndarray


@cache
def _leggauss(n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(n)


def _curve_nodes(curves: list[_Curve], panel: float, order: int = _GL_ORDER) -> tuple[np.ndarray, np.ndarray]:
    """Composite Gauss-Legendre nodes on each curve, panels of equal arc length ~``panel``."""
    x, w = _leggauss(order)
    means, weights = [], []
    for c in curves:
        fine = np.linspace(c.lo, c.hi, 4097)
        speed = c.speed(fine)
        arc = np.concatenate([[0.0], np.cumsum(0.5 * (speed[1:] + speed[:-1]) * np.diff(fine))])
        n_panels = max(1, math.ceil(arc[-1] / panel))
        # panel ends need not be at exact arc lengths: any partition is a valid quadrature
        bounds = np.interp(np.linspace(0.0, arc[-1], n_panels + 1), arc, fine)
        half, mid = np.diff(bounds)[:, None] / 2, (bounds[1:] + bounds[:-1])[:, None] / 2
        s = (mid + half * x).ravel()
        means.append(c.mean(s))
        weights.append(c.weight * c.pdf(s) * (half * w).ravel())
    return np.concatenate(means), np.concatenate(weights)


def _moons_curves() -> list[_Curve]:
    def upper(s: np.ndarray) -> np.ndarray:
        return np.stack([np.cos(s), np.sin(s)], axis=1)

    def lower(s: np.ndarray) -> np.ndarray:
        return np.stack([1.0 - np.cos(s), 0.5 - np.sin(s)], axis=1)

    def unit(s: np.ndarray) -> np.ndarray:
        return np.ones_like(s)

    def uniform(s: np.ndarray) -> np.ndarray:
        return np.full_like(s, 1.0 / math.pi)

    return [_Curve(upper, unit, uniform, 0.0, math.pi, 0.5), _Curve(lower, unit, uniform, 0.0, math.pi, 0.5)]


def _spiral_curves() -> list[_Curve]:
    top = 3.0 * math.pi

    def arm(sign: float) -> Callable[[np.ndarray], np.ndarray]:
        return lambda s: sign * np.stack([-s * np.cos(s), s * np.sin(s)], axis=1)

    def speed(s: np.ndarray) -> np.ndarray:
        return np.sqrt(1.0 + s * s)

    def pdf(s: np.ndarray) -> np.ndarray:  # s = 3 pi sqrt(u): P(s <= t) = (t / 3 pi)^2
        return 2.0 * s / top**2

    return [_Curve(arm(1.0), speed, pdf, 0.0, top, 0.5), _Curve(arm(-1.0), speed, pdf, 0.0, top, 0.5)]


def _swiss_roll_curves() -> list[_Curve]:
    def mean(s: np.ndarray) -> np.ndarray:
        return np.stack([s * np.cos(s), s * np.sin(s)], axis=1)

    def speed(s: np.ndarray) -> np.ndarray:
        return np.sqrt(1.0 + s * s)

    def pdf(s: np.ndarray) -> np.ndarray:
        return np.full_like(s, 1.0 / (3.0 * math.pi))

    return [_Curve(mean, speed, pdf, 1.5 * math.pi, 4.5 * math.pi, 1.0)]


_CURVES: dict[str, tuple[Callable[[], list[_Curve]], float]] = {
    "moons": (_moons_curves, 0.06),
    "two_spirals": (_spiral_curves, 0.15),
    "swiss_roll": (_swiss_roll_curves, 0.25),
}


def _picture_grid(picture: str) -> _Grid:
    dark = _darkness(picture).numpy()
    h, w = dark.shape
    # row 0 is the top of the picture (y = 1); cells are indexed (x, y) with y increasing
    probs = dark[::-1, :].T / dark.sum()
    return _Grid(np.linspace(-1.0, 1.0, w + 1), np.linspace(-1.0, 1.0, h + 1), np.ascontiguousarray(probs))


def _checkerboard_grid() -> _Grid:
    col, row = np.meshgrid(np.arange(4), np.arange(4), indexing="ij")
    probs = np.where((col + row) % 2 == 0, 1.0 / 8.0, 0.0)  # dark squares: (row + col) even
    edges = np.linspace(-2.0, 2.0, 5)
    return _Grid(edges, edges.copy(), probs)


@cache
def _spec(name: str, refine: int = 1) -> _Nodes | _Rings | _Grid:
    """The density of data set ``name``; ``refine`` multiplies the quadrature nodes (convergence checks)."""
    if name in _UNSUPPORTED:
        raise NotImplementedError(f"no exact density for '{name}': {_UNSUPPORTED[name]}; "
                                  f"supported: {', '.join(supported())}")
    if name not in DATASETS:
        raise ValueError(f"unknown data set '{name}'; exact densities exist for: {', '.join(supported())}")
    if refine < 1:
        raise ValueError(f"refine must be >= 1, got {refine}")
    if name == "8gaussians":
        angle = np.arange(8) * (2.0 * math.pi / 8.0)
        return _Nodes(np.stack([np.cos(angle), np.sin(angle)], axis=1), np.full(8, 1.0 / 8.0), 0.08)
    if name in _CURVES:
        make, sigma = _CURVES[name]
        means, weights = _curve_nodes(make(), _PANEL_SIGMAS * sigma / refine)
        return _Nodes(means, weights, sigma)
    if name == "olympic_rings":
        centers = np.array([[-2.2, 0.5], [0.0, 0.5], [2.2, 0.5], [-1.1, -0.5], [1.1, -0.5]])
        return _Rings(centers, np.ones(5), np.full(5, 0.2), 0.04)
    if name == "four_rings":
        return _Rings(np.zeros((4, 2)), np.arange(1.0, 5.0), np.full(4, 0.25), 0.06)
    if name == "checkerboard":
        return _checkerboard_grid()
    return _picture_grid(name)


def supported() -> list[str]:
    """Names of the built-in data sets with exact densities, in registry order.

    Example:
        >>> "pinwheel" in supported(), "8gaussians" in supported()
        (False, True)
    """
    return [name for name in DATASETS if name not in _UNSUPPORTED]


def default_box(name: str) -> Box:
    """``(x_min, x_max, y_min, y_max)`` holding the support of ``name`` with margin: mass outside < 1e-4.

    Gaussian parts get ``4.5 sigma`` beyond their centres (4.5 ``w`` beyond a ring's radius), so the mass
    outside is below ``4 Phi(-4.5) ~ 1.4e-5``; piecewise-constant sets get their exact support box.

    Example:
        >>> default_box("checkerboard")
        (-2.0, 2.0, -2.0, 2.0)
    """
    spec = _spec(name)
    if isinstance(spec, _Grid):
        lo = (spec.edges_x[0], spec.edges_y[0])
        hi = (spec.edges_x[-1], spec.edges_y[-1])
    elif isinstance(spec, _Rings):
        reach = (spec.radii + _BOX_SIGMAS * spec.width)[:, None]
        lo, hi = (spec.centers - reach).min(axis=0), (spec.centers + reach).max(axis=0)
    else:
        lo = spec.means.min(axis=0) - _BOX_SIGMAS * spec.sigma
        hi = spec.means.max(axis=0) + _BOX_SIGMAS * spec.sigma
    return float(lo[0]), float(hi[0]), float(lo[1]), float(hi[1])


# ---------------------------------------------------------------------------------------------------------
# bin probabilities


def _ndtr_diff(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``Phi(hi) - Phi(lo)`` without cancellation in the upper tail."""
    upper = lo > 0
    return np.where(upper, ndtr(-lo) - ndtr(-hi), ndtr(hi) - ndtr(lo))


def _node_masses(spec: _Nodes, ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    # each node's Gaussian factorises over x and y, so the sum over nodes is one matrix product
    zx = (ex[None, :] - spec.means[:, :1]) / spec.sigma
    zy = (ey[None, :] - spec.means[:, 1:]) / spec.sigma
    dx = _ndtr_diff(zx[:, :-1], zx[:, 1:])
    dy = _ndtr_diff(zy[:, :-1], zy[:, 1:])
    return (dx * spec.weights[:, None]).T @ dy


def _overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a) - 1, len(b) - 1) lengths of the overlaps of the intervals between edges ``a`` and ``b``."""
    lo = np.maximum(a[:-1, None], b[None, :-1])
    hi = np.minimum(a[1:, None], b[None, 1:])
    return np.clip(hi - lo, 0.0, None)


def _grid_masses(spec: _Grid, ex: np.ndarray, ey: np.ndarray) -> np.ndarray:
    ox = _overlap(ex, spec.edges_x) / np.diff(spec.edges_x)
    oy = _overlap(ey, spec.edges_y) / np.diff(spec.edges_y)
    return ox @ spec.probs @ oy.T


def _quadrant_angle(rho: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angular measure of ``{theta : rho cos(theta) <= a, rho sin(theta) <= b}`` (rho > 0), in radians.

    ``cos <= a / rho`` is the arc ``[alpha, 2 pi - alpha]``; ``sin <= b / rho`` is ``[pi - beta, 2 pi + beta]``,
    which wraps past 2 pi to ``[0, beta]`` when ``beta > 0``. Clipping the ratios to [-1, 1] gives the full or
    empty arcs.
    """
    rho = np.maximum(rho, 1e-300)  # zero-length pieces at rho = 0 (their weight is 0) must not give 0 / 0
    alpha = np.arccos(np.clip(a / rho, -1.0, 1.0))
    beta = np.arcsin(np.clip(b / rho, -1.0, 1.0))
    lo1, hi1 = alpha, 2.0 * np.pi - alpha
    main = np.minimum(hi1, np.minimum(2.0 * np.pi, 2.0 * np.pi + beta)) - np.maximum(lo1, np.pi - beta)
    wrap = np.minimum(hi1, np.maximum(beta, 0.0)) - lo1
    return np.clip(main, 0.0, None) + np.clip(wrap, 0.0, None)


def _ring_cdf(r: float, w: float, a: np.ndarray, b: np.ndarray, refine: int) -> np.ndarray:
    """``P(X - c <= a, Y - c <= b)`` for one ring, at corner offsets ``a``, ``b`` (m,)."""
    lo, hi = max(0.0, r - _RING_SIGMAS * w), r + _RING_SIGMAS * w
    x_norm = np.sum(_radial_weight(np.array([lo, hi]), r, w, refine)[1])  # total radial mass in the window
    out = np.where((a >= hi) & (b >= hi), x_norm, 0.0)
    todo = np.flatnonzero((np.minimum(a, b) > -hi) & ~((a >= hi) & (b >= hi)))  # the rest see 0 or all
    if len(todo) == 0:
        return out
    # a side beyond the window cuts nothing: clamping it to the window makes grid corners repeat
    corners, inverse = np.unique(np.minimum(np.stack([a[todo], b[todo]], axis=1), hi), axis=0,
                                 return_inverse=True)
    a, b = corners[:, 0], corners[:, 1]
    n_even = _RING_PIECES * refine
    step = (hi - lo) / n_even
    # the quadrant's angular measure has square-root kinks where the circle touches a side line or passes the
    # corner: pieces end there, shrinking geometrically towards each kink so that one lying just outside a
    # piece (two kinks close together) stays resolved
    kinks = np.stack([np.abs(a), np.abs(b), np.hypot(a, b)], axis=1)[:, :, None]
    offsets = step * _RING_GRADING ** -np.arange(1.0, _RING_LEVELS + 1)
    graded = np.clip(kinks + np.concatenate([-offsets, [0.0], offsets]), lo, hi).reshape(len(a), -1)
    kind = np.tile(np.r_[np.ones(_RING_LEVELS), 2.0, np.ones(_RING_LEVELS)], 3)  # 1 graded, 2 kink
    even = np.broadcast_to(np.linspace(lo, hi, n_even + 1), (len(a), n_even + 1))
    ends = np.concatenate([even, graded], axis=1)
    kind = np.concatenate([np.zeros(n_even + 1), kind])[np.argsort(ends, axis=1, kind="stable")]
    ends = np.sort(ends, axis=1)
    # the cosine map (clustering nodes at both ends) for pieces at a kink or inside the graded zone; plain
    # Gauss-Legendre for the rest, where it resolves the Gaussian with fewer nodes
    cos_map = (np.minimum(kind[:, :-1], kind[:, 1:]) >= 1) | (np.maximum(kind[:, :-1], kind[:, 1:]) == 2)
    rho, jac = _radial_nodes(ends[:, :-1], np.diff(ends, axis=1), cos_map, refine)
    dens = _radial_density(rho, r, w)
    angle = _quadrant_angle(rho, a[:, None, None], b[:, None, None])
    out[todo] = (np.sum(dens * angle * jac, axis=(1, 2)) / (2.0 * np.pi))[inverse.ravel()]
    return out


def _radial_nodes(lo: np.ndarray, length: np.ndarray, cos_map: np.ndarray, refine: int) -> tuple[np.ndarray, ...]:
    """Quadrature nodes and weights (..., Q) on pieces ``[lo, lo + length]``, cosine-mapped where asked."""
    u, wq = _leggauss(_RING_ORDER * refine)
    phi = (u + 1.0) * (np.pi / 2.0)
    # t = (1 - cos phi) / 2 makes sqrt(t) and sqrt(1 - t) smooth in phi: square-root endpoints become analytic
    t = np.where(cos_map[..., None], 0.5 - 0.5 * np.cos(phi), 0.5 * (u + 1.0))
    dt = np.where(cos_map[..., None], (np.pi / 4.0) * np.sin(phi) * wq, 0.5 * wq)
    return lo[..., None] + length[..., None] * t, length[..., None] * dt


def _radial_density(rho: np.ndarray, r: float, w: float) -> np.ndarray:
    """Density of |radius| at rho >= 0: a draw -rho at angle theta is the point rho at theta + pi."""
    return (np.exp(-0.5 * ((rho - r) / w) ** 2) + np.exp(-0.5 * ((rho + r) / w) ** 2)) / (w * math.sqrt(2 * np.pi))


def _radial_weight(window: np.ndarray, r: float, w: float, refine: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the radial density on ``window`` = [lo, hi] with the even pieces (no kinks)."""
    n_even = _RING_PIECES * refine
    ends = np.linspace(window[0], window[1], n_even + 1)
    rho, jac = _radial_nodes(ends[:-1], np.diff(ends), np.zeros(n_even, dtype=bool), refine)
    return rho, _radial_density(rho, r, w) * jac


def _ring_masses(spec: _Rings, ex: np.ndarray, ey: np.ndarray, refine: int) -> np.ndarray:
    gx, gy = np.meshgrid(ex, ey, indexing="ij")
    cdf = np.zeros(gx.shape)
    for c, r, p in zip(spec.centers, spec.radii, spec.weights, strict=True):
        cdf += p * _ring_cdf(float(r), spec.width, (gx - c[0]).ravel(), (gy - c[1]).ravel(), refine).reshape(gx.shape)
    return cdf[1:, 1:] - cdf[:-1, 1:] - cdf[1:, :-1] + cdf[:-1, :-1]


def _check_edges(edges: np.ndarray, axis: str) -> np.ndarray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2:
        raise ValueError(f"edges_{axis} must be a 1-D array of >= 2 edges, got shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError(f"edges_{axis} contains NaN or infinite values")
    if not (np.diff(e) > 0).all():
        raise ValueError(f"edges_{axis} must be strictly increasing")
    return e


def bin_masses(name: str, edges_x: np.ndarray, edges_y: np.ndarray, *, refine: int = 1) -> np.ndarray:
    """Exact probability of each rectangle ``[ex_i, ex_{i+1}) x [ey_j, ey_{j+1})`` under data set ``name``.

    ``P_ij = int_{bin ij} p(x) dx``, float64 of shape ``(len(edges_x) - 1, len(edges_y) - 1)``; the total is
    the mass inside the box spanned by the edges. Closed form for ``8gaussians`` (products of normal-CDF
    differences), ``checkerboard`` and the pictures (overlap areas); accurate quadrature over a 1-D latent for
    the others (see the module docstring). ``refine`` multiplies the quadrature nodes, for convergence checks.
    Raises ``ValueError`` for an unknown name or bad edges, ``NotImplementedError`` for ``pinwheel``.

    Example:
        >>> e = np.array([-5.0, 0.5, 5.0])  # 3 of the 8 centres have x > 0.5 (by 0.21 = 2.6 sigma or more)
        >>> bin_masses("8gaussians", e, np.array([-5.0, 5.0])).round(3)
        array([[0.626],
               [0.374]])
    """
    spec = _spec(name, refine)
    ex, ey = _check_edges(edges_x, "x"), _check_edges(edges_y, "y")
    if isinstance(spec, _Nodes):
        masses = _node_masses(spec, ex, ey)
    elif isinstance(spec, _Grid):
        masses = _grid_masses(spec, ex, ey)
    else:
        masses = _ring_masses(spec, ex, ey, refine)
    return np.clip(masses, 0.0, None)  # rounding can leave -1e-17 where the mass is 0


# ---------------------------------------------------------------------------------------------------------
# log-density and entropy


_CHUNK = 2048  # points per block of a dense (points x nodes) matrix: memory ~ _CHUNK * J doubles
_NEAREST = 128  # nodes summed per point; the rest are bounded and must be negligible
_TAIL = math.log(1e-14)  # largest relative share the nodes left out may have


def _dense_log_sum(spec: _Nodes, x: np.ndarray) -> np.ndarray:
    """``log sum_j w_j exp(-|x - mu_j|^2 / 2 sigma^2)`` over all nodes, in row blocks."""
    log_w = np.log(spec.weights)
    m2 = np.sum(spec.means**2, axis=1)
    out = np.empty(len(x))
    for start in range(0, len(x), _CHUNK):
        xb = x[start:start + _CHUNK]
        d2 = np.clip(np.sum(xb**2, axis=1)[:, None] + m2[None, :] - 2.0 * xb @ spec.means.T, 0.0, None)
        out[start:start + _CHUNK] = logsumexp(log_w - d2 / (2.0 * spec.sigma**2), axis=1)
    return out


def _node_log_density(spec: _Nodes, x: np.ndarray) -> np.ndarray:
    k = min(_NEAREST, len(spec.weights))
    dist, idx = spec.tree.query(x, k=k)
    dist, idx = dist.reshape(len(x), k), idx.reshape(len(x), k)
    log_sum = logsumexp(np.log(spec.weights)[idx] - dist**2 / (2.0 * spec.sigma**2), axis=1)
    if k < len(spec.weights):
        # the left-out nodes (weights summing to <= 1) are all at least as far as the k-th nearest
        far = -dist[:, -1] ** 2 / (2.0 * spec.sigma**2) - log_sum > _TAIL
        if far.any():  # e.g. a point far from the curve sees many nodes at similar distances
            log_sum[far] = _dense_log_sum(spec, x[far])
    return log_sum - _LOG_2PI - 2.0 * math.log(spec.sigma)


def _ring_log_density(spec: _Rings, x: np.ndarray) -> np.ndarray:
    terms = []
    w = spec.width
    with np.errstate(divide="ignore"):  # d = 0 (a ring's centre) has infinite density: log = +inf
        for c, r, p in zip(spec.centers, spec.radii, spec.weights, strict=True):
            d = np.hypot(x[:, 0] - c[0], x[:, 1] - c[1])
            radial = np.logaddexp(-0.5 * ((d - r) / w) ** 2, -0.5 * ((d + r) / w) ** 2)
            terms.append(math.log(p) + radial - 0.5 * _LOG_2PI - math.log(w) - _LOG_2PI - np.log(d))
    return logsumexp(np.stack(terms), axis=0)


def _grid_log_density(spec: _Grid, x: np.ndarray) -> np.ndarray:
    ex, ey = spec.edges_x, spec.edges_y
    ix = np.clip(np.searchsorted(ex, x[:, 0], side="right") - 1, 0, len(ex) - 2)
    iy = np.clip(np.searchsorted(ey, x[:, 1], side="right") - 1, 0, len(ey) - 2)
    inside = (x[:, 0] >= ex[0]) & (x[:, 0] <= ex[-1]) & (x[:, 1] >= ey[0]) & (x[:, 1] <= ey[-1])
    area = np.diff(ex)[ix] * np.diff(ey)[iy]
    prob = np.where(inside, spec.probs[ix, iy], 0.0)
    with np.errstate(divide="ignore"):
        return np.log(prob) - np.log(area)


def _log_density(spec: _Nodes | _Rings | _Grid, x: np.ndarray) -> np.ndarray:
    if isinstance(spec, _Nodes):
        return _node_log_density(spec, x)
    if isinstance(spec, _Rings):
        return _ring_log_density(spec, x)
    return _grid_log_density(spec, x)


def log_density(name: str, points: torch.Tensor | np.ndarray) -> np.ndarray:
    """Exact ``log p(x)`` in nats of data set ``name`` at ``points`` ``(n, 2)`` (raw coordinates) -> ``(n,)``.

    ``-inf`` outside the support of ``checkerboard`` and the pictures. For the curve sets the latent integral
    ``p(x) = int q(s) N(x; mu(s), sigma^2 I) ds`` is computed with the quadrature nodes of :func:`bin_masses`
    (relative error < 1e-9), for rings the closed form of the module docstring. Cost ~ n x (number of nodes):
    about 0.5 s for 10k points of ``two_spirals``.

    Example:
        >>> float(np.exp(log_density("checkerboard", np.array([[-1.5, -1.5], [-0.5, -1.5]]))).round(3).max())
        0.125
    """
    spec = _spec(name)
    x = torch.as_tensor(points).detach().to("cpu", torch.float64).numpy()
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"points must have shape (n, 2), got {tuple(x.shape)}")
    if not np.isfinite(x).all():
        raise ValueError("points contain NaN or infinite values")
    return _log_density(spec, x)


def _node_entropy(name: str, spec: _Nodes, refine: int) -> float:
    # outer latent integral on a coarser set of nodes: E_eps[log p(mu(s) + sigma eps)] varies with s on the
    # curve's scale, not the noise's
    if name in _CURVES:
        make, _ = _CURVES[name]
        outer_means, outer_w = _curve_nodes(make(), 1.0 / refine)
    else:
        outer_means, outer_w = spec.means, spec.weights
    z, wz = np.polynomial.hermite_e.hermegauss(6 * refine)
    wz = wz / wz.sum()
    ez = np.stack(np.meshgrid(z, z, indexing="ij"), axis=-1).reshape(-1, 2)
    wzz = np.outer(wz, wz).ravel()
    pts = (outer_means[:, None, :] + spec.sigma * ez[None]).reshape(-1, 2)
    logp = _node_log_density(spec, pts).reshape(len(outer_means), -1)
    return float(-np.sum(outer_w[:, None] * wzz[None, :] * logp))


def _ring_entropy(spec: _Rings, refine: int) -> float:
    n_theta = 2048 * refine  # periodic trapezoid rule: resolves the crossings, where log p bends within ~w
    theta = np.arange(n_theta) * (2.0 * np.pi / n_theta)
    u, wu = _leggauss(64 * refine)
    z = _RING_SIGMAS * u
    wz = _RING_SIGMAS * wu * np.exp(-0.5 * z * z) / math.sqrt(2.0 * np.pi)
    total = 0.0
    for c, r, p in zip(spec.centers, spec.radii, spec.weights, strict=True):
        rho = r + spec.width * z
        pts = c + (rho[:, None, None] * np.stack([np.cos(theta), np.sin(theta)], axis=-1)[None]).reshape(-1, 2)
        logp = _ring_log_density(spec, pts).reshape(len(z), n_theta)
        total -= p * float(np.sum(wz[:, None] * logp) / n_theta)
    return total


def _grid_entropy(spec: _Grid) -> float:
    area = np.outer(np.diff(spec.edges_x), np.diff(spec.edges_y))
    keep = spec.probs > 0
    p = spec.probs[keep]
    return float(-np.sum(p * (np.log(p) - np.log(area[keep]))))


@cache
def entropy(name: str, refine: int = 1) -> float:
    """True differential entropy ``H = -int p log p dx`` in nats of data set ``name`` (cached).

    By quadrature, not Monte Carlo: exact sums for piecewise-constant sets; for Gaussians along a curve,
    ``H = -sum_j w_j E_eps[log p(mu_j + sigma eps)]`` with 6 x 6 Gauss-Hermite points per latent node
    (latent nodes 1 unit of arc length apart: the inner mean varies on the curve's scale); for
    rings, a trapezoid rule over the angle times Gauss-Legendre over the radial noise. ``refine`` multiplies
    the nodes (for convergence checks; refine=2 moves the value by < 1e-5). A model's test NLL is >= H up to
    sampling noise.

    Example:
        >>> round(entropy("8gaussians"), 4)  # ln 8 + ln(2 pi e 0.08^2): the modes barely overlap
        -0.1341
    """
    spec = _spec(name, refine)
    if isinstance(spec, _Grid):
        return _grid_entropy(spec)
    if isinstance(spec, _Rings):
        return _ring_entropy(spec, refine)
    return _node_entropy(name, spec, refine)
