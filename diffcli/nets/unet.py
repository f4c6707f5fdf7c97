"""ADM-style UNet (Dhariwal & Nichol 2021, as re-implemented in EDM's `DhariwalUNet`).

The network knows nothing of diffusion: it maps (input image, a scalar noise condition, a class id) to an
output image of the same shape. The denoiser wrapper (diffcli.denoiser) owns every scaling.

Shapes: x (B, C_in, H, W) float32; c_noise (B,) float32; class_labels (B,) int64 in [0, num_classes]
where id `num_classes` is the "null" class used for classifier-free guidance; returns (B, C_out, H, W).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 as in ADM, fewer for the narrow layers of small models (≥ 4 channels a group)."""
    g = min(32, max(1, channels // 4))
    while channels % g:
        g -= 1
    return g


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch so every block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar (Vaswani et al. 2017; DDPM's timestep embedding)."""

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: Tensor) -> Tensor:  # (B,) -> (B, dim)
        args = c.float()[:, None] * self.freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020; NCSN++/EDM use scale 16).
    The frequencies are a persistent buffer drawn from a fixed seed so checkpoints carry them."""

    def __init__(self, dim: int, scale: float = 16.0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=g) * scale)

    def forward(self, c: Tensor) -> Tensor:  # (B,) -> (B, dim)
        args = (2 * math.pi) * c.float()[:, None] * self.freqs[None]
        return torch.cat([args.cos(), args.sin()], dim=1)


# Row k of _UP_TAPS says which taps (w₋₁, w₀, w₁) of a 3-tap kernel act, on one axis, at tap k of the equivalent
# 4-tap stride-2 transposed kernel (see upsample_conv).
_UP_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


def upsample_conv(h: Tensor, conv: nn.Conv2d) -> Tensor:
    """conv(nearest_upsample_2×(h)) for a 3×3, padding-1 convolution, computed as one stride-2 transposed
    convolution with a 4×4 kernel derived from conv's weights: the same function, and the same parameters.

    Why: the upsampled image repeats every pixel four times, so a 3×3 convolution over it recomputes the same
    products; per axis, output 2i reads w₋₁·h[i-1] + (w₀+w₁)·h[i] and output 2i+1 reads (w₋₁+w₀)·h[i] +
    w₁·h[i+1]. As a transposed convolution (output 2i + k - 1 receives tap k from input i) that is the kernel
    (w₁, w₀+w₁, w₋₁+w₀, w₋₁): 16 products per input pixel instead of 36, and no upsampled copy. Equal to
    interpolate-then-conv to float64 round-off (tests/test_unet.py); about 2× faster forward + backward for
    the decoder's up-sampling convolutions on a CPU.

    h (B, C_in, H, W) → (B, C_out, 2H, 2W); conv.weight (C_out, C_in, 3, 3).
    """
    taps = torch.tensor(_UP_TAPS, dtype=conv.weight.dtype, device=conv.weight.device)  # (4, 3)
    # (C_out, C_in, 3, 3) → (C_in, C_out, 4, 4): transposed convolutions take their weights (in, out, kH, kW).
    # In the weights' own precision even under autocast (einsum would run as a half-precision bmm there), so
    # the sums of taps and, in the backward, of their gradients are not rounded; the convolution casts after.
    with torch.autocast(h.device.type, enabled=False):
        weight = torch.einsum("yk,oikl,xl->ioyx", taps, conv.weight, taps)
    return F.conv_transpose2d(h, weight, conv.bias, stride=2, padding=1)


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, then scale-shift conditioning on the embedding (ADM's "adaptive GroupNorm"),
    SiLU → dropout → conv (zero-initialised); optional 2× down/up-sampling of both paths."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, resample: str | None = None) -> None:
        super().__init__()
        self.resample = resample
        self.norm0 = nn.GroupNorm(_groups(cin), cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = _zero(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def _resample(self, h: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(h, 2)
        if self.resample == "up":
            return F.interpolate(h, scale_factor=2.0, mode="nearest")
        return h

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.norm0(x))
        h = upsample_conv(h, self.conv0) if self.resample == "up" else self.conv0(self._resample(h))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return h + self.skip(self._resample(x))


# Up to this many tokens the CPU attention runs as two matmuls and a softmax rather than torch's fused kernel.
_CPU_MATH_TOKENS = 128


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q·kᵀ/√d)·v; q, k, v (B, heads, N, d) → (B, heads, N, d).

    On a CPU with N ≤ 128 tokens (the low-resolution attention of small UNets) as two batched matmuls and a
    softmax: torch's fused flash-attention CPU kernel works in blocks sized for long sequences, and at these
    lengths the plain form was faster (bench/unet_ops.py, forward + backward, 2 threads, AMD EPYC, torch 2.14:
    0.70 vs 2.03 ms at (128, 2, 16, 32), 4.1 vs 5.7 ms at (32, 4, 64, 32), 10.4 vs 13.5 ms at (32, 4, 128, 32);
    at (32, 4, 256, 32) it was 2.5× slower, 83 vs 33 ms). The softmax is taken in at least float32. Elsewhere
    torch's scaled_dot_product_attention (flash / memory-efficient kernels on CUDA).
    """
    if q.device.type == "cpu" and q.shape[-2] <= _CPU_MATH_TOKENS:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, heads, N, N)
        weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        return weights.to(v.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, residual, zero-initialised output projection."""

    def __init__(self, channels: int, head_channels: int) -> None:
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = _zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # The 1×1 convolutions run as matmuls over (B, H·W, C) tokens — the same weights, viewed (out, in) —
        # so q, k and v come out as (B, heads, H·W, d) slices with unit stride in d: the layout the fused
        # scaled-dot-product kernels take, where the transposed (B, heads, d, H·W) views fell back to the
        # unfused math path (bmm + safe softmax).
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = qkv.view(b, h * w, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.requires_grad and h * w <= 256:
            # Training under CPU bf16 autocast runs the attention in float32: torch's bf16 CPU attention
            # backward is the slow one (forward + backward ms, float32 vs bf16, torch 2.14 on an AVX-512/AMX
            # Xeon: 0.76 vs 10.4 at 16 tokens, 5.1 vs 26 at 64, 27.6 vs 36.9 at 256; bf16 wins only from
            # 1024 tokens, 88 vs 68), while its forward alone is the faster one from 64 tokens.
            with torch.autocast("cpu", enabled=False):
                out = attention(q.float(), k.float(), v.float())
        else:
            out = attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, h * w, c)
        out = F.linear(out, self.proj.weight.flatten(1), self.proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """ADM UNet sized by the recipe.

    Encoder: for each level l (resolution `resolution / 2**l`, width `channels·channel_mult[l]`) `num_res_blocks`
    residual blocks (+ attention where the resolution is in `attention_resolutions`), then a down-sampling
    residual block. A middle of res-attn-res. Decoder mirrors it with skip concatenations.
    """

    def __init__(self, *, in_channels: int, out_channels: int, resolution: int, channels: int = 64,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (), head_channels: int = 32, dropout: float = 0.0,
                 num_classes: int = 0, noise_embedding: str = "positional", fourier_scale: float = 16.0,
                 guidance_embedding: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        emb_dim = 4 * channels
        self.map_noise = (FourierEmbedding(channels, fourier_scale) if noise_embedding == "fourier"
                          else PositionalEmbedding(channels))
        self.map_layer0 = nn.Linear(channels, emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)
        # One extra row: id `num_classes` is the null (unconditional) class for classifier-free guidance.
        self.map_label = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        # Optional second scalar condition (a guidance scale w, Meng et al. 2023): zero-initialised, so a network
        # initialised from one without it computes the same function until trained.
        self.map_guidance = (nn.Sequential(PositionalEmbedding(channels), _zero(nn.Linear(channels, emb_dim)))
                             if guidance_embedding else None)

        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.enc = nn.ModuleList()
        skips = [channels]
        cur, res = channels, resolution
        for level, mult in enumerate(channel_mult):
            cout = channels * mult
            for _ in range(num_res_blocks):
                attn = AttentionBlock(cout, head_channels) if res in attention_resolutions else None
                self.enc.append(nn.ModuleList([ResBlock(cur, cout, emb_dim, dropout), attn or nn.Identity()]))
                cur = cout
                skips.append(cur)
            if level < len(channel_mult) - 1:
                self.enc.append(nn.ModuleList([ResBlock(cur, cur, emb_dim, dropout, "down"), nn.Identity()]))
                res //= 2
                skips.append(cur)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, dropout), AttentionBlock(cur, head_channels),
                                  ResBlock(cur, cur, emb_dim, dropout)])
        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            cout = channels * mult
            for _ in range(num_res_blocks + 1):
                attn = AttentionBlock(cout, head_channels) if res in attention_resolutions else None
                self.dec.append(nn.ModuleList([ResBlock(cur + skips.pop(), cout, emb_dim, dropout),
                                               attn or nn.Identity()]))
                cur = cout
            if level > 0:
                self.dec.append(nn.ModuleList([ResBlock(cur, cur, emb_dim, dropout, "up"), nn.Identity()]))
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = _zero(nn.Conv2d(cur, out_channels, 3, padding=1))
        self._n_up = len(channel_mult) - 1

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        emb = self.map_layer0(self.map_noise(c_noise))
        if self.map_guidance is not None:  # w = 1 (the conditional model) when not given
            w = guidance if guidance is not None else torch.ones(x.shape[0], device=x.device)
            emb = emb + self.map_guidance(100 * w.to(x.device, torch.float32).reshape(-1).expand(x.shape[0]))
        if self.map_label is not None:
            if class_labels is None:
                class_labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.map_label(class_labels)
        emb = F.silu(self.map_layer1(F.silu(emb)))

        h = self.conv_in(x)
        hs = [h]
        for block, attn in self.enc:
            h = attn(block(h, emb))
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block, attn in self.dec:
            if block.resample == "up":
                h = block(h, emb)
            else:
                h = attn(block(torch.cat([h, hs.pop()], dim=1), emb))
        return self.conv_out(F.silu(self.norm_out(h)))
