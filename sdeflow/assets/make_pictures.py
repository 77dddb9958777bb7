"""Draw the pictures behind the image-defined 2D densities (``tree`` and ``carpet``).

Run once from the repository root; the PNGs it writes are committed::

    python sdeflow/assets/make_pictures.py

Both pictures are black shapes on a white background, drawn with numpy only and written as
grayscale PNGs with matplotlib. The output is deterministic.

- ``tree.png`` (128 x 128): a symmetric fractal tree, 9 levels of binary branching, anti-aliased.
- ``carpet.png`` (162 x 162): a level-4 Sierpinski carpet (81 x 81 cells, each 2 x 2 pixels).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _tree_segments(depth: int = 9) -> list[tuple[float, float, float, float, float]]:
    """Segments (x0, y0, x1, y1, half_width) of a fractal tree, in a [-1, 1]^2 frame with y up."""
    segments: list[tuple[float, float, float, float, float]] = []
    spread = math.radians(28.0)
    ratio = 0.74

    def grow(x: float, y: float, angle: float, length: float, width: float, level: int) -> None:
        x1, y1 = x + length * math.cos(angle), y + length * math.sin(angle)
        segments.append((x, y, x1, y1, width))
        if level == 0:
            return
        for turn in (-spread, spread):
            grow(x1, y1, angle + turn, length * ratio, max(width * 0.72, 0.008), level - 1)

    grow(0.0, -0.95, math.pi / 2, 0.48, 0.05, depth)
    return segments


def draw_tree(size: int = 128) -> np.ndarray:
    """Gray image (size, size) in [0, 1], 1 = white, of the fractal tree."""
    coords = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    px, py = np.meshgrid(coords, coords[::-1])  # row 0 is the top of the picture
    pixel = 2.0 / size
    ink = np.zeros((size, size))
    for x0, y0, x1, y1, half in _tree_segments():
        dx, dy = x1 - x0, y1 - y0
        u = np.clip(((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
        dist = np.hypot(px - (x0 + u * dx), py - (y0 + u * dy))
        # coverage of a pixel by a stroke of half-width `half`, linear ramp over one pixel
        ink = np.maximum(ink, np.clip((half - dist) / pixel + 0.5, 0.0, 1.0))
    return 1.0 - ink


def draw_carpet(level: int = 4, upscale: int = 2) -> np.ndarray:
    """Gray image of a Sierpinski carpet, (3**level * upscale) pixels square, 1 = white."""
    filled = np.ones((1, 1))
    hole = np.array([[1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=float)
    for _ in range(level):
        filled = np.kron(hole, filled)
    filled = np.kron(filled, np.ones((upscale, upscale)))
    return 1.0 - filled


def main() -> None:
    import matplotlib.image as mpimg

    for name, gray in (("tree", draw_tree()), ("carpet", draw_carpet())):
        path = HERE / f"{name}.png"
        mpimg.imsave(path, gray, cmap="gray", vmin=0.0, vmax=1.0, pil_kwargs={"optimize": True})
        print(f"wrote {path} ({gray.shape[0]}x{gray.shape[1]}, {path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
