"""2D toy densities, user point files, and the data scaling used for DiffFlow's 2D experiments.

Every generator has the signature ``fn(n, generator) -> (points, labels)`` with ``points`` a float32
tensor of shape (n, 2) and ``labels`` an int64 tensor of shape (n,) saying which mode (ring, arm,
square, ...) each point came from, e.g. for colouring trajectories. All randomness comes from the given
``torch.Generator`` (a CPU generator), so the same seed gives the same data.

Raw coordinates are of order 1-10; use :class:`Scaler` to bring them to the scale the models train
on (method note §7: scaled to max |coord| 0.85, then standardised).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DATASETS",
    "Scaler",
    "checkerboard",
    "dataset_names",
    "eight_gaussians",
    "four_rings",
    "image_density",
    "load_points",
    "make_dataset",
    "moons",
    "olympic_rings",
    "pinwheel",
    "swiss_roll",
    "two_spirals",
]

Sampler = Callable[[int, torch.Generator], tuple[Tensor, Tensor]]
_F32 = torch.float32


def _rand(n: int, g: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(n, *shape, generator=g, dtype=_F32)


def _randn(n: int, g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(n, *shape, generator=g, dtype=_F32)


def _modes(n: int, k: int, g: torch.Generator) -> Tensor:
    """(n,) int64 mode labels, uniform over k modes."""
    return torch.randint(0, k, (n,), generator=g)


def _rings(n: int, g: torch.Generator, centers: Tensor, radii: Tensor, width: float) -> tuple[Tensor, Tensor]:
    """Points on circles (k centers (k, 2), radii (k,)) with Gaussian radial noise of std ``width``."""
    labels = _modes(n, len(radii), g)
    angle = 2 * math.pi * _rand(n, g)
    radius = radii[labels] + width * _randn(n, g)
    points = centers[labels] + radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
    return points, labels


def olympic_rings(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Five interlocking unit rings laid out like the Olympic logo (3 on top, 2 below); label = ring."""
    centers = torch.tensor([[-2.2, 0.5], [0.0, 0.5], [2.2, 0.5], [-1.1, -0.5], [1.1, -0.5]], dtype=_F32)
    return _rings(n, generator, centers, torch.ones(5, dtype=_F32), width=0.04)


def four_rings(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Four concentric rings of radius 1, 2, 3, 4, equally many points on each; label = ring."""
    return _rings(n, generator, torch.zeros(4, 2, dtype=_F32), torch.arange(1.0, 5.0), width=0.06)


def two_spirals(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaved Archimedean spirals of 1.5 turns (radius up to ~9.4); label = arm."""
    labels = _modes(n, 2, generator)
    s = _rand(n, generator).sqrt() * 3 * math.pi  # sqrt: roughly uniform density along the arc
    arm = torch.stack([-s * s.cos(), s * s.sin()], dim=1)
    sign = 1.0 - 2.0 * labels[:, None].to(_F32)
    return sign * arm + 0.15 * _randn(n, generator, 2), labels


def checkerboard(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Uniform on the 8 dark squares of a 4 x 4 board on [-2, 2]^2; label = square (0..7)."""
    labels = _modes(n, 8, generator)
    row = labels // 2
    col = 2 * (labels % 2) + row % 2  # dark squares: (row + col) even
    corner = torch.stack([col, row], dim=1).to(_F32) - 2.0
    return corner + _rand(n, generator, 2), labels


def swiss_roll(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """2D Swiss roll (angle 1.5π..4.5π, radius = angle); label = position along the roll in 4 bins."""
    u = _rand(n, generator)
    s = 1.5 * math.pi * (1 + 2 * u)
    points = torch.stack([s * s.cos(), s * s.sin()], dim=1) + 0.25 * _randn(n, generator, 2)
    return points, (u * 4).long().clamp_(max=3)


def moons(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two interleaving half circles of radius 1 (as in scikit-learn); label = moon."""
    labels = _modes(n, 2, generator)
    angle = math.pi * _rand(n, generator)
    upper = torch.stack([angle.cos(), angle.sin()], dim=1)
    lower = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], dim=1)
    points = torch.where(labels[:, None] == 0, upper, lower)
    return points + 0.06 * _randn(n, generator, 2), labels


