"""Pictures of a 2D DiffFlow: samples beside data, and the forward and backward processes over time.

matplotlib is imported inside the functions (it is an optional dependency) and only through its
object-oriented API with the Agg canvas: no pyplot, no global backend switch, safe on headless machines
and inside other programs' GUIs. Each function writes one PNG.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "samples.png"
    >>> plot_samples(torch.randn(100, 2), torch.randn(100, 2), path)
    >>> path.exists()
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers

from .model import DiffFlow
from .sample import Samples, sample_trajectory

__all__ = ["plot_samples", "plot_trajectories", "plot_paths", "plot_comparison", "plot_sample_grid"]

_SNAPSHOTS = 6
_POINT = dict(s=2.0, alpha=0.6, linewidths=0, rasterized=True)
_GRID_POINTS = 3000  # samples drawn per panel of plot_sample_grid: enough to see blur, few enough to see gaps


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _numpy(points: Tensor | np.ndarray) -> np.ndarray:
    arr = points.detach().cpu().numpy() if isinstance(points, Tensor) else np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"expected 2D points of shape (n, 2), got {arr.shape}")
    return arr.astype(np.float64)


def _limits(points: np.ndarray, margin: float = 0.1) -> tuple[tuple[float, float], tuple[float, float]]:
    """A square box around ``points`` (their bounding box's larger side, plus ``margin`` on each side)."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    center, half = (lo + hi) / 2, (hi - lo).max() / 2 * (1 + margin) + 1e-9
    return (center[0] - half, center[0] + half), (center[1] - half, center[1] + half)


def _style(ax: Any, limits: tuple[tuple[float, float], tuple[float, float]], title: str) -> None:
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def plot_samples(samples: Tensor | np.ndarray, data: Tensor | np.ndarray, path: str | Path,
                 *, title: str | None = None) -> None:
    """Data (left) and samples (right) ``(n, 2)`` as scatter plots on the same square axes, saved to ``path``.

    The limits come from the data (10% margin), so samples leaking far off the support fall outside the
    frame; their amount is in the metrics (the histogram KL's overflow cell).
    """
    x, y = _numpy(data), _numpy(samples)
    limits = _limits(x)
    fig = _figure(8.0, 4.2)
    axes = fig.subplots(1, 2)
    axes[0].scatter(x[:, 0], x[:, 1], color="tab:blue", **_POINT)
    _style(axes[0], limits, f"data ({len(x)} points)")
    axes[1].scatter(y[:, 0], y[:, 1], color="tab:orange", **_POINT)
    _style(axes[1], limits, f"samples ({len(y)})")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)


@torch.no_grad()
def plot_trajectories(model: DiffFlow, data: Tensor, labels: Tensor, grid: solvers.Grid, path: str | Path,
                      *, generator: torch.Generator | None = None) -> None:
    """A DiffFlow's forward (data → noise) and backward (noise → data) SDEs on ``grid`` (see :func:`plot_paths`).

    ``data`` ``(n, 2)`` in model coordinates, ``labels`` ``(n,)`` their modes; ``generator`` drives both
    processes' noise (default: seed 0).
    """
    g = torch.Generator().manual_seed(0) if generator is None else generator
    x0 = data.to(torch.float32)
    save = solvers.SaveAt(t0=True, steps=True)
    forward = solvers.sdesolve(model.forward_sde(), x0, grid, generator=g, save=save)
    backward = sample_trajectory(model, len(x0), (x0.shape[1],), grid, generator=g, save=save)
    plot_paths(Samples(forward.ts, forward.xs), backward, labels, path)


def plot_paths(forward: Samples, backward: Samples, labels: Tensor, path: str | Path, *,
               title: str = "forward: data → noise (colour: mode)    ·    backward: noise → data "
                            "(colour: mode of the nearest data point at the end)") -> None:
    """Snapshots of a forward and a backward process at 6 times.

    Top row: ``forward.xs`` ``(S, n, 2)`` (increasing ``forward.ts``), coloured by mode ``labels`` ``(n,)``,
    as in the paper's figure 1. Bottom row: ``backward.xs`` ``(S, n, 2)`` (decreasing ``backward.ts``),
    coloured by the label of the forward start point nearest to where each one ends. Snapshots are at nodes
    ``round(k (S - 1) / 5)``, ``k = 0..5``; all panels share one square frame.
    """
    labels_np = labels.detach().cpu().numpy()
    x0 = forward.xs[0]
    ends = backward.xs[-1]
    nearest = torch.cdist(ends.float(), x0.float()).argmin(dim=1).cpu().numpy()
    back_labels = labels_np[nearest]
    steps = len(forward.ts) - 1
    nodes = np.round(np.linspace(0, steps, _SNAPSHOTS)).astype(int)
    back_nodes = np.round(np.linspace(0, len(backward.ts) - 1, _SNAPSHOTS)).astype(int)
    both = torch.cat([forward.xs[nodes].reshape(-1, 2), backward.xs[back_nodes].reshape(-1, 2)]).cpu().numpy()
    limits = _frame(both)

    fig = _figure(2.2 * _SNAPSHOTS, 4.9)
    axes = fig.subplots(2, _SNAPSHOTS)
    vmax = max(int(labels_np.max()), 9) if len(labels_np) else 9
    for col, i in enumerate(nodes):
        xf = forward.xs[i].cpu().numpy()
        axes[0, col].scatter(xf[:, 0], xf[:, 1], c=labels_np, cmap="tab10", vmin=0, vmax=vmax, **_POINT)
        _style(axes[0, col], limits, f"forward  t = {float(forward.ts[i]):.4f}")
    for col, j in enumerate(back_nodes):
        # backward runs from T down to t0: put it under the forward snapshot of the same time
        xb = backward.xs[j].cpu().numpy()
        ax = axes[1, _SNAPSHOTS - 1 - col]
        ax.scatter(xb[:, 0], xb[:, 1], c=back_labels, cmap="tab10", vmin=0, vmax=vmax, **_POINT)
        _style(ax, limits, f"backward  t = {float(backward.ts[j]):.4f}")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)


