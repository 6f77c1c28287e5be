"""How much of a segmentation task a stride-s grid can carry, and where a model's errors lie.

A head that sees only a stride-s grid predicts at best something like the mask averaged over s x s blocks and
upsampled bilinearly. :class:`GridCeiling` scores exactly that prediction against the true masks (for two classes
at the best of a few thresholds on the foreground fraction, since a model can bias its logits; for more, by
argmax), so it tells, before any training, which strides a task needs: on CFD's cracks (eval size 160 x 240) the
ceiling is 0.14 foreground IoU at stride 16 and 0.43 at stride 4; on MTD's defects (128 x 128) 0.85 at stride 16.
It is an estimate of what a grid can carry, not a bound on every possible head (a learned upsampler can do better
than bilinear), and it is computed on the masks alone.

:class:`GroupIoU` scores predictions with the training metric overall and per image group (e.g. MTD's defect type
from its labels.csv), and for two classes counts the images with foreground and those where the prediction hits any of
it: a model far below its grid's ceiling that finds few of the defect images is limited by recognition, not by
resolution. ``python train/ceiling.py`` prints both for a config's segmentation tasks.

>>> masks = torch.zeros(1, 32, 32, dtype=torch.long)
>>> masks[0, :, 8] = 1                             # a one-pixel vertical line
>>> ceiling = GridCeiling(num_classes=2, strides=[1, 4, 16])
>>> ceiling.update(masks)
>>> {s: round(v, 2) for s, v in ceiling.compute()["overall"].items()}
{1: 1.0, 4: 0.25, 16: 0.09}
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.nn.functional as F

from backbone_router.train.training.metrics import SegMetrics

THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # foreground-fraction thresholds tried for a two-class task
ALL = "all"  # the group name of every image together


class GroupIoU:
    """The training metric (train/training/metrics.py's SegMetrics) of predictions against masks, overall and per image group.

    ``score()`` is what a task is scored by: the foreground IoU for two classes, else the mean IoU over the classes
    that occur. For two classes it also counts, per group, the images with foreground and those where the
    prediction hits any of it.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.meters: dict[str, SegMetrics] = {}
        self.images: dict[str, int] = defaultdict(int)  # group -> images with foreground (two classes)
        self.found: dict[str, int] = defaultdict(int)  # group -> of those, images where the prediction hits any of it

    def update(self, pred: torch.Tensor, target: torch.Tensor, groups: list[str] | None = None) -> None:
        """Add a batch: `pred` and `target` B x H x W class indices; `groups` one name per image (or None)."""
        if pred.shape != target.shape or pred.dim() != 3:
            raise ValueError(f"GroupIoU.update: pred {tuple(pred.shape)} and target {tuple(target.shape)} must "
                             "both be B x H x W")
        if groups is not None and len(groups) != pred.shape[0]:
            raise ValueError(f"GroupIoU.update: {len(groups)} group names for a batch of {pred.shape[0]} images")
        members = {ALL: list(range(pred.shape[0]))}
        for i, g in enumerate(groups or []):
            members.setdefault(g, []).append(i)
        fg = (target == 1).flatten(1)
        has_fg, hit = fg.any(1), ((pred == 1).flatten(1) & fg).any(1)
        for g, idx in members.items():
            if g not in self.meters:
                self.meters[g] = SegMetrics([str(k) for k in range(self.num_classes)], self.ignore_index)
            self.meters[g].update(pred[idx], target[idx])
            if self.num_classes == 2:
                self.images[g] += int(has_fg[idx].sum())
                self.found[g] += int(hit[idx].sum())

    def groups(self) -> list[str]:
        """The group names seen, `all` first."""
        return [ALL] + sorted(g for g in self.meters if g != ALL)

    def score(self, group: str = ALL) -> float:
        """Foreground IoU (two classes) or mean IoU over the classes that occur; nan for an empty group."""
        if group not in self.meters:
            return math.nan
        return self.meters[group].compute()["fg_iou" if self.num_classes == 2 else "mIoU"]


def block_prediction(masks: torch.Tensor, num_classes: int, stride: int,
                     ignore_index: int | None = None) -> torch.Tensor:
    """B x K x H x W class fractions of the masks averaged over stride x stride blocks, upsampled bilinearly.

    The block grid is ceil(H / stride) x ceil(W / stride), as the Router's; ignored pixels count for no class.
    """
    onehot = torch.stack([masks == k for k in range(num_classes)], 1).float()
    if ignore_index is not None:
        onehot = onehot * (masks != ignore_index)[:, None]
    if stride == 1:
        return onehot
    blocks = F.avg_pool2d(onehot, stride, stride, ceil_mode=True)
    return F.interpolate(blocks, size=masks.shape[-2:], mode="bilinear", align_corners=False)


class GridCeiling:
    """Scores of the best stride-s block prediction of each mask, per stride, overall and per image group.

    For two classes the foreground is predicted where its block fraction exceeds a threshold, and the threshold
    (of :data:`THRESHOLDS`) that scores best over all images is kept for every group; for more classes, argmax.
    """

    def __init__(self, num_classes: int, strides: list[int], ignore_index: int | None = None,
                 thresholds: tuple[float, ...] = THRESHOLDS):
        bad = [s for s in strides if not isinstance(s, int) or s < 1]
        if bad or not strides:
            raise ValueError(f"GridCeiling: strides must be positive ints, got {strides}")
        self.num_classes, self.strides, self.ignore_index = num_classes, list(strides), ignore_index
        self.thresholds = tuple(thresholds) if num_classes == 2 else (None,)
        self.meters = {(s, t): GroupIoU(num_classes, ignore_index) for s in self.strides for t in self.thresholds}
        self.pixels: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(num_classes, dtype=torch.float64))

    def update(self, masks: torch.Tensor, groups: list[str] | None = None) -> None:
        """Add a batch of B x H x W masks (one size per batch), with one group name per mask or None."""
        if masks.dim() != 3:
            raise ValueError(f"GridCeiling.update: masks must be B x H x W, got {tuple(masks.shape)}")
        counts = torch.stack([(masks == k).flatten(1).sum(1) for k in range(self.num_classes)], 1).double()
        for i in range(masks.shape[0]):
            for g in [ALL] if groups is None else [ALL, groups[i]]:
                self.pixels[g] += counts[i]
        for s in self.strides:
            frac = block_prediction(masks, self.num_classes, s, self.ignore_index)
            for t in self.thresholds:
                pred = frac.argmax(1) if t is None else (frac[:, 1] > t).long()
                self.meters[(s, t)].update(pred, masks, groups)

    def compute(self) -> dict:
        """{"overall": stride -> score, "groups": group -> stride -> score, "threshold": stride -> t,
        "share": group -> its fraction of the foreground pixels (two classes) or of all labelled pixels}."""
        best = {s: max(self.thresholds, key=lambda t, s=s: _or_minus_one(self.meters[(s, t)].score()))
                for s in self.strides}
        groups = self.meters[(self.strides[0], self.thresholds[0])].groups()
        first = 1 if self.num_classes == 2 else 0  # two classes: the foreground's pixels; more: every class's
        fg = {g: float(self.pixels[g][first:].sum()) for g in groups}
        return {
            "overall": {s: self.meters[(s, best[s])].score() for s in self.strides},
            "groups": {g: {s: self.meters[(s, best[s])].score(g) for s in self.strides} for g in groups if g != ALL},
            "threshold": best if self.num_classes == 2 else {},
            "share": {g: fg[g] / fg[ALL] if fg[ALL] else math.nan for g in groups if g != ALL},
        }


def _or_minus_one(value: float) -> float:
    return -1.0 if math.isnan(value) else value
