"""Self-supervised pretraining methods for in-domain extractors: MAE, SMIR (selective masking), DINO.

`train/pretrain.py` is the Accelerate script; these modules hold the methods, the config and the pool.

The package is named like the standard library's `ssl`. A script run from train/ (``python
train/pretrain.py``, ``accelerate launch train/finetune.py``) puts train/ first on sys.path, so
``import ssl`` (done by torch, accelerate, urllib) would find this package: in that case it loads the
real `ssl` in its own place and defines nothing else.
"""

if __name__ == "ssl":  # imported as the top-level `ssl` through a train/ script's sys.path entry
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _train_dir = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _path = [p for p in _sys.path if _os.path.abspath(p or ".") != _train_dir]
    _spec = _machinery.PathFinder.find_spec("ssl", _path)
    _module = _util.module_from_spec(_spec)
    _sys.modules["ssl"] = _module  # the import system hands out what sys.modules holds after this file runs
    _spec.loader.exec_module(_module)
else:
    from .config import PretrainConfig, load_pretrain_config
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
