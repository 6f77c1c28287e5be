"""Single versus routed extractors: every fusion variant on the same frozen features, data and budget.

    accelerate launch train/compare.py --config configs/compare_shared.yaml --output-dir runs/cmp
    accelerate launch train/compare.py --config configs/compare_tiny.yaml --output-dir runs/cmp_tiny \\
        compare.seeds=[0,1] train.max_steps=50

One config names the extractors and tasks (``model:``), the datasets (``data:``), the budget (``train:``,
the same steps, lr and batch for every variant) and the comparison (``compare:``): the variants, the seeds,
the number of precomputed views and the feature cache. Variants:

- ``single``: one variant per extractor (``single_<name>``), the Router with ``fusion: single``;
- ``mean``, ``concat``: fixed fusions of all extractors;
- ``gated_<task|image|token>[_top<k>]``: the task-conditioned gate at that granularity (top-k optional);
- ``{name: ..., base: <one of the above>, model: {dotted.key: value}}``: a base variant with model-section
  overrides (e.g. ``gate.temperature: 2`` or ``extractors.0.frozen: false``; an unfrozen extractor runs live,
  outside the cache);
- ``peer_unet_frozen``, ``peer_unet_finetuned``: not a Router but what a user would pick instead, an smp U-Net
  on the ImageNet MobileNetV2 of ``compare.peer_checkpoint`` (:mod:`train.peers`), on the images of the same
  views, segmentation tasks only.

Following dinov2 ``eval/linear.py``, the frozen extractors run once per image and view (through
:class:`train.feature_cache.FeatureCache` on disk, so a second comparison runs none), and for each seed all
variants are trained side by side on the very same batches. Augmentation is a fixed set of V views per
training image (view 0: the eval transform; views 1..V-1: seeded random resized crops, flips and jitter,
the mask or label travelling with its view); each training batch uses one view.

The output dir gets results.csv / results.json (rows variant, seed, task, metric, value), gates.json,
sweeps.json, summary.json, results.md and the plots of :mod:`train.report`, plus config.yaml (resolved).
Each (variant, seed) result is written to results/<variant>/seed_<seed>.json the moment it is done
(:mod:`train.results`); processes never wait for each other at a collective while one trains; ``--resume``
trains the seeds that still miss a result, and ``report.py <output dir>`` reports whatever is done. One run at a
time per output dir, no overwrite without --overwrite (:mod:`train.rundir`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import os
import re
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from extractors import Extractor, create_extractor
from extractors.atomic import atomic_write_bytes
from heads.losses import build_loss
from router import Router, RouterConfig
from router.config import _from_dict
from train.config import ExperimentConfig, TrainConfig, apply_override, load_config_file
from train.data import (
    TaskData,
    TaskDataset,
    TaskSchedule,
    foreground_prior,
    prepare_experiment_data,
)
from train.errors import run_cli
from train.feature_cache import FeatureCache
from train.finetune import lr_factor
from train.metrics import GateMeter, task_metrics
from train.peers import PEER_VARIANTS, UnetPeer, build_peer, encoder_state
from train.report import write_report
from train.results import ResultStore, collect, missing_notes, publish_plan, read_plan, remove_plan
from train.rundir import COMPARE_OUTPUTS, add_run_dir_args, claim_output_dir

VARIANT_RE = re.compile(r"^(single|mean|concat|gated_(task|image|token)(_top(\d+))?)$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# config
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

    def __post_init__(self):
        if not self.variants:
            raise ValueError("compare.variants: at least one variant is needed")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"compare.seeds: expected distinct seeds, got {self.seeds}")
        if self.views < 1:
            raise ValueError(f"compare.views: must be >= 1 (view 0 is the eval transform), got {self.views}")
        if self.cache_dtype not in DTYPES:
            raise ValueError(f"compare.cache_dtype: expected one of {sorted(DTYPES)}, got {self.cache_dtype!r}")
        if self.feature_batch_size < 1:
            raise ValueError(f"compare.feature_batch_size: must be >= 1, got {self.feature_batch_size}")


@dataclass
class Variant:
    name: str  # unique name in tables and plots, e.g. "single_mnv2" or "gated_token_top2"
    kind: str  # "single", "mean", "concat", "routed" or "peer" (train/peers.py: not a Router)
    model: RouterConfig  # the model section this variant trains (a peer: the experiment's, for its tasks)


def load_configs(path: str | Path, overrides: list[str] | None = None) -> tuple[ExperimentConfig, CompareConfig]:
    """The experiment (model/data/train) and compare sections of one file, with dotted overrides.

    >>> cfg, cmp = load_configs("configs/compare_tiny.yaml", ["compare.seeds=[0, 1]", "train.max_steps=20"])
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
    cmp = _from_dict(CompareConfig, raw_compare, f"{path}: compare")
    if compare_over:
        full = {"compare": dataclasses.asdict(cmp)}
        for item in compare_over:
            apply_override(full, item)
        cmp = _from_dict(CompareConfig, full["compare"], f"{path}: compare (with overrides)")
    return cfg, cmp


