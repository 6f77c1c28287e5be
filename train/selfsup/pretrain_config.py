"""A pretraining file (train/pretrain.py): method, unlabeled data pool, the ViT, the method's section, schedule.

>>> cfg = load_pretrain_config("configs/pretrain_mae.yaml", ["train.max_steps=2"])
>>> cfg.method, cfg.train.max_steps
('mae', 2)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbone_router.extractors.base import FAMILIES
from backbone_router.train.training.config import (
    apply_override,
    check_size,
    data_root,
    decode,
    load_config_file,
)

# ---- the pretraining file (train/pretrain.py) --------------------------------------------------------
METHODS = ("mae", "smir", "dino")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@dataclass
class PretrainDataConfig:
    root: str | None = None  # folder of dataset folders; None: data_root()'s rule
    datasets: list[str] = field(default_factory=lambda: ["mtd", "cfd", "camvid", "flowers12"])  # pool members
    splits: list[str] = field(default_factory=lambda: ["train"])  # splits.csv values taken into the pool
    image_size: int = 96  # side of the (global) training crops
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # RandomResizedCrop area range
    hflip: bool = True  # random horizontal flips
    preload_short_side: int | None = 160  # decode once, resize the short side to this, keep in memory; None: lazy
    max_images: int | None = None  # keep only this many pool images (a seeded random subset); None keeps all
    num_workers: int = 0  # DataLoader workers

    def __post_init__(self):
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"data.crop_scale: expected [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        if not self.datasets:
            raise ValueError("data.datasets: name at least one dataset folder")
        check_size("data.image_size", self.image_size)
        check_size("data.num_workers", self.num_workers, 0)
        for key in ("preload_short_side", "max_images"):
            if getattr(self, key) is not None:
                check_size(f"data.{key}", getattr(self, key))

    def resolved_root(self) -> Path:
        """The folder of dataset folders (:func:`data_root`)."""
        return data_root(self.root)


@dataclass
class PretrainModelConfig:
    name: str = "vit_small_patch16_224"  # timm ViT architecture (the saved extractor's model_name)
    kwargs: dict[str, Any] = field(  # timm.create_model kwargs: the size of the ViT
        default_factory=lambda: {"img_size": 96, "embed_dim": 192, "depth": 6, "num_heads": 3}
    )
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))  # normalization mean saved with the weights
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))  # normalization std saved with the weights
    family: str = "morphological"  # family tag of the saved extractor
    layers: list[int] | None = None  # dense layers of the saved extractor; None: the last block

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"model.family: expected one of {FAMILIES}, got {self.family!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"model.mean / model.std: expected 3 values each, got {self.mean} / {self.std}")


@dataclass
class DecoderConfig:
    dim: int = 128  # width of the MAE/SMIR decoder
    depth: int = 2  # transformer blocks of the decoder
    num_heads: int = 4  # attention heads of the decoder

    def __post_init__(self):
        for key in ("dim", "depth", "num_heads"):
            check_size(f"decoder.{key}", getattr(self, key))


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75  # fraction of patches masked (random)
    norm_pix_loss: bool = True  # regress per-patch normalized pixels (MAE paper default)

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"mae.mask_ratio: expected 0 < ratio < 1, got {self.mask_ratio}")


@dataclass
class SMIRConfig:
    partitions: int = 10  # P: the pool is split into P parts trained in order; part 0 uses random masks
    num_masks: int = 5  # K: random masks per image used to score patches for the selective mask
    mask_ratio: float = 0.5  # fraction of patches masked (random in part 0, highest-loss afterwards)
    ms_ssim_weight: float = 1.0  # weight of (1 - MS-SSIM) in the training loss
    l1_weight: float = 1.0  # weight of the L1 on masked patches in the training loss
    ssim_sigma: float = 1.5  # std of the Gaussian SSIM window (11 taps at 1.5, as torchmetrics)
    ms_ssim_scales: int | None = None  # MS-SSIM scales; None: as many (<= 5) as the crop size allows

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"smir.mask_ratio: expected 0 < ratio < 1, got {self.mask_ratio}")
        if self.partitions < 1 or self.num_masks < 1:
            raise ValueError(f"smir.partitions and smir.num_masks must be >= 1, got {self.partitions}, {self.num_masks}")


@dataclass
class DINOConfig:
    out_dim: int = 1024  # prototypes of the projection head
    hidden_dim: int = 512  # hidden width of the head MLP
    bottleneck_dim: int = 128  # width before the weight-normed last layer
    head_layers: int = 3  # linear layers of the head MLP
    norm_last_layer: bool = True  # freeze the weight-norm gain of the last layer at 1
    local_crops: int = 4  # N local views besides the 2 global ones
    local_size: int = 48  # side of the local views
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])  # crop area range of global views
    local_scale: list[float] = field(default_factory=lambda: [0.1, 0.4])  # crop area range of local views
    student_temp: float = 0.1  # softmax temperature of the student
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0
    teacher_temp: float = 0.07  # teacher temperature after the warm-up
    teacher_temp_warmup_steps: int = 300  # linear warm-up of the teacher temperature
    momentum: float = 0.996  # EMA momentum of the teacher at step 0 (cosine schedule to momentum_end)
    momentum_end: float = 1.0  # EMA momentum of the teacher at the last step
    center_momentum: float = 0.9  # EMA momentum of the center of teacher outputs

    def __post_init__(self):
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "local_size"):
            check_size(f"dino.{key}", getattr(self, key))
        check_size("dino.local_crops", self.local_crops, 0)
        if self.student_temp <= 0 or self.teacher_temp <= 0 or self.warmup_teacher_temp <= 0:
            raise ValueError("dino: temperatures must be > 0")
        if not 0 <= self.momentum <= self.momentum_end <= 1:
            raise ValueError(f"dino: expected 0 <= momentum <= momentum_end <= 1, got {self.momentum}, {self.momentum_end}")


@dataclass
class PretrainTrainConfig:
    max_steps: int = 250  # optimizer steps
    batch_size: int = 64  # images per process per micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    lr: float = 1.5e-3  # peak learning rate (AdamW)
    min_lr: float = 1e-5  # end of the cosine schedule
    warmup_steps: int = 100  # linear warm-up of the learning rate
    weight_decay: float = 0.05  # on 2-D+ parameters only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    clip_grad_norm: float | None = 3.0  # max gradient norm; None: no clipping
    mixed_precision: str = "no"  # accelerate mixed precision: no / fp16 / bf16
    log_every: int = 10  # steps between metrics.jsonl lines
    tensorboard: bool = False  # also write TensorBoard scalars under <output>/tb
    seed: int = 0  # seeds torch, the pool subset and the SMIR partitions
    cpu_threads: int | None = None  # torch intra-op threads on CPU; None: torch's default (1 is faster on a busy CPU)

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "grad_accum_steps", "log_every"):
            check_size(f"train.{key}", getattr(self, key))
        check_size("train.warmup_steps", self.warmup_steps, 0)
        if self.cpu_threads is not None:
            check_size("train.cpu_threads", self.cpu_threads)
        if not self.lr > 0:
            raise ValueError(f"train.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr: expected 0 <= min_lr <= train.lr ({self.lr}), got {self.min_lr}")
        if self.weight_decay < 0 or (self.clip_grad_norm is not None and self.clip_grad_norm <= 0):
            raise ValueError(f"train.weight_decay / train.clip_grad_norm: expected >= 0 / > 0 or null, got "
                             f"{self.weight_decay} / {self.clip_grad_norm}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas: expected two values in [0, 1), got {self.betas}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"train.mixed_precision: expected 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")


@dataclass
class PretrainConfig:
    method: str  # mae / smir / dino
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)  # MAE and SMIR
    mae: MAEConfig = field(default_factory=MAEConfig)
    smir: SMIRConfig = field(default_factory=SMIRConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    train: PretrainTrainConfig = field(default_factory=PretrainTrainConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> PretrainConfig:
        """Strict decoding: an unknown key or a wrong type is an error naming its dotted path."""
        return decode(cls, data, where)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_pretrain_config(path: str | Path, overrides: list[str] = ()) -> PretrainConfig:
    """Read a YAML/JSON pretraining config and apply ``key=value`` overrides.

    >>> cfg = load_pretrain_config("configs/pretrain_mae.yaml", ["train.max_steps=2"])
    >>> cfg.method, cfg.train.max_steps
    ('mae', 2)
    """
    path = Path(path)
    data = load_config_file(path)
    for item in overrides:  # on the file's own keys: a key it does not know is the strict decoder's error
        apply_override(data, item, strict=False)
    return PretrainConfig.from_dict(data, where=str(path))
