"""Top-down decoder: a pyramid of fused maps (finest first) -> one map at the finest level (UPerNet's fuse).

FPN / UPerNet-lite: starting from the coarsest level, the running map is projected by a lateral 1x1
convolution to the next finer level's width (before upsampling, a quarter of the work), bilinearly
upsampled onto that level's grid, added to its fused map, and merged by a 3 x 3 block (a full
convolution, or depthwise 3 x 3 + pointwise 1 x 1 with ``block="separable"``) with a channel LayerNorm
and GELU. Coarse context thus reaches the fine grid.

The output (UPerNet's fuse step) is not the finest running map alone but every level's map after its
merge (the coarsest level as it came in) resampled to the finest grid, concatenated and mixed by a 1 x 1
convolution + LayerNorm + GELU to ``out_width`` channels: the head reads the coarse levels at their full
width, not through the finest level's few channels (measured better, docs/levels.md). A 1 x 1 convolution and bilinear
resampling are both linear, so each level's slice of the 1 x 1 weights is applied on that level's own
grid before resampling, and the results summed: the same map as concatenating first, at a fraction of
the work (the coarse levels are not widened at the finest resolution).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

DECODER_BLOCKS = ("conv", "separable")


def merge_block(width: int, block: str) -> nn.Sequential:
    """3 x 3 merge of a level: conv (or depthwise + pointwise) -> LayerNorm2d -> GELU."""
    if block == "conv":
        convs = [nn.Conv2d(width, width, 3, padding=1)]
    else:
        convs = [nn.Conv2d(width, width, 3, padding=1, groups=width), nn.Conv2d(width, width, 1)]
    return nn.Sequential(*convs, LayerNorm2d(width), nn.GELU())


class TopDownDecoder(nn.Module):
    """Maps of widths ``widths`` (finest level first) -> B x out_width x h_0 x w_0 (``out_width`` default: the
    coarsest level's width).

    >>> maps = [torch.rand(2, 16, 28, 30), torch.rand(2, 32, 14, 15), torch.rand(2, 64, 7, 8)]
    >>> tuple(TopDownDecoder([16, 32, 64])(maps).shape)
    (2, 64, 28, 30)
    """

    def __init__(self, widths: list[int], block: str = "separable", out_width: int | None = None):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"TopDownDecoder: needs >= 2 levels, got widths {widths}")
        if block not in DECODER_BLOCKS:
            raise ValueError(f"TopDownDecoder.block: expected one of {DECODER_BLOCKS}, got {block!r}")
        self.widths = list(widths)
        self.out_width = out_width or widths[-1]
        # lateral[i] takes level i + 1's running map to level i's width; merge[i] merges at level i.
        self.lateral = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in range(len(widths) - 1))
        self.merge = nn.ModuleList(merge_block(widths[i], block) for i in range(len(widths) - 1))
        self.fuse = nn.Sequential(nn.Conv2d(sum(widths), self.out_width, 1), LayerNorm2d(self.out_width), nn.GELU())

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.widths):
            raise ValueError(f"TopDownDecoder: expected {len(self.widths)} maps (finest first), got {len(maps)}")
        x = maps[-1]
        merged = [x]
        for i in range(len(maps) - 2, -1, -1):
            up = F.interpolate(self.lateral[i](x), size=maps[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.merge[i](maps[i] + up)
            merged.append(x)
        conv, size = self.fuse[0], x.shape[-2:]
        fused = conv.bias[None, :, None, None]
        for m, w in zip(reversed(merged), conv.weight.split(self.widths, dim=1)):  # finest first, as the widths
            y = F.conv2d(m, w)
            fused = fused + (y if y.shape[-2:] == size else
                             F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        return self.fuse[1:](fused)
