"""The detail path: a small trainable conv stem on the raw image that feeds the finest level.

Extractors see the image at stride 14-32 (ViTs) or through frozen ImageNet stages; an edge one or two
pixels wide survives neither. The stem sees the image itself at stride 2 and 4 (two 3 x 3 stride-2
convolutions, 3 -> 16 -> 32 channels, GELU) and a 1x1 projection with a channel LayerNorm brings it to the
finest level's width; its map is added to that level's fused map, so a committee of pure ViTs still sees
edges. 5.1 k parameters in the convolutions plus 35 x width for the projection and norm (6.2 k at width 32).

With ``full_res=True`` it also keeps a full-resolution map (one 3 x 3 convolution, 3 -> 8 channels, GELU:
224 parameters), and :meth:`DetailStem.forward` with ``skips`` returns its stride-2 and stride-1 maps for the
segmentation head's refiner (``head.refine``, :class:`heads.Refiner`), U-Net's skip connections at the two
finest scales, computed from the raw image instead of a frozen encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import nn

from .align import resample

SKIP_WIDTHS = {2: 16, 1: 8}  # channels of the maps the stem keeps for the refiner, by stride


class DetailStem(nn.Module):
    """[0, 1] images B x 3 x H x W -> B x width x h x w on the finest level's grid (and, asked, skip maps).

    >>> stem = DetailStem(32, full_res=True)
    >>> x, skips = stem(torch.rand(2, 3, 97, 130), (25, 33), skips=[2, 1])   # skips=(): x and {}
    >>> tuple(x.shape), {s: tuple(m.shape) for s, m in skips.items()}
    ((2, 32, 25, 33), {2: (2, 16, 49, 65), 1: (2, 8, 97, 130)})
    """

    def __init__(self, width: int, hidden: tuple[int, int] = (SKIP_WIDTHS[2], 32), full_res: bool = False):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, hidden[0], 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hidden[0], hidden[1], 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(hidden[1], width, 1), LayerNorm2d(width),
        )  # fmt: skip
        if full_res:
            self.full = nn.Sequential(nn.Conv2d(3, SKIP_WIDTHS[1], 3, padding=1), nn.GELU())

    def forward(self, images: torch.Tensor, grid: tuple[int, int],
                skips: Sequence[int] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The map for the finest level, and {stride: map} for the asked `skips` (strides, of 2 and 1)."""
        if 1 in skips and not hasattr(self, "full"):
            raise ValueError("DetailStem: a stride-1 skip needs full_res=True")
        x = (images - 0.5) / 0.25
        half = self.net[:2](x)
        return resample(self.net[2:](half), grid), {s: half if s == 2 else self.full(x) for s in skips}
