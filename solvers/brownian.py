"""Brownian increments.

A solve needs ``dW = W(t_{k+1}) - W(t_k)`` at every step. Two sources:

* fresh Gaussian draws, ``dW = sqrt(|dt|) z`` with ``z ~ N(0, I)`` from a ``torch.Generator`` (the fast
  default: one ``randn`` per step, no tree, no host-device synchronisation);
* a Brownian *path*: any callable ``(ta, tb) -> W(tb) - W(ta)`` for ``ta < tb``. Querying the same path on
  different grids gives consistent increments (``W(a, m) + W(m, b) = W(a, b)``), which is what strong
  convergence tests and pathwise comparisons need. :class:`BrownianPath` is one, backed by torchsde's
  ``BrownianInterval``; a ``torchsde.BrownianInterval`` itself is accepted too.

Example:
    >>> W = BrownianPath(0.0, 1.0, shape=(4, 2), seed=0, dtype=torch.float64)
    >>> dw = W(0.0, 0.5) + W(0.5, 1.0)
    >>> torch.allclose(dw, W(0.0, 1.0))
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchsde
from torch import Tensor

__all__ = ["BrownianPath", "BrownianIncrement", "AntitheticIncrements"]

BrownianIncrement = Callable[[float, float], Tensor]
"""A Brownian path queried by interval: ``path(ta, tb) = W(tb) - W(ta)`` with ``ta < tb``."""


class BrownianPath:
    """A seeded Brownian motion on ``[t0, t1]`` that can be queried on any interval, consistently.

    Args:
        t0, t1: interval on which the path is defined.
        shape: shape of ``W(t)``, e.g. ``(batch, d)``, or ``(batch, m)`` for general noise.
        seed: the path is a deterministic function of the seed.
        dtype, device: of the returned increments.
        dt: unused; kept for compatibility (the dyadic tree below needs no step-size hint).
        levy_area: also simulate the Lévy area needed by some higher-order solvers (``"space-time"``
            or ``"foster"``); ``None`` for Euler-type methods.
    """

    def __init__(
        self,
        t0: float,
        t1: float,
        shape: Sequence[int],
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        dt: float | None = None,
        levy_area: str | None = None,
    ):
        if not t0 < t1:
            raise ValueError(f"BrownianPath needs t0 < t1, got t0={t0}, t1={t1}")
        self.t0, self.t1 = float(t0), float(t1)
        self.shape = tuple(shape)
        self.seed = int(seed)
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        self.levy_area = levy_area
        # halfway_tree: torchsde's default tree splits at the query points, so its path depends on the seed
        # *and* on the order of the queries (a reversed solve would see another path). The dyadic tree makes
        # the path a function of the seed alone; query times are resolved to ~1e-9 of the interval.
        self.interval = torchsde.BrownianInterval(
            t0=self.t0,
            t1=self.t1,
            size=self.shape,
            dtype=dtype,
            device=self.device,
            entropy=self.seed,
            tol=1e-9 * (self.t1 - self.t0),
            halfway_tree=True,
            levy_area_approximation=levy_area or "none",
        )

    def __call__(self, ta: float, tb: float) -> Tensor:
        return self.interval(ta, tb)


class AntitheticIncrements:
    """Fresh increments in antithetic pairs along the batch: ``dW = sqrt(tb - ta) [z; -z]``.

    Samples ``i`` and ``i + batch/2`` are driven by opposite noise. Each half is an exact draw, so any
    Monte-Carlo average stays unbiased, while every term odd in the noise cancels within a pair: when the
    noise is small next to the drift (DiffFlow's ``g = 0.2`` over ``T = 0.05``), this removes most of the
    variance of path-wise estimators and of their gradients. Pass it as ``brownian=`` to one solve over one
    grid; it is a stream of draws, not a path that can be queried twice.

    Args:
        shape: shape of the whole increment ``(batch, ...)``; ``batch`` must be even.
        generator: source of ``z`` (same seed, same increments).

    Example:
        >>> noise = AntitheticIncrements((4, 2), torch.Generator().manual_seed(0))
        >>> dw = noise(0.0, 0.01)
        >>> torch.equal(dw[:2], -dw[2:])
        True
    """

    def __init__(
        self,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        shape = tuple(shape)
        if not shape or shape[0] % 2:
            raise ValueError(f"antithetic increments pair the batch: its size must be even, got {shape}")
        self.half = (shape[0] // 2, *shape[1:])
        self.generator, self.dtype, self.device = generator, dtype, device

    def __call__(self, ta: float, tb: float) -> Tensor:
        z = torch.randn(self.half, generator=self.generator, dtype=self.dtype, device=self.device)
        z.mul_(abs(tb - ta) ** 0.5)
        return torch.cat([z, -z])
