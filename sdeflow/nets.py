"""Time-conditioned networks for DiffFlow's drift f(x, t) and score s(x, t) on low-dimensional data.

Both are called as ``net(x, t)`` with the continuous time value ``t`` (method note §1).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["FourierTimeEmbedding", "TimeMLP"]


class FourierTimeEmbedding(nn.Module):
    """Fourier features of time: ``[sin(2π w_k u), cos(2π w_k u)]`` with ``u = t * t_scale``.

    The ``n_freq`` frequencies ``w_k`` are geometric from ``min_freq`` to ``max_freq``. With the
    defaults (t_scale = 1/0.05 = 20, w from 0.025 to 16):

    - DiffFlow's range t ∈ [0.001, 0.05] maps to u ∈ [0.02, 1]; the top frequencies (w ≳ 0.5) go
      through half a cycle or more across it, and at w = 16 one grid step (Δt ≈ 0.0013) turns the
      phase by about 2.6 rad, so neighbouring steps get clearly different features without the
      highest feature aliasing within a step; the low frequencies are near-linear ramps in t.
    - t ∈ [0, 1] maps to u ∈ [0, 20]; the lowest frequency makes half a cycle, so features are
      unique over the whole range and the low ones vary smoothly.

    Input ``t``: python float, or a tensor of shape (), (1,), (B,) or (B, 1).
    Output: (2 * n_freq,) for a scalar t, else (B, 2 * n_freq); sines first, then cosines.
    """

    omega: Tensor

    def __init__(
        self, n_freq: int = 16, min_freq: float = 0.025, max_freq: float = 16.0, t_scale: float = 1 / 0.05
    ) -> None:
        super().__init__()
        if n_freq < 1 or not 0 < min_freq <= max_freq:
            raise ValueError(
                f"need n_freq >= 1, 0 < min_freq <= max_freq; got {n_freq}, {min_freq}, {max_freq}"
            )
        self.n_freq, self.t_scale = n_freq, t_scale
        freqs = torch.logspace(math.log10(min_freq), math.log10(max_freq), n_freq, dtype=torch.float64)
        # angular frequencies in units of t (t_scale folded in): features are sin/cos(omega * t)
        self.register_buffer("omega", (2 * math.pi * t_scale * freqs).to(torch.get_default_dtype()))

    @property
    def out_features(self) -> int:
        return 2 * self.n_freq

    def forward(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=self.omega.dtype, device=self.omega.device)
        if t.numel() == 1:
            t = t.reshape(())
        elif t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        elif t.ndim != 1:
            raise ValueError(f"t must have shape (), (B,) or (B, 1), got {tuple(t.shape)}")
        angles = t[..., None] * self.omega
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class TimeMLP(nn.Module):
    """MLP ``net(x, t)`` on concat(x, Fourier(t)), ``depth`` hidden layers of ``width``.

    Architecture: Linear(dim + 2*time_features, width) → act → [Linear(width, width) → act] × (depth-1)
    → Linear(width, dim). ``time_features`` is the number of Fourier frequencies (features = twice that).
    The first layer is applied as ``W_x x + (W_t emb(t) + b)``, which equals the linear layer on the
    concatenation but, for a scalar t, embeds once and broadcasts instead of copying it per sample.

    The output layer keeps PyTorch's default init scaled by ``out_scale`` (0.1): the initial drift and
    score are then small, so the first simulated SDE paths stay close to pure diffusion, while every
    parameter still receives gradient from the first step (a zero init would block earlier layers).

    Size: the published 2D setting ``TimeMLP(2)`` (width 128, 3 hidden layers, 16 frequencies) has
    37,762 parameters.

    Shapes: x (B, dim); t a python float or tensor of shape (), (B,) or (B, 1); output (B, dim).
    """

    def __init__(
        self,
        dim: int,
        width: int = 128,
        depth: int = 3,
        time_features: int = 16,
        activation: Callable[[], nn.Module] = nn.SiLU,
        t_scale: float = 1 / 0.05,
        out_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.dim = dim
        self.embed = FourierTimeEmbedding(time_features, t_scale=t_scale)
        self.inp = nn.Linear(dim + self.embed.out_features, width)
        layers: list[nn.Module] = [activation()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), activation()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(width, dim)
        with torch.no_grad():
            self.out.weight.mul_(out_scale)
            self.out.bias.mul_(out_scale)

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        emb = self.embed(t)
        if emb.ndim == 2 and emb.shape[0] != x.shape[0]:
            raise ValueError(f"t has batch size {emb.shape[0]} but x has {x.shape[0]}")
        w = self.inp.weight
        h = F.linear(x, w[:, : self.dim]) + F.linear(emb.to(x.dtype), w[:, self.dim :], self.inp.bias)
        return self.out(self.body(h))
