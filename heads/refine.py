"""The refiner: segmentation features at the finest level -> a map at stride 2 or 1, U-Net style.

A plain upsampling of logits from stride 4 cannot draw a crack one pixel wide; U-Net's decoder goes on to
stride 1, concatenating the encoder's map of each scale. The refiner does that at the two finest scales with
the detail stem's maps of the raw image (:class:`router.detail.DetailStem`, ``skips``): a 1x1 reduction to
``width`` channels on the coarse grid (before upsampling), then per skip: bilinear upsampling onto the skip's
grid, concatenation, and a depthwise 3 x 3 + pointwise 1 x 1 block with a channel LayerNorm and GELU.
Separable blocks keep the full-resolution work near 0.5 k multiply-adds per pixel at the default widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn


class Refiner(nn.Module):
    """B x in_dim x h x w features + skip maps (coarsest first) -> B x width x (the last skip's grid).

    >>> ref = Refiner(96, [16, 8])
    >>> skips = [torch.rand(2, 16, 49, 65), torch.rand(2, 8, 97, 130)]
    >>> tuple(ref(torch.rand(2, 96, 25, 33), skips).shape)
    (2, 8, 97, 130)
    """

    def __init__(self, in_dim: int, skip_widths: list[int], width: int = 8):
        super().__init__()
        if not skip_widths:
            raise ValueError("Refiner: needs at least one skip map")
        self.skip_widths, self.out_width = list(skip_widths), width
        self.reduce = nn.Conv2d(in_dim, width, 1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width + s, width + s, 3, padding=1, groups=width + s),
                          nn.Conv2d(width + s, width, 1), LayerNorm2d(width), nn.GELU())
            for s in skip_widths)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        if len(skips) != len(self.blocks):
            raise ValueError(f"Refiner: expected {len(self.blocks)} skip maps (coarsest first), got {len(skips)}")
        x = self.reduce(x)
        for block, skip, width in zip(self.blocks, skips, self.skip_widths):
            if skip.ndim != 4 or skip.shape[1] != width or skip.shape[0] != x.shape[0]:
                raise ValueError(f"Refiner: skip map has shape {tuple(skip.shape)}, expected {x.shape[0]} x {width} x h x w")
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x
