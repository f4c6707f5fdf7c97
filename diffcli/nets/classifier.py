"""A small noise-conditional image classifier backbone: the encoder half of the ADM UNet (Dhariwal & Nichol
2021, Sec. 4: "the downsampling trunk of the UNet model with an attention pool"; here a mean pool).

Like every backbone it knows nothing of diffusion: it maps (input image, scalar noise condition) to class
logits. The wrapper in diffcli.classifier owns the scalings. Shapes: x (B, C, H, W) float32, c_noise (B,)
float32 → logits (B, num_classes).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .unet import FourierEmbedding, PositionalEmbedding, ResBlock, _groups


class EncoderClassifier(nn.Module):
    def __init__(self, *, in_channels: int, num_classes: int, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2), num_res_blocks: int = 1, dropout: float = 0.0,
                 noise_embedding: str = "fourier") -> None:
        super().__init__()
        emb_dim = 4 * channels
        self.map_noise = FourierEmbedding(channels) if noise_embedding == "fourier" else PositionalEmbedding(channels)
        self.map_layer0 = nn.Linear(channels, emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks = []
        cur = channels
        for level, mult in enumerate(channel_mult):
            cout = channels * mult
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(cur, cout, emb_dim, dropout))
                cur = cout
            if level < len(channel_mult) - 1:
                blocks.append(ResBlock(cur, cur, emb_dim, dropout, "down"))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.head = nn.Linear(cur, num_classes)

    def forward(self, x: Tensor, c_noise: Tensor) -> Tensor:
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(self.map_noise(c_noise)))))
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)