def eight_gaussians(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mixture of 8 Gaussians (std 0.08) evenly spaced on the unit circle; label = component."""
    labels = _modes(n, 8, generator)
    angle = labels.to(_F32) * (2 * math.pi / 8)
    centers = torch.stack([angle.cos(), angle.sin()], dim=1)
    return centers + 0.08 * _randn(n, generator, 2), labels


def pinwheel(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Five curved arms: Gaussian blobs at radius 1 sheared by an angle growing with radius; label = arm."""
    labels = _modes(n, 5, generator)
    radial = 1.0 + 0.3 * _randn(n, generator)
    tangential = 0.08 * _randn(n, generator)
    angle = labels.to(_F32) * (2 * math.pi / 5) + 0.25 * radial.exp()
    cos, sin = angle.cos(), angle.sin()
    points = torch.stack([radial * cos - tangential * sin, radial * sin + tangential * cos], dim=1)
    return points, labels


@cache
def _darkness(picture: str) -> Tensor:
    """(H, W) float64 darkness in [0, 1] (1 = black) of ``sdeflow/assets/<picture>.png``."""
    try:
        import matplotlib.image as mpimg
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"the image density '{picture}' needs matplotlib to read its PNG: pip install matplotlib"
        ) from err
    try:
        ref = resources.files(__package__) / "assets" / f"{picture}.png"
    except (TypeError, OSError):  # namespace package (no __init__.py) seen through an editable install
        ref = Path(__file__).with_name("assets") / f"{picture}.png"
    with resources.as_file(ref) as path:
        img = np.asarray(mpimg.imread(path), dtype=np.float64)
    gray = img[..., :3].mean(axis=-1) if img.ndim == 3 else img
    dark = 1.0 - gray
    if dark.sum() <= 0:
        raise ValueError(f"picture '{picture}' is blank")
    return torch.from_numpy(dark)


