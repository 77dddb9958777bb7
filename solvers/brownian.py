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

__all__ = ["BrownianPath", "BrownianIncrement"]

BrownianIncrement = Callable[[float, float], Tensor]
"""A Brownian path queried by interval: ``path(ta, tb) = W(tb) - W(ta)`` with ``ta < tb``."""


class BrownianPath:
    """A seeded Brownian motion on ``[t0, t1]`` that can be queried on any interval, consistently.

    Args:
        t0, t1: interval on which the path is defined.
        shape: shape of ``W(t)``, e.g. ``(batch, d)``, or ``(batch, m)`` for general noise.
        seed: the path is a deterministic function of the seed.
        dtype, device: of the returned increments.
        dt: expected step size; a hint that lets the underlying tree start at the right resolution.
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
        self.interval = torchsde.BrownianInterval(
            t0=self.t0,
            t1=self.t1,
            size=self.shape,
            dtype=dtype,
            device=self.device,
            entropy=self.seed,
            dt=dt,
            levy_area_approximation=levy_area or "none",
        )

    def __call__(self, ta: float, tb: float) -> Tensor:
        return self.interval(ta, tb)
