"""Router: extractors -> alignment to a pyramid of levels -> task-conditioned gate per level -> fusion per
level -> top-down decoder -> shared heads."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from safetensors import SafetensorError, safe_open
from torch import nn

from extractors import Extractor, ExtractorOutput, check_images, create_extractor
from extractors.atomic import atomic_save_safetensors, verify_checksums
from extractors.checkpoints import key_problems
from extractors.factory import local_files_needed
from extractors.hub import resolve_model_dir
from extractors.local_dir import local_dir_architecture
from heads import ClsHead, Refiner, SegHead, TopDownDecoder

from .align import Aligner, grid_size, resample
from .card import router_card, write_card
from .config import FORMAT_VERSION, RouterConfig, TaskConfig, load_yaml_or_json, nearest_level
from .detail import SKIP_WIDTHS, DetailStem
from .gate import ProbeMixture, TaskGate, drop_extractors, keep_renormalized
from .inputs import DEFAULT_MAX_PIXELS, fit_pixel_budget, to_image_list
from .outputs import RouterOutput
from .predictions import Label, SegPrediction, class_names, same_size_batches, top_labels
from .saved import paths_for_loading, paths_for_saving

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def task_text(task: TaskConfig) -> str:
    """The sentence a text encoder embeds for a task: its description, then its class names."""
    classes = f"Classes: {', '.join(task.classes)}." if task.classes else ""
    return " ".join(s for s in (task.description.strip(), classes) if s) or task.name


class Router(nn.Module):
    """Specialist extractors routed per task and level into shared segmentation and classification heads.

    Every extractor is aligned to each level of ``config.levels`` (strides, e.g. 4, 8, 16, 32; see
    :mod:`router.align`), the gate weighs the extractors per task x level (x image or location), the
    weighted maps are fused level by level, a raw-image detail stem joins the finest level
    (``config.detail``), and a top-down decoder carries coarse context down to the finest level, where the
    segmentation head reads it (``head.refine``: and carries it on to stride 2 / 1 with the detail stem's maps).
    Classification reads one level (``head.cls_stride``, default the one nearest stride 16) and the pooled vectors:
    with ``head.cls_taps: all`` (the default) its own map on that level's grid, into which every tap of each
    extractor is resampled, as at one level; with ``level`` the level's map. In training an auxiliary seg head
    (``head.aux_weight``, 0.4) reads that map too. The defaults are the recommended model (levels 4-32); with
    one level there is no decoder: ``levels: [16]`` is the single-grid model of format 1.

    >>> model = Router.from_config("configs/tiny.yaml")
    >>> out = model(torch.rand(2, 3, 97, 130), task="demo_seg")
    >>> out["seg"].shape, out["gate"].shape, out["gate_levels"].shape
    (torch.Size([2, 2, 97, 130]), torch.Size([2, 2]), torch.Size([2, 4, 2]))
    """

    def __init__(self, config: RouterConfig, *, text_embeddings: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.config = config
        self.extractors = nn.ModuleDict()
        for ecfg in config.extractors:
            ext = create_extractor(ecfg.spec, layers=ecfg.layers, pretrained=ecfg.pretrained,
                                   checkpoint=ecfg.checkpoint, family=ecfg.family, **ecfg.kwargs)
            self.extractors[ecfg.name] = ext.freeze() if ecfg.frozen else ext
        levels, widths = config.strides, config.widths
        cls_width = widths[config.cls_level] if config.cls_reads_all_taps else None
        self.aligners = nn.ModuleDict({n: Aligner(e.info, levels, widths, pooled_width=widths[-1], cls_width=cls_width)
                                       for n, e in self.extractors.items()})
        n = len(self.extractors)
        if config.fusion == "concat" or (config.fusion == "gated" and config.gate.combine == "concat"):
            self.concat_proj = nn.ModuleDict({str(s): nn.Conv2d(n * w, w, 1) for s, w in zip(levels, widths)})
            self.concat_pooled_proj = nn.Linear(n * widths[-1], widths[-1])
        if config.fusion == "gated":
            if config.gate.task_embedding == "text" and text_embeddings is None:
                text_embeddings = self.embed_task_texts(config.tasks)
            self.gate = TaskGate(n, [t.name for t in config.tasks], config.gate, widths[self.gate_level],
                                 text_embeddings, num_levels=len(levels))
        h = config.head
        if config.has_detail:
            self.detail = DetailStem(widths[0], full_res=1 in h.refine)
        seg_width = widths[0]
        if len(levels) > 1:  # "fuse": the head reads all levels mixed at the stride-16 width
            self.decoder = TopDownDecoder(widths, block=h.decoder_block, output=h.decoder_output,
                                          out_width=config.width if h.decoder_output == "fuse" else None)
            seg_width = self.decoder.out_width
        seg = {t.name: t.num_classes for t in config.tasks if t.type == "seg"}
        cls = {t.name: t.num_classes for t in config.tasks if t.type == "cls"}
        refiner = Refiner(h.seg_hidden, [SKIP_WIDTHS[s] for s in h.refine], h.refine_width) if h.refine else None
        self.seg_head = SegHead(seg_width, seg, hidden=h.seg_hidden, dropout=h.dropout, trunk=h.seg_trunk,
                                refine=refiner)
        if config.has_aux_head:  # training only: a plain seg head on the stride-16 level (UPerNet's auxiliary head),
            #                 or with cls_taps: all on classification's map, so segmentation trains it as at one level
            aux_width = widths[config.cls_level] if config.cls_reads_all_taps else widths[self.gate_level]
            self.aux_seg_head = SegHead(aux_width, seg, hidden=h.seg_hidden, dropout=h.dropout, trunk=h.seg_trunk)
        self.cls_head = ClsHead(widths[config.cls_level], cls, pooling=h.cls_pooling, hidden=h.cls_hidden, dropout=h.dropout,
                                pooled_dim=widths[-1])
        if config.fusion == "gated" and config.gate.probe_weight:  # training only; built last, so that the
            #                                                       other modules' initial weights do not depend on it
            self.probes = ProbeMixture(widths, n, {t.name: (t.num_classes, self._probed_levels(t)) for t in config.tasks})

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

    def _probed_levels(self, task: TaskConfig) -> list[int]:
        """Indices of the levels whose gate weights a task's output depends on: all (seg), classification's (cls)."""
        return list(range(len(self.config.strides))) if task.type == "seg" else [self.config.cls_level]

    def _text_encoder(self):
        from extractors.text import create_text_encoder

        if not hasattr(self, "_text_encoder_cache"):
            object.__setattr__(self, "_text_encoder_cache", create_text_encoder(self.config.gate.text_encoder))
        return self._text_encoder_cache

    @torch.no_grad()
    def embed_task_texts(self, tasks: list[TaskConfig]) -> dict[str, torch.Tensor]:
        """Text embeddings of each task's description and class names, with the configured text encoder."""
        vectors = self._text_encoder().encode([task_text(t) for t in tasks])
        return {t.name: v for t, v in zip(tasks, vectors)}

    def add_task(self, task: TaskConfig) -> None:
        """Add a task after training: new head outputs; with text task embeddings the gate routes it at once."""
        if task.name in {t.name for t in self.config.tasks}:
            raise ValueError(f"add_task: a task named {task.name!r} already exists")
        (self.seg_head if task.type == "seg" else self.cls_head).add_task(task.name, task.num_classes)
        if task.type == "seg" and hasattr(self, "aux_seg_head"):
            self.aux_seg_head.add_task(task.name, task.num_classes)
        if hasattr(self, "gate"):
            text = self.embed_task_texts([task])[task.name] if self.config.gate.task_embedding == "text" else None
            self.gate.add_task(task.name, text)
        if hasattr(self, "probes"):
            self.probes.add_task(task.name, task.num_classes, self.config.widths, self._probed_levels(task))
        self.config.tasks.append(task)

    @torch.no_grad()
    def init_seg_bias_from_prior(self, task: str, prior: float) -> None:
        """A segmentation task's output bias from the foreground prior (:meth:`heads.SegHead.init_bias_from_prior`):
        the main head's and the auxiliary head's."""
        for name in ("seg_head", "aux_seg_head"):
            if hasattr(self, name):
                getattr(self, name).init_bias_from_prior(task, prior)

    # ---- forward ---------------------------------------------------------------------------------
    def _run_extractor(self, name: str, images: torch.Tensor, grids: list, features=None, cls_grid=None):
        """The extractor's aligned maps at the levels whose grid is given (None elsewhere), its pooled vector,
        and with `cls_grid` classification's own map (``head.cls_taps: all``; else None)."""
        if features is not None and name in features:  # precomputed (frozen-feature cache)
            out = features[name]
        else:
            ext: Extractor = self.extractors[name]
            trainable = any(p.requires_grad for p in ext.parameters())
            with nullcontext() if trainable else torch.no_grad():
                out = ext(images)
        aligner = self.aligners[name]
        maps, vec = aligner(out["dense"], out["pooled"], grids)
        return maps, vec, (None if cls_grid is None else aligner.cls(out["dense"], cls_grid))

    def _level_weights(self, weights: torch.Tensor | None, k: int, grid: tuple[int, int]) -> torch.Tensor | None:
        """Level k's gate weights (B x E, or B x E x h x w resampled from the gate's grid: a convex mix)."""
        if weights is None:
            return None
        wk = weights[:, k]
        return resample(wk, grid) if wk.ndim == 4 and k != self.gate_level else wk

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

    def forward(self, images: torch.Tensor, task: str, features: dict[str, ExtractorOutput] | None = None,
                keep: list[str] | None = None, target: torch.Tensor | None = None) -> RouterOutput:
        """Route `images` (B x C x H x W in [0, 1], C = 1 or 3) for one task.

        `features` may hold precomputed outputs of some extractors (name -> {"dense", "pooled"}), e.g.
        from a frozen-feature cache; those extractors are then not run.
        `keep` (extractor names; ablation at evaluation): the others are left out of the fusion as if the gate
        gave them zero weight, the kept weights renormalised to sum to 1 (gated); mean / concat fuse the kept
        maps only (concat: zeros in place of the others). A gate that reads features still reads all of them.
        `target` (training; B x H x W class indices or B labels): with ``gate.probe_weight`` the probe-mixture loss
        (:class:`router.gate.ProbeMixture`) joins ``aux_loss``; without it, or in eval mode, it is not used.
        """
        images = check_images(images, "Router input")
        tcfg = self.config.task(task)
        kept = self._kept_indices(keep)
        b, (h, w) = images.shape[0], images.shape[-2:]
        levels, g = self.config.strides, self.gate_level
        grids = [grid_size((h, w), s) for s in levels]
        names, n = self.extractor_names, len(self.extractors)
        fusion = self.config.fusion
        aux = images.new_zeros(())
        # Segmentation reads every level (through the decoder); classification one (head.cls_stride: nearest 16 by
        # default), or with head.cls_taps: all its own map on that level's grid (no level map is aligned for it).
        cls_k, own_cls = self.config.cls_level, tcfg.type == "cls" and self.config.cls_reads_all_taps
        aux_cls_map = (self.training and tcfg.type == "seg" and hasattr(self, "aux_seg_head")
                       and self.config.cls_reads_all_taps)  # the auxiliary seg head reads classification's map
        weighed = list(range(len(levels))) if tcfg.type == "seg" else [cls_k]  # levels whose gate weights count
        used = [] if own_cls else weighed  # levels whose maps are aligned
        if fusion == "gated" and self.gate.needs_features and g not in used:
            used = sorted({*used, g})

        # 1. Decide which extractors run. A gate that does not read features decides first, so that with
        #    top-k at inference an extractor whose weight is zero at every used level never runs.
        weights = None  # B x L x E (x h x w on the gate level's grid)
        if fusion == "gated" and not self.gate.needs_features:
            weights, aux = self.gate(task, b, grids[g], images=images)
            weights = weights if kept is None else keep_renormalized(weights, kept)
        if fusion == "single":
            active = [names.index(self.config.single)]
        elif weights is not None and not self.training and self.config.gate.top_k is not None:
            active = rearrange(weights[:, weighed], "b l e ... -> e (b l ...)").gt(0).any(dim=1).nonzero().flatten().tolist()
        else:
            active = list(range(n))
        if kept is not None and not (fusion == "gated" and self.gate.needs_features):
            # a top-k gate chose none of the kept ones: they run with weight 0 (a zero fused map) rather than none
            active = [i for i in active if i in kept] or kept

        # 2. Run and align the active extractors, at the used levels.
        maps, vecs, cls_maps = {}, {}, {}
        level_grids = [grids[k] if k in used else None for k in range(len(levels))]
        for i in active:
            maps[i], vecs[i], cls_maps[i] = self._run_extractor(names[i], images, level_grids, features,
                                                                cls_grid=grids[cls_k] if own_cls or aux_cls_map else None)

        # 3. Fuse, level by level.
        if fusion == "gated" and weights is None:  # the gate reads the aligned features of its level
            weights, aux = self.gate(task, b, grids[g], features=torch.stack([maps[i][g] for i in active]).mean(0))
            if kept is not None:
                weights = keep_renormalized(weights, kept)
                active = [i for i in active if i in kept]
                vecs, cls_maps = {i: vecs[i] for i in active}, {i: cls_maps[i] for i in active}
        fused: list[torch.Tensor | None] = [None] * len(levels)
        reported = weights
        if weights is not None and self.training and self.config.gate.extractor_dropout:
            weights = drop_extractors(weights, self.config.gate.extractor_dropout)
        for k in ([] if own_cls else used):  # (with own_cls a used level is aligned only for the gate to read)
            fused[k] = self._fuse({i: maps[i][k] for i in active}, self._level_weights(weights, k, grids[k]), k)
        if own_cls:
            fused[cls_k] = self._fuse(cls_maps, self._level_weights(weights, cls_k, grids[cls_k]), cls_k)
        if weights is None:  # fixed weights for single / mean / concat, reported the same way
            weights = torch.zeros(b, len(levels), n, device=images.device)
            for i in active:  # int indices: a list index is copied host -> device, a sync on an accelerator
                weights[:, :, i] = 1.0 / len(active)
        cls_w = weights[:, cls_k] if weights.ndim == 3 else weights[:, cls_k].mean(dim=(2, 3))
        if self.training and target is not None and hasattr(self, "probes") and len(active) == n:
            probed = {k: [cls_maps[i] if own_cls else maps[i][k] for i in active] for k in self._probed_levels(tcfg)}
            level_w = {k: self._level_weights(weights, k, grids[k]) for k in probed}
            aux = aux + self.config.gate.probe_weight * self.probes(task, probed, level_w, target, tcfg.ignore_index)

        ran = torch.zeros(n, dtype=torch.bool)
        ran[active] = True
        reported = weights if reported is None else reported
        gate = reported.mean(dim=1)
        out: RouterOutput = {"gate": gate, "gate_levels": reported,
                             "gate_mean": rearrange(gate, "b e ... -> e (b ...)").mean(1),
                             "gate_level_mean": rearrange(reported, "b l e ... -> l e (b ...)").mean(2),
                             "aux_loss": aux, "ran": ran}
        if tcfg.type == "seg":
            refine, skips = self.config.head.refine, {}
            if self.config.has_detail:
                detail, skips = self.detail(images, grids[0], skips=refine)
                fused[0] = fused[0] + detail
            x = self.decoder(fused) if len(levels) > 1 else fused[0]
            skip_maps = [skips[s] for s in refine] if refine else None
            out["seg"] = self.seg_head(x, task, out_size=(h, w), skips=skip_maps)
            if self.training and hasattr(self, "aux_seg_head"):
                aux_in = self._fuse(cls_maps, self._level_weights(weights, cls_k, grids[cls_k]), cls_k) if aux_cls_map \
                    else fused[g]
                out["seg_aux"] = self.aux_seg_head(aux_in, task, out_size=(h, w))
        else:
            out["cls"] = self.cls_head(fused[cls_k], task, pooled=self._fuse_pooled(vecs, cls_w))
        return out

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
                    pred: SegPrediction = {"mask": one[0].argmax(0).cpu(), "classes": names}
                    if return_probs:
                        pred["probs"] = one[0].softmax(0).cpu()
                    preds[i] = pred
        finally:
            self.train(was_training)
        return preds

    # ---- save / load -----------------------------------------------------------------------------
    def saved_extractors(self) -> list[str]:
        """Extractors whose weights a spec cannot rebuild: random, trainable, or unfrozen in training."""
        out = []
        for ecfg in self.config.extractors:
            ext = self.extractors[ecfg.name]
            trained = any(p.requires_grad for p in ext.parameters())
            if not ecfg.pretrained or not ecfg.frozen or ecfg.unfreeze_last > 0 or trained:
                out.append(ecfg.name)
        return out

    def save_pretrained(self, directory: str | os.PathLike, full: bool = False,
                        card_data: dict | None = None) -> Path:
        """Write config.json + model.safetensors + README.md (a model card with Hub metadata).

        By default, frozen pretrained extractors are left out (their specs rebuild them). `card_data` adds what
        only the caller knows to the card: metrics, gate weights per task and level, datasets, license, a gate
        heatmap image (see :mod:`router.card`).

        >>> model.save_pretrained("runs/x/final", card_data={"metrics": {"demo_seg": {"mIoU": 0.71}}})
        >>> Router.from_pretrained("runs/x/final")
        """
        directory = Path(directory)
        saved = self.extractor_names if full else self.saved_extractors()
        card = router_card(self.config, {n: e.info for n, e in self.extractors.items()}, saved, card_data)
        skip = tuple(f"extractors.{n}." for n in self.extractor_names if n not in saved)
        state = {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}
        metadata = {"format": "backbone-router", "saved_extractors": json.dumps(saved)}
        atomic_save_safetensors(state, directory / WEIGHTS_NAME, metadata=metadata)
        config = RouterConfig.from_dict(self.config.to_dict())
        for ecfg in config.extractors:  # a saved local-dir extractor rebuilds without its folder
            if ecfg.name in saved and (arch := local_dir_architecture(ecfg.spec)) is not None:
                ecfg.kwargs = {**ecfg.kwargs, "architecture": arch}
            paths_for_saving(ecfg, directory, pinned=ecfg.name not in saved)
        config.save_json(directory / CONFIG_NAME)
        write_card(directory, card, card_data, self.config, {n: e.info for n, e in self.extractors.items()})
        return directory

    def push_to_hub(self, repo_id: str, private: bool | None = None,
                    commit_message: str = "Upload backbone-router model", token: str | None = None,
                    full: bool = False, card_data: dict | None = None, revision: str | None = None) -> str:
        """Create (or reuse) the Hub repo `repo_id` and upload what `save_pretrained` writes, card included.

        Every extractor must be rebuildable on another machine: one left out of model.safetensors (frozen,
        pretrained) whose spec or checkpoint is a local file or dir is an error unless ``full=True`` (which uploads
        every extractor's weights); one whose weights are uploaded needs only its architecture, which a hub or
        library name gives, and ``local-dir:`` / ``timm:local-dir:`` folders too (config.json keeps theirs), but
        ``open_clip:local-dir:`` and ``hf:<dir>`` folders do not: an error. Returns the commit URL.

        >>> model.push_to_hub("org/my-router", private=True)
        >>> Router.from_pretrained("org/my-router")
        """
        from huggingface_hub import HfApi

        saved = self.extractor_names if full else self.saved_extractors()
        needs = {e.name: need for e in self.config.extractors
                 if (need := local_files_needed(e.spec, e.checkpoint, weights_saved=e.name in saved))}
        if weights := [n for n in needs if n not in saved]:
            raise ValueError(
                f"push_to_hub: extractor(s) {weights} take their weights from a local file or dir "
                f"({[needs[n] for n in weights]}) that a user of the Hub repo does not have; pass full=True to "
                "upload their weights too")
        if needs:
            raise ValueError(
                f"push_to_hub: extractor(s) {list(needs)} need {list(needs.values())}, which is not uploaded and "
                "a user of the Hub repo does not have; name the model by its hub id (hf:<org/repo>, "
                "open_clip:hf-hub:<org/repo>) or save it in timm's format (timm:local-dir:<dir>)")
        api = HfApi(token=token)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        with tempfile.TemporaryDirectory(prefix="backbone_router_push_") as tmp:
            self.save_pretrained(tmp, full=full, card_data={"model_id": repo.repo_id, **(card_data or {})})
            commit = api.upload_folder(repo_id=repo.repo_id, folder_path=tmp, commit_message=commit_message,
                                       token=token, revision=revision)
        return str(getattr(commit, "commit_url", commit))

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,
                        cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                        token: str | bool | None = None, map_location: str = "cpu") -> Router:
        """Rebuild from config.json, then load model.safetensors with strict key checks and checksums.

        Args:
            name_or_path: a save_pretrained directory, or a Hub repo id ("org/name") found in the HF cache
                (and on the hub unless offline) through ``huggingface_hub.snapshot_download``.
            revision, cache_dir, token: as in ``snapshot_download`` (a branch, tag or commit hash).
            local_files_only: only the HF cache; None means "when HF_HUB_OFFLINE is set".
            map_location: device the tensors are read to.

        Unexpected keys are an error; missing keys are allowed only for frozen pretrained extractors,
        which the extractor specs rebuild.

        >>> model = Router.from_pretrained("org/my-router", revision="main")
        """
        directory = resolve_model_dir(name_or_path, (CONFIG_NAME, WEIGHTS_NAME), what="Router.from_pretrained",
                                      revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                      token=token)
        from_hub = directory != Path(os.fspath(name_or_path)).expanduser()  # a snapshot: only its own files
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        raw = load_yaml_or_json(config_path)
        config = RouterConfig.from_dict(raw, where=str(config_path))
        try:
            with safe_open(str(weights_path), framework="pt", device=map_location) as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights_path}: not a readable safetensors file ({e})") from e
        verify_checksums(state, metadata, str(weights_path))
        if raw.get("format_version", FORMAT_VERSION) < 2:
            state = upgrade_state_v1(state, config)
        try:
            saved = json.loads(metadata["saved_extractors"])
        except (KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{weights_path}: metadata 'saved_extractors' missing or not JSON; not a Router checkpoint") from e
        unknown = set(saved) - {e.name for e in config.extractors}
        if unknown:
            raise ValueError(f"{weights_path}: saved_extractors {sorted(unknown)} are not in {config_path}")
        for ecfg in config.extractors:  # paths against this folder; frozen local weights checked against sha256
            paths_for_loading(ecfg, directory, from_hub, str(config_path), pinned=ecfg.name not in saved)
        # Extractors saved here need no weights from their spec (which may be unavailable offline).
        load_cfg = RouterConfig.from_dict(config.to_dict())
        for ecfg in load_cfg.extractors:
            if ecfg.name in saved:
                ecfg.pretrained = False
        text = None
        if config.fusion == "gated" and config.gate.task_embedding == "text":  # saved: no text encoder needed
            keys = {t.name: f"gate.task_vectors.{t.name}" for t in config.tasks}
            if missing := [k for k in keys.values() if k not in state]:
                raise ValueError(f"{weights_path}: missing keys {missing} (the tasks' text embeddings)")
            text = {name: state[k] for name, k in keys.items()}
        model = cls(load_cfg, text_embeddings=text)
        model.config = config
        model.load_checked(state, saved, str(weights_path))
        return model

    def load_checked(self, state: dict[str, torch.Tensor], saved: list[str], source: str) -> None:
        """Load `state`; every key must be known, and all but frozen pretrained extractors' and the probes' present."""
        own = self.state_dict()
        # frozen pretrained extractors come from their specs; the gate's training-only probes, if missing, start anew
        skip = (*(f"extractors.{n}." for n in self.extractor_names if n not in saved), "probes.")
        if problems := key_problems(own, state, expected={k for k in own if not k.startswith(skip)}):
            raise ValueError(f"{source}: does not fit the model in its config.json: " + "; ".join(problems))
        self.load_state_dict(state, strict=False)

    def extra_repr(self) -> str:
        c = self.config
        return (f"fusion={c.fusion}, levels={c.strides}, widths={c.widths}, detail={c.has_detail}, "
                f"refine={c.head.refine}, cls_stride={c.strides[c.cls_level]}, cls_taps={c.head.cls_taps}")


def upgrade_state_v1(state: dict[str, torch.Tensor], config: RouterConfig) -> dict[str, torch.Tensor]:
    """Keys of a format-1 (one grid) checkpoint -> the one-level names: ``aligners.<e>.proj.*`` becomes
    ``aligners.<e>.levels.<stride>.proj.*`` (norm alike) and ``concat_proj.*`` becomes ``concat_proj.<stride>.*``.
    The tensors are unchanged."""
    level = str(config.strides[0])
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "aligners" and len(parts) > 2 and parts[2] in ("proj", "norm"):
            key = ".".join([*parts[:2], "levels", level, *parts[2:]])
        elif parts[0] == "concat_proj":
            key = ".".join(["concat_proj", level, *parts[1:]])
        out[key] = value
    return out