def expand_variants(cmp: CompareConfig, model: RouterConfig) -> list[Variant]:
    """The variants of the config as full model sections; names are unique."""
    out: list[Variant] = []
    for i, spec in enumerate(cmp.variants):
        where = f"compare.variants[{i}]"
        if isinstance(spec, str):
            out += _base_variants(spec, model, where)
            continue
        if not isinstance(spec, dict) or set(spec) - {"name", "base", "model"} or not {"name", "base"} <= set(spec):
            raise ValueError(f"{where}: expected a variant name or {{name, base, model}}, got {spec!r}")
        (base,) = _base_variants(spec["base"], model, where) if spec["base"] != "single" else (None,)
        if base is None:
            raise ValueError(f"{where}.base: 'single' expands to several variants; name one, e.g. single_<extractor>")
        if base.kind == "peer":
            raise ValueError(f"{where}.base: peer variant {spec['base']!r} is not a Router and takes no overrides; "
                             "list it by its name")
        tree = base.model.to_dict()
        for key, value in (spec.get("model") or {}).items():
            apply_override(tree, f"{key}={json.dumps(value)}")
        out.append(Variant(str(spec["name"]), base.kind, RouterConfig.from_dict(tree, where=f"{where}.model")))
    names = [v.name for v in out]
    if len(set(names)) != len(names):
        raise ValueError(f"compare.variants: names must be unique, got {names}")
    return out


def _base_variants(name: str, model: RouterConfig, where: str) -> list[Variant]:
    single = re.fullmatch(r"single_(\w+)", name)
    if single and single.group(1) in [e.name for e in model.extractors]:
        cfg = copy.deepcopy(model)
        cfg.fusion, cfg.single = "single", single.group(1)
        return [Variant(name, "single", RouterConfig.from_dict(cfg.to_dict(), where=where))]
    if name in PEER_VARIANTS:
        return [Variant(name, "peer", RouterConfig.from_dict(model.to_dict(), where=where))]
    m = VARIANT_RE.match(name)
    if not m:
        raise ValueError(
            f"{where}: unknown variant {name!r}; expected single, single_<extractor>, mean, concat, "
            f"gated_<task|image|token>[_top<k>] or a peer ({', '.join(PEER_VARIANTS)})"
        )
    if m.group(1) == "single":
        return [v for e in model.extractors for v in _base_variants(f"single_{e.name}", model, where)]
    cfg = copy.deepcopy(model)
    if m.group(1) in ("mean", "concat"):
        cfg.fusion = m.group(1)
        kind = m.group(1)
    else:
        cfg.fusion, kind = "gated", "routed"
        cfg.gate.granularity = m.group(2)
        cfg.gate.top_k = int(m.group(4)) if m.group(4) else None
    return [Variant(name, kind, RouterConfig.from_dict(cfg.to_dict(), where=where))]


def primary_metric(task_type: str, num_classes: int) -> str:
    """Default headline metric: defect IoU for binary seg, mIoU otherwise, balanced accuracy for cls."""
    if task_type == "seg":
        return "fg_iou" if num_classes == 2 else "mIoU"
    return "balanced_accuracy"


# ----------------------------------------------------------------------------------------------------
# views: fixed images (uint8) and targets per task, split and view
@dataclass
class ViewSet:
    """One task split as V fixed views: ``images[v]`` N x C x H x W uint8, ``targets[v]`` N x H x W or N."""

    ids: list[str]  # image ids for the cache: <dataset>/<stem>#<content hash>
    transforms: list[str]  # per view: what made it (part of the cache key)
    images: list[torch.Tensor]
    targets: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.ids)


