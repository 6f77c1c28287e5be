"""Per-task evaluation metrics on torchmetrics, plus gate weights.

Segmentation: a ``MulticlassStatScores`` (average=None, ignore_index honoured) accumulates per-class
tp / fp / tn / fn over every pixel; IoU, Dice (= pixel F1), precision and recall per class follow from it.
Classes absent from both predictions and targets are NaN per class and left out of the means (mIoU, ...).
Binary seg adds a sweep over thresholds 0.1..0.9 on the foreground probability (precision, recall, IoU,
false-positive rate) and the predicted vs true foreground fraction.

Classification: accuracy (micro), balanced accuracy (``MulticlassAccuracy(average="macro")``: the mean
per-class recall over classes present in the targets) and macro F1.

>>> m = SegMetrics(["background", "defect"], ignore_index=None)
>>> m.update(torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [0, 1]]]), torch.tensor([[[.1, .9], [.6, .8]]]))
>>> round(m.compute()["fg_iou"], 3)
0.667
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassStatScores

THRESHOLDS = tuple(round(0.1 * k, 1) for k in range(1, 10))


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den with NaN where den == 0."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def _floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().cpu().tolist()]


def _nanmean(t: torch.Tensor) -> float:
    t = t[~torch.isnan(t)]
    return float(t.mean()) if t.numel() else float("nan")


class ThresholdSweep(Metric):
    """tp / fp / fn / tn of ``prob >= threshold`` for each threshold, over non-ignored pixels.

    Counted from one histogram instead of a thresholds x pixels comparison: each pixel's bin is the number of
    thresholds at or below its probability (a uint8 count, one comparison per threshold; NaN is at none), so it is
    predicted foreground at exactly the thresholds below its bin; one ``bincount`` of (bin, foreground) codes and
    reverse cumulative sums give tp / fp. (torch.bucketize and masked selects: 49 instead of 6.5 ms for 32 x 160 x
    160 pixels on one CPU thread.)

    >>> s = ThresholdSweep((0.3, 0.6))
    >>> s.update(torch.tensor([0.2, 0.3, 0.7, 0.6]), torch.tensor([0, 1, 1, 0]))
    >>> s.tp.tolist(), s.fp.tolist(), s.fn.tolist(), s.tn.tolist()
    ([2, 1], [1, 1], [0, 1], [1, 1])
    """

    full_state_update = False
    MAX_THRESHOLDS = 126  # codes 2 * bin + foreground, and one for ignored pixels, fit a uint8

    def __init__(self, thresholds: tuple[float, ...] = THRESHOLDS, ignore_index: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if (not thresholds or len(thresholds) > self.MAX_THRESHOLDS
                or any(not math.isfinite(b) or b <= a for a, b in zip((-math.inf, *thresholds), thresholds))):
            raise ValueError(f"ThresholdSweep.thresholds: expected 1 to {self.MAX_THRESHOLDS} finite values in "
                             f"increasing order, got {thresholds}")
        self.ignore_index = ignore_index
        self.register_buffer("thresholds", torch.tensor(thresholds, dtype=torch.float32), persistent=False)
        self.threshold_values = self.thresholds.tolist()  # the float32 values as Python floats: no device sync per update
        for name in ("tp", "fp", "fn", "tn"):
            self.add_state(name, default=torch.zeros(len(thresholds), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prob: torch.Tensor, target: torch.Tensor) -> None:
        if prob.shape != target.shape:
            raise ValueError(f"ThresholdSweep: prob {tuple(prob.shape)} and target {tuple(target.shape)} differ")
        p, k = prob.float(), len(self.thresholds)
        bins = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)
        for threshold in self.threshold_values:
            bins += p >= threshold  # NaN >= threshold is False: background at every threshold
        code = bins.mul_(2).add_(target == 1)
        if self.ignore_index is not None:
            code[target == self.ignore_index] = 2 * (k + 1)
        counts = torch.bincount(code.flatten(), minlength=2 * (k + 1) + 1)[: 2 * (k + 1)].view(k + 1, 2)
        neg, pos = counts[:, 0], counts[:, 1]
        # predicted foreground at threshold j <=> bin > j: the pixels of bins j+1..T
        tp, fp = pos.flip(0).cumsum(0).flip(0)[1:], neg.flip(0).cumsum(0).flip(0)[1:]
        self.tp += tp
        self.fp += fp
        self.fn += pos.sum() - tp
        self.tn += neg.sum() - fp

    def compute(self) -> dict[str, list[float]]:
        return {
            "thresholds": [round(v, 4) for v in _floats(self.thresholds)],
            "precision": _floats(_ratio(self.tp, self.tp + self.fp)),
            "recall": _floats(_ratio(self.tp, self.tp + self.fn)),
            "iou": _floats(_ratio(self.tp, self.tp + self.fp + self.fn)),
            "fpr": _floats(_ratio(self.fp, self.fp + self.tn)),
        }


class SegMetrics:
    """IoU / Dice / precision / recall per class and their means; binary tasks add the threshold sweep."""

    def __init__(self, classes: list[str], ignore_index: int | None, device: torch.device | str = "cpu"):
        self.classes, self.ignore_index = list(classes), ignore_index
        k = len(classes)
        # sync_on_compute=False: evaluation gathers predictions first, so every update already sees all data.
        # validate_args=False: :meth:`update` checks the class range itself (min / max); torchmetrics' check runs
        # torch.unique on every batch, ~11 % of a comparison's evaluation on the CPU.
        self.stats = MulticlassStatScores(
            num_classes=k, average=None, multidim_average="global", ignore_index=ignore_index, sync_on_compute=False,
            validate_args=False,
        ).to(device)
        self.sweep = ThresholdSweep(ignore_index=ignore_index, sync_on_compute=False).to(device) if k == 2 else None

    def update(self, pred: torch.Tensor, target: torch.Tensor, fg_prob: torch.Tensor | None = None) -> None:
        """pred, target: B x H x W class indices; fg_prob: B x H x W foreground probability (binary)."""
        if pred.shape != target.shape:
            raise ValueError(f"SegMetrics: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        if target.numel() == 0:  # nothing to count
            return
        # one host read for both ranges (on an accelerator: one sync); ignored target pixels count as class 0 here
        counted = target if self.ignore_index is None else target.masked_fill(target == self.ignore_index, 0)
        ranges = torch.stack([torch.stack(torch.aminmax(t)) for t in (pred, counted)]).tolist()
        for what, (low, high) in zip(("pred", "target"), ranges):
            if low < 0 or high >= len(self.classes):
                ignored = f" or {self.ignore_index} (ignored)" if what == "target" and self.ignore_index is not None else ""
                raise ValueError(f"SegMetrics: {what} has class values in [{low}, {high}], expected "
                                 f"0..{len(self.classes) - 1}{ignored}")
        self.stats.update(pred, target)
        if self.sweep is not None and fg_prob is not None:
            self.sweep.update(fg_prob, target)

    def compute(self) -> dict[str, Any]:
        tp, fp, tn, fn, _ = self.stats.compute().T
        iou, dice = _ratio(tp, tp + fp + fn), _ratio(2 * tp, 2 * tp + fp + fn)
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        out: dict[str, Any] = {
            "mIoU": _nanmean(iou), "mDice": _nanmean(dice),
            "mPrecision": _nanmean(precision), "mRecall": _nanmean(recall),
            "pixel_accuracy": float(tp.sum() / (tp.sum() + fn.sum()).clamp_min(1)),
            "iou": dict(zip(self.classes, _floats(iou))),
            "dice": dict(zip(self.classes, _floats(dice))),
        }
        if len(self.classes) == 2:  # the foreground class, and how much of it there is
            out.update(fg_iou=float(iou[1]), fg_dice=float(dice[1]), fg_precision=float(precision[1]),
                       fg_recall=float(recall[1]))
            total = (tp + fn).sum().clamp_min(1)
            out["fg_fraction_true"] = float((tp[1] + fn[1]) / total)
            out["fg_fraction_pred"] = float((tp[1] + fp[1]) / total)
            if self.sweep is not None and int(self.sweep.tp.sum() + self.sweep.fp.sum() + self.sweep.fn.sum() + self.sweep.tn.sum()):
                out["sweep"] = self.sweep.compute()
        return out

    def headline(self, result: dict[str, Any]) -> dict[str, float]:
        """The few numbers for the progress log and summary."""
        keys = ("fg_iou", "fg_dice", "mIoU") if len(self.classes) == 2 else ("mIoU", "mDice", "pixel_accuracy")
        return {k: result[k] for k in keys}


class ClsMetrics:
    """Accuracy, balanced accuracy (macro recall) and macro F1."""

    def __init__(self, classes: list[str], device: torch.device | str = "cpu"):
        k = len(classes)
        kw = {"num_classes": k, "sync_on_compute": False}
        self.metrics = {
            "accuracy": MulticlassAccuracy(average="micro", **kw).to(device),
            "balanced_accuracy": MulticlassAccuracy(average="macro", **kw).to(device),
            "macro_f1": MulticlassF1Score(average="macro", **kw).to(device),
        }

    def update(self, pred: torch.Tensor, target: torch.Tensor, fg_prob: torch.Tensor | None = None) -> None:
        for m in self.metrics.values():
            m.update(pred, target)

    def compute(self) -> dict[str, float]:
        return {k: float(m.compute()) for k, m in self.metrics.items()}

    def headline(self, result: dict[str, Any]) -> dict[str, float]:
        return {k: result[k] for k in ("accuracy", "balanced_accuracy", "macro_f1")}


class GateMeter:
    """Mean gate weight per extractor over the evaluated images (token gates averaged over locations).

    With ``levels`` (the model's level strides) it also averages the per-level gate ``out["gate_levels"]``
    (B x L x E, or B x L x E x h x w for token gates), reported by :meth:`compute_levels`.

    >>> m = GateMeter(["a", "b"], levels=[8, 16])
    >>> m.update(torch.tensor([[.5, .5]]), torch.tensor([[[.25, .75], [.75, .25]]]))
    >>> m.compute(), m.compute_levels()
    ({'a': 0.5, 'b': 0.5}, {8: {'a': 0.25, 'b': 0.75}, 16: {'a': 0.75, 'b': 0.25}})
    """

    def __init__(self, names: list[str], levels: list[int] | None = None):
        self.names = list(names)
        self.levels = None if levels is None else [int(v) for v in levels]
        self.total: torch.Tensor | None = None  # E
        self.level_total: torch.Tensor | None = None  # L x E
        self.count = 0
        self.level_count = 0

    def update(self, gate: torch.Tensor, gate_levels: torch.Tensor | None = None) -> None:
        """gate: B x E or B x E x h x w weights; gate_levels: B x L x E or B x L x E x h x w (optional)."""
        e = len(self.names)
        if gate.ndim < 2 or gate.shape[1] != e:
            raise ValueError(f"GateMeter: gate of shape {tuple(gate.shape)}, expected B x {e} (x h x w) for {self.names}")
        g = gate.detach().double()
        s = (g.flatten(2).mean(2) if g.ndim > 2 else g).sum(0).cpu()
        self.total = s if self.total is None else self.total + s
        self.count += gate.shape[0]
        if gate_levels is None:
            return
        if self.levels is None:
            raise ValueError("GateMeter: got per-level gates but no levels; pass GateMeter(names, levels=model.config.strides)")
        want = (gate.shape[0], len(self.levels), e)
        if gate_levels.ndim < 3 or tuple(gate_levels.shape[:3]) != want:
            raise ValueError(f"GateMeter: gate_levels of shape {tuple(gate_levels.shape)}, expected {want} (x h x w) "
                             f"for levels {self.levels} and extractors {self.names}")
        gl = gate_levels.detach().double()
        s = (gl.flatten(3).mean(3) if gl.ndim > 3 else gl).sum(0).cpu()
        self.level_total = s if self.level_total is None else self.level_total + s
        self.level_count += gate_levels.shape[0]

    def compute(self) -> dict[str, float] | None:
        if self.total is None or self.count == 0:
            return None
        return dict(zip(self.names, _floats(self.total / self.count)))

    def compute_levels(self) -> dict[int, dict[str, float]] | None:
        """level stride -> extractor -> mean weight; None when no per-level gate was seen."""
        if self.level_total is None or self.levels is None:
            return None
        mean = self.level_total / self.level_count
        return {lv: dict(zip(self.names, _floats(row))) for lv, row in zip(self.levels, mean)}


def task_metrics(task_type: str, classes: list[str], ignore_index: int | None, device="cpu") -> SegMetrics | ClsMetrics:
    if task_type == "seg":
        return SegMetrics(classes, ignore_index, device)
    return ClsMetrics(classes, device)


def json_safe(value: Any) -> Any:
    """NaN / inf -> None, recursively (metrics.jsonl is strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def primary_metric(task_type: str, num_classes: int, cls_metric: str = "balanced_accuracy") -> str:
    """Headline metric of a task: foreground IoU for binary seg, mIoU otherwise, `cls_metric` for cls."""
    if task_type == "seg":
        return "fg_iou" if num_classes == 2 else "mIoU"
    return cls_metric
