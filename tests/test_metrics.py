"""train/training/metrics.py: the threshold sweep's counts against the direct thresholds x pixels comparison; the
segmentation counts (torchmetrics without its per-batch torch.unique check) against a direct count, and the class-range
check that replaced it."""

from __future__ import annotations

import pytest
import torch

from backbone_router.train.training.metrics import THRESHOLDS, SegMetrics, ThresholdSweep


def direct_counts(prob: torch.Tensor, target: torch.Tensor, thresholds, ignore_index) -> dict[str, list[int]]:
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    p, t = prob[valid].float(), target[valid] == 1
    pred = p[None, :] >= torch.tensor(thresholds, dtype=torch.float32)[:, None]
    return {"tp": (pred & t).sum(1).tolist(), "fp": (pred & ~t).sum(1).tolist(),
            "fn": (~pred & t).sum(1).tolist(), "tn": (~pred & ~t).sum(1).tolist()}


@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("thresholds", [THRESHOLDS, tuple(k / 127 for k in range(1, 127))])  # the most a uint8 code holds
def test_the_histogram_sweep_counts_what_comparing_every_pixel_with_every_threshold_counts(ignore_index, thresholds):
    """Random probabilities, and values exactly on each threshold (>= includes them), 0 and 1; several batches."""
    g = torch.Generator().manual_seed(0)
    sweep = ThresholdSweep(thresholds, ignore_index=ignore_index)
    expected = {k: [0] * len(thresholds) for k in ("tp", "fp", "fn", "tn")}
    for _ in range(3):
        prob = torch.rand(2, 37, 41, generator=g)
        on = torch.tensor([0.0, 1.0, float("nan"), *thresholds], dtype=torch.float32)
        prob.view(-1)[: on.numel() * 20] = on.repeat(20)
        target = torch.randint(0, 2, (2, 37, 41), generator=g)
        if ignore_index is not None:
            target[torch.rand(2, 37, 41, generator=g) < 0.2] = ignore_index
        sweep.update(prob, target)
        for k, v in direct_counts(prob, target, thresholds, ignore_index).items():
            expected[k] = [a + b for a, b in zip(expected[k], v)]
    assert {k: getattr(sweep, k).tolist() for k in expected} == expected
    assert sum(expected["tp"][:1] + expected["fn"][:1]) > 0 and expected["tp"][0] > expected["tp"][-1]


@pytest.mark.parametrize("thresholds", [(0.6, 0.3), (0.3, 0.3), (), (0.5, float("nan")), tuple(range(127))])
def test_bad_thresholds_are_an_error(thresholds):
    with pytest.raises(ValueError, match=r"^ThresholdSweep.thresholds: expected 1 to 126 finite values in increasing"):
        ThresholdSweep(thresholds)


@pytest.mark.parametrize("classes,ignore_index", [(2, None), (2, 255), (5, 255), (5, None)])
def test_segmentation_counts_equal_a_direct_count(classes, ignore_index):
    g = torch.Generator().manual_seed(classes)
    meter = SegMetrics([f"c{k}" for k in range(classes)], ignore_index)
    tp, fp, fn = (torch.zeros(classes, dtype=torch.float64) for _ in range(3))
    for _ in range(3):
        pred = torch.randint(0, classes, (2, 13, 17), generator=g)
        target = torch.randint(0, classes, (2, 13, 17), generator=g)
        if ignore_index is not None:
            target[torch.rand(2, 13, 17, generator=g) < 0.2] = ignore_index
        meter.update(pred, target)
        valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
        for k in range(classes):
            tp[k] += ((pred == k) & (target == k) & valid).sum()
            fp[k] += ((pred == k) & (target != k) & valid).sum()
            fn[k] += ((pred != k) & (target == k) & valid).sum()
    iou = (tp / (tp + fp + fn)).double()
    result = meter.compute()
    assert result["iou"] == pytest.approx(dict(zip(meter.classes, iou.tolist())), abs=1e-12)
    assert result["mIoU"] == pytest.approx(float(iou.mean()), abs=1e-12)


@pytest.mark.parametrize("where,value", [("target", 2), ("target", -1), ("pred", 3), ("pred", 255)])
def test_class_values_out_of_range_are_one_error(where, value):
    """The ignore index is a valid target value only; a prediction must be a class."""
    meter = SegMetrics(["background", "defect"], ignore_index=255)
    pred, target = torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 255)
    target[0, 0, 0] = 1
    (target if where == "target" else pred)[0, 1, 2] = value
    ignored = " or 255 \\(ignored\\)$" if where == "target" else "$"
    with pytest.raises(ValueError, match=rf"^SegMetrics: {where} has class values in \[.*\], expected 0..1{ignored}"):
        meter.update(pred, target)
    meter.update(pred[:0], target[:0])  # an empty batch counts nothing
    assert meter.stats.tp.sum() == 0
