"""Time-conditioned U-Net for DiffFlow's drift ``f(x, t)`` and score ``s(x, t)`` on images ``(B, C, H, W)``.

The layout follows the DDPM U-Net (Ho et al. 2020): residual blocks with GroupNorm and SiLU, self-attention
at chosen resolutions and in the middle, strided-conv downsampling, nearest-neighbour upsampling with a
conv, and a skip connection from every down-path activation to the up path. Differences, each for a reason:

- **Time scale.** DiffFlow's images live on ``t ∈ [t_0, T] = [0.001, 0.05]``. A transformer embedding of
  the raw ``t`` barely moves over that range, so ``t`` is first multiplied by ``t_scale`` (default ``1/T``,
  mapping ``[0, T]`` to ``[0, 1]``) and then by the usual 1000 "positions" (see
  :func:`sinusoidal_time_embedding` for the numbers). ``t_scale = 1`` gives DDPM's convention on ``[0, 1]``.
- **Time injection** is scale-shift by default (``GroupNorm(h) * (1 + a) + b`` in every residual block,
  as in Dhariwal & Nichol 2021); ``scale_shift=False`` gives DDPM's additive injection ``h + b`` before
  the norm, and then the CIFAR-10 preset with 128 channels is exactly DDPM's 35.7M-parameter network.
- **Any image size.** Downsampling halves with rounding up (a 3×3 stride-2 conv, padding 1), and each
  upsampling goes to the exact size of the matching skip, so odd sizes work without padding:
  28 → 14 → 7 (MNIST) or 7 → 4 → 2. The size is fixed at construction because attention placement
  depends on it, and ``forward`` checks it.
- **Zero output.** The final conv is zero-initialised, so an untrained drift and score are exactly 0
  (the forward SDE starts as pure Brownian motion). Inner layers keep PyTorch's default init, so every
  parameter receives gradient from the second optimiser step on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .nets import FourierTimeEmbedding

__all__ = ["UNet", "sinusoidal_time_embedding"]


def sinusoidal_time_embedding(
    n_freq: int, t_scale: float = 1 / 0.05, positions: float = 1000.0, max_period: float = 10000.0
) -> FourierTimeEmbedding:
    """The transformer / DDPM sinusoidal embedding of ``p = positions * t_scale * t``.

    Features ``[sin(ω_k p), cos(ω_k p)]`` with ``ω_k = max_period^(-k/(n_freq-1))``, k = 0 … n_freq-1, i.e.
    angular frequencies geometric from 1 down to 1/max_period per position, as in DDPM (which feeds the
    integer step 0 … 999, i.e. ``t_scale * t ∈ [0, 1]`` times 1000 positions). Built as a
    :class:`~sdeflow.nets.FourierTimeEmbedding` with those frequencies.

    Numbers for DiffFlow's images (``t_scale = 1/T = 20``, so ``p = 20000 t``): across ``t ∈ [0.001, 0.05]``
    the position moves by 980, so the highest frequency turns 980 rad (156 cycles), the lowest
    (10⁻⁴) 0.098 rad, and the middle one (10⁻²) 9.8 rad; 3/4 of the frequencies (ω ≥ 10⁻³) turn by at
    least ~1 rad. One step of a 30-step grid (Δt ≈ 0.0013–0.0018, Δp ≈ 26–36) turns frequencies
    0.003–0.1 by 0.1–π rad, so neighbouring steps are told apart by the middle of the spectrum. Relative
    change ``‖e(0.05) − e(0.001)‖ / ‖e(0.001)‖``: 1.25 with 32 frequencies, 0.84 with 8. Feeding the raw
    ``t`` instead (``positions * t_scale = 1``) moves the highest frequency by only 0.049 rad over the
    whole range, the lowest by 5·10⁻⁶ rad: relative change 0.013, the features are almost constant.

    Input ``t``: python float or tensor of shape (), (1,), (B,) or (B, 1).
    Output: (2 * n_freq,) for a scalar t, else (B, 2 * n_freq).

    Example:
        >>> emb = sinusoidal_time_embedding(32)
        >>> emb(torch.tensor([0.001, 0.05])).shape
        torch.Size([2, 64])
    """
    if n_freq < 2:
        raise ValueError(f"need n_freq >= 2 (the spectrum runs from 1 to 1/max_period), got {n_freq}")
    # FourierTimeEmbedding uses sin(2π w u) with u = t_scale t: w = positions ω / (2π)
    return FourierTimeEmbedding(
        n_freq,
        min_freq=positions / max_period / (2 * math.pi),
        max_freq=positions / (2 * math.pi),
        t_scale=t_scale,
    )


def _num_groups(channels: int, max_groups: int = 32, min_group_size: int = 2) -> int:
    """Largest divisor of ``channels`` that is ≤ ``max_groups`` and leaves ≥ ``min_group_size`` channels per
    group (32 groups for 64 or more channels as in DDPM; 8 for 16; 1 when nothing else fits)."""
    for g in range(min(max_groups, channels // min_group_size), 0, -1):
        if channels % g == 0:
            return g
    return 1


def _norm(channels: int, max_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(_num_groups(channels, max_groups), channels)


class _ResBlock(nn.Module):
    """norm → SiLU → conv → [time] → norm → SiLU → dropout → conv, plus a (1×1-conv) skip."""

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, scale_shift: bool, max_groups: int
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = _norm(in_ch, max_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = _norm(out_ch, max_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(emb)[:, :, None, None]  # emb is already SiLU-activated; (B or 1, ·, 1, 1)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class _Attention(nn.Module):
    """Multi-head self-attention over the H·W positions, residual: ``x + proj(attn(norm(x)))``."""

    def __init__(self, channels: int, num_heads: int, max_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = _norm(channels, max_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class _Downsample(nn.Module):
    """3×3 stride-2 conv: H → ceil(H / 2)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    """Nearest-neighbour resize to the skip's exact size (2× for even sizes), then a 3×3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class _Level(nn.Module):
    """The blocks of one resolution: residual blocks, each followed by attention where enabled."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.attns = nn.ModuleList()  # nn.Identity where a block has no attention


