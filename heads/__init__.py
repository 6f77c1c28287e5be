"""Shared segmentation / classification heads and their losses."""

if __name__ == "heads":  # the old import name (deprecated): the same module as backbone_router.heads
    from backbone_router._compat import alias_old_name

    alias_old_name(__name__)

from backbone_router.heads.cls import ClsHead
from backbone_router.heads.decoder import DECODER_BLOCKS, TopDownDecoder
from backbone_router.heads.losses import (
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
from backbone_router.heads.refine import Refiner
from backbone_router.heads.seg import SegHead

__all__ = [
    "SegHead",
    "ClsHead",
    "TopDownDecoder",
    "Refiner",
    "DECODER_BLOCKS",
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
