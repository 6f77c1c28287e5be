"""`local-dir:<dir>`: an extractor saved on disk (config.json + model.safetensors), in either of two formats.

New folders are in timm's own format (:func:`extractors.timm_backend.save_timm_extractor`, what train/pretrain.py
and train/imgsim_extractor.py write): ``local-dir:<dir>`` loads them exactly as ``timm:local-dir:<dir>`` does, and
``timm.create_model("local-dir:<dir>")`` opens them too. Older folders are in this package's own format, which
still loads (and :func:`save_extractor_dir` still writes, for tests and tools that need it)::

    {"format": "backbone-router-extractor", "format_version": 1,
     "backend": "timm", "model_name": "vit_small_patch16_224", "model_kwargs": {"depth": 6, ...},
     "layers": [5], "family": "morphological",
     "preprocessing": {"mean": [...], "std": [...], "input_size": 224},
     "source": {"method": "mae", ...}}          # free-form provenance

model.safetensors holds the timm model's state dict under timm's own key names.

A Router that saved such an extractor's weights in its own model.safetensors (trained or unfrozen) does not need
the folder again: given ``architecture=`` (the folder's config.json, :func:`local_dir_architecture`; either format)
and ``pretrained=False``, the extractor is rebuilt without reading the folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .base import Extractor
from .io.atomic import atomic_save_safetensors, atomic_write_bytes
from .io.weights import load_state_dict_file, load_state_dict_strict
from .registry import register_extractor
from .timm_backend import TimmExtractor, _build_timm, create_timm_model, is_timm_config, timm_dir_architecture
from .untrusted import check_model_name

FORMAT = "backbone-router-extractor"
FORMAT_VERSION = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
_KEYS = {"format", "format_version", "backend", "model_name", "model_kwargs", "layers", "family", "preprocessing", "source"}


def save_extractor_dir(extractor: TimmExtractor, directory: str | os.PathLike, model_name: str, model_kwargs: dict,
                       source: dict | None = None) -> Path:
    """Write a timm-built extractor in this package's older format, so that `create_extractor("local-dir:<directory>")`
    rebuilds it. New folders are written by :func:`extractors.timm_backend.save_timm_extractor` (timm's format).

    >>> ext = create_extractor("timm:vit_small_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2)
    >>> save_extractor_dir(ext, "runs/x/final", "vit_small_patch16_224", {"embed_dim": 32, "depth": 2, "num_heads": 2})
    """
    directory = Path(directory)
    info = extractor.info
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": "timm",
        "model_name": model_name,
        "model_kwargs": model_kwargs,
        "layers": list(info.layers),
        "family": info.family,
        "preprocessing": {"mean": list(info.mean), "std": list(info.std), "input_size": info.input_size},
        "source": source or {},
    }
    json.dumps(config)  # fail before writing anything if the config is not JSON-serializable
    atomic_save_safetensors(extractor.model.state_dict(), directory / WEIGHTS_NAME)
    atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def read_config_json(directory: Path) -> dict:
    """The folder's config.json as it is (timm's format or this package's older one)."""
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"local-dir extractor: {path} does not exist (expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def check_extractor_config(config: dict, path: Path | str) -> dict:
    """A local-dir config.json (from its folder, or passed as `architecture=`): format, version, keys, backend."""
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path}: 'format' must be {FORMAT!r}, got {config.get('format') if isinstance(config, dict) else config!r}")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {config['format_version']} is newer than this package reads ({FORMAT_VERSION}); "
            "upgrade backbone-router"
        )
    unknown = set(config) - _KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected a subset of {sorted(_KEYS)}")
    for key in ("backend", "model_name"):
        if key not in config:
            raise ValueError(f"{path}: missing key {key!r}")
    if config["backend"] != "timm":
        raise ValueError(f"{path}: backend {config['backend']!r} is not supported; expected 'timm'")
    return config


def local_dir_architecture(spec: str) -> dict | None:
    """The config.json of a ``local-dir:<dir>`` or ``timm:local-dir:<dir>`` spec (all it takes to rebuild the
    extractor without its folder, as ``architecture=``); None for other specs."""
    if spec.startswith("timm:local-dir:"):
        return timm_dir_architecture(spec)
    if not spec.startswith("local-dir:"):
        return None
    directory = Path(spec.split(":", 1)[1])
    config = read_config_json(directory)
    return config if is_timm_config(config) else check_extractor_config(config, directory / CONFIG_NAME)


@register_extractor("local-dir")
def _build_local_dir(directory: str, layers=None, pretrained=True, checkpoint=None, architecture=None,
                     **kwargs) -> Extractor:
    directory = Path(directory)
    folder_gone = architecture is not None and not pretrained  # weights come from elsewhere: the folder is not needed
    raw = architecture if folder_gone else read_config_json(directory)
    if is_timm_config(raw):  # timm's format: exactly what timm:local-dir:<dir> builds
        return _build_timm(f"local-dir:{directory}", layers=layers, pretrained=pretrained, checkpoint=checkpoint,
                           architecture=architecture, **kwargs)
    config = check_extractor_config(raw, f"local-dir:{directory} (architecture=)" if folder_gone else directory / CONFIG_NAME)
    check_model_name(config["model_name"], f"{directory / CONFIG_NAME}: model_name")
    model = create_timm_model(config["model_name"], pretrained=False, checkpoint=None, **{**config.get("model_kwargs", {}), **kwargs})
    if pretrained:
        weights = Path(checkpoint) if checkpoint is not None else directory / WEIGHTS_NAME
        load_state_dict_strict(model, load_state_dict_file(weights), str(weights))
    pre = config.get("preprocessing", {})
    model.pretrained_cfg = {**model.pretrained_cfg, **{k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}}
    if "input_size" in pre:
        model.pretrained_cfg["input_size"] = (3, pre["input_size"], pre["input_size"])
    ext = TimmExtractor(model, layers if layers is not None else tuple(config.get("layers") or ()) or None)
    return ext.set_family(config.get("family", "semantic"))

