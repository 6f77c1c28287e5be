"""train/training/metrics.py: the threshold sweep's counts against the direct thresholds x pixels comparison."""

from __future__ import annotations

import pytest
import torch

from backbone_router.train.training.metrics import THRESHOLDS, ThresholdSweep


def direct_counts(prob: torch.Tensor, target: torch.Tensor, thresholds, ignore_index) -> dict[str, list[int]]:
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    p, t = prob[valid].float(), target[valid] == 1
    pred = p[None, :] >= torch.tensor(thresholds, dtype=torch.float32)[:, None]
    return {"tp": (pred & t).sum(1).tolist(), "fp": (pred & ~t).sum(1).tolist(),
            "fn": (~pred & t).sum(1).tolist(), "tn": (~pred & ~t).sum(1).tolist()}


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_the_histogram_sweep_counts_what_comparing_every_pixel_with_every_threshold_counts(ignore_index):
    """Random probabilities, and values exactly on each threshold (>= includes them), 0 and 1; several batches."""
    g = torch.Generator().manual_seed(0)
    sweep = ThresholdSweep(ignore_index=ignore_index)
    expected = {k: [0] * len(THRESHOLDS) for k in ("tp", "fp", "fn", "tn")}
    for _ in range(3):
        prob = torch.rand(2, 37, 41, generator=g)
        on = torch.tensor([0.0, 1.0, float("nan"), *THRESHOLDS], dtype=torch.float32)
        prob.view(-1)[: on.numel() * 20] = on.repeat(20)
        target = torch.randint(0, 2, (2, 37, 41), generator=g)
        if ignore_index is not None:
            target[torch.rand(2, 37, 41, generator=g) < 0.2] = ignore_index
        sweep.update(prob, target)
        for k, v in direct_counts(prob, target, THRESHOLDS, ignore_index).items():
            expected[k] = [a + b for a, b in zip(expected[k], v)]
    assert {k: getattr(sweep, k).tolist() for k in expected} == expected
    assert sum(expected["tp"][:1] + expected["fn"][:1]) > 0 and expected["tp"][0] > expected["tp"][-1]


@pytest.mark.parametrize("thresholds", [(0.6, 0.3), (0.3, 0.3), (), (0.5, float("nan"))])
def test_thresholds_out_of_order_are_an_error(thresholds):
    with pytest.raises(ValueError, match=r"^ThresholdSweep.thresholds: expected finite values in increasing order"):
        ThresholdSweep(thresholds)
