"""Alignment: every extractor's dense maps -> one width on one grid, so maps of a ViT-S/14, a ViT-B/16,
a CLIP B/32 and a CNN's stride 8/16/32 stages can be added, weighed and concatenated."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from extractors import ExtractorInfo


def grid_size(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Cells of the common grid for an image: ceil(H / stride) x ceil(W / stride)."""
    return math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)


def resample(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resampling to `size`, anti-aliased when shrinking (a stride-8 map onto a stride-16 grid)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = x.shape[-2] > size[0] or x.shape[-1] > size[1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class Aligner(nn.Module):
    """One extractor's maps (any widths/strides) -> B x width x h x w on the grid, and pooled -> B x width.

    Each layer is resampled to the grid, the layers are concatenated, and a 1x1 convolution projects them
    to `width` (resampling first keeps the projection at the grid's resolution; both are linear, so the
    order does not change the result), followed by a channel LayerNorm so extractors enter the fusion at
    comparable scales.
    """

    def __init__(self, info: ExtractorInfo, width: int):
        super().__init__()
        self.proj = nn.Conv2d(sum(info.widths), width, kernel_size=1)
        self.norm = LayerNorm2d(width)
        self.pooled_proj = nn.Sequential(nn.Linear(info.width, width), nn.LayerNorm(width))

    def forward(self, dense: list[torch.Tensor], pooled: torch.Tensor, grid: tuple[int, int]):
        x = torch.cat([resample(d, grid) for d in dense], dim=1)
        return self.norm(self.proj(x)), self.pooled_proj(pooled)
