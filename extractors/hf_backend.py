"""`hf:<repo id or local dir>`: a transformers vision transformer as an extractor.

Supported model types (``config.json`` ``model_type``): ``dinov2``, ``dinov2_with_registers``, ``vit``,
``clip_vision_model`` and ``clip`` (a full CLIPModel: its vision tower is loaded), ``siglip_vision_model``
and ``siglip`` (likewise).

Outputs: dense maps are the ``hidden_states`` after the requested blocks, prefix tokens dropped (CLS and
``num_register_tokens`` registers; SigLIP has none), NCHW at stride = patch. The model's final norm
(``layernorm`` of DINOv2 / ViT, ``post_layernorm`` of CLIP / SigLIP) is applied to the map of the *last*
block only, so that map equals ``last_hidden_state`` for DINOv2, ViT and SigLIP; earlier blocks are raw.
The pooled vector is ``pooler_output`` (DINOv2: normed CLS; CLIP: ``post_layernorm`` CLS; SigLIP: the
attention-pooling head), else the normed CLS. ViT is built without its tanh pooler
(``add_pooling_layer=False``; many checkpoints do not have it), so its pooled vector is the normed CLS.

Any H, W: ``interpolate_pos_encoding=True`` for CLIP, SigLIP and ViT; DINOv2 interpolates natively.
Preprocessing: ``image_mean`` / ``image_std`` of ``preprocessor_config.json`` next to the weights, else
the model type's default. Weights: ``from_pretrained`` from the local dir, else the HF cache (only the
cache when ``HF_HUB_OFFLINE`` is set), else the hub; weights the model needs but the files lack are an
error, never a silent random init.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .base import Extractor, ExtractorInfo, resolve_layers
from .io.model_files import hub_offline, looks_like_path, missing_files_error
from .registry import register_extractor

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")  # what from_pretrained reads
# model_type -> (transformers class name, default (mean, std), prefix tokens besides registers)
MODEL_TYPES = {
    "dinov2": ("Dinov2Model", IMAGENET, 1),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", IMAGENET, 1),
    "vit": ("ViTModel", HALF, 1),
    "clip_vision_model": ("CLIPVisionModel", OPENAI_CLIP, 1),
    "clip": ("CLIPVisionModel", OPENAI_CLIP, 1),
    "siglip_vision_model": ("SiglipVisionModel", HALF, 0),
    "siglip": ("SiglipVisionModel", HALF, 0),
}


def resolve_hf_source(source: str, what: str = "model") -> tuple[str, bool]:
    """A local dir or a repo id -> (path or repo id for `from_pretrained`, local_files_only).

    A repo id must be in the HF cache when ``HF_HUB_OFFLINE`` is set; otherwise this raises an error that
    says where it looked.
    """
    from huggingface_hub.constants import HF_HUB_CACHE

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"hf:{source}: {path / 'config.json'} does not exist; expected a save_pretrained dir")
        return str(path), True
    if looks_like_path(source):
        raise FileNotFoundError(f"hf:{source}: directory {path} does not exist (expected a {what} save_pretrained dir)")
    if not hub_offline():
        return source, False
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source, "config.json")
    if not isinstance(cached, str):
        repo_dir = Path(HF_HUB_CACHE) / f"models--{source.replace('/', '--')}"
        raise FileNotFoundError(
            f"hf:{source}: no local dir {path} and repo {source!r} is not in the HF cache (looked in {repo_dir}); "
            "HF_HUB_OFFLINE is set, so not on the network. Pass a local dir saved with save_pretrained, or "
            "download the repo on a machine with access"
        )
    return source, True


def weights_missing_error(location: str, path: str, local_only: bool) -> FileNotFoundError:
    """A dir or cached repo with config.json but no weights: the error names the folder, the files and the
    offline setting (transformers' own OSError names neither)."""
    from huggingface_hub import try_to_load_from_cache

    wanted = [f"{WEIGHT_NAMES[0]} (or {', '.join(WEIGHT_NAMES[1:])})"]
    if Path(path).is_dir():
        return missing_files_error(f"hf:{location}", Path(path), wanted, local_only=True)
    return missing_files_error(f"hf:{location}", Path(try_to_load_from_cache(path, "config.json")).parent, wanted,
                               local_only, repo_id=path)


def _read_preprocessor_config(source: str, local_only: bool) -> dict:
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "preprocessor_config.json", local_files_only=local_only))
        except Exception:  # no preprocessor config: the model type's defaults
            return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def create_hf_vision_model(source: str, pretrained: bool, checkpoint: str | None = None, **kwargs) -> tuple[nn.Module, dict]:
    """The transformers vision model for `source` and its preprocessor config (may be empty)."""
    import transformers
    from transformers import AutoConfig

    location = checkpoint if checkpoint is not None else source
    path, local_only = resolve_hf_source(location)
    config = AutoConfig.from_pretrained(path, local_files_only=local_only)
    if config.model_type not in MODEL_TYPES:
        raise ValueError(
            f"hf:{location}: model_type {config.model_type!r} is not supported; expected one of {sorted(MODEL_TYPES)}"
        )
    cls = getattr(transformers, MODEL_TYPES[config.model_type][0])
    if config.model_type in ("clip", "siglip"):
        config = config.vision_config
    extra = {"add_pooling_layer": False} if config.model_type == "vit" else {}
    for key, value in kwargs.items():
        if not hasattr(config, key):
            raise ValueError(f"hf:{location}: {type(config).__name__} has no field {key!r} to override")
        setattr(config, key, value)
    if not pretrained:
        model = cls(config, **extra)
    else:
        check_pickled_weights(path)
        try:
            model, info = cls.from_pretrained(
                path, config=config, local_files_only=local_only, output_loading_info=True, **extra
            )
        except OSError as e:  # config found, weights not: a partial cache or download
            raise weights_missing_error(location, path, local_only) from e
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(
                f"hf:{location}: the weights in {path} do not fit {cls.__name__}: "
                + "; ".join(f"{k} {sorted(map(str, v))[:8]}" for k, v in problems.items())
            )
    return model.eval(), _read_preprocessor_config(path, local_only)


