"""`timm:<name>[.<tag>]`: any timm ViT or CNN through `forward_intermediates`.

`timm:local-dir:<dir>` and `timm:hf-hub:<org/repo>` are timm's own names for a model saved in its format
(`timm.models.push_to_hf_hub` / `save_for_hf`: config.json with `architecture`, `model_args` and `pretrained_cfg`,
plus model.safetensors or pytorch_model.bin); `timm.create_model` builds them. The architecture is read from
config.json first (ViTs get `dynamic_img_size`), and a cached repo lacking its weights is an error naming the
cache dir, the files looked for and the offline setting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from huggingface_hub.constants import HF_HUB_CACHE
from torch import nn

from .base import Extractor, ExtractorInfo, resolve_layers
from .checkpoints import load_into_timm_model
from .registry import register_extractor

TIMM_SCHEMAS = ("local-dir:", "hf-hub:")
TIMM_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from a local-dir / hf-hub model


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def create_timm_model(name: str, pretrained: bool, checkpoint: str | None, **kwargs) -> nn.Module:
    """`timm.create_model` with weights from `checkpoint`, the HF cache or the hub; never silently random."""
    if name.startswith(TIMM_SCHEMAS):
        arch = schema_architecture(name, weights=pretrained and checkpoint is None)
    else:
        arch = name
    if "dynamic_img_size" not in kwargs and _is_vit_name(arch):
        kwargs["dynamic_img_size"] = True  # any H, W: position embeddings are interpolated
    if checkpoint is not None or not pretrained:
        model = timm.create_model(name, pretrained=False, **kwargs)
        if pretrained:
            load_into_timm_model(model, checkpoint)
        return model
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:  # offline, not cached, or no pretrained tag
        cfg = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        raise RuntimeError(
            f"timm:{name}: no pretrained weights could be loaded. Looked for hub repo {hub_id!r} in the HF "
            f"cache {HF_HUB_CACHE}{' (HF_HUB_OFFLINE is set, so not on the network)' if offline else ' and on the hub'}. "
            f"Pass checkpoint=<weight file> to load local weights, or pretrained=False for random weights. "
            f"Cause: {type(e).__name__}: {e}"
        ) from e


def schema_architecture(name: str, weights: bool) -> str:
    """The timm architecture of a ``local-dir:`` / ``hf-hub:`` name, from its config.json; with `weights`, the
    weight file is looked for too (in the dir, or the repo's snapshot in the HF cache) so that a partial cache
    is a clear error before timm's own."""
    from .hub import resolve_model_dir, resolve_model_file

    schema, _, source = name.partition(":")
    if schema == "local-dir":
        directory = resolve_model_dir(Path(source).expanduser(), ("config.json",), what=f"timm:{name}")
        config_path = directory / "config.json"
        if weights and not any((directory / w).is_file() for w in TIMM_WEIGHT_NAMES):
            raise FileNotFoundError(f"timm:{name}: {directory} has none of {list(TIMM_WEIGHT_NAMES)}; pass "
                                    "checkpoint=<weight file> or pretrained=False")
    else:
        repo, _, revision = source.partition("@")
        config_path = resolve_model_file(repo, ("config.json",), what=f"timm:{name}", revision=revision or None)
        if weights:
            resolve_model_file(repo, TIMM_WEIGHT_NAMES, what=f"timm:{name}", revision=revision or None)
    try:
        return json.loads(config_path.read_text())["architecture"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"timm:{name}: {config_path} is not a timm config.json with 'architecture' "
                         f"({type(e).__name__}: {e}); timm's save_for_hf / push_to_hf_hub write one (a folder in this package's "
                         "own format loads as 'local-dir:<dir>')") from e


def _is_vit_name(name: str) -> bool:
    from timm.models import get_arch_name

    arch = get_arch_name(name)
    return arch.startswith(("vit_", "deit", "eva", "beit", "samvit")) and not arch.startswith("vit_base_r")


class TimmExtractor(Extractor):
    """Wraps a timm model. ViTs give one map per requested block (stride = patch); CNNs give stage maps.

    The classifier of the wrapped model is kept (:meth:`classify`) so real weights can be sanity-checked.
    """

    def __init__(self, model: nn.Module, layers, family: str | None = None):
        self.vit = is_vit(model)
        cfg = model.pretrained_cfg
        if self.vit:
            num_blocks = len(model.blocks)
            layers = resolve_layers(layers, num_blocks, default=(num_blocks - 1,))
            patch = model.patch_embed.patch_size[0]
            widths, strides = (model.embed_dim,) * len(layers), (patch,) * len(layers)
        else:
            feats = model.feature_info if isinstance(model.feature_info, list) else model.feature_info.info
            num_blocks = len(feats)
            default = tuple(i for i, f in enumerate(feats) if f["reduction"] in (8, 16, 32)) or (num_blocks - 1,)
            layers = resolve_layers(layers, num_blocks, default=default)
            widths = tuple(feats[i]["num_chs"] for i in layers)
            strides = tuple(feats[i]["reduction"] for i in layers)
            patch = max(f["reduction"] for f in feats)
        info = ExtractorInfo(
            name="timm",
            width=model.num_features,
            widths=widths,
            strides=strides,
            patch_size=patch,
            layers=layers,
            mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            family=family or "semantic",
            input_size=int(cfg.get("input_size", (3, 224, 224))[-1]),
        )
        super().__init__(info)
        self.model = model

    def forward_features(self, x):
        # timm returns intermediates in block order; hand them back in the order the layers were asked for.
        order = sorted(set(self.info.layers))
        final, dense = self.model.forward_intermediates(x, indices=order, output_fmt="NCHW", norm=self.vit)
        return [dense[order.index(i)] for i in self.info.layers], self.model.forward_head(final, pre_logits=True)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of the wrapped timm classifier on [0, 1] images (for checking real weights)."""
        return self.model.forward_head(self.model.forward_features(self.preprocess(images)))

    def block_modules(self):
        m = self.model
        if self.vit or isinstance(getattr(m, "blocks", None), nn.Sequential):
            return list(m.blocks)
        if hasattr(m, "stages"):
            return list(m.stages)
        if hasattr(m, "layer4"):
            return [m.layer1, m.layer2, m.layer3, m.layer4]
        return [m.get_submodule(f["module"]) for f in m.feature_info]

    def final_modules(self):
        # Children after the block container, except the classifier: final norms, conv_head / bn2.
        names = [n for n, _ in self.model.named_children()]
        container = "blocks" if "blocks" in names else "stages" if "stages" in names else None
        if container is None:
            return []
        classifier = self.model.get_classifier()
        return [c for n, c in list(self.model.named_children())[names.index(container) + 1 :] if c is not classifier]


@register_extractor("timm")
def _build_timm(name: str, layers=None, pretrained=True, checkpoint=None, **kwargs) -> TimmExtractor:
    if not name:
        raise ValueError("timm extractor spec needs a model name, e.g. 'timm:vit_small_patch14_dinov2.lvd142m'")
    model = create_timm_model(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    return TimmExtractor(model, layers)
