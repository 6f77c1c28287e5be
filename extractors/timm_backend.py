"""`timm:<name>[.<tag>]`: any timm ViT or CNN through `forward_intermediates`.

`timm:local-dir:<dir>` and `timm:hf-hub:<org/repo>` are timm's own names for a model saved in its format
(`timm.models.push_to_hf_hub` / `save_for_hf`: config.json with `architecture`, `model_args` and `pretrained_cfg`,
plus model.safetensors or pytorch_model.bin); `timm.create_model` builds them. The architecture is read from
config.json first (ViTs get `dynamic_img_size`), and a cached repo lacking its weights is an error naming the
cache dir, the files looked for and the offline setting.

:func:`save_timm_extractor` writes that format (what train/pretrain.py and the imgsim converter save), with this
package's own facts about the extractor (dense layers, family, provenance) under config.json's
``"backbone_router"`` key, which timm ignores.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import timm
import torch
from huggingface_hub.constants import HF_HUB_CACHE
from torch import nn

from .base import Extractor, ExtractorInfo, resolve_layers
from .io.atomic import atomic_save_safetensors, atomic_write_bytes
from .io.weights import load_into_timm_model
from .registry import register_extractor
from .untrusted import check_architecture_kwargs, check_model_name

TIMM_SCHEMAS = ("local-dir:", "hf-hub:")
TIMM_WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")  # what timm loads from a local-dir / hf-hub model
SAFE_TIMM = (1, 0, 26)  # from 1.0.26 timm's load_checkpoint / load_state_dict default to torch.load(weights_only=True)
if tuple(int(p) for p in timm.__version__.split("+")[0].split(".")[:3] if p.isdigit()) < SAFE_TIMM:
    raise ImportError(f"timm {timm.__version__} loads checkpoints with torch.load(weights_only=False) by default, which "
                      "runs pickled code; backbone-router needs timm >= 1.0.26 (pip install -U timm)")
OWN_KEY = "backbone_router"  # config.json key with this package's facts: layers, family, source (timm ignores it)
# pretrained_cfg keys that describe saved weights of any origin (preprocessing, input, classifier); the rest
# (tag, license, hf_hub_id, paper, ...) belongs to the architecture's published weights, not to ours
PRETRAINED_CFG_KEYS = ("input_size", "fixed_input_size", "min_input_size", "test_input_size", "interpolation",
                       "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "num_classes", "pool_size",
                       "test_pool_size", "first_conv", "classifier", "custom_load")


def is_vit(model: nn.Module) -> bool:
    return hasattr(model, "patch_embed") and hasattr(model, "blocks") and hasattr(model, "num_prefix_tokens")


def create_timm_model(name: str, pretrained: bool, checkpoint: str | None, **kwargs) -> nn.Module:
    """`timm.create_model` with weights from `checkpoint`, the HF cache or the hub; never silently random.

    `kwargs` are architecture arguments only (:func:`check_architecture_kwargs`: timm would open a
    ``checkpoint_path`` itself), and every weight file of a ``local-dir:`` / ``hf-hub:`` name is read by
    :func:`load_into_timm_model` (safetensors or ``torch.load(weights_only=True)``)."""
    check_architecture_kwargs(kwargs, f"timm:{name} kwargs")
    if name.startswith(TIMM_SCHEMAS):
        config = schema_config(name, weights=pretrained and checkpoint is None)
        arch = config["architecture"]
        check_model_name(arch, f"{config['_dir']}/config.json: architecture")
        check_architecture_kwargs(config.get("model_args") or {}, f"{config['_dir']}/config.json: model_args")
        if pretrained and checkpoint is None:  # read by us: strict keys, CRC-32, never unpickled
            if name.startswith("local-dir:"):
                checkpoint = str(next(p for w in TIMM_WEIGHT_NAMES if (p := Path(config["_dir"]) / w).is_file()))
            else:
                from .io.model_files import resolve_model_file

                repo, _, revision = name.removeprefix("hf-hub:").partition("@")
                checkpoint = str(resolve_model_file(repo, TIMM_WEIGHT_NAMES, what=f"timm:{name}",
                                                    revision=revision or None))
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
        raise FileNotFoundError(  # a clear error (one line from the scripts), not a crash
            f"timm:{name}: no pretrained weights could be loaded. Looked for hub repo {hub_id!r} in the HF "
            f"cache {HF_HUB_CACHE}{' (HF_HUB_OFFLINE is set, so not on the network)' if offline else ' and on the hub'}. "
            f"Pass checkpoint=<weight file> to load local weights, or pretrained=False for random weights. "
            f"Cause: {type(e).__name__}: {e}"
        ) from e


def model_from_timm_config(config: dict, where: str, **kwargs) -> nn.Module:
    """A randomly initialized timm model from a timm config.json dict alone (architecture, model_args,
    pretrained_cfg): what rebuilds a saved extractor whose folder is gone."""
    if not is_timm_config(config):
        raise ValueError(f"{where}: not a timm config.json (expected 'architecture', 'pretrained_cfg'; got keys "
                         f"{sorted(config) if isinstance(config, dict) else config!r})")
    check_model_name(config["architecture"], f"{where}: architecture")
    model = create_timm_model(config["architecture"], pretrained=False, checkpoint=None,
                              **{**config.get("model_args", {}), **kwargs})
    pre = {k: tuple(v) if isinstance(v, list) else v for k, v in config.get("pretrained_cfg", {}).items()}
    model.pretrained_cfg = {**model.pretrained_cfg, **pre}
    return model


def is_timm_config(config) -> bool:
    """Whether a config.json dict is timm's (``architecture`` at the top), not this package's older format."""
    return isinstance(config, dict) and isinstance(config.get("architecture"), str) and "format" not in config


def save_timm_extractor(extractor: TimmExtractor, directory: str | os.PathLike, model_args: dict | None = None,
                        source: dict | None = None) -> Path:
    """Write a timm-built extractor in timm's own format (timm's ``save_for_hf`` layout: config.json with
    ``architecture``, ``model_args`` and ``pretrained_cfg``, plus model.safetensors), each file atomically.

    ``timm.create_model("local-dir:<directory>")`` opens it, and ``create_extractor("timm:local-dir:<directory>")``
    (or ``"local-dir:<directory>"``) gives the same extractor: weights, mean / std, layers, family.

    Args:
        extractor: a :class:`TimmExtractor` (e.g. train/pretrain.py's encoder).
        directory: the folder to write (created if needed).
        model_args: timm.create_model kwargs that rebuild the architecture (recent timm records them
            itself; older versions need them here).
        source: free-form provenance (method, steps, data), kept under config.json's ``"backbone_router"``.

    >>> ext = create_extractor("timm:vit_small_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2)
    >>> save_timm_extractor(ext, "runs/x/final", {"embed_dim": 32, "depth": 2, "num_heads": 2})
    >>> timm.create_model("local-dir:runs/x/final", pretrained=True)  # or create_extractor("timm:local-dir:runs/x/final")
    """
    from timm.models._hub import save_config_for_hf

    directory, info, model = Path(directory), extractor.info, extractor.model
    own = {"layers": list(info.layers), "family": info.family, "source": source or {}}
    with tempfile.TemporaryDirectory() as tmp:  # timm writes its config in place; ours is renamed in whole
        save_config_for_hf(model, Path(tmp) / "config.json",  # a Path: timm < 1.0.2x calls .open() on it
                           model_config={OWN_KEY: own}, model_args=model_args)
        config = json.loads((Path(tmp) / "config.json").read_text())
    config["pretrained_cfg"] = {k: v for k, v in config["pretrained_cfg"].items() if k in PRETRAINED_CFG_KEYS}
    config["pretrained_cfg"].update(mean=list(info.mean), std=list(info.std))
    atomic_save_safetensors(model.state_dict(), directory / TIMM_WEIGHT_NAMES[0])
    atomic_write_bytes(directory / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return directory


def schema_config(name: str, weights: bool) -> dict:
    """The timm config.json of a ``local-dir:`` / ``hf-hub:`` name (with ``"_dir"``, the folder it was read from);
    with `weights`, the weight file is looked for too (in the dir, or the repo's snapshot in the HF cache) so that a
    partial cache is a clear error before timm's own."""
    from .io.model_files import resolve_model_dir, resolve_model_file

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
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        config = e
    if not is_timm_config(config):
        raise ValueError(f"timm:{name}: {config_path} is not a timm config.json with 'architecture' "
                         f"({config if isinstance(config, Exception) else 'keys ' + str(sorted(config))}); timm's "
                         "save_for_hf / push_to_hf_hub write one (a folder in this package's own format loads as "
                         "'local-dir:<dir>')")
    return {**config, "_dir": str(config_path.parent)}


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
def _build_timm(name: str, layers=None, pretrained=True, checkpoint=None, architecture=None, **kwargs) -> TimmExtractor:
    if not name:
        raise ValueError("timm extractor spec needs a model name, e.g. 'timm:vit_small_patch14_dinov2.lvd142m'")
    if not name.startswith(TIMM_SCHEMAS):
        if architecture is not None:
            raise ValueError(f"timm:{name}: architecture= is for 'local-dir:' / 'hf-hub:' names, whose folder may be gone")
        return TimmExtractor(create_timm_model(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs), layers)
    if architecture is not None and not pretrained:  # weights come from elsewhere: the folder is not needed
        config = architecture
        model = model_from_timm_config(architecture, f"timm:{name} (architecture=)", **kwargs)
    else:
        config = schema_config(name, weights=pretrained and checkpoint is None)
        model = create_timm_model(name, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    own = config.get(OWN_KEY) or {}
    ext = TimmExtractor(model, layers if layers is not None else tuple(own.get("layers") or ()) or None)
    return ext.set_family(own.get("family", "semantic"))


def timm_dir_architecture(spec: str) -> dict | None:
    """The timm config.json of a ``timm:local-dir:<dir>`` spec (all it takes to rebuild the extractor without its
    folder, as ``architecture=``); None for other specs."""
    if not spec.startswith("timm:local-dir:"):
        return None
    config = schema_config(spec.removeprefix("timm:"), weights=False)
    config.pop("_dir")
    return config
