"""The ``compare:`` section of a comparison file (train/compare.py), read with the experiment sections it sits beside.

>>> cfg, cmp = load_compare_config("configs/compare_tiny.yaml", ["compare.seeds=[0, 1]", "train.max_steps=20"])
>>> cmp.seeds, cfg.train.max_steps
([0, 1], 20)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backbone_router.train.training.config import ExperimentConfig, apply_override, decode, load_config_file

# ---- the comparison section (train/compare.py) ---------------------------------------------------------
CACHE_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class CompareConfig:
    variants: list[Any]  # "single" | "mean" | "concat" | "gated_<task|image|token>[_top<k>]" | {name, base, model}
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # every variant is trained once per seed
    views: int = 2  # precomputed views per training image: 0 = eval transform, 1..V-1 = seeded augmentations
    view_seed: int = 0  # seed of the augmented views (a change makes new views: cache misses)
    cache_dir: str | None = "runs/feature_cache"  # FeatureCache root shared by runs; null: no disk cache
    cache_dtype: str = "float16"  # storage dtype of cached (and in-memory) features: float32 / float16 / bfloat16
    feature_batch_size: int = 32  # images per extractor forward when filling the cache
    max_train_items: int | None = None  # per task: a fixed-seed subset of the training items; null: all
    metrics: dict[str, str] = field(default_factory=dict)  # task -> primary metric; default by task type
    threads: int | None = None  # torch.set_num_threads; null: leave as is (OMP_NUM_THREADS)
    peer_checkpoint: str | None = None  # torchvision MobileNetV2 weights for the peer_unet_* variants' encoder
    ablation: bool = True  # gated variants: val score without / with only each extractor (train/experiments/gate_proof.py)

    def __post_init__(self):
        if not self.variants:
            raise ValueError("compare.variants: at least one variant is needed")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"compare.seeds: expected distinct seeds, got {self.seeds}")
        if self.views < 1:
            raise ValueError(f"compare.views: must be >= 1 (view 0 is the eval transform), got {self.views}")
        if self.cache_dtype not in CACHE_DTYPES:
            raise ValueError(f"compare.cache_dtype: expected one of {sorted(CACHE_DTYPES)}, got {self.cache_dtype!r}")
        if self.feature_batch_size < 1:
            raise ValueError(f"compare.feature_batch_size: must be >= 1, got {self.feature_batch_size}")



def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> tuple[ExperimentConfig, CompareConfig]:
    """The experiment (model/data/train) and compare sections of one file, with dotted overrides.

    >>> cfg, cmp = load_compare_config("configs/compare_tiny.yaml", ["compare.seeds=[0, 1]", "train.max_steps=20"])
    >>> cmp.seeds, cfg.train.max_steps
    ([0, 1], 20)
    """
    path = Path(path)
    data = load_config_file(path)
    if "compare" not in data:
        raise ValueError(f"{path}: missing the 'compare' section (variants, seeds, views, cache_dir)")
    raw_compare = data.pop("compare")
    compare_over = [o for o in overrides or [] if o.split("=", 1)[0].strip().startswith("compare.")]
    other = [o for o in overrides or [] if o not in compare_over]
    cfg = ExperimentConfig.from_dict(data, other, where=str(path))
    cmp = decode(CompareConfig, raw_compare, f"{path}: compare")
    if compare_over:
        full = {"compare": dataclasses.asdict(cmp)}
        for item in compare_over:
            apply_override(full, item)
        cmp = decode(CompareConfig, full["compare"], f"{path}: compare (with overrides)")
    return cfg, cmp