def image_id(td: TaskData, item) -> str:
    """<dataset>/<stem>#<hash of the file's bytes>: an edited image file gets a new id (a cache miss)."""
    return f"{td.folder.name}/{item.stem}#{hashlib.blake2b(item.image.read_bytes(), digest_size=8).hexdigest()}"


def view_seed(base: int, image: str, view: int) -> int:
    """The augmentation seed of one image's view: fixed by (view seed, <dataset>/<stem>, view)."""
    return int(np.random.SeedSequence([base, zlib.crc32(image.split("#")[0].encode()), view]).generate_state(1)[0])


def build_views(td: TaskData, split: str, cfg: ExperimentConfig, cmp: CompareConfig, n_views: int,
                subset: list[int] | None = None) -> ViewSet:
    ds = TaskDataset(td, split, cfg.data)
    items = list(range(len(ds))) if subset is None else subset
    d = cfg.data
    eval_tf = f"eval:{ds.eval_size},c={td.channels}"
    train_tf = (f"train:{ds.image_size},scale={d.crop_scale},ratio={d.crop_ratio},hflip={d.hflip},vflip={d.vflip},"
                f"jitter={d.color_jitter},c={td.channels},seed={cmp.view_seed}")
    ids = [image_id(td, ds.items[i]) for i in items]
    images, targets = [], []
    for v in range(n_views):
        ims, tgs = [], []
        for i, iid in zip(items, ids):
            sample = ds[i] if v == 0 else ds[(i, view_seed(cmp.view_seed, iid, v))]
            ims.append(sample["image"].mul(255).round_().to(torch.uint8))
            t = sample["target"]
            tgs.append(t.to(torch.int16) if t.ndim else t)
        images.append(torch.stack(ims))
        targets.append(torch.stack(tgs))
    return ViewSet(ids, [eval_tf] + [train_tf] * (n_views - 1), images, targets)


def subset_indices(n: int, limit: int | None, seed: int = 0) -> list[int] | None:
    if limit is None or limit >= n:
        return None
    return sorted(np.random.default_rng([seed, 0x5B5E7]).permutation(n)[:limit].tolist())


# ----------------------------------------------------------------------------------------------------
# frozen features: through the cache (read back batch by batch), or held in memory without one
class HeldFeatures:
    """One view's frozen features held in memory in the storage dtype: name -> {"dense": [N x ...], "pooled"}."""

    def __init__(self, feats: dict[str, dict]):
        self.feats = feats

    def gather(self, idx: torch.Tensor, device) -> dict[str, dict]:
        """name -> {"dense": [B x D x h x w], "pooled": B x D} of the items `idx`, float32 on `device`."""
        return {n: {"dense": [d[idx].to(device).float() for d in f["dense"]], "pooled": f["pooled"][idx].to(device).float()}
                for n, f in self.feats.items()}


class CachedFeatures:
    """One view's frozen features in the disk cache, read back per batch.

    The cache's safetensors shards are memory-mapped, so the processes of a run share one copy in the page
    cache instead of each holding its own (with stride-4 taps that is ~6 GB per process). The values are the
    stored ones, exactly what :class:`HeldFeatures` would hold.
    """

    def __init__(self, cache: FeatureCache, extractors: dict[str, Extractor], ids: list[str], view: int, transform: str):
        self.cache, self.extractors, self.ids, self.view, self.transform = cache, extractors, ids, view, transform

    def gather(self, idx: torch.Tensor, device) -> dict[str, dict]:
        """name -> {"dense": [B x D x h x w], "pooled": B x D} of the items `idx`, float32 on `device`."""
        ids = [self.ids[i] for i in idx.tolist()]
        out = {}
        for n, ext in self.extractors.items():
            o = self.cache.get_or_compute(ext, ids, None, view=self.view, transform=self.transform)
            out[n] = {"dense": [d.to(device) for d in o["dense"]], "pooled": o["pooled"].to(device)}
        return out


