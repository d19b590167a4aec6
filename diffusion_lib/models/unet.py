"""UNetCifar32: the DDPM UNet (Ho et al. 2020, appendix B) scaled down for 32×32 images.

Sinusoidal time embedding, residual blocks with GroupNorm, SiLU and dropout, optional
self-attention at chosen resolutions. At base_channels 32 with the default layout
(channel_mults 1,2,2,2, two blocks per level, no attention) it has ≈1.98M parameters,
the research notes' figure.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 8


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of integer timesteps (Vaswani et al. 2017, §3.5)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, time_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, out_ch)
        self.norm2 = nn.GroupNorm(GROUPS, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (b, hw, c)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNetCifar32(nn.Module):
    def __init__(
        self,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (),
        dropout: float = 0.1,
        image_channels: int = 3,
    ):
        super().__init__()
        self.base_channels = base_channels
        time_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        self.conv_in = nn.Conv2d(image_channels, base_channels, 3, padding=1)

        def level(ch: int, res: int) -> nn.Module:
            return AttentionBlock(ch) if res in attention_resolutions else nn.Identity()

        # Down path: remember each output's channels for the skip connections.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch, res = base_channels, 32
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(
                    nn.ModuleList(
                        [ResBlock(ch, base_channels * mult, time_dim, dropout), level(base_channels * mult, res)]
                    )
                )
                ch = base_channels * mult
                skip_channels.append(ch)
            if i < len(channel_mults) - 1:
                self.down.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_channels.append(ch)
                res //= 2

        self.mid = nn.ModuleList(
            [ResBlock(ch, ch, time_dim, dropout), level(ch, res), ResBlock(ch, ch, time_dim, dropout)]
        )

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                out = base_channels * mult
                self.up.append(
                    nn.ModuleList([ResBlock(ch + skip_channels.pop(), out, time_dim, dropout), level(out, res)])
                )
                ch = out
            if i > 0:
                self.up.append(
                    nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1))
                )
                res *= 2

        self.norm_out = nn.GroupNorm(GROUPS, ch)
        self.conv_out = nn.Conv2d(ch, image_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.conv_in(x)
        skips = [h]
        for block in self.down:
            if isinstance(block, nn.ModuleList):
                h = block[1](block[0](h, temb))
            else:
                h = block(h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
        for block in self.up:
            if isinstance(block, nn.ModuleList):
                h = block[1](block[0](torch.cat([h, skips.pop()], dim=1), temb))
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))
