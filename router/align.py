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
    if shrink and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        # The CPU has no bf16/fp16 kernel for anti-aliased resampling (e.g. under bf16 autocast): use fp32.
        return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class Aligner(nn.Module):
    """One extractor's maps (any widths/strides) -> B x width x h x w on the grid, and pooled -> B x width.

    The layers are brought to the grid, concatenated, and a 1x1 convolution projects them to `width`,
    followed by a channel LayerNorm so extractors enter the fusion at comparable scales.

    The projection is computed per layer, on each layer's slice of the 1x1 weights, at the cheaper of the two
    resolutions: a layer finer than the grid (a stride-8 stage) is resampled first and projected on the
    grid; a layer coarser than the grid (a stride-32 stage) is projected at its own resolution and then
    upsampled. A 1x1 convolution and bilinear resampling are both linear and the resampling weights sum
    to 1, so the order does not change the result (up to float rounding, tested); projecting a 7 x 7 map
    before upsampling it to 14 x 14 costs a quarter of the multiply-adds.
    """

    def __init__(self, info: ExtractorInfo, width: int):
        super().__init__()
        self.widths = list(info.widths)
        self.proj = nn.Conv2d(sum(info.widths), width, kernel_size=1)
        self.norm = LayerNorm2d(width)
        self.pooled_proj = nn.Sequential(nn.Linear(info.width, width), nn.LayerNorm(width))

    def forward(self, dense: list[torch.Tensor], pooled: torch.Tensor, grid: tuple[int, int]):
        weights = self.proj.weight.split(self.widths, dim=1)
        x = None
        for d, w in zip(dense, weights, strict=True):
            if d.shape[-2] <= grid[0] and d.shape[-1] <= grid[1]:
                y = resample(F.conv2d(d, w), grid)  # coarser than (or on) the grid: project, then upsample
            else:
                y = F.conv2d(resample(d, grid), w)
            x = y if x is None else x + y
        return self.norm(x + self.proj.bias.view(1, -1, 1, 1)), self.pooled_proj(pooled)
