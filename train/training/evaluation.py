"""Evaluation of one task: metrics (torchmetrics, train/training/metrics.py) and the mean gate, from model outputs.

Fine-tuning and the comparison both score a task through :func:`evaluate_task`: the caller runs the model
(its own way: a DataLoader under accelerate, or precomputed views and features) and passes the outputs with
their targets; ``gather`` (e.g. a pooling + ``accelerator.gather_for_metrics``) runs on each batch's part
before the meters see it, and only the process with ``keep=True`` keeps the meters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from backbone_router.heads.losses import class_argmax
from backbone_router.train.training.metrics import GateMeter, task_metrics


@dataclass
class TaskEval:
    metrics: dict[str, Any]  # meter.compute(): every metric of the task (lists such as per-class values included)
    headline: dict[str, float]  # the few metrics shown in logs
    gate: dict[str, float] | None  # extractor -> mean gate weight (None: the model has no gate)
    gate_levels: dict[int, dict[str, float]] | None  # level stride -> extractor -> mean weight


def batch_part(out: dict[str, torch.Tensor], target: torch.Tensor, task_type: str, num_classes: int) -> dict:
    """What the meters need from one batch: predictions, targets, foreground probability, gates."""
    logits = out[task_type].float()
    part = {"pred": class_argmax(logits), "target": target}
    if "gate" in out:  # a peer (train/experiments/peers.py) has none
        part["gate"] = out["gate"].float()
        if out.get("gate_levels") is not None:
            part["gate_levels"] = out["gate_levels"].float()
    if task_type == "seg" and num_classes == 2:
        part["fg_prob"] = F.softmax(logits, dim=1)[:, 1]
    return part


def pool_gates(part: dict) -> dict:
    """Token gates averaged over locations (B x E, B x L x E): the same shapes in every process, for gathering."""
    out = dict(part)
    if "gate" in out and out["gate"].ndim > 2:
        out["gate"] = out["gate"].mean(dim=(2, 3))
    if "gate_levels" in out and out["gate_levels"].ndim > 3:
        out["gate_levels"] = out["gate_levels"].mean(dim=(3, 4))
    return out


@torch.no_grad()
def evaluate_task(outputs: Iterable[tuple[dict, torch.Tensor]], task, names: list[str], levels: list[int] | None,
                  device, gather: Callable[[dict], dict] | None = None, keep: bool = True) -> TaskEval | None:
    """Score one task from ``(model output, target)`` pairs; None where ``keep`` is False (other processes).

    Args:
        outputs: the model's outputs on the task's eval batches, with their targets.
        task: the task's config (type, classes, ignore_index).
        names, levels: the extractor names and level strides of the gate (empty / None for a model without one).
        device: where the metrics accumulate.
        gather: applied to each batch's part before the meters (e.g. gathering across processes).
        keep: whether this process accumulates and returns the metrics.
    """
    meter = task_metrics(task.type, task.classes, task.ignore_index, device)
    gates = GateMeter(names, levels)
    for out, target in outputs:
        part = batch_part(out, target, task.type, task.num_classes)
        if gather is not None:
            part = gather(part)
        if keep:
            meter.update(part["pred"], part["target"], part.get("fg_prob"))
            if "gate" in part:
                gates.update(part["gate"], part.get("gate_levels"))
    if not keep:
        return None
    metrics = meter.compute()
    return TaskEval(metrics, meter.headline(metrics), gates.compute(), gates.compute_levels())