class UNet(nn.Module):
    """Time-conditioned U-Net ``net(x, t)`` for images, output of the same shape as ``x``.

    Down path: per level ``i`` with ``channels = base_channels * channel_mults[i]``, ``num_res_blocks``
    residual blocks (each followed by self-attention if the level's resolution is in
    ``attention_resolutions``), then a stride-2 downsample except at the last level. Middle: residual
    block, attention, residual block. Up path: per level, ``num_res_blocks + 1`` residual blocks, each on
    the concatenation with one stored down-path activation, then an upsample except at the first level.
    Time: :func:`sinusoidal_time_embedding` with ``base_channels`` features, then
    Linear → SiLU → Linear to ``4 * base_channels``, injected into every residual block (scale-shift by
    default, see the module docstring). The last conv is zero-initialised: the initial output is 0.

    A level's resolution is the shorter side of its feature map; sizes halve rounding up
    (28 → 14 → 7, 7 → 4 → 2). ``attention_resolutions`` entries that match no level are an error.
    Group counts: the largest divisor of the channel count ≤ ``norm_groups`` with ≥ 2 channels a group.

    Args:
        image_size: ``H`` (square) or ``(H, W)``; inputs must have exactly this size.
        in_channels: ``C`` of the input; the output has ``out_channels`` (default ``in_channels``).
        base_channels, channel_mults, num_res_blocks: width and depth, as in DDPM.
        attention_resolutions: resolutions that get self-attention after each residual block.
        dropout: dropout rate inside residual blocks (before the second conv).
        num_heads: attention heads; must divide the channel count of every attention layer.
        t_scale: multiplies ``t`` before the embedding's 1000 positions; ``1/T`` maps ``[0, T]`` to
            ``[0, 1]``. The default 20 suits DiffFlow's ``T = 0.05``; use 1 for ``t ∈ [0, 1]``.
        scale_shift: time injection by scale-shift (True) or DDPM's additive bias (False).
        norm_groups: upper bound on GroupNorm's group count.

    Presets: :meth:`digits` (8×8×1), :meth:`mnist` (28×28×1), :meth:`cifar10` (32×32×3).

    Shapes: x (B, C, H, W); t a python float or a tensor of shape (), (1,), (B,) or (B, 1); output
    (B, out_channels, H, W) in ``x``'s dtype (also under autocast).

    Example:
        >>> net = UNet(8, 1, base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,))
        >>> net(torch.randn(5, 1, 8, 8), 0.01).shape
        torch.Size([5, 1, 8, 8])
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        in_channels: int,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        out_channels: int | None = None,
        num_heads: int = 1,
        t_scale: float = 1 / 0.05,
        scale_shift: bool = True,
        norm_groups: int = 32,
    ) -> None:
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be a positive int or (H, W), got {image_size}")
        if in_channels < 1 or base_channels < 4 or base_channels % 2 or not channel_mults or num_res_blocks < 1:
            raise ValueError(
                "need in_channels >= 1, an even base_channels >= 4, non-empty channel_mults and "
                f"num_res_blocks >= 1; got {in_channels}, {base_channels}, {tuple(channel_mults)}, {num_res_blocks}"
            )
        sizes = [size]
        for _ in channel_mults[1:]:
            h, w = sizes[-1]
            if min(h, w) < 2:
                raise ValueError(f"image size {size} is too small for {len(channel_mults)} levels: sizes {sizes}")
            sizes.append(((h + 1) // 2, (w + 1) // 2))
        resolutions = [min(s) for s in sizes]
        unknown = set(attention_resolutions) - set(resolutions)
        if unknown:
            raise ValueError(
                f"attention_resolutions {sorted(unknown)} match no level; the levels of image size {size} "
                f"have resolutions {resolutions}"
            )
        self.image_size: tuple[int, int] = size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.level_sizes: list[tuple[int, int]] = sizes

        def attention(ch: int, res: int) -> nn.Module:
            if res not in attention_resolutions:
                return nn.Identity()
            if ch % num_heads:
                raise ValueError(f"num_heads={num_heads} does not divide the {ch} channels of the attention at {res}")
            return _Attention(ch, num_heads, norm_groups)

        def res_block(cin: int, cout: int) -> _ResBlock:
            return _ResBlock(cin, cout, emb_dim, dropout, scale_shift, norm_groups)

        emb_dim = 4 * base_channels
        self.time_embed = sinusoidal_time_embedding(base_channels // 2, t_scale=t_scale)
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        skip_channels = [base_channels]
        ch = base_channels
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, mult in enumerate(channel_mults):
            level = _Level()
            for _ in range(num_res_blocks):
                level.blocks.append(res_block(ch, base_channels * mult))
                ch = base_channels * mult
                level.attns.append(attention(ch, resolutions[i]))
                skip_channels.append(ch)
            self.down.append(level)
            if i < len(channel_mults) - 1:
                self.downsample.append(_Downsample(ch))
                skip_channels.append(ch)

        self.mid1 = res_block(ch, ch)
        if ch % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the {ch} channels of the middle attention")
        self.mid_attn = _Attention(ch, num_heads, norm_groups)
        self.mid2 = res_block(ch, ch)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            level = _Level()
            for _ in range(num_res_blocks + 1):
                level.blocks.append(res_block(ch + skip_channels.pop(), base_channels * mult))
                ch = base_channels * mult
                level.attns.append(attention(ch, resolutions[i]))
            self.up.append(level)
            if i > 0:
                self.upsample.append(_Upsample(ch))

        self.norm_out = _norm(ch, norm_groups)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # initial field is exactly 0
        nn.init.zeros_(self.conv_out.bias)

    def embed_time(self, t: Tensor | float, batch: int) -> Tensor:
        """Time embedding after the MLP and SiLU, as fed to the blocks: (1, 4·base) for a scalar t, else
        (batch, 4·base). Raises if a batched ``t`` does not have ``batch`` entries."""
        emb = self.time_embed(t)
        if emb.ndim == 1:
            emb = emb[None]
        elif emb.shape[0] != batch:
            raise ValueError(f"t has batch size {emb.shape[0]} but x has {batch}")
        return F.silu(self.time_mlp(emb))

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        expected = (self.in_channels, *self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet expects x of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        emb = self.embed_time(t, x.shape[0])

        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(h, emb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)

        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            if i < len(self.upsample):
                h = self.upsample[i](h, skips[-1].shape[-2:])

        return self.conv_out(F.silu(self.norm_out(h))).to(x.dtype)

    # ---- presets -------------------------------------------------------------------------------------

    @classmethod
    def digits(cls, **overrides: Any) -> UNet:
        """8×8×1 (scikit-learn digits): 16 base channels, mults (1, 2, 2) on 8 → 4 → 2, one block per
        level, attention at 4 and in the middle (2×2), no dropout: 0.30M parameters, fast on a CPU."""
        kw: dict[str, Any] = dict(
            image_size=8, in_channels=1, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
            attention_resolutions=(4,), dropout=0.0,
        )
        return cls(**{**kw, **overrides})

    @classmethod
    def mnist(cls, **overrides: Any) -> UNet:
        """28×28×1: 64 base channels (the published MNIST width), mults (1, 2, 2) on 28 → 14 → 7, two
        blocks per level, attention at 14 and in the middle (7×7), dropout 0.1: 6.95M parameters
        (6.47M with ``scale_shift=False``)."""
        kw: dict[str, Any] = dict(
            image_size=28, in_channels=1, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
            attention_resolutions=(14,), dropout=0.1,
        )
        return cls(**{**kw, **overrides})

    @classmethod
    def cifar10(cls, **overrides: Any) -> UNet:
        """32×32×3, DDPM's CIFAR-10 layout: 128 base channels, mults (1, 2, 2, 2) on 32 → 16 → 8 → 4, two
        blocks per level, attention at 16 and in the middle, dropout 0.1. The published DiffFlow uses
        128 channels for the drift and ``base_channels=64`` for the score; with ``scale_shift=False`` the
        128-channel net is DDPM's exactly. Parameters: 38.3M (35.7M additive) at 128 channels, 9.6M
        (8.95M additive) at 64."""
        kw: dict[str, Any] = dict(
            image_size=32, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
            attention_resolutions=(16,), dropout=0.1,
        )
        return cls(**{**kw, **overrides})
