"""Stochastic differential equations: the interface every solver in this package integrates.

An Itô SDE on states ``x`` of shape ``(batch, *dims)``::

    dx = f(t, x) dt + g(t, x) dW(t)

is a :class:`SDE` subclass that implements ``drift(t, x)`` (``f``) and ``diffusion(t, x)`` (``g``). The
class attribute ``noise_type`` fixes how ``g`` multiplies the Brownian increment ``dW``:

==============  ===========================  ==================  ==================================
noise type      ``diffusion(t, x)`` shape    ``dW`` shape        product ``g dW``
==============  ===========================  ==================  ==================================
``diagonal``    ``x.shape`` (or broadcast)   ``x.shape``         ``g * dW`` element-wise
``scalar``      ``(*x.shape, 1)``            ``(batch, 1)``      one Brownian motion per sample
``general``     ``(*x.shape, m)``            ``(batch, m)``      matrix-vector product over ``m``
``additive``    ``(*x.shape, m)``            ``(batch, m)``      as ``general``; ``g`` ignores ``x``
==============  ===========================  ==================  ==================================

These are torchsde's conventions for ``(batch, d)`` states, so an :class:`SDE` on flat states can be
handed to ``torchsde.sdeint`` as it is (it exposes ``f``, ``g``, ``noise_type`` and ``sde_type``), and a
module written for torchsde is accepted by every solver here through :func:`as_sde`.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["NoiseType", "SDEType", "SDE", "TorchsdeSDE", "TimeReversedSDE", "as_sde"]


class NoiseType(str, Enum):
    """How the diffusion multiplies the Brownian increment (see the module docstring)."""

    DIAGONAL = "diagonal"
    ADDITIVE = "additive"
    SCALAR = "scalar"
    GENERAL = "general"


class SDEType(str, Enum):
    """Stochastic calculus the SDE is written in."""

    ITO = "ito"
    STRATONOVICH = "stratonovich"


class SDE(nn.Module):
    """Base class of SDEs ``dx = drift(t, x) dt + diffusion(t, x) dW``.

    Subclasses implement :meth:`drift` and :meth:`diffusion` and may set ``noise_type`` and ``sde_type``.
    ``t`` is a 0-dim tensor of the state's dtype and device; ``x`` has shape ``(batch, *dims)``.

    Example:
        >>> class OU(SDE):
        ...     noise_type = NoiseType.DIAGONAL
        ...     def drift(self, t, x):
        ...         return -x
        ...     def diffusion(self, t, x):
        ...         return torch.full_like(x, 0.5)
        >>> OU().drift(torch.tensor(0.0), torch.ones(3, 2)).shape
        torch.Size([3, 2])
    """

    noise_type: NoiseType = NoiseType.DIAGONAL
    sde_type: SDEType = SDEType.ITO

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """``f(t, x)``, shape ``x.shape``."""
        raise NotImplementedError(f"{type(self).__name__} must implement drift(t, x)")

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        """``g(t, x)``, shaped according to ``noise_type``."""
        raise NotImplementedError(f"{type(self).__name__} must implement diffusion(t, x)")

    def __setattr__(self, name: str, value: Any) -> None:
        # f and g are torchsde's protocol methods below; a submodule of that name would be silently
        # shadowed by them, so refuse it where the mistake is made.
        if name in ("f", "g") and isinstance(value, (nn.Module, Tensor)):
            raise AttributeError(
                f"an SDE cannot hold a module or tensor named {name!r}: f and g are torchsde's drift and "
                f"diffusion methods; name it e.g. '{name}_net'"
            )
        super().__setattr__(name, value)

    # torchsde's protocol, so that ``torchsde.sdeint(our_sde, ...)`` works on (batch, d) states.
    def f(self, t: Tensor, y: Tensor) -> Tensor:
        return self.drift(t, y)

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        g = self.diffusion(t, y)
        if NoiseType(self.noise_type) is NoiseType.DIAGONAL and g.shape != y.shape:
            g = g.expand_as(y)  # torchsde insists on the exact (batch, d) shape
        return g


class TorchsdeSDE(SDE):
    """Adapter: a torchsde-style module (methods ``f(t, y)``, ``g(t, y)``; attributes ``noise_type``,
    ``sde_type``) seen as an :class:`SDE`. Its parameters stay its own (it is registered as a submodule)."""

    def __init__(self, module: Any):
        super().__init__()
        self.inner = module
        self.noise_type = NoiseType(module.noise_type)
        self.sde_type = SDEType(module.sde_type)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.inner.f(t, x)

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        return self.inner.g(t, x)


class TimeReversedSDE(SDE):
    """The SDE seen in reversed time ``s = -t``: ``y(s) = x(-s)`` solves
    ``dy = -f(-s, y) ds + g(-s, y) dW'(s)``.

    Solving it forward in ``s`` from ``-t1`` to ``-t0`` integrates the original equation backward from
    ``t1`` to ``t0`` (with a fresh Brownian motion ``W'``: pathwise, this is the inverse map only for
    Stratonovich SDEs). Solvers that only step forward in time use this view for decreasing grids.
    """

    def __init__(self, sde: SDE):
        super().__init__()
        self.base = sde
        self.noise_type = NoiseType(sde.noise_type)
        self.sde_type = SDEType(sde.sde_type)

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return -self.base.drift(-t, x)

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        return self.base.diffusion(-t, x)


def as_sde(sde: Any) -> SDE:
    """Return ``sde`` as an :class:`SDE`: ours pass through, torchsde-style modules are wrapped.

    Raises:
        TypeError: if ``sde`` is neither an :class:`SDE` nor has torchsde's ``f``, ``g``, ``noise_type``
            and ``sde_type``.
    """
    if isinstance(sde, SDE):
        NoiseType(sde.noise_type), SDEType(sde.sde_type)  # fail early on a misspelt class attribute
        return sde
    missing = [name for name in ("f", "g", "noise_type", "sde_type") if not hasattr(sde, name)]
    if missing:
        raise TypeError(
            f"expected a solvers.SDE or a torchsde-style module with f, g, noise_type and sde_type; "
            f"{type(sde).__name__} lacks {', '.join(missing)}"
        )
    return TorchsdeSDE(sde)


def check_diffusion_shape(noise_type: NoiseType, g: Tensor, x: Tensor) -> None:
    """Raise a ``ValueError`` naming the expected shape when ``g`` does not fit ``noise_type``."""
    if noise_type is NoiseType.DIAGONAL:
        try:
            ok = torch.broadcast_shapes(g.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        expected = f"x's shape {tuple(x.shape)} (or one that broadcasts to it)"
    elif noise_type is NoiseType.SCALAR:
        ok = g.shape == (*x.shape, 1)
        expected = f"{(*x.shape, 1)}"
    else:
        ok = g.dim() == x.dim() + 1 and g.shape[:-1] == x.shape
        expected = f"{(*x.shape, 'm')}"
    if not ok:
        raise ValueError(
            f"diffusion of a {noise_type.value}-noise SDE must have shape {expected}, got {tuple(g.shape)}"
        )


def noise_shape(noise_type: NoiseType, g: Tensor, x: Tensor) -> tuple[int, ...]:
    """Shape of the Brownian increment that multiplies ``g`` (see the module docstring)."""
    if noise_type is NoiseType.DIAGONAL:
        return tuple(x.shape)
    return (x.shape[0], g.shape[-1])


def diffusion_times_noise(noise_type: NoiseType, g: Tensor, dw: Tensor) -> Tensor:
    """``g dW`` for each noise type; ``dw`` has the shape given by :func:`noise_shape`."""
    if noise_type is NoiseType.DIAGONAL:
        return g * dw
    # (batch, *dims, m) x (batch, m) -> (batch, *dims)
    batch, m = dw.shape
    return (g.reshape(batch, -1, m) @ dw.unsqueeze(-1)).reshape(g.shape[:-1])