def image_density(picture: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sample from a picture: pixel chosen with probability ∝ darkness, then uniform within the pixel.

    The picture fills [-1, 1]^2 (y up). Label = quadrant of the pixel: 0 top-left, 1 top-right,
    2 bottom-left, 3 bottom-right.
    """
    dark = _darkness(picture)
    h, w = dark.shape
    idx = torch.multinomial(dark.flatten(), n, replacement=True, generator=generator)
    row, col = idx // w, idx % w
    jitter = _rand(n, generator, 2)
    x = (col.to(_F32) + jitter[:, 0]) * (2.0 / w) - 1.0
    y = 1.0 - (row.to(_F32) + jitter[:, 1]) * (2.0 / h)
    labels = 2 * (2 * row >= h).long() + (2 * col >= w).long()
    return torch.stack([x, y], dim=1), labels


def _picture(name: str) -> Sampler:
    def sample(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return image_density(name, n, generator)

    sample.__name__ = name
    sample.__doc__ = f"Density drawn from sdeflow/assets/{name}.png; label = quadrant (0..3)."
    return sample


DATASETS: dict[str, Sampler] = {
    "olympic_rings": olympic_rings,
    "four_rings": four_rings,
    "two_spirals": two_spirals,
    "checkerboard": checkerboard,
    "swiss_roll": swiss_roll,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "tree": _picture("tree"),
    "carpet": _picture("carpet"),
}


def dataset_names() -> list[str]:
    """Names of the built-in datasets, in registry order."""
    return list(DATASETS)


def _parse_csv(path: Path) -> tuple[np.ndarray, list[int]]:
    """Rows of a 2-column CSV and their 1-based line numbers; a non-numeric first line is a header."""
    rows: list[list[float]] = []
    line_numbers: list[int] = []
    first = True
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        is_first, first = first, False
        try:
            values = [float(f) for f in line.split(",")]
        except ValueError:
            if is_first:
                continue  # header line
            raise ValueError(f"{path}: line {lineno} is not numeric: {line!r}") from None
        if len(values) != 2:
            raise ValueError(f"{path}: line {lineno} has {len(values)} columns, expected 2 (x,y)")
        rows.append(values)
        line_numbers.append(lineno)
    return np.array(rows, dtype=np.float64).reshape(-1, 2), line_numbers


def load_points(path: str | Path) -> Tensor:
    """Load user points from a ``.npy`` array (n, 2) or a ``.csv`` file with two comma-separated columns.

    A non-numeric first CSV line is taken as a header and skipped. Returns float32 (n, 2).
    Raises ``ValueError`` naming the problem: missing file, wrong extension, not 2 columns,
    NaN/inf (with the row), fewer than 2 points.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    if suffix not in (".npy", ".csv"):
        raise ValueError(f"{path}: unsupported extension '{path.suffix}', expected .npy or .csv")
    line_numbers: list[int] = []
    if suffix == ".csv":
        arr, line_numbers = _parse_csv(path)
    else:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable .npy array ({err})") from None
        if arr.ndim != 2 or arr.shape[1] != 2:
            raise ValueError(f"{path}: array has shape {arr.shape}, expected (n, 2)")
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ValueError(f"{path}: array has dtype {arr.dtype}, expected real numbers")
        arr = arr.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        where = f"line {line_numbers[bad[0]]}" if suffix == ".csv" else f"row {bad[0]} (0-based)"
        raise ValueError(f"{path}: {where} has a NaN or infinite value ({bad.size} bad rows in all)")
    if len(arr) < 2:
        raise ValueError(f"{path}: found {len(arr)} point(s), need at least 2")
    return torch.from_numpy(arr).to(_F32)


def check_source(name_or_path: str | Path) -> None:
    """Refuse, before any work, what is neither a registry name nor an existing ``.npy``/``.csv`` file.

    Raises:
        ValueError: ``unknown dataset`` (listing the registry) or ``file not found``.

    Example:
        >>> check_source("moons")
        >>> check_source("moon")
        Traceback (most recent call last):
        ...
        ValueError: unknown dataset 'moon'; available: ...
    """
    name = str(name_or_path)
    if name in DATASETS:
        return
    path = Path(name)
    if path.suffix.lower() not in (".npy", ".csv"):
        raise ValueError(f"unknown dataset '{name}'; available: {', '.join(DATASETS)} (or a path to a .npy/.csv file)")
    if not path.is_file():
        raise ValueError(f"{path}: file not found")


def make_dataset(name_or_path: str | Path, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points (n, 2) float32 and labels (n,) int64 from a registry name or a .npy/.csv path.

    For a file, labels are all zero and the points are shuffled with ``generator``: a random subset
    without replacement if n <= len(file), otherwise every point once plus (n - len) redrawn with
    replacement.
    """
    name = str(name_or_path)
    if name in DATASETS:
        return DATASETS[name](n, generator)
    path = Path(name_or_path)
    if path.suffix.lower() not in (".npy", ".csv") and not path.exists():
        raise ValueError(
            f"unknown dataset '{name}'; available: {', '.join(DATASETS)} (or a path to a .npy/.csv file)"
        )
    points = load_points(path)
    m = len(points)
    idx = torch.randperm(m, generator=generator)[:n]
    if n > m:
        extra = torch.randint(0, m, (n - m,), generator=generator)
        idx = torch.cat([idx, extra])[torch.randperm(n, generator=generator)]
    return points[idx], torch.zeros(n, dtype=torch.long)


@dataclass
class Scaler:
    """Affine map of §7: ``y = (x * scale - mean) / std`` with ``scale = 0.85 / max|x|``.

    ``scale`` is a float; ``mean`` and ``std`` are per-coordinate float64 tensors of shape (D,).
    """

    scale: float
    mean: Tensor
    std: Tensor

    MAX_ABS: ClassVar[float] = 0.85

    @classmethod
    def fit(cls, points: Tensor) -> Scaler:
        """Fit to ``points`` (n, D): global max-abs scaling, then per-coordinate mean/std (population)."""
        x = points.detach().to(torch.float64).cpu()
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"Scaler.fit needs points of shape (n >= 2, D), got {tuple(points.shape)}")
        max_abs = x.abs().max().item()
        if not math.isfinite(max_abs) or max_abs == 0:
            raise ValueError(f"Scaler.fit: max |coord| is {max_abs}; points must be finite and not all 0")
        scaled = x * (cls.MAX_ABS / max_abs)
        std = scaled.std(dim=0, unbiased=False)
        if (std == 0).any():
            raise ValueError("Scaler.fit: a coordinate is constant, cannot standardise it")
        return cls(cls.MAX_ABS / max_abs, scaled.mean(dim=0), std)

    def transform(self, x: Tensor) -> Tensor:
        """Data (..., D) -> model space (..., D), same dtype/device as ``x``."""
        mean, std = self.mean.to(x), self.std.to(x)
        return (x * self.scale - mean) / std

    def inverse(self, y: Tensor) -> Tensor:
        """Model space (..., D) -> data (..., D); exactly undoes :meth:`transform` (up to rounding)."""
        mean, std = self.mean.to(y), self.std.to(y)
        return (y * std + mean) / self.scale

    def state_dict(self) -> dict[str, float | list[float]]:
        """Plain-Python state (floats and lists), safe for checkpoints and JSON."""
        return {"scale": float(self.scale), "mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_state_dict(cls, state: dict) -> Scaler:
        """Rebuild from :meth:`state_dict` output."""
        return cls(
            float(state["scale"]),
            torch.tensor(state["mean"], dtype=torch.float64),
            torch.tensor(state["std"], dtype=torch.float64),
        )
