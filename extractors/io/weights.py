"""Reading weight files safely and mapping foreign key layouts onto timm models.

Nothing here unpickles arbitrary objects: ``.safetensors`` is read with safetensors, ``.pth`` / ``.pt`` /
``.bin`` with ``torch.load(weights_only=True)``, and any other file is refused.

Known foreign layouts (the weights in ../shared/weights are of these kinds) are converted to timm names
by *checked order*: both state dicts are walked in order, and every pair must have the same shape.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .atomic import verify_checksums

TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)  # a file name ending so is a weight file


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weight file without running code from it; unwrap ``{"state_dict"|"model": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weight file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                sd, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        verify_checksums(sd, metadata, str(path))
        return sd
    if path.suffix not in TORCH_SUFFIXES:
        raise ValueError(
            f"{path}: unsupported weight file type {path.suffix!r}; expected .safetensors or one of "
            f"{TORCH_SUFFIXES} (read with torch.load(weights_only=True))"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for code-carrying pickles, RuntimeError for truncation
        raise ValueError(
            f"{path}: refused or unreadable with torch.load(weights_only=True): only plain tensors are "
            f"accepted, never pickled code ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    for key in ("state_dict", "model", "module", "teacher"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return obj


def _tensors(sd: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def convert_by_order(sd: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Rename `sd` to `model`'s keys, pairing tensors in order; every pair must have equal shape."""
    theirs = _tensors(sd)
    ours = _tensors(model.state_dict())
    if len(theirs) != len(ours):
        raise ValueError(
            f"{source}: {len(theirs)} tensors in the file but {len(ours)} in {type(model).__name__}; "
            "cannot map the layout by order"
        )
    out = {}
    for (k_theirs, v), (k_ours, ref) in zip(theirs, ours):
        if v.shape != ref.shape:
            raise ValueError(
                f"{source}: tensor {k_theirs!r} {tuple(v.shape)} pairs with {k_ours!r} {tuple(ref.shape)} "
                "by order, but the shapes differ: this file is not of the model's architecture"
            )
        out[k_ours] = v
    # BatchNorm step counters carry no weight information; keep the model's own.
    out.update({k: v for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")})
    return out


# name -> (detect(state_dict) -> bool, convert(state_dict, model, source) -> state_dict)
FOREIGN_FORMATS: dict[str, tuple[Callable[[dict], bool], Callable[..., dict]]] = {
    # torchvision MobileNetV2 / EfficientNet / ... : "features.0.0.weight", "classifier.1.weight"
    "torchvision": (lambda sd: "features.0.0.weight" in sd, convert_by_order),
    # lukemelas EfficientNet-PyTorch (and its Lite ports): "_conv_stem.weight", "_blocks.0...."
    "lukemelas-efficientnet": (lambda sd: "_conv_stem.weight" in sd, convert_by_order),
}


def detect_format(sd: dict[str, torch.Tensor]) -> str | None:
    for name, (detect, _) in FOREIGN_FORMATS.items():
        if detect(sd):
            return name
    return None


def timm_filter_fn(model: nn.Module) -> Callable | None:
    """The `checkpoint_filter_fn` of the timm module that defines `model` (official -> timm layouts)."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_into_timm_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a weight file of any known layout into a timm model, strictly, with a clear error."""
    source = str(path)
    sd = load_state_dict_file(path)
    own_keys = set(model.state_dict())
    fmt = None if set(sd) == own_keys else detect_format(sd)
    if fmt is not None:
        sd = FOREIGN_FORMATS[fmt][1](sd, model, f"{source} ({fmt} layout)")
    elif set(sd) != own_keys and (filter_fn := timm_filter_fn(model)) is not None:
        sd = filter_fn(sd, model)  # e.g. official DINOv2 / DINO / CLIP ViT layouts
    load_state_dict_strict(model, sd, source)


def key_problems(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], expected: set[str] | None = None) -> list[str]:
    """Missing, unexpected and shape-mismatched keys of `sd` against `own` (`expected` keys must be present)."""
    expected = set(own) if expected is None else expected
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    problems = []
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if keys:
            problems.append(f"{label} {keys[:8]}{' ...' if len(keys) > 8 else ''}")
    return problems


def load_state_dict_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(sd, strict=True)` with an error that names the file and the keys."""
    if problems := key_problems(model.state_dict(), sd):
        raise ValueError(f"{source}: weights do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