def check_pickled_weights(path: str) -> None:
    """A dir or cached repo whose weights are only ``pytorch_model.bin`` (read by transformers with ``torch.load``):
    read it first with :func:`load_state_dict_file`, whose refusal of pickled code names the file."""
    from huggingface_hub import try_to_load_from_cache

    from .io.weights import load_state_dict_file

    def find(name: str) -> Path | None:
        if Path(path).is_dir():
            return p if (p := Path(path) / name).is_file() else None
        cached = try_to_load_from_cache(path, name)
        return Path(cached) if isinstance(cached, str) else None

    if not find(WEIGHT_NAMES[0]) and not find(WEIGHT_NAMES[1]) and (pickled := find(WEIGHT_NAMES[2])):
        load_state_dict_file(pickled)


def _find_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: `encoder.layer(s)` or, in newer transformers, `layer(s)` on the model."""
    for path in ("encoder.layer", "encoder.layers", "layers", "layer"):
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    raise ValueError(f"{type(model).__name__}: found no transformer blocks at encoder.layer(s) or layer(s)")


class HFExtractor(Extractor):
    """Wraps a transformers ViT-style vision model (see the module docstring for the outputs)."""

    def __init__(self, model: nn.Module, layers, preprocessor: dict):
        config = model.config
        model_type = config.model_type
        _, (mean, std), num_cls = MODEL_TYPES[model_type]
        self.num_prefix = num_cls + int(getattr(config, "num_register_tokens", 0) or 0)
        inner = getattr(model, "vision_model", model)  # CLIP / SigLIP keep the tower one level down
        self.blocks = _find_blocks(inner)
        num_blocks = len(self.blocks)
        layers = resolve_layers(layers, num_blocks, default=(num_blocks - 1,))
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        info = ExtractorInfo(
            name="hf",
            width=config.hidden_size,
            widths=(config.hidden_size,) * len(layers),
            strides=(patch,) * len(layers),
            patch_size=patch,
            layers=layers,
            mean=tuple(preprocessor.get("image_mean", mean)),
            std=tuple(preprocessor.get("image_std", std)),
            input_size=int(size),
        )
        super().__init__(info)
        self.model = model
        # Plain attributes, not submodules: both are already registered under `model`.
        final_norm = getattr(inner, "layernorm", None) or getattr(inner, "post_layernorm", None)
        head = getattr(inner, "head", None) if getattr(config, "vision_use_head", True) else None
        object.__setattr__(self, "final_norm", final_norm)
        object.__setattr__(self, "head", head)
        self.interpolate = model_type not in ("dinov2", "dinov2_with_registers")

    def forward_features(self, x):
        b, _, h, w = x.shape
        p = self.info.patch_size
        kw = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=x, output_hidden_states=True, **kw)
        last = len(self.blocks) - 1
        dense = []
        for i in self.info.layers:
            t = out.hidden_states[i + 1]
            if i == last and self.final_norm is not None:
                t = self.final_norm(t)
            t = t[:, self.num_prefix :]
            dense.append(t.transpose(1, 2).reshape(b, -1, h // p, w // p))
        pooled = out.pooler_output
        if pooled is None:
            pooled = out.last_hidden_state[:, 0] if self.num_prefix else out.last_hidden_state.mean(1)
        return dense, pooled

    def block_modules(self):
        return list(self.blocks)

    def final_modules(self):
        return [m for m in (self.final_norm, self.head) if m is not None]


@register_extractor("hf")
def _build_hf(source: str, layers=None, pretrained=True, checkpoint=None, **kwargs) -> HFExtractor:
    if not source:
        raise ValueError("hf extractor spec needs a repo id or a local dir, e.g. 'hf:facebook/dinov2-small'")
    model, preprocessor = create_hf_vision_model(source, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    return HFExtractor(model, layers, preprocessor)

