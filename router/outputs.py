"""What :class:`router.Router` returns, and the training loss of one of its outputs.

>>> out = model(images, task="demo_seg")     # model.train(): "seg_aux" and the gate's "aux_loss" too
>>> loss = training_loss(out, "seg", build_loss("ce"), target, loss_weight=1.0, aux_weight=0.4, aux_loss_weight=1.0)
"""

from __future__ import annotations

from typing import TypedDict

import torch

from backbone_router.heads.losses import logits_loss


class RouterOutput(TypedDict, total=False):
    seg: torch.Tensor  # B x K x H x W logits (segmentation tasks)
    seg_aux: torch.Tensor  # B x K x H x W logits of the auxiliary head (training mode, a pyramid, head.aux_weight > 0)
    cls: torch.Tensor  # B x K logits (classification tasks)
    gate: torch.Tensor  # B x E (task / image gates) or B x E x h x w (token gates): gate_levels averaged over levels
    gate_levels: torch.Tensor  # B x L x E or B x L x E x h x w: per level, summing to 1 over E (h x w: the gate grid)
    gate_mean: torch.Tensor  # E: the gate averaged over the batch (and locations)
    gate_level_mean: torch.Tensor  # L x E: per level, averaged over the batch (and locations)
    aux_loss: torch.Tensor  # scalar: weighted gate auxiliary losses
    ran: torch.Tensor  # E booleans: which extractors were run for this batch


def output_loss(out: RouterOutput, kind: str, loss, *args, aux_weight: float = 0.0, **kwargs) -> torch.Tensor:
    """``loss(logits, *args, **kwargs)`` of the output's ``kind`` ("seg" / "cls") logits in float32
    (:func:`heads.losses.logits_loss`), plus ``aux_weight`` x the same loss of the auxiliary segmentation head's
    logits where the output has them (``seg_aux``: a pyramid model with ``head.aux_weight > 0``, in training mode).

    >>> value = output_loss(out, "seg", build_loss([{"name": "ce"}]), target, aux_weight=0.4)
    """
    total = logits_loss(out[kind], loss, *args, **kwargs)
    if kind == "seg" and "seg_aux" in out:
        total = total + aux_weight * logits_loss(out["seg_aux"], loss, *args, **kwargs)
    return total


def training_loss(out: RouterOutput, kind: str, loss, *args, loss_weight: float, aux_weight: float,
                  aux_loss_weight: float, **kwargs) -> torch.Tensor:
    """What fine-tuning and the comparison minimise for one batch of one task: ``loss_weight`` x
    :func:`output_loss` + ``aux_loss_weight`` x the gate's ``aux_loss``."""
    task_loss = output_loss(out, kind, loss, *args, aux_weight=aux_weight, **kwargs)
    return loss_weight * task_loss + aux_loss_weight * out["aux_loss"]
