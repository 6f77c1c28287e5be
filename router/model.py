"""Router: extractors -> alignment to a pyramid of levels -> task-conditioned gate per level -> fusion per
level -> top-down decoder -> shared heads."""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from backbone_router.extractors import Extractor, ExtractorOutput, check_images, create_extractor
from backbone_router.extractors.io.images import DEFAULT_MAX_PIXELS, fit_pixel_budget, to_image_list
from backbone_router.extractors.text import TextEncoder, create_text_encoder
from backbone_router.heads import ClsHead, Refiner, SegHead, TopDownDecoder
from backbone_router.heads.losses import class_argmax

from .align import Aligner, grid_size, resample
from .config import ExtractorConfig, RouterConfig, TaskConfig, nearest_level
from .detail import SKIP_WIDTHS, DetailStem
from .gate import TaskGate, keep_renormalized
from .hub import RouterHubMixin
from .outputs import RouterOutput
from .predictions import Label, SegPrediction, class_names, same_size_batches, top_labels


def task_text(task: TaskConfig) -> str:
    """The sentence a text encoder embeds for a task: its description, then its class names."""
    classes = f"Classes: {', '.join(task.classes)}." if task.classes else ""
    return " ".join(s for s in (task.description.strip(), classes) if s) or task.name


def build_extractor(ecfg: ExtractorConfig) -> Extractor:
    """The extractor an entry of ``config.extractors`` names, frozen unless it says otherwise."""
    ext = create_extractor(ecfg.spec, layers=ecfg.layers, pretrained=ecfg.pretrained, checkpoint=ecfg.checkpoint,
                           family=ecfg.family, **ecfg.kwargs)
    return ext.freeze() if ecfg.frozen else ext


@dataclass(frozen=True)
class Plan:
    """What one forward pass reads, from the task, the model and the image size."""

    grids: list[tuple[int, int]]  # each level's grid (h, w) at this image size
    weighed: list[int]  # levels whose gate weights the task's output depends on: all (seg), classification's (cls)
    aligned: list[int]  # levels whose maps are aligned: the weighed ones (none with own_cls), + the gate's level for
    #                     a gate that reads features
    own_cls: bool  # classification reads its own map (head.cls_taps: all): every tap resampled to its level's grid
    cls_map: bool  # the extractors' classification maps are made: own_cls, or the auxiliary seg head reads them


class Aligned(NamedTuple):
    """One extractor's output aligned as a :class:`Plan` asks."""

    maps: list[torch.Tensor | None]  # per level: B x D_k x h_k x w_k at the aligned levels, None elsewhere
    vec: torch.Tensor  # B x D: the pooled vector at the coarsest level's width
    cls_map: torch.Tensor | None  # B x D x h x w on classification's grid (Plan.cls_map), else None


