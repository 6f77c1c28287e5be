"""The detail path: a small trainable conv stem on the raw image that feeds the finest level.

Extractors see the image at stride 14-32 (ViTs) or through frozen ImageNet stages; an edge one or two
pixels wide survives neither. The stem sees the image itself at stride 2 and 4 (two 3 x 3 stride-2
convolutions, 3 -> 16 -> 32 channels, GELU) and a 1x1 projection with a channel LayerNorm brings it to the
finest level's width; its map is added to that level's fused map, so a committee of pure ViTs still sees
edges. 5.1 k parameters in the convolutions plus 35 x width for the projection and norm (6.2 k at width 32).
"""

from __future__ import annotations

import torch
from timm.layers import LayerNorm2d
from torch import nn

from .align import resample


class DetailStem(nn.Module):
    """[0, 1] images B x 3 x H x W -> B x width x h x w on the finest level's grid.

    >>> stem = DetailStem(32)
    >>> tuple(stem(torch.rand(2, 3, 97, 130), (25, 33)).shape)
    (2, 32, 25, 33)
    """

    def __init__(self, width: int, hidden: tuple[int, int] = (16, 32)):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, hidden[0], 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hidden[0], hidden[1], 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hidden[1], width, 1), LayerNorm2d(width),
        )  # fmt: skip

    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return resample(self.net((images - 0.5) / 0.25), grid)
