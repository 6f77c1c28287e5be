"""Shared segmentation / classification heads and their losses."""

from heads.cls import ClsHead
from heads.decoder import DECODER_BLOCKS, DECODER_OUTPUTS, TopDownDecoder
from heads.losses import (
    LOSSES,
    BinaryCrossEntropyLoss,
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LossTermConfig,
    TaskLoss,
    TotalVariationLoss,
    TverskyLoss,
    build_loss,
    hard_negative_mask,
    logits_loss,
)
from heads.refine import Refiner
from heads.seg import SegHead

__all__ = [
    "SegHead",
    "ClsHead",
    "TopDownDecoder",
    "Refiner",
    "DECODER_BLOCKS",
    "DECODER_OUTPUTS",
    "build_loss",
    "TaskLoss",
    "LOSSES",
    "LossTermConfig",
    "CombinedLoss",
    "CrossEntropyLoss",
    "BinaryCrossEntropyLoss",
    "DiceLoss",
    "TverskyLoss",
    "FocalLoss",
    "TotalVariationLoss",
    "hard_negative_mask",
    "logits_loss",
]