def frozen_features(extractors: dict[str, Extractor], views: ViewSet, cache: FeatureCache | None, batch: int,
                    store: torch.dtype, device, progress: tqdm | None = None) -> list[HeldFeatures | CachedFeatures]:
    """Per view: the features of every image, computed once (cache misses) and then read from the cache, or held
    in memory in `store` dtype when there is no cache."""
    out: list[HeldFeatures | CachedFeatures] = []
    for v in range(len(views.images)):
        per_ext = {}
        for name, ext in extractors.items():
            dense, pooled = [], []
            for lo in range(0, len(views), batch):
                x = views.images[v][lo : lo + batch].to(device).float().div_(255)
                if cache is not None:
                    cache.get_or_compute(ext, views.ids[lo : lo + batch], x, view=v, transform=views.transforms[v])
                else:
                    with torch.no_grad():
                        o = ext(x)
                    dense.append([d.to("cpu", store) for d in o["dense"]])
                    pooled.append(o["pooled"].to("cpu", store))
                if progress is not None:
                    progress.update(x.shape[0])
            if cache is None:
                per_ext[name] = {"dense": [torch.cat([d[i] for d in dense]) for i in range(len(dense[0]))],
                                 "pooled": torch.cat(pooled)}
        out.append(HeldFeatures(per_ext) if cache is None else
                   CachedFeatures(cache, extractors, views.ids, v, views.transforms[v]))
    return out


# ----------------------------------------------------------------------------------------------------
# models and optimisation
def build_router(variant: Variant, shared: dict[str, Extractor], seed: int, priors: dict[str, float]) -> Router:
    """The variant's Router with the shared frozen extractors (unfrozen ones: a private copy), seeded init."""
    light = RouterConfig.from_dict(variant.model.to_dict())
    for e in light.extractors:  # the real weights come from `shared`; do not load them again
        e.pretrained = False
    set_seed(seed)
    model = Router(light)
    model.config = variant.model
    for ecfg in variant.model.extractors:
        ext = shared[ecfg.name]
        if not ecfg.frozen:
            ext = copy.deepcopy(ext).unfreeze()
        model.extractors[ecfg.name] = ext
    with torch.no_grad():
        for task, p in priors.items():
            model.seg_head.init_bias_from_prior(task, p)
    return model


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay only on 2-D+ tensors (nanoGPT); unfrozen extractors (a peer's encoder) at phase2_lr_scale x lr."""
    pretrained = model.is_pretrained if isinstance(model, UnetPeer) else (lambda k: k.startswith("extractors."))
    groups = []
    for is_ext in (False, True):
        params = [p for k, p in model.named_parameters() if p.requires_grad and pretrained(k) == is_ext]
        lr = t.lr * (t.phase2_lr_scale if is_ext else 1.0)
        for ps, wd in (([p for p in params if p.ndim >= 2], t.weight_decay), ([p for p in params if p.ndim < 2], 0.0)):
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))


def batch_view(seed: int, step: int, n_views: int) -> int:
    """The view one training micro-batch uses (a pure function of the seed and the micro-batch index)."""
    return int(np.random.SeedSequence([seed, step, 0x71E3]).generate_state(1)[0] % n_views)


