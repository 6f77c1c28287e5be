"""Top-down decoder: a pyramid of fused maps (finest first) -> one map at the finest level.

FPN / UPerNet-lite: starting from the coarsest level, the running map is projected by a lateral 1x1
convolution to the next finer level's width (before upsampling, a quarter of the work), bilinearly
upsampled onto that level's grid, added to its fused map, and merged by a 3 x 3 block (a full
convolution, or depthwise 3 x 3 + pointwise 1 x 1 with ``block="separable"``) with a channel LayerNorm
and GELU. Coarse context thus reaches the fine grid, where the segmentation head reads it.
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
    """Maps of widths ``widths`` (finest level first) -> B x widths[0] x h_0 x w_0.

    >>> dec = TopDownDecoder([16, 32, 64])
    >>> maps = [torch.rand(2, 16, 28, 30), torch.rand(2, 32, 14, 15), torch.rand(2, 64, 7, 8)]
    >>> tuple(dec(maps).shape)
    (2, 16, 28, 30)
    """

    def __init__(self, widths: list[int], block: str = "separable"):
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"TopDownDecoder: needs >= 2 levels, got widths {widths}")
        if block not in DECODER_BLOCKS:
            raise ValueError(f"TopDownDecoder.block: expected one of {DECODER_BLOCKS}, got {block!r}")
        self.widths = list(widths)
        # lateral[i] takes level i + 1's running map to level i's width; merge[i] merges at level i.
        self.lateral = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 1) for i in range(len(widths) - 1))
        self.merge = nn.ModuleList(merge_block(widths[i], block) for i in range(len(widths) - 1))

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        if len(maps) != len(self.widths):
            raise ValueError(f"TopDownDecoder: expected {len(self.widths)} maps (finest first), got {len(maps)}")
        x = maps[-1]
        for i in range(len(maps) - 2, -1, -1):
            up = F.interpolate(self.lateral[i](x), size=maps[i].shape[-2:], mode="bilinear", align_corners=False)
            x = self.merge[i](maps[i] + up)
        return x