def _frame(points: np.ndarray) -> tuple[tuple[float, float], tuple[float, float]]:
    """Square limits holding ``points`` (quantiles drop outliers), no tighter than the prior's ±3."""
    finite = points[np.isfinite(points).all(axis=1)]
    lo = np.minimum(np.quantile(finite, 0.001, axis=0), -3.0)
    hi = np.maximum(np.quantile(finite, 0.999, axis=0), 3.0)
    return _limits(np.stack([lo, hi]), margin=0.05)


def plot_comparison(rows: list[tuple[str, Samples, Tensor]], labels: Tensor, data: Tensor, path: str | Path,
                    *, title: str = "") -> None:
    """The paper's comparison figure: one row per model, its forward path from data to noise at 6 times
    (coloured by mode ``labels``), then its samples beside the data.

    ``rows``: ``(name, forward, samples)`` with ``forward.xs`` ``(S, n, 2)`` starting at the data points
    (model coordinates) and ``samples`` ``(m, 2)``; ``data`` ``(k, 2)`` in the samples' coordinates.
    """
    fig = _figure(2.2 * (_SNAPSHOTS + 1), 2.3 * len(rows) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(rows), _SNAPSHOTS + 1))
    labels_np = labels.detach().cpu().numpy()
    vmax = max(int(labels_np.max()), 9) if len(labels_np) else 9
    data_np = _numpy(data)
    data_limits = _limits(data_np)
    for r, (name, forward, samples) in enumerate(rows):
        nodes = np.round(np.linspace(0, len(forward.ts) - 1, _SNAPSHOTS)).astype(int)
        limits = _frame(forward.xs[nodes].reshape(-1, 2).cpu().numpy())
        for col, i in enumerate(nodes):
            xf = forward.xs[i].cpu().numpy()
            axes[r, col].scatter(xf[:, 0], xf[:, 1], c=labels_np, cmap="tab10", vmin=0, vmax=vmax, **_POINT)
            _style(axes[r, col], limits, f"{name}  t = {float(forward.ts[i]):.3g}")
        _samples_over_data(axes[r, _SNAPSHOTS], _numpy(samples), data_np, data_limits, f"{name} samples (grey: data)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)


def _samples_over_data(ax: Any, y: np.ndarray, data: np.ndarray,
                       limits: tuple[tuple[float, float], tuple[float, float]], title: str) -> None:
    """Samples ``y`` (orange) over the data (grey) in one panel."""
    ax.scatter(data[:, 0], data[:, 1], color="0.8", **_POINT)
    ax.scatter(y[:, 0], y[:, 1], color="tab:orange", **_POINT)
    _style(ax, limits, title)


def plot_sample_grid(rows: Sequence[tuple[str, Sequence[tuple[str, Tensor]]]], data: Tensor, path: str | Path,
                     *, title: str = "") -> None:
    """Samples of several samplers at several settings: one row per sampler, one panel per setting.

    ``rows``: ``(row name, [(column title, samples (m, 2)), ...])``, e.g. one row per model and one column per
    number of sampling steps. Each panel shows the first 3000 samples (orange) over the data ``data``
    ``(k, 2)`` (grey), on the data's square frame; all in the same coordinates.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "grid.png"
        >>> x = torch.randn(200, 2)
        >>> plot_sample_grid([("a", [("N = 5", x), ("N = 10", x)]), ("b", [("N = 5", x)])], x, path)
        >>> path.exists()
        True
    """
    if not rows or not all(panels for _, panels in rows):
        raise ValueError("plot_sample_grid needs at least one row, each with at least one panel")
    columns = max(len(panels) for _, panels in rows)
    data_np = _numpy(data)
    limits = _limits(data_np)
    fig = _figure(2.0 * columns, 2.1 * len(rows) + 0.4)
    axes = np.array(fig.subplots(len(rows), columns, squeeze=False))
    for r, (name, panels) in enumerate(rows):
        for c in range(columns):
            ax = axes[r, c]
            if c >= len(panels):
                ax.set_axis_off()
                continue
            label, samples = panels[c]
            _samples_over_data(ax, _numpy(samples)[:_GRID_POINTS], data_np, limits, f"{name}, {label}")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path)