def scalar_metrics(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------------------------
# command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML with model / data / train / compare sections")
    p.add_argument("--output-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="train only the seeds whose results the output dir misses")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 compare.seeds=[0,1]")
    add_run_dir_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as run_dir:  # releases the output dir's lock however the run ends
        return run(args, run_dir)


def run(args: argparse.Namespace, run_dir: contextlib.ExitStack) -> int:
    cfg, cmp = load_configs(args.config, args.overrides)
    output_dir = Path(args.output_dir or Path("runs") / Path(args.config).stem)
    t = cfg.train
    if cmp.threads:
        torch.set_num_threads(cmp.threads)

    # ------------------------------------------------------------------------------------------------
    # accelerator: seeds are split across processes (each trains every variant for its seeds)
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=multi_cpu or None)
    main_process, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    device, say = accelerator.device, accelerator.print
    lock = run_dir.enter_context(claim_output_dir(output_dir, "compare", COMPARE_OUTPUTS, resume=args.resume,
                                                  overwrite=args.overwrite, accelerator=accelerator))
    timings: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------
    # data and views
    t0 = time.perf_counter()
    _, tasks = prepare_experiment_data(cfg, output_dir, main_process, accelerator.wait_for_everyone)
    task_names = list(tasks)
    variants = expand_variants(cmp, cfg.model)  # after the tasks got their classes from meta.json
    primary = {n: cmp.metrics.get(n) or primary_metric(td.task.type, td.task.num_classes) for n, td in tasks.items()}
    if unknown := sorted(set(cmp.metrics) - set(task_names)):
        raise ValueError(f"compare.metrics: unknown task(s) {unknown}; tasks are {task_names}")
    # Peers (train/peers.py) serve the segmentation tasks only; their encoder weights are read once, here.
    seg_classes = {n: td.task.num_classes for n, td in tasks.items() if td.task.type == "seg"}
    peer_names = [v.name for v in variants if v.kind == "peer"]
    if peer_names and not seg_classes:
        raise ValueError(f"compare.variants: peer variants {peer_names} serve segmentation tasks only; there is none")
    peer_state = encoder_state(cmp.peer_checkpoint) if peer_names else None
    serves = {v.name: list(seg_classes) if v.kind == "peer" else task_names for v in variants}
    notes = {p: f"segmentation tasks only (an smp U-Net): no rows for {[n for n in task_names if n not in seg_classes]}"
             for p in peer_names if len(seg_classes) < len(task_names)}
    resolved = {**cfg.to_dict(), "compare": dataclasses.asdict(cmp)}
    pairs = ResultStore(output_dir, resolved, {v.name: {"kind": v.kind, **v.model.to_dict()} for v in variants})
    todo = pairs.seeds_to_train(cmp.seeds)  # a result of other settings in the dir is an error here, in every process
    if args.resume:
        say(f"--resume: {len(variants) * len(cmp.seeds) - len(pairs.missing(cmp.seeds))} of "
            f"{len(variants) * len(cmp.seeds)} (variant, seed) results done; training seed(s) {todo}")
    if main_process:
        atomic_write_bytes(output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    views: dict[str, dict[str, ViewSet]] = {}
    for n, td in tasks.items():
        sub = subset_indices(len(td.train), cmp.max_train_items)
        views[n] = {"train": build_views(td, "train", cfg, cmp, cmp.views, sub),
                    "val": build_views(td, "val", cfg, cmp, 1)}
        say(f"  {n}: {td.folder.name} ({td.task.type}, {td.task.num_classes} classes) train {len(views[n]['train'])} "
            f"x {cmp.views} views / val {len(views[n]['val'])}; primary metric {primary[n]}")
    timings["views_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------
    # extractors (built once, shared by all variants) and their frozen features
    t0 = time.perf_counter()
    shared: dict[str, Extractor] = {}
    set_seed(0)  # extractors with random weights (pretrained: false) get the same weights in every run
    for e in cfg.model.extractors:
        ext = create_extractor(e.spec, layers=e.layers, pretrained=e.pretrained, checkpoint=e.checkpoint,
                               family=e.family, **e.kwargs)
        shared[e.name] = ext.freeze().eval().to(device)
    families = {n: ext.info.family for n, ext in shared.items()}
    timings["extractors_load_s"] = time.perf_counter() - t0
    # Extractors frozen in the model section are cached; a variant that unfreezes one runs it live.
    cached = [e.name for e in cfg.model.extractors if e.frozen]
    live = {v.name: [e.name for e in v.model.extractors if not e.frozen] for v in variants}
    store = DTYPES[cmp.cache_dtype]
    cache = FeatureCache(cmp.cache_dir, dtype=store) if cmp.cache_dir else None
    calls_before = {n: e.forward_calls for n, e in shared.items()}
    t0 = time.perf_counter()
    memo: dict[tuple, list] = {}  # tasks on the same images (MTD seg + cls) share one copy in memory
    feats: dict[str, dict[str, list]] = {}
    total = sum(len(vs) * len(vs.images) for s in views.values() for vs in s.values()) * len(cached)
    with tqdm(total=total, desc="features", unit="img", disable=not accelerator.is_local_main_process,
              dynamic_ncols=True) as bar:
        if not main_process:  # the main process fills the cache first; the others then read it (no collective)
            todo = read_plan(output_dir, lock.token)
        for n in task_names:
            feats[n] = {}
            for split, vs in views[n].items():
                key = (tuple(vs.ids), tuple(vs.transforms))
                if key not in memo:
                    memo[key] = frozen_features({k: shared[k] for k in cached}, vs, cache,
                                                cmp.feature_batch_size, store, device, bar)
                else:
                    bar.update(len(vs) * len(vs.images) * len(cached))
                feats[n][split] = memo[key]
        if main_process:
            publish_plan(output_dir, lock.token, todo)
    timings["features_s"] = time.perf_counter() - t0
    forward_calls = {n: e.forward_calls - calls_before[n] for n, e in shared.items()}
    cache_stats = cache.stats() if cache is not None else {"hits": 0, "misses": 0}
    say(f"features in {timings['features_s']:.1f}s: cache {cmp.cache_dir} {cache_stats}, extractor forward calls "
        f"{forward_calls}" + "".join(f"; {k} runs {x} live (unfrozen, not cached)" for k, x in live.items() if x))

    # ------------------------------------------------------------------------------------------------
    # losses and priors (the same for every variant)
    loss_fns = {n: build_loss(t.loss[n]) for n in task_names}
    ignore = {n: tasks[n].task.ignore_index for n in task_names}
    priors = ({n: foreground_prior(td) for n, td in tasks.items() if td.task.type == "seg" and td.task.num_classes == 2}
              if t.prior_init else {})
    weights = [tasks[n].source.weight for n in task_names]
    if t.grad_accum_steps != 1 and main_process:
        say(f"note: train.grad_accum_steps={t.grad_accum_steps}: each optimizer step accumulates that many batches")

    @torch.no_grad()
    def evaluate(model: torch.nn.Module, live_names: list[str], served: list[str]) -> tuple[dict, dict, dict, dict]:
        """Per served task: all metrics, the mean gate per extractor (and per level), the threshold sweep (binary seg)."""
        model.eval()
        results, gates, level_gates, sweeps = {}, {}, {}, {}
        names = model.extractor_names if isinstance(model, Router) else []  # a peer has no gate
        levels = model.config.strides if isinstance(model, Router) else None
        for n in served:
            tcfg, vs = tasks[n].task, views[n]["val"]
            meter = task_metrics(tcfg.type, tcfg.classes, tcfg.ignore_index, device)
            meter_g = GateMeter(names, levels)
            for lo in range(0, len(vs), t.eval_batch_size):
                idx = torch.arange(lo, min(lo + t.eval_batch_size, len(vs)))
                images = vs.images[0][idx].to(device).float().div_(255)
                target = vs.targets[0][idx].to(device).long()
                own = {k: f for k, f in feats[n]["val"][0].gather(idx, device).items() if k not in live_names}
                out = model(images, task=n, features=own)
                logits = out[tcfg.type].float()
                fg = F.softmax(logits, 1)[:, 1] if tcfg.type == "seg" and tcfg.num_classes == 2 else None
                meter.update(logits.argmax(1), target, fg)
                if "gate" in out:  # a peer has none
                    meter_g.update(out["gate"].float(), out.get("gate_levels"))
            r = meter.compute()
            results[n], gates[n], level_gates[n] = scalar_metrics(r), meter_g.compute(), meter_g.compute_levels()
            if "sweep" in r:
                sweeps[n] = r["sweep"]
        model.train()
        return results, gates, level_gates, sweeps

    meta = {
        "tasks": task_names, "task_types": {n: tasks[n].task.type for n in task_names}, "primary": primary,
        "variants": [v.name for v in variants], "kinds": {v.name: v.kind for v in variants}, "notes": notes,
        "peer_checkpoint": cmp.peer_checkpoint if peer_names else None,
        "extractors": list(shared), "families": families, "seeds": cmp.seeds,
        "budget": {"max_steps": t.max_steps, "batch_size": t.batch_size, "lr": t.lr, "views": cmp.views,
                   "image_size": cfg.data.image_size, "eval_size": cfg.data.eval_size,
                   "train_items": {n: len(views[n]["train"]) for n in task_names},
                   "val_items": {n: len(views[n]["val"]) for n in task_names}},
        "cache": {"dir": cmp.cache_dir, **cache_stats, "extractor_forward_calls": forward_calls,
                  "live": {k: x for k, x in live.items() if x}},
        "timings_s": dict(timings),
        "command": " ".join(["accelerate launch train/compare.py", "--config", str(args.config), "--output-dir",
                             str(output_dir), *args.overrides]),
    }
    if main_process:  # what a report of a run that has not finished needs (report.py <output dir>)
        pairs.save_meta(meta)

    # ------------------------------------------------------------------------------------------------
    # training: per seed, every variant on the same batches
    my_seeds = todo[rank::world]
    rows, gate_rows, sweep_rows = [], [], []
    A = t.grad_accum_steps
    for seed in my_seeds:
        train_time = {v.name: 0.0 for v in variants}
        models = {}
        for v in variants:
            if v.kind == "peer":
                set_seed(seed)
                models[v.name] = build_peer(v.name, seg_classes, cmp.peer_checkpoint, peer_state, priors).to(device)
            else:
                models[v.name] = build_router(v, shared, seed, priors).to(device)
        opts = {k: make_optimizer(m, t) for k, m in models.items()}
        for m in models.values():
            m.train()
        schedule = TaskSchedule([len(views[n]["train"]) for n in task_names], weights, t.batch_size, seed)
        bar = tqdm(range(t.max_steps), desc=f"seed {seed}", disable=not accelerator.is_local_main_process,
                   dynamic_ncols=True)
        for step in bar:
            for opt in opts.values():
                for g in opt.param_groups:
                    g["lr"] = g["base_lr"] * lr_factor(step, cfg)
            for micro in range(A):
                i = step * A + micro
                ti, keys = schedule.batch(i)
                n = task_names[ti]
                v, vs = batch_view(seed, i, cmp.views), views[n]["train"]
                idx = torch.tensor([k for k, _ in keys])
                images = vs.images[v][idx].to(device).float().div_(255)
                target = vs.targets[v][idx].to(device).long()
                features = feats[n]["train"][v].gather(idx, device)
                for name, model in models.items():
                    if n not in serves[name]:
                        continue
                    tick = time.perf_counter()
                    own = {k: f for k, f in features.items() if k not in live[name]}
                    out = model(images, task=n, features=own)
                    loss = loss_fns[n](out[tasks[n].task.type].float(), target, ignore_index=ignore[n])["loss"]
                    loss = (t.loss_weights[n] * loss + t.aux_loss_weight * out["aux_loss"]) / A
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"variant {name}, seed {seed}: non-finite loss at step {step} (task {n!r})")
                    loss.backward()
                    train_time[name] += time.perf_counter() - tick
            for name, model in models.items():
                tick = time.perf_counter()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], t.grad_clip)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                train_time[name] += time.perf_counter() - tick
        bar.close()
        for name, model in models.items():
            results, gates, level_gates, sweeps = evaluate(model, live[name], serves[name])
            for n, r in results.items():
                rows += [{"variant": name, "seed": seed, "task": n, "metric": k, "value": v} for k, v in r.items()]
                # level None: the gate averaged over levels; then one row per level stride when the model has levels
                gate_rows += [{"variant": name, "seed": seed, "task": n, "extractor": e, "family": families[e],
                               "level": None, "weight": w} for e, w in (gates[n] or {}).items()]
                gate_rows += [{"variant": name, "seed": seed, "task": n, "extractor": e, "family": families[e],
                               "level": lv, "weight": w}
                              for lv, per in (level_gates[n] or {}).items() for e, w in per.items()]
            for n, s in sweeps.items():
                sweep_rows.append({"variant": name, "seed": seed, "task": n, **s})
            pairs.save(name, seed, rows, gate_rows, sweep_rows, train_time[name])  # on disk now, atomically
            say(f"seed {seed} {name:<22} " + "  ".join(f"{n} {primary[n]} {results[n][primary[n]]:.4f}" for n in results))
        del models, opts

    # ------------------------------------------------------------------------------------------------
    # the report, from the result files: the main process waits for the others' files (no collective)
    if main_process:
        pairs.wait(cmp.seeds, say=say)
        remove_plan(output_dir, lock.token)
        done = collect(pairs, cmp.seeds)
        rows, gate_rows, sweep_rows, train_s = done["rows"], done["gates"], done["sweeps"], done["train_s"]
        meta["notes"] = {**notes, **missing_notes(done["missing"])}
        meta["timings_s"]["train_per_variant"] = train_s
        paths = write_report(output_dir, rows, gate_rows, sweep_rows, meta)
        say(f"\nreport: {paths['md']}\n" + Path(paths["md"]).read_text())
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
