"""Self-supervised pretraining methods for in-domain extractors: MAE, SMIR (selective masking), DINO.

`train/pretrain.py` is the Accelerate script; these modules hold the methods, the config and the pool.

"""

from backbone_router.train.selfsup.pretrain_config import PretrainConfig, load_pretrain_config

from .dino import DINOHead, DINOPretrainer
from .encoder import build_encoder, encode_visible
from .mae import MAEPretrainer, random_mask
from .smir import SMIRPretrainer, highest_loss_mask
from .unlabeled import UnlabeledImages, list_pool_images, partition_indices

__all__ = [
    "DINOHead",
    "DINOPretrainer",
    "MAEPretrainer",
    "PretrainConfig",
    "SMIRPretrainer",
    "UnlabeledImages",
    "build_encoder",
    "encode_visible",
    "highest_loss_mask",
    "list_pool_images",
    "load_pretrain_config",
    "partition_indices",
    "random_mask",
]
