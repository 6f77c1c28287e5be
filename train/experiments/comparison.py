"""Single versus routed extractors: every fusion variant on the same frozen features, data and budget.

The library behind ``train/compare.py`` (the command line and its wiring).
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
  on the ImageNet MobileNetV2 of ``compare.peer_checkpoint`` (:mod:`train.experiments.peers`), on the images of the same
  views, segmentation tasks only.

Following dinov2 ``eval/linear.py``, the frozen extractors run once per image and view (through
:class:`train.experiments.feature_cache.FeatureCache` on disk, so a second comparison runs none), and for each seed all
variants are trained side by side on the very same batches. Augmentation is a fixed set of V views per
training image (view 0: the eval transform; views 1..V-1: seeded random resized crops, flips and jitter,
the mask or label travelling with its view); each training batch uses one view.

The output dir gets results.csv / results.json (rows variant, seed, task, metric, value), gates.json,
sweeps.json, ablation.json, summary.json, results.md and the plots of :mod:`train.report`, plus config.yaml
(resolved). With ``compare.ablation`` (the default) every gated variant is also scored on val without each extractor
and with it alone (``Router.forward(keep=...)``): the gate proof of :mod:`train.experiments.gate_proof`.
Each (variant, seed) result is written to results/<variant>/seed_<seed>.json the moment it is done
(:mod:`train.experiments.results`); processes never wait for each other at a collective while one trains; ``--resume``
trains the seeds that still miss a result, and ``report.py <output dir>`` reports whatever is done. One run at a
time per output dir, no overwrite without --overwrite (:mod:`train.training.rundir`).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from backbone_router.extractors import Extractor, create_extractor
from backbone_router.heads.losses import build_loss
from backbone_router.router import Router, RouterConfig
from backbone_router.router.outputs import training_loss
from backbone_router.train.experiments.compare_config import CompareConfig
from backbone_router.train.experiments.feature_cache import FeatureCache
from backbone_router.train.experiments.gate_proof import ablation_scores
from backbone_router.train.experiments.peers import PEER_VARIANTS, UnetPeer, build_peer
from backbone_router.train.training.config import ExperimentConfig, TrainConfig, apply_override
from backbone_router.train.training.data import (
    TaskData,
    TaskDataset,
    TaskSchedule,
    foreground_prior,
)
from backbone_router.train.training.evaluation import evaluate_task
from backbone_router.train.training.optim import lr_factor, make_optimizer, set_lrs

VARIANT_RE = re.compile(r"^(single|mean|concat|gated_(task|image|token)(_top(\d+))?)$")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------
# config
@dataclass
class Variant:
    name: str  # unique name in tables and plots, e.g. "single_mnv2" or "gated_token_top2"
    kind: str  # "single", "mean", "concat", "routed" or "peer" (train/experiments/peers.py: not a Router)
    model: RouterConfig  # the model section this variant trains (a peer: the experiment's, for its tasks)


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
    """One view's frozen features held in memory (the storage dtype; the val sets of a comparison on the CPU: float32):
    name -> {"dense": [N x ...], "pooled"}."""

    def __init__(self, feats: dict[str, dict]):
        self.feats = feats

    def gather(self, idx: torch.Tensor | slice, device) -> dict[str, dict]:
        """name -> {"dense": [B x D x h x w], "pooled": B x D} of the items `idx`, float32 on `device` (a slice of
        float32 features on `device`, as evaluation reads the val set, is a view: nothing is copied)."""
        return {n: {"dense": [d[idx].to(device).float() for d in f["dense"]], "pooled": f["pooled"][idx].to(device).float()}
                for n, f in self.feats.items()}


class CachedFeatures:
    """One view's frozen features in the disk cache, read back per batch.

    The cache's safetensors shards are memory-mapped, so the processes of a run share one copy in the page
    cache instead of each holding its own (with stride-4 taps that is ~6 GB per process). The values are the
    stored ones, exactly what :class:`HeldFeatures` would hold. The val sets, read again by every evaluation and
    ablation, are held in memory instead (:meth:`held`), on the CPU widened to float32 once so that a batch is a view
    (for compare_levels.yaml's val images 1.36 GiB per process, computed from the extractors' output shapes, not
    measured).
    """

    def __init__(self, cache: FeatureCache, extractors: dict[str, Extractor], ids: list[str], view: int, transform: str):
        self.cache, self.extractors, self.ids, self.view, self.transform = cache, extractors, ids, view, transform

    def gather(self, idx: torch.Tensor | slice, device) -> dict[str, dict]:
        """name -> {"dense": [B x D x h x w], "pooled": B x D} of the items `idx`, float32 on `device`."""
        ids = self.ids[idx] if isinstance(idx, slice) else [self.ids[i] for i in idx.tolist()]
        out = {}
        for n, ext in self.extractors.items():
            o = self.cache.get_or_compute(ext, ids, None, view=self.view, transform=self.transform)
            out[n] = {"dense": [d.to(device) for d in o["dense"]], "pooled": o["pooled"].to(device)}
        return out

    def held(self, store: torch.dtype, batch: int) -> HeldFeatures:
        """Every item read once and held in memory in `store` dtype (the cache's own dtype or wider keeps the values
        exact): for the val sets, which every evaluation and ablation of every variant reads again. Filled batch by
        batch into tensors allocated once: the set is never in memory twice."""
        if not self.ids:
            raise ValueError("CachedFeatures.held: no items to hold (an empty split)")
        out: dict[str, dict] = {}
        for lo in range(0, len(self.ids), batch):
            got = self.gather(slice(lo, lo + batch), "cpu")
            if not out:
                out = {n: {"dense": [d.new_empty((len(self.ids), *d.shape[1:]), dtype=store) for d in f["dense"]],
                           "pooled": f["pooled"].new_empty((len(self.ids), *f["pooled"].shape[1:]), dtype=store)}
                       for n, f in got.items()}
            for n, f in got.items():
                for d, part in zip(out[n]["dense"], f["dense"]):
                    d[lo : lo + part.shape[0]] = part
                out[n]["pooled"][lo : lo + f["pooled"].shape[0]] = f["pooled"]
        return HeldFeatures(out)


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
            model.init_seg_bias_from_prior(task, p)
    return model


def variant_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (train/training/optim.py); unfrozen extractors (a peer's encoder) at phase2_lr_scale x lr."""
    pretrained = model.is_pretrained if isinstance(model, UnetPeer) else (lambda k: k.startswith("extractors."))
    params = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    return make_optimizer([p for k, p in params if not pretrained(k)], t, [p for k, p in params if pretrained(k)])


