"""Alignment: every extractor's dense maps -> a pyramid of levels (strides such as 4, 8, 16, 32), each at
one width, so maps of a ViT-S/14, a ViT-B/16, a CLIP B/32 and a CNN's stride 4-32 stages can be added,
weighed and concatenated level by level.

Which tap feeds which level (:func:`assign_taps`):

- a CNN's stages (taps of several strides) go to the level nearest their stride (a stride-8 stage to level 8);
- a ViT's blocks (taps of one stride) are spread over the levels in depth order, shallow blocks to fine
  levels, as DPT reassembles blocks 3 / 6 / 9 / 12 to strides 4 / 8 / 16 / 32;
- a level left without a tap borrows the tap assigned to the nearest level (a stride-16 ViT block for
  levels 4 and 8).

A tap whose stride is 1.5 or more times off its level and that got there by depth or by borrowing is
*reassembled* by learned layers owned here, never by the extractor (DPT): projected to the level's width at
its own resolution, then a k x k transposed convolution with stride k (k = 2, 4, ...) up, or 3 x 3 stride-2
convolutions down. Every other tap is bilinearly resampled, as a one-level model has always done, so
``levels: [16]`` is exactly the single-grid model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

from backbone_router.extractors import ExtractorInfo


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


def shrink(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """:func:`resample` of a map larger than `size` in a dimension (anti-aliased bilinear) as two matrix products with
    the 1-D operators torch's kernel applies, read off an identity: the same values up to float rounding, ~4x faster on
    the CPU (8 x 256 x 64 x 64 -> 16 x 16, one thread: 4.5 vs 18.4 ms). Other dtypes (bf16 autocast) go to resample."""
    if x.dtype not in (torch.float32, torch.float64):
        return resample(x, size)
    rows = _shrink_operator(x.shape[-2], size[0], x.dtype, x.device)
    cols = _shrink_operator(x.shape[-1], size[1], x.dtype, x.device)
    return rows @ x @ cols.T


@functools.lru_cache(maxsize=64)
def _shrink_operator(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """n_out x n_in: anti-aliased bilinear resampling along one axis, as F.interpolate computes it (columns of width 2:
    torch's kernel mishandles a width of 1)."""
    eye = torch.eye(n_in, dtype=dtype, device=device).view(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 2).contiguous()
    out = F.interpolate(eye, size=(n_out, 2), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0, :, 0].T.contiguous()


@dataclass(frozen=True)
class Tap:
    """One dense map of an extractor as one level uses it."""

    index: int  # position in the extractor's dense list
    stride: int  # its input pixels per cell
    factor: int  # learned reassembly: > 1 transposed-conv up by factor, < -1 strided-conv down by -factor; 0 none


def _octaves(a: int, b: int) -> float:
    return math.log2(a / b)


def assign_taps(info: ExtractorInfo, levels: list[int]) -> dict[int, list[Tap]]:
    """level stride -> the extractor's taps that feed it (see the module docstring for the rule).

    >>> from backbone_router.extractors import ExtractorInfo
    >>> vit = ExtractorInfo("vit", 384, (384,) * 4, (16,) * 4, 16, (2, 5, 8, 11), (0.5,) * 3, (0.5,) * 3)
    >>> {s: [(t.index, t.factor) for t in taps] for s, taps in assign_taps(vit, [4, 8, 16, 32]).items()}
    {4: [(0, 4)], 8: [(1, 2)], 16: [(2, 0)], 32: [(3, -2)]}
    """
    strides = list(info.strides)
    n = len(strides)
    if len(levels) == 1:
        return {levels[0]: [Tap(i, s, 0) for i, s in enumerate(strides)]}
    one_stride = len(set(strides)) == 1
    if one_stride and n > 1:  # blocks of a ViT: depth order over the levels
        depth_order = sorted(range(n), key=lambda i: info.layers[i])
        home = {i: levels[round(rank * (len(levels) - 1) / (n - 1))] for rank, i in enumerate(depth_order)}
    else:  # stages of a CNN (or a single map): the level nearest in octaves, ties to the finer
        home = {i: min(levels, key=lambda lv, s=s: (abs(_octaves(s, lv)), lv)) for i, s in enumerate(strides)}
    out: dict[int, list[Tap]] = {}
    for level in levels:
        own = [i for i in range(n) if home[i] == level]
        borrowed = not own
        if borrowed:  # the taps of the nearest level that has some
            nearest = min(set(home.values()), key=lambda lv: (abs(_octaves(lv, level)), lv))
            own = [i for i in range(n) if home[i] == nearest]
        taps = []
        for i in own:
            octaves = _octaves(strides[i], level)  # > 0: the tap is coarser than the level
            learned = (borrowed or one_stride) and round(abs(octaves)) >= 1  # >= ~1.5x off its level
            factor = 0 if not learned else (2 ** round(octaves) if octaves > 0 else -(2 ** round(-octaves)))
            taps.append(Tap(i, strides[i], factor))
        out[level] = taps
    return out


def reassembly(width: int, factor: int) -> nn.Module:
    """DPT's learned resampling of a projected map: transposed conv up by `factor`, strided 3 x 3 convs down."""
    if factor > 1:
        return nn.ConvTranspose2d(width, width, kernel_size=factor, stride=factor)
    steps = round(math.log2(-factor))
    return nn.Sequential(*[nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(steps)])


class LevelAligner(nn.Module):
    """An extractor's taps for one level -> B x width x h x w on that level's grid.

    The taps are brought to the grid, concatenated, and a 1x1 convolution projects them to `width`,
    followed by a channel LayerNorm so extractors enter the fusion at comparable scales.

    The projection runs at the cheaper of two resolutions per tap: a tap finer than the grid (a stride-8 stage) is
    resampled first and projected on the grid; a tap coarser than the grid (a stride-32 stage) is projected at its own
    resolution and then upsampled. A 1x1 convolution and bilinear resampling are both linear and the resampling
    weights sum to 1, so the order does not change the result (up to float rounding, tested); projecting a 7 x 7 map
    before upsampling it to 14 x 14 costs a quarter of the multiply-adds. Taps projected at the same resolution (all
    those on the grid after resampling; coarser ones of one size) are concatenated and projected by one convolution
    on their slices of the 1x1 weights: the same sum as one convolution per tap, in fewer, larger ops (and a finer tap
    is resampled by :func:`shrink`, as :func:`resample` computes it). A reassembled
    tap is projected, then goes through its learned up / down layers, then is resampled to the exact grid.
    """

    def __init__(self, taps: list[Tap], widths: list[int], width: int):
        super().__init__()
        self.taps = taps
        self.widths = [widths[t.index] for t in taps]
        self.proj = nn.Conv2d(sum(self.widths), width, kernel_size=1)
        self.norm = LayerNorm2d(width)
        self.reassemble = nn.ModuleDict({str(k): reassembly(width, t.factor) for k, t in enumerate(taps) if t.factor})

    def forward(self, dense: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
        weights = self.proj.weight.split(self.widths, dim=1)
        parts = []  # the projected taps, each on the grid
        groups: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}  # size -> (maps, weights)
        for k, (tap, w) in enumerate(zip(self.taps, weights, strict=True)):
            d = dense[tap.index]
            if tap.factor:
                parts.append(resample(self.reassemble[str(k)](F.conv2d(d, w)), grid))
                continue
            if not (d.shape[-2] <= grid[0] and d.shape[-1] <= grid[1]):  # finer than the grid: resample, then project
                d = shrink(d, grid)
            maps, ws = groups.setdefault(tuple(d.shape[-2:]), ([], []))
            maps.append(d)
            ws.append(w)
        for maps, ws in groups.values():  # one projection per resolution, then up to the grid
            parts.append(resample(F.conv2d(_channels(maps), _channels(ws)), grid))
        x = parts[0]
        for y in parts[1:]:
            x = x + y
        return self.norm(x + self.proj.bias.view(1, -1, 1, 1))


def _channels(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated along dim 1 (one tensor: itself, no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


class Aligner(nn.Module):
    """One extractor's maps -> one B x width_l x h_l x w_l map per level, and pooled -> B x pooled_width.

    With `cls_width`, ``self.cls`` also brings *every* tap onto one grid (bilinear resampling, 1x1 projection to
    `cls_width`): the map a one-level model's classification reads, for a pyramid's classification tasks.

    >>> from backbone_router.extractors import ExtractorInfo
    >>> cnn = ExtractorInfo("cnn", 40, (8, 24, 40), (8, 16, 32), 32, (2, 3, 4), (0.5,) * 3, (0.5,) * 3)
    >>> al = Aligner(cnn, [4, 8, 16, 32], [8, 8, 16, 16], pooled_width=16)
    >>> maps, vec = al([torch.rand(1, 8, 7, 8), torch.rand(1, 24, 4, 4), torch.rand(1, 40, 2, 2)],
    ...                torch.rand(1, 40), grids=[(14, 16), (7, 8), (4, 4), (2, 2)])
    >>> [tuple(m.shape) for m in maps], tuple(vec.shape)
    ([(1, 8, 14, 16), (1, 8, 7, 8), (1, 16, 4, 4), (1, 16, 2, 2)], (1, 16))
    """

    def __init__(self, info: ExtractorInfo, levels: list[int], widths: list[int], pooled_width: int,
                 cls_width: int | None = None):
        super().__init__()
        assignment = assign_taps(info, levels)
        self.levels = nn.ModuleDict(
            {str(s): LevelAligner(assignment[s], list(info.widths), w) for s, w in zip(levels, widths)})
        self.pooled_proj = nn.Sequential(nn.Linear(info.width, pooled_width), nn.LayerNorm(pooled_width))
        if cls_width is not None:  # classification's own aligner: every tap onto one grid, as at one level
            self.cls = LevelAligner([Tap(i, s, 0) for i, s in enumerate(info.strides)], list(info.widths), cls_width)

    def forward(self, dense: list[torch.Tensor], pooled: torch.Tensor, grids: list[tuple[int, int] | None]):
        """`grids`: each level's grid, or None for a level not needed now (its map comes back as None)."""
        maps = [None if grid is None else aligner(dense, grid)
                for aligner, grid in zip(self.levels.values(), grids, strict=True)]
        return maps, self.pooled_proj(pooled)
