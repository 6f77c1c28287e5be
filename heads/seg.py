"""Shared segmentation head: one light trunk on the fused map, one 1x1 output conv per task.

The trunk (channel LayerNorm -> 3x3 conv -> GELU, optionally a second 3x3 conv -> GELU; or, with
``trunk="separable"``, each 3x3 conv replaced by a depthwise 3x3 + pointwise 1x1 pair) is shared by all
segmentation tasks, so every task's gradient reaches it; each task owns only a 1x1 conv to its classes.
Logits are computed on the feature grid and bilinearly upsampled to the requested output size; with a
``refine`` module (:class:`heads.Refiner`) the trunk's output is also carried to a finer grid with skip maps
(U-Net's last decoder stages), and a per-task 1x1 conv of that, zero at initialisation, is added to the
upsampled logits: the model starts as the one without a refiner and learns only the fine correction.
(Reading the refiner alone, as a first version did, trained too slowly: in the 400-step multi-task comparison
the thin-structure tasks stayed all background.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

SEG_TRUNKS = ("conv", "separable")


def prior_logits(prior: float | Sequence[float], num_classes: int, where: str = "prior") -> torch.Tensor:
    """Log-prior bias vector (K,) whose softmax is the given class distribution.

    ``prior`` is either a float p (only for K = 2: the foreground probability, giving [1-p, p]) or a
    sequence of K non-negative class frequencies (normalized to sum 1). Frequencies are clamped to
    1e-6 before the log so an absent class gets a large negative bias instead of -inf.
    """
    if isinstance(prior, (int, float)) and not isinstance(prior, bool):
        if num_classes != 2:
            raise ValueError(
                f"{where}: a single foreground probability needs a 2-class task, got {num_classes} classes; "
                f"pass a list of {num_classes} class frequencies instead"
            )
        if not 0.0 < float(prior) < 1.0:
            raise ValueError(f"{where}: foreground probability must lie in (0, 1), got {prior}")
        freqs = torch.tensor([1.0 - float(prior), float(prior)], dtype=torch.float64)
    else:
        freqs = torch.as_tensor(list(prior), dtype=torch.float64)
        if freqs.shape != (num_classes,):
            raise ValueError(
                f"{where}: expected {num_classes} class frequencies, got shape {tuple(freqs.shape)}"
            )
        if (freqs < 0).any() or not math.isfinite(float(freqs.sum())) or float(freqs.sum()) <= 0:
            raise ValueError(f"{where}: class frequencies must be finite, >= 0 and not all 0, got {prior}")
        freqs = freqs / freqs.sum()
    return freqs.clamp_min(1e-6).log().float()


class SegHead(nn.Module):
    """Shared segmentation trunk with per-task 1x1 output convs.

    Args:
        in_dim: channels D of the fused feature map.
        num_classes: task name -> number of classes K (binary tasks: K = 2, background and foreground).
        hidden: channels of the shared trunk.
        dropout: Dropout2d probability after the trunk (0 disables it).
        depth: number of 3x3 conv + GELU blocks in the trunk (1 or 2).
        trunk: "conv" (full 3x3 convolutions) or "separable" (depthwise 3x3 + pointwise 1x1, MobileNet-style:
            about 1/9 of the multiply-adds, for routing small CNN extractors at almost no extra cost).
        refine: an optional :class:`heads.Refiner` on the trunk's output; ``forward`` then needs its skip maps
            (``skips``), and each task gets a zero-initialised 1x1 conv of the refined map added to its logits.

    Multi-layer input: ``forward`` also accepts a list of maps with the same D; each is bilinearly
    resampled to the grid of the first one and the maps are **summed** (so ``in_dim`` does not depend on
    how many layers are passed; the trunk's LayerNorm removes the scale the sum adds).

    Example:
        >>> head = SegHead(32, {"lesion": 2, "organs": 5})
        >>> head.init_bias_from_prior("lesion", 0.03)
        >>> x = torch.randn(2, 32, 7, 9)
        >>> head(x, "lesion", out_size=(97, 130)).shape
        torch.Size([2, 2, 97, 130])
        >>> head([x, torch.randn(2, 32, 14, 18)], "organs", out_size=(112, 144)).shape
        torch.Size([2, 5, 112, 144])
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: dict[str, int],
        hidden: int = 128,
        dropout: float = 0.0,
        depth: int = 1,
        trunk: str = "conv",
        refine: nn.Module | None = None,
    ):
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"SegHead.depth: expected 1 or 2 conv blocks, got {depth}")
        if trunk not in SEG_TRUNKS:
            raise ValueError(f"SegHead.trunk: expected one of {SEG_TRUNKS}, got {trunk!r}")
        self.in_dim = in_dim
        self.hidden = hidden

        def block(cin: int) -> list[nn.Module]:
            if trunk == "conv":
                return [nn.Conv2d(cin, hidden, 3, padding=1), nn.GELU()]
            return [nn.Conv2d(cin, cin, 3, padding=1, groups=cin), nn.Conv2d(cin, hidden, 1), nn.GELU()]

        layers: list[nn.Module] = [LayerNorm2d(in_dim), *block(in_dim)]
        if depth == 2:
            layers += block(hidden)
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        self.trunk = nn.Sequential(*layers)
        self.refine = refine
        if refine is not None:
            self.refine_outputs = nn.ModuleDict()
        self.outputs = nn.ModuleDict()
        for name, k in num_classes.items():
            self.add_task(name, k)

    @property
    def num_classes(self) -> dict[str, int]:
        """Task name -> number of output classes."""
        return {name: conv.out_channels for name, conv in self.outputs.items()}

    def add_task(self, name: str, num_classes: int) -> None:
        """Add a 1x1 output conv for a new task (on the trunk's device and dtype)."""
        if name in self.outputs:
            raise ValueError(
                f"SegHead.add_task: task {name!r} already exists with {self.num_classes[name]} classes"
            )
        if num_classes < 2:
            raise ValueError(
                f"SegHead.add_task({name!r}): need >= 2 classes (binary = background + foreground), got {num_classes}"
            )
        ref = next(self.trunk.parameters())
        self.outputs[name] = nn.Conv2d(self.hidden, num_classes, 1).to(device=ref.device, dtype=ref.dtype)
        if self.refine is not None:
            fine = nn.Conv2d(self.refine.out_width, num_classes, 1).to(device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(fine.weight)
            nn.init.zeros_(fine.bias)
            self.refine_outputs[name] = fine

    @torch.no_grad()
    def init_bias_from_prior(self, task: str, prior: float | Sequence[float]) -> None:
        """Set a task's output bias to the log class prior.

        For K = 2 and a foreground probability p the bias becomes [log(1-p), log p], so
        bias[1] - bias[0] = log(p / (1 - p)) and, while the output conv's weights contribute nothing,
        softmax(logits)[1] = sigmoid(l1 - l0) = p at every pixel. For K > 2 pass K class frequencies
        (normalized here); the bias becomes their log and the softmax at init reproduces them.
        The output weights are left as they are; with their small default init the mean prediction
        starts close to the prior.
        """
        conv = self._output(task)
        conv.bias.copy_(
            prior_logits(prior, conv.out_channels, where=f"SegHead.init_bias_from_prior({task!r})")
        )

    def _output(self, task: str) -> nn.Conv2d:
        if task not in self.outputs:
            raise KeyError(
                f"SegHead: unknown task {task!r}; known segmentation tasks: {sorted(self.outputs)}"
            )
        return self.outputs[task]

    def _merge(self, x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        maps = [x] if isinstance(x, torch.Tensor) else list(x)
        if not maps:
            raise ValueError("SegHead: got an empty list of feature maps")
        for i, m in enumerate(maps):
            if m.ndim != 4 or m.shape[1] != self.in_dim:
                raise ValueError(
                    f"SegHead: feature map {i} has shape {tuple(m.shape)}, expected B x {self.in_dim} x h x w"
                )
        grid = maps[0].shape[-2:]
        out = maps[0]
        for m in maps[1:]:
            if m.shape[-2:] != grid:
                m = F.interpolate(m, size=grid, mode="bilinear", align_corners=False)
            out = out + m
        return out

    def forward(
        self,
        x: torch.Tensor | Sequence[torch.Tensor],
        task: str,
        out_size: tuple[int, int] | None = None,
        skips: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits B x K x H x W for ``task``, upsampled to ``out_size`` (None: the feature grid, or the last
        skip map's grid with a refiner, whose skip maps ``skips`` are then required, coarsest first)."""
        conv = self._output(task)
        feats = self.trunk(self._merge(x))
        logits = conv(feats)
        if self.refine is not None:
            if skips is None:
                raise ValueError("SegHead: this head refines with skip maps; pass skips=[...] (coarsest first)")
            fine = self.refine(feats, list(skips))
            logits = F.interpolate(logits.contiguous(), size=fine.shape[-2:], mode="bilinear", align_corners=False)
            logits = logits + self.refine_outputs[task](fine)
        if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
            # timm's LayerNorm2d leaves channels-last strides, which the convs keep; bilinear upsampling of a
            # channels-last tensor with few channels is ~3x slower on the CPU (8 x 2 x 14 x 14 -> 224 x 224,
            # one thread: 8.4-9.2 vs 2.3-3.3 ms), so the small logits tensor is made contiguous first.
            logits = F.interpolate(logits.contiguous(), size=tuple(out_size), mode="bilinear", align_corners=False)
        return logits