class Router(RouterHubMixin, nn.Module):
    """Specialist extractors routed per task and level into shared segmentation and classification heads.

    Every extractor is aligned to each level of ``config.levels`` (strides, e.g. 4, 8, 16, 32; see
    :mod:`router.align`), the gate weighs the extractors per task x level (x image or location), the
    weighted maps are fused level by level, a raw-image detail stem joins the finest level
    (``config.detail``), and a top-down decoder carries coarse context down to the finest level, where the
    segmentation head reads it (``head.refine``: and carries it on to stride 2 / 1 with the detail stem's maps).
    Classification reads one level (the one nearest stride 16) and the pooled vectors:
    with ``head.cls_taps: all`` (the default) its own map on that level's grid, into which every tap of each
    extractor is resampled, as at one level; with ``level`` the level's map. In training an auxiliary seg head
    (``head.aux_weight``, 0.4) reads that map too. The defaults are the recommended model (levels 4-32); with
    one level there is no decoder: ``levels: [16]`` is the single-grid model of format 1. The optional parts
    (``gate``, ``concat_proj``, ``detail``, ``decoder``, ``aux_seg_head``) are modules or None; saving,
    loading and pushing come from :class:`router.hub.RouterHubMixin`.

    >>> model = Router.from_config("configs/tiny.yaml")
    >>> out = model(torch.rand(2, 3, 97, 130), task="demo_seg")
    >>> out["seg"].shape, out["gate"].shape, out["gate_levels"].shape
    (torch.Size([2, 2, 97, 130]), torch.Size([2, 2]), torch.Size([2, 4, 2]))
    """

    def __init__(self, config: RouterConfig, *, text_embeddings: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        self._text_encoders: dict[str, TextEncoder] = {}  # a plain dict: the encoder is no part of the model's state
        levels, widths, h = config.strides, config.widths, config.head
        gated = config.fusion == "gated"
        # Extractors, and their aligners to the levels (and to classification's own map with cls_taps: all).
        self.extractors = nn.ModuleDict({e.name: build_extractor(e) for e in config.extractors})
        cls_width = widths[config.cls_level] if config.cls_reads_all_taps else None
        self.aligners = nn.ModuleDict({n: Aligner(e.info, levels, widths, pooled_width=widths[-1], cls_width=cls_width)
                                       for n, e in self.extractors.items()})
        # Fusion: the projections of concatenated maps (concat, or gated with gate.combine: concat), the gate.
        n, concat = len(self.extractors), config.fusion == "concat" or (gated and config.gate.combine == "concat")
        self.concat_proj = nn.ModuleDict({str(s): nn.Conv2d(n * w, w, 1) for s, w in zip(levels, widths)}) \
            if concat else None
        self.concat_pooled_proj = nn.Linear(n * widths[-1], widths[-1]) if concat else None
        if gated and config.gate.task_embedding == "text" and text_embeddings is None:
            text_embeddings = self.embed_task_texts(config.tasks)
        self.gate = TaskGate(n, [t.name for t in config.tasks], config.gate, widths[self.gate_level], text_embeddings,
                             num_levels=len(levels)) if gated else None
        # Decoding: the raw-image detail stem, the top-down decoder over the levels ("fuse": the head reads all
        # levels mixed at the stride-16 width), the heads.
        self.detail = DetailStem(widths[0], full_res=1 in h.refine) if config.has_detail else None
        self.decoder = TopDownDecoder(widths, block=h.decoder_block, out_width=config.width) if len(levels) > 1 else None
        seg = {t.name: t.num_classes for t in config.tasks if t.type == "seg"}
        cls = {t.name: t.num_classes for t in config.tasks if t.type == "cls"}
        refiner = Refiner(h.seg_hidden, [SKIP_WIDTHS[s] for s in h.refine]) if h.refine else None
        self.seg_head = SegHead(widths[0] if self.decoder is None else self.decoder.out_width, seg,
                                hidden=h.seg_hidden, dropout=h.dropout, trunk=h.seg_trunk, refine=refiner)
        # Training only: a plain seg head on the stride-16 level (UPerNet's auxiliary head), or with cls_taps: all
        # on classification's map, so that segmentation trains it as at one level.
        aux_width = widths[config.cls_level] if config.cls_reads_all_taps else widths[self.gate_level]
        self.aux_seg_head = SegHead(aux_width, seg, hidden=h.seg_hidden, dropout=h.dropout, trunk=h.seg_trunk) \
            if config.has_aux_head else None
        self.cls_head = ClsHead(widths[config.cls_level], cls, pooling=h.cls_pooling, hidden=h.cls_hidden,
                                dropout=h.dropout, pooled_dim=widths[-1])

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: str | os.PathLike | dict | RouterConfig) -> Router:
        """From a RouterConfig, a dict, or a YAML/JSON file (a model section or a whole experiment config)."""
        if isinstance(config, (str, os.PathLike)):
            config = RouterConfig.from_file(config)
        elif isinstance(config, dict):
            config = RouterConfig.from_dict(config.get("model", config))
        return cls(config)

    @property
    def extractor_names(self) -> list[str]:
        return list(self.extractors.keys())

    @property
    def gate_level(self) -> int:
        """Index of the level whose grid the gate works on (token weights, feature content): nearest stride 16."""
        return nearest_level(self.config.strides, 16)

    @property
    def gate_reads_features(self) -> bool:
        """True when the gate reads the extractors' aligned maps, so that it decides after they have run."""
        return self.gate is not None and self.gate.needs_features

    def _weighed_levels(self, task: TaskConfig) -> list[int]:
        """Indices of the levels whose gate weights a task's output depends on: all (seg), classification's (cls)."""
        return list(range(len(self.config.strides))) if task.type == "seg" else [self.config.cls_level]

    @torch.no_grad()
    def embed_task_texts(self, tasks: list[TaskConfig]) -> dict[str, torch.Tensor]:
        """Text embeddings of each task's description and class names, with the configured text encoder."""
        spec = self.config.gate.text_encoder
        if spec not in self._text_encoders:
            self._text_encoders[spec] = create_text_encoder(spec)
        vectors = self._text_encoders[spec].encode([task_text(t) for t in tasks])
        return {t.name: v for t, v in zip(tasks, vectors)}

    def add_task(self, task: TaskConfig) -> None:
        """Add a task after training: new head outputs; with text task embeddings the gate routes it at once."""
        if task.name in {t.name for t in self.config.tasks}:
            raise ValueError(f"add_task: a task named {task.name!r} already exists")
        (self.seg_head if task.type == "seg" else self.cls_head).add_task(task.name, task.num_classes)
        if task.type == "seg" and self.aux_seg_head is not None:
            self.aux_seg_head.add_task(task.name, task.num_classes)
        if self.gate is not None:
            text = self.embed_task_texts([task])[task.name] if self.config.gate.task_embedding == "text" else None
            self.gate.add_task(task.name, text)
        self.config.tasks.append(task)

    @torch.no_grad()
    def init_seg_bias_from_prior(self, task: str, prior: float) -> None:
        """A segmentation task's output bias from the foreground prior (:meth:`heads.SegHead.init_bias_from_prior`):
        the main head's and the auxiliary head's."""
        for head in (self.seg_head, self.aux_seg_head):
            if head is not None:
                head.init_bias_from_prior(task, prior)

    # ---- forward ---------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, task: str, features: dict[str, ExtractorOutput] | None = None,
                keep: list[str] | None = None) -> RouterOutput:
        """Route `images` (B x C x H x W in [0, 1], C = 1 or 3) for one task.

        `features` may hold precomputed outputs of some extractors (name -> {"dense", "pooled"}), e.g.
        from a frozen-feature cache; those extractors are then not run.
        `keep` (extractor names; ablation at evaluation): the others are left out of the fusion as if the gate
        gave them zero weight, the kept weights renormalised to sum to 1 (gated); mean / concat fuse the kept
        maps only (concat: zeros in place of the others). A gate that reads features still reads all of them.
        """
        images = check_images(images, "Router input")
        tcfg, kept = self.config.task(task), self._kept_indices(keep)
        plan = self._plan(tcfg, tuple(images.shape[-2:]))
        # 1. Which extractors run. A gate that does not read features decides first, so that with top-k at
        #    inference an extractor whose weight is zero at every level the task reads never runs.
        weights, aux = self._gate_on_pixels(task, images, plan, kept)
        active = self._active_extractors(weights, plan, kept)
        # 2. Run them, each aligned to the levels the task reads.
        aligned = {i: self._run_extractor(self.extractor_names[i], images, plan, features) for i in active}
        # 3. A gate that reads the aligned features decides now.
        if self.gate_reads_features:
            weights, aux, active = self._gate_on_features(task, aligned, plan, kept)
        # 4. Fuse level by level; without a gate the weights are equal and reported the same way.
        fused = self._fuse_levels(aligned, weights, plan, active)
        if weights is None:
            weights = self._equal_weights(images.shape[0], active, images.device)
        out = self._gate_outputs(weights, aux, active)
        # 5. Decode and predict.
        if tcfg.type == "seg":
            out.update(self._segment(images, task, fused, aligned, weights, plan, active))
        else:
            out["cls"] = self._classify(task, fused, aligned, weights, plan, active)
        return out

    def _plan(self, tcfg: TaskConfig, size: tuple[int, int]) -> Plan:
        """What a forward pass for this task at this image size reads (:class:`Plan`)."""
        own_cls = tcfg.type == "cls" and self.config.cls_reads_all_taps
        aux_reads_cls_map = (self.training and tcfg.type == "seg" and self.aux_seg_head is not None
                             and self.config.cls_reads_all_taps)
        weighed = self._weighed_levels(tcfg)
        aligned = [] if own_cls else weighed  # (with own_cls no level map is aligned for classification)
        if self.gate_reads_features and self.gate_level not in aligned:
            aligned = sorted({*aligned, self.gate_level})
        return Plan(grids=[grid_size(size, s) for s in self.config.strides], weighed=weighed, aligned=aligned,
                    own_cls=own_cls, cls_map=own_cls or aux_reads_cls_map)

    def _gate_on_pixels(self, task: str, images: torch.Tensor, plan: Plan,
                        kept: list[int] | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The weights of a gate that does not read features (None for none, or one that does) and its aux loss."""
        if self.gate is None or self.gate.needs_features:
            return None, images.new_zeros(())
        weights, aux = self.gate(task, images.shape[0], plan.grids[self.gate_level], images=images)
        return (weights if kept is None else keep_renormalized(weights, kept)), aux

    def _active_extractors(self, weights: torch.Tensor | None, plan: Plan, kept: list[int] | None) -> list[int]:
        """Indices of the extractors to run: the single one; with a top-k gate at inference those with a weight at
        a level the task reads; else all. With `keep` (and a gate that does not read features), the kept ones."""
        if self.config.fusion == "single":
            active = [self.extractor_names.index(self.config.single)]
        elif weights is not None and not self.training and self.config.gate.top_k is not None:
            chosen = rearrange(weights[:, plan.weighed], "b l e ... -> e (b l ...)").gt(0).any(dim=1)
            active = chosen.nonzero().flatten().tolist()
        else:
            active = list(range(len(self.extractors)))
        if kept is not None and not self.gate_reads_features:
            # a top-k gate chose none of the kept ones: they run with weight 0 (a zero fused map) rather than none
            active = [i for i in active if i in kept] or kept
        return active

    def _run_extractor(self, name: str, images: torch.Tensor, plan: Plan, features=None) -> Aligned:
        """The extractor's output (precomputed in `features`, or run now) aligned as the plan asks."""
        if features is not None and name in features:  # precomputed (frozen-feature cache)
            out = features[name]
        else:
            ext: Extractor = self.extractors[name]
            trainable = any(p.requires_grad for p in ext.parameters())
            with nullcontext() if trainable else torch.no_grad():
                out = ext(images)
        aligner = self.aligners[name]
        maps, vec = aligner(out["dense"], out["pooled"], [g if k in plan.aligned else None
                                                          for k, g in enumerate(plan.grids)])
        cls_map = aligner.cls(out["dense"], plan.grids[self.config.cls_level]) if plan.cls_map else None
        return Aligned(maps, vec, cls_map)

    def _gate_on_features(self, task: str, aligned: dict[int, Aligned], plan: Plan,
                          kept: list[int] | None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """The weights of a gate that reads the mean of the aligned maps on its level, its aux loss, and the
        extractors that take part in the fusion (with `keep`, the kept ones)."""
        g, active = self.gate_level, list(aligned)
        content = torch.stack([aligned[i].maps[g] for i in active]).mean(0)
        weights, aux = self.gate(task, content.shape[0], plan.grids[g], features=content)
        if kept is None:
            return weights, aux, active
        return keep_renormalized(weights, kept), aux, [i for i in active if i in kept]

    def _fuse_levels(self, aligned: dict[int, Aligned], weights: torch.Tensor | None, plan: Plan,
                     active: list[int]) -> list[torch.Tensor | None]:
        """The fused map of every level the task reads (None elsewhere); with own_cls classification's own map
        at its level."""
        fused: list[torch.Tensor | None] = [None] * len(plan.grids)
        for k in ([] if plan.own_cls else plan.aligned):  # (with own_cls a level is aligned only for the gate)
            fused[k] = self._fuse({i: aligned[i].maps[k] for i in active}, self._level_weights(weights, k, plan), k)
        if plan.own_cls:
            fused[self.config.cls_level] = self._fuse_cls_maps(aligned, weights, plan, active)
        return fused

    def _fuse_cls_maps(self, aligned: dict[int, Aligned], weights: torch.Tensor | None, plan: Plan,
                       active: list[int]) -> torch.Tensor:
        """Classification's own maps (``head.cls_taps: all``) fused with its level's weights."""
        k = self.config.cls_level
        return self._fuse({i: aligned[i].cls_map for i in active}, self._level_weights(weights, k, plan), k)

    def _level_weights(self, weights: torch.Tensor | None, k: int, plan: Plan) -> torch.Tensor | None:
        """Level k's gate weights (B x E, or B x E x h x w resampled from the gate's grid: a convex mix)."""
        if weights is None:
            return None
        wk = weights[:, k]
        return resample(wk, plan.grids[k]) if wk.ndim == 4 and k != self.gate_level else wk

    def _fuse(self, maps: dict[int, torch.Tensor], weights: torch.Tensor | None, level: int) -> torch.Tensor:
        """One level's maps (extractor index -> B x D x h x w) fused with that level's weights (B x E [x h x w]);
        an extractor without a map (skipped, or left out by ``keep``) enters a concat as zeros."""
        fusion, n, active = self.config.fusion, len(self.extractors), list(maps)
        if fusion == "gated" and self.config.gate.combine == "sum":
            wmap = weights[:, :, None, None, None] if weights.ndim == 2 else weights[:, :, None]  # -> B x 1 x (1|h) x (1|w)
            return sum(wmap[:, i] * maps[i] for i in active)
        if fusion in ("gated", "concat"):  # maps side by side; gated: weighted (x n: equal weights = plain concat)
            zero_map = torch.zeros_like(maps[active[0]])
            if fusion == "gated":
                wmap = weights[:, :, None, None, None] if weights.ndim == 2 else weights[:, :, None]
                maps = {i: n * wmap[:, i] * m for i, m in maps.items()}
            proj = self.concat_proj[str(self.config.strides[level])]
            return proj(torch.cat([maps.get(i, zero_map) for i in range(n)], dim=1))
        return sum(maps.values()) / len(maps)  # single / mean

    def _fuse_pooled(self, vecs: dict[int, torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
        """Pooled vectors (extractor index -> B x D) fused with the classification level's image weights (B x E)."""
        fusion, n, active = self.config.fusion, len(self.extractors), list(vecs)
        if fusion == "gated" and self.config.gate.combine == "sum":
            return sum(weights[:, i, None] * vecs[i] for i in active)
        if fusion in ("gated", "concat"):
            zero_vec = torch.zeros_like(vecs[active[0]])
            if fusion == "gated":
                vecs = {i: n * weights[:, i, None] * v for i, v in vecs.items()}
            return self.concat_pooled_proj(torch.cat([vecs.get(i, zero_vec) for i in range(n)], dim=1))
        return sum(vecs.values()) / len(vecs)

    def _equal_weights(self, batch: int, active: list[int], device: torch.device) -> torch.Tensor:
        """B x L x E: 1 / (number of active extractors) for each active one (single / mean / concat)."""
        weights = torch.zeros(batch, len(self.config.strides), len(self.extractors), device=device)
        for i in active:  # int indices: a list index is copied host -> device, a sync on an accelerator
            weights[:, :, i] = 1.0 / len(active)
        return weights

    def _gate_outputs(self, weights: torch.Tensor, aux: torch.Tensor, active: list[int]) -> RouterOutput:
        """The gate's weights (per level, averaged over levels, over the batch), its aux loss, which extractors ran."""
        ran = torch.zeros(len(self.extractors), dtype=torch.bool)
        ran[active] = True
        gate = weights.mean(dim=1)
        return {"gate": gate, "gate_levels": weights, "gate_mean": rearrange(gate, "b e ... -> e (b ...)").mean(1),
                "gate_level_mean": rearrange(weights, "b l e ... -> l e (b ...)").mean(2), "aux_loss": aux, "ran": ran}

    def _segment(self, images: torch.Tensor, task: str, fused: list[torch.Tensor | None], aligned: dict[int, Aligned],
                 weights: torch.Tensor, plan: Plan, active: list[int]) -> RouterOutput:
        """Segmentation logits at the image's size: the detail stem joins the finest level, the decoder carries the
        levels down to it, the head reads it (``head.refine``: on to stride 2 / 1); in training the auxiliary head's
        logits too."""
        size, refine, skips = tuple(images.shape[-2:]), self.config.head.refine, {}
        if self.detail is not None:
            detail, skips = self.detail(images, plan.grids[0], skips=refine)
            fused[0] = fused[0] + detail
        x = fused[0] if self.decoder is None else self.decoder(fused)
        out: RouterOutput = {"seg": self.seg_head(x, task, out_size=size,
                                                  skips=[skips[s] for s in refine] if refine else None)}
        if self.training and self.aux_seg_head is not None:
            aux_in = self._fuse_cls_maps(aligned, weights, plan, active) if plan.cls_map else fused[self.gate_level]
            out["seg_aux"] = self.aux_seg_head(aux_in, task, out_size=size)
        return out

    def _classify(self, task: str, fused: list[torch.Tensor | None], aligned: dict[int, Aligned],
                  weights: torch.Tensor, plan: Plan, active: list[int]) -> torch.Tensor:
        """Classification logits from the classification level's map and the pooled vectors, fused with its
        weights (token weights averaged over the grid)."""
        k = self.config.cls_level
        cls_w = weights[:, k] if weights.ndim == 3 else weights[:, k].mean(dim=(2, 3))
        pooled = self._fuse_pooled({i: aligned[i].vec for i in active}, cls_w)
        return self.cls_head(fused[k], task, pooled=pooled)

    def _kept_indices(self, keep: list[str] | None) -> list[int] | None:
        """`keep`'s extractor names as indices (None: all), checked against the extractors and the fusion."""
        if keep is None:
            return None
        names = self.extractor_names
        unknown = [k for k in keep if k not in names]
        if unknown or not keep:
            raise ValueError(f"keep: expected a non-empty list of extractor names from {names}, got {list(keep)}")
        if self.config.fusion == "single" and self.config.single not in keep:
            raise ValueError(f"keep: the single extractor {self.config.single!r} must be kept, got {list(keep)}")
        return sorted(names.index(k) for k in keep)

    @torch.inference_mode()
    def predict(self, images, task: str, *, top_k: int | None = 5, return_probs: bool = False, batch_size: int = 8,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[list[Label]] | list[SegPrediction]:
        """Predictions for images of any size: class names with scores, or class masks with their class names.

        Args:
            images: one image or a list of them: file paths (str / Path), PIL images, NumPy arrays (H, W) or
                (H, W, C), tensors (C, H, W) in [0, 1]; or a batch tensor (B, C, H, W).
            task: a task of the model (``model.config.tasks``).
            top_k: classification: the labels kept per image, best first (None: every class).
            return_probs: segmentation: add per-class probabilities (K x H x W) at each image's size.
            batch_size: images of the same size run together, this many per forward pass.
            max_pixels: an image above this is shrunk for the forward pass (with a warning) and its logits resized
                back; None predicts at full size.

        Returns:
            One entry per image, in order. Classification: a list of ``{"label": class name, "score": softmax
            probability}``, best first, as transformers' image-classification pipeline. Segmentation:
            ``{"mask": H x W int64 class indices at the image's original size, "classes": class names (index = mask
            value)}`` plus ``"probs"`` (K x H x W) with ``return_probs=True``.

        >>> model.predict(["cat.jpg", np.zeros((97, 130), np.uint8)], task="demo_cls", top_k=2)
        [[{'label': 'cat', 'score': 0.91}, {'label': 'dog', 'score': 0.06}], [...]]
        >>> model.predict(Image.open("a.png"), task="demo_seg")[0]["mask"].shape
        torch.Size([97, 130])
        """
        tcfg = self.config.task(task)
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k: expected an int >= 1 or None, got {top_k!r}")
        originals = to_image_list(images)
        inputs = []
        for i, image in enumerate(originals):
            small, note = fit_pixel_budget(image, max_pixels, f"images[{i}]")
            if note:
                warnings.warn(note, stacklevel=2)
            inputs.append(small)
        batches = same_size_batches(inputs, batch_size)
        preds: list = [None] * len(inputs)
        was_training = self.training
        self.eval()
        try:
            device = next(self.parameters()).device
            for batch in batches:
                out = self(torch.stack([inputs[i] for i in batch]).to(device), task=task)
                logits = out["seg" if tcfg.type == "seg" else "cls"].float()
                names = class_names(tcfg.classes, logits.shape[1])
                for row, i in enumerate(batch):
                    if tcfg.type == "cls":
                        preds[i] = top_labels(logits[row].softmax(0).cpu(), names, top_k)
                        continue
                    one = logits[row: row + 1]
                    if one.shape[-2:] != originals[i].shape[-2:]:
                        one = F.interpolate(one, size=originals[i].shape[-2:], mode="bilinear", align_corners=False)
                    pred: SegPrediction = {"mask": class_argmax(one[0], 0).cpu(), "classes": names}
                    if return_probs:
                        pred["probs"] = one[0].softmax(0).cpu()
                    preds[i] = pred
        finally:
            self.train(was_training)
        return preds

    def extra_repr(self) -> str:
        c = self.config
        return (f"fusion={c.fusion}, levels={c.strides}, widths={c.widths}, detail={c.has_detail}, "
                f"refine={c.head.refine}, cls_reads_stride={c.strides[c.cls_level]}, cls_taps={c.head.cls_taps}")