def batch_view(seed: int, step: int, n_views: int) -> int:
    """The view one training micro-batch uses (a pure function of the seed and the micro-batch index)."""
    return int(np.random.SeedSequence([seed, step, 0x71E3]).generate_state(1)[0] % n_views)


def scalar_metrics(result: dict) -> dict[str, float]:
    return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


# ----------------------------------------------------------------------------------------------------
# one comparison: views, shared extractors and their features, then every variant per seed
class Comparison:
    """What the variants of one comparison share: tasks, views, extractors, frozen features, losses and priors.

    The state the script's steps used to share through closures lives here; :meth:`train_seed` trains every
    variant for one seed on the same batches and :meth:`evaluate` scores one trained variant.
    """

    def __init__(self, cfg: ExperimentConfig, cmp: CompareConfig, tasks: dict[str, TaskData], variants: list[Variant],
                 device, progress: bool = True, say=print):
        self.cfg, self.cmp, self.t, self.tasks, self.variants = cfg, cmp, cfg.train, tasks, variants
        self.device, self.progress, self.say = device, progress, say
        self.task_names = list(tasks)
        self.seg_classes = {n: td.task.num_classes for n, td in tasks.items() if td.task.type == "seg"}
        # Peers (train/experiments/peers.py) serve the segmentation tasks only
        self.serves = {v.name: list(self.seg_classes) if v.kind == "peer" else self.task_names for v in variants}
        self.aux_weight = {v.name: 0.0 if v.kind == "peer" else v.model.head.aux_weight for v in variants}
        self.views: dict[str, dict[str, ViewSet]] = {}
        self.shared: dict[str, Extractor] = {}
        self.feats: dict[str, dict[str, list]] = {}

    def build_views(self, primary: dict[str, str]) -> None:
        """Train views (V per image) and the val view of every task; `primary`: task -> headline metric."""
        cfg, cmp = self.cfg, self.cmp
        self.primary = primary
        for n, td in self.tasks.items():
            sub = subset_indices(len(td.train), cmp.max_train_items)
            self.views[n] = {"train": build_views(td, "train", cfg, cmp, cmp.views, sub),
                             "val": build_views(td, "val", cfg, cmp, 1)}
            self.say(f"  {n}: {td.folder.name} ({td.task.type}, {td.task.num_classes} classes) train "
                     f"{len(self.views[n]['train'])} x {cmp.views} views / val {len(self.views[n]['val'])}; "
                     f"primary metric {primary[n]}")

    def load_extractors(self) -> None:
        """The extractors of the model section, built once, frozen, shared by every variant."""
        set_seed(0)  # extractors with random weights (pretrained: false) get the same weights in every run
        for e in self.cfg.model.extractors:
            ext = create_extractor(e.spec, layers=e.layers, pretrained=e.pretrained, checkpoint=e.checkpoint,
                                   family=e.family, **e.kwargs)
            self.shared[e.name] = ext.freeze().eval().to(self.device)
        # Extractors frozen in the model section are cached; a variant that unfreezes one runs it live.
        self.cached = [e.name for e in self.cfg.model.extractors if e.frozen]
        self.live = {v.name: [e.name for e in v.model.extractors if not e.frozen] for v in self.variants}

    def compute_features(self, cache: FeatureCache | None, before_reading=None) -> None:
        """Every view's frozen features of the cached extractors (tasks on the same images share one copy).

        ``before_reading`` runs first (the other processes wait there for the main one to fill the cache).
        """
        views, cached = self.views, self.cached
        memo: dict[tuple, list] = {}
        total = sum(len(vs) * len(vs.images) for s in views.values() for vs in s.values()) * len(cached)
        with tqdm(total=total, desc="features", unit="img", disable=not self.progress, dynamic_ncols=True) as bar:
            if before_reading is not None:
                before_reading()
            for n in self.task_names:
                self.feats[n] = {}
                for split, vs in views[n].items():
                    key = (tuple(vs.ids), tuple(vs.transforms))
                    if key not in memo:
                        store = DTYPES[self.cmp.cache_dtype]
                        memo[key] = frozen_features({k: self.shared[k] for k in cached}, vs, cache,
                                                    self.cmp.feature_batch_size, store, self.device, bar)
                        if split == "val" and cache is not None:  # read by every evaluation and ablation: held
                            # in float32 on the CPU, where a batch is then a view; elsewhere it is copied anyway
                            held = torch.float32 if torch.device(self.device).type == "cpu" else store
                            memo[key] = [f.held(held, self.cmp.feature_batch_size) for f in memo[key]]
                    else:
                        bar.update(len(vs) * len(vs.images) * len(cached))
                    self.feats[n][split] = memo[key]

    def prepare_training(self) -> None:
        """Losses and priors, the same for every variant."""
        t, tasks = self.t, self.tasks
        self.loss_fns = {n: build_loss(t.loss[n]) for n in self.task_names}
        self.ignore = {n: tasks[n].task.ignore_index for n in self.task_names}
        self.priors = ({n: foreground_prior(td) for n, td in tasks.items()
                        if td.task.type == "seg" and td.task.num_classes == 2} if t.prior_init else {})
        self.weights = [tasks[n].source.weight for n in self.task_names]

    def val_outputs(self, model: torch.nn.Module, name: str, task: str, keep: list[str] | None = None):
        """(output, target) per val batch of `task`, from the cached features (``keep``: a Router's kept extractors)."""
        vs, live, device, batch = self.views[task]["val"], self.live[name], self.device, self.t.eval_batch_size
        extra = {} if keep is None else {"keep": keep}
        for lo in range(0, len(vs), batch):
            idx = slice(lo, lo + batch)
            images = vs.images[0][idx].to(device).float().div_(255)
            target = vs.targets[0][idx].to(device).long()
            own = {k: f for k, f in self.feats[task]["val"][0].gather(idx, device).items() if k not in live}
            yield model(images, task=task, features=own, **extra), target

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, name: str) -> tuple[dict, dict, dict, dict]:
        """Per served task: all metrics, the mean gate per extractor (and per level), the threshold sweep (binary seg)."""
        model.eval()
        device = self.device
        results, gates, level_gates, sweeps = {}, {}, {}, {}
        names = model.extractor_names if isinstance(model, Router) else []  # a peer has no gate
        levels = model.config.strides if isinstance(model, Router) else None
        for n in self.serves[name]:
            r = evaluate_task(self.val_outputs(model, name, n), self.tasks[n].task, names, levels, device)
            results[n], gates[n], level_gates[n] = scalar_metrics(r.metrics), r.gate, r.gate_levels
            if "sweep" in r.metrics:
                sweeps[n] = r.metrics["sweep"]
        model.train()
        return results, gates, level_gates, sweeps

    @torch.no_grad()
    def ablate(self, model: Router, name: str, seed: int, results: dict[str, dict]) -> list[dict]:
        """Ablation rows of a gated variant (train/experiments/gate_proof.py): per served task and extractor, the primary metric
        on val without it and with it alone, scored as :meth:`evaluate` scores (`results`: its metrics, the full)."""
        model.eval()
        rows = []
        for n in self.serves[name]:
            metric = self.primary[n]
            score = functools.partial(self.kept_score, model, name, n)
            rows += [{"variant": name, "seed": seed, "task": n, "metric": metric, **r}
                     for r in ablation_scores(score, model.extractor_names, results[n][metric])]
        model.train()
        return rows

    def kept_score(self, model: Router, name: str, task: str, keep: list[str]) -> float:
        """The task's primary metric on val with only the extractors `keep` in the model's fusion."""
        r = evaluate_task(self.val_outputs(model, name, task, keep), self.tasks[task].task, model.extractor_names,
                          model.config.strides, self.device)
        return float(r.metrics[self.primary[task]])

    def train_seed(self, seed: int, peer_state, save, progress: bool = True) -> None:
        """Every variant trained for one seed on the same batches, evaluated, and handed to
        ``save(variant, seed, rows, gate_rows, sweep_rows, train_seconds, ablation_rows)`` the moment it is done
        (ablation rows: gated variants with ``compare.ablation``)."""
        t, cmp, device, tasks, names = self.t, self.cmp, self.device, self.tasks, self.task_names
        families = {n: ext.info.family for n, ext in self.shared.items()}
        rows, gate_rows, sweep_rows, ablation_rows = [], [], [], []
        kinds = {v.name: v.kind for v in self.variants}
        A = t.grad_accum_steps
        train_time = {v.name: 0.0 for v in self.variants}
        models = {}
        for v in self.variants:
            if v.kind == "peer":
                set_seed(seed)
                models[v.name] = build_peer(v.name, self.seg_classes, cmp.peer_checkpoint, peer_state,
                                            self.priors).to(device)
            else:
                models[v.name] = build_router(v, self.shared, seed, self.priors).to(device)
        opts = {k: variant_optimizer(m, t) for k, m in models.items()}
        # listed once: walking the modules for them at every step took ~2 % of the training time
        trained = {k: [p for p in m.parameters() if p.requires_grad] for k, m in models.items()}
        for m in models.values():
            m.train()
        schedule = TaskSchedule([len(self.views[n]["train"]) for n in names], self.weights, t.batch_size, seed)
        bar = tqdm(range(t.max_steps), desc=f"seed {seed}", disable=not progress, dynamic_ncols=True)
        for step in bar:
            for opt in opts.values():
                set_lrs(opt, lr_factor(step, t))
            for micro in range(A):
                i = step * A + micro
                ti, keys = schedule.batch(i)
                n = names[ti]
                v, vs = batch_view(seed, i, cmp.views), self.views[n]["train"]
                idx = torch.tensor([k for k, _ in keys])
                images = vs.images[v][idx].to(device).float().div_(255)
                target = vs.targets[v][idx].to(device).long()
                features = self.feats[n]["train"][v].gather(idx, device)
                for name, model in models.items():
                    if n not in self.serves[name]:
                        continue
                    tick = time.perf_counter()
                    own = {k: f for k, f in features.items() if k not in self.live[name]}
                    out = model(images, task=n, features=own)
                    loss = training_loss(out, tasks[n].task.type, self.loss_fns[n], target, ignore_index=self.ignore[n],
                                         loss_weight=t.loss_weights[n], aux_weight=self.aux_weight[name],
                                         aux_loss_weight=t.aux_loss_weight) / A
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"variant {name}, seed {seed}: non-finite loss at step {step} (task {n!r})")
                    loss.backward()
                    train_time[name] += time.perf_counter() - tick
            for name in models:
                tick = time.perf_counter()
                if t.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in trained[name] if p.grad is not None], t.grad_clip)
                opts[name].step()
                opts[name].zero_grad(set_to_none=True)
                train_time[name] += time.perf_counter() - tick
        bar.close()
        for name, model in models.items():
            results, gates, level_gates, sweeps = self.evaluate(model, name)
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
            if cmp.ablation and kinds[name] == "routed":
                ablation_rows += self.ablate(model, name, seed, results)
            save(name, seed, rows, gate_rows, sweep_rows, train_time[name], ablation_rows)  # on disk now, atomically
            self.say(f"seed {seed} {name:<22} " + "  ".join(f"{n} {self.primary[n]} {results[n][self.primary[n]]:.4f}"
                                                          for n in results))
        del models, opts
