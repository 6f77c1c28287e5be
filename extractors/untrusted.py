"""What a saved or downloaded config may ask of this machine: it is data, never an instruction.

- Constructor ``kwargs`` are architecture arguments only (:func:`check_architecture_kwargs`): numbers, booleans,
  null, short names without path characters, and lists of these; a name that could point at a file, a cache or other
  weights (``checkpoint_path``, ``pretrained_cfg_overlay``, ``cache_dir``, ...) is refused.
- The local file or folder a spec or ``checkpoint`` names (:func:`spec_local_path`) resolves against the saved
  model's folder; a model from the Hub may only name files inside its own snapshot (:func:`resolve_saved_path`).
- Frozen extractor weights that do not travel with a saved model are pinned by their sha256 (:func:`weights_sha256`).

>>> check_architecture_kwargs({"embed_dim": 32, "act_layer": "gelu"}, "kwargs")
>>> check_architecture_kwargs({"checkpoint_path": "/tmp/x.pth"}, "kwargs")
Traceback (most recent call last):
ValueError: kwargs.checkpoint_path: ...
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path

from .io.model_files import looks_like_path
from .io.weights import WEIGHT_SUFFIXES

# '_'-separated parts of a key that may name a file, a folder, a download or other weights (and keys ending in
# "path"): never an architecture argument. drop_path_rate, class_token stay allowed.
DENIED_KEY_PARTS = {"checkpoint", "ckpt", "file", "filename", "dir", "folder", "url", "hub", "cache", "pretrained",
                    "overlay", "weights", "load", "revision", "repo", "auth", "cfg", "config"}
NAME_VALUE = re.compile(r"[A-Za-z0-9_+\-]{1,64}")  # a short name ("gelu", "avg", "token"): no '.', '/', ':' or '~'
LOCAL_SPEC_PREFIXES = ("local-dir:", "timm:local-dir:", "open_clip:local-dir:")


def check_architecture_kwargs(kwargs, where: str) -> None:
    """Refuse kwargs that are not plain architecture arguments, naming the key (``<where>.<key>``)."""
    if not isinstance(kwargs, dict):
        raise TypeError(f"{where}: expected a mapping of architecture arguments, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        at = f"{where}.{key}"
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"{at}: not an argument name")
        if key.lower().endswith("path") or key.lower() == "token" or DENIED_KEY_PARTS & set(key.lower().split("_")):
            raise ValueError(f"{at}: refused; a config's kwargs take architecture arguments only, never a file, "
                             "folder, download or other weights (give weights as the extractor's `checkpoint`)")
        _check_value(value, at)


def _check_value(value, at: str) -> None:
    if value is None or isinstance(value, (bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{at}: expected a finite number, got {value!r}")
        return
    if isinstance(value, str):
        if not NAME_VALUE.fullmatch(value):
            raise ValueError(f"{at}: {value!r} refused; a string argument must be a short name of letters, digits, "
                             "'_', '-' or '+' (no path characters)")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_value(v, f"{at}[{i}]")
        return
    raise ValueError(f"{at}: {type(value).__name__} refused; expected a number, boolean, null, short name or a list")


def check_model_name(name, where: str) -> None:
    """A library model name read from a config file (``vit_small_patch16_224[.tag]``): no schema, no path."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)?", name):
        raise ValueError(f"{where}: {name!r} is not a model name (letters, digits, '_', '-', one '.tag'); a config "
                         "may not name a folder or a hub repo here")


def spec_local_path(spec: str) -> tuple[str, str] | None:
    """The local file or folder a spec names, as (prefix, path) with ``prefix + path == spec``; None for hub and
    library names."""
    for prefix in LOCAL_SPEC_PREFIXES:
        if spec.startswith(prefix):
            return prefix, spec[len(prefix):]
    backend, _, rest = spec.partition(":")
    if backend == "hf" and looks_like_path(rest):
        return "hf:", rest
    if backend == "open_clip" and not rest.startswith(("hf-hub:", "local-dir:")):
        arch, _, weights = rest.partition("/")
        if weights.endswith(WEIGHT_SUFFIXES):
            return f"open_clip:{arch}/", weights
    return None


def resolve_saved_path(path: str, model_dir: Path, contained: bool, where: str) -> str:
    """A path from a saved model's config: relative ones against `model_dir`; with `contained` (a Hub snapshot),
    one that leaves `model_dir` is refused."""
    p = Path(path).expanduser()
    resolved = Path(os.path.normpath(p if p.is_absolute() else model_dir / p))
    if contained:
        root = Path(os.path.normpath(model_dir))
        # lexically inside the snapshot, and its target inside the repo's cache folder (snapshot files link to blobs)
        inside = resolved == root or root in resolved.parents
        real_ok = not resolved.exists() or root.resolve().parents[1] in resolved.resolve().parents
        if not (inside and real_ok):
            raise ValueError(f"{where}: {path!r} is outside the downloaded model's snapshot {model_dir}; a model from "
                             "the Hub may only name files inside its own repo")
    return str(resolved)


def weight_files(path: str | os.PathLike) -> list[Path]:
    """A weight file itself, or a folder's weight files sorted by name."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"{path}: no weight file ({', '.join(WEIGHT_SUFFIXES)}) to hash")
    return files


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weight file, or of a folder's weight files (name and bytes, sorted by name)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in weight_files(path):
        if path.is_dir():
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def check_extractor_kwargs(kwargs, where: str) -> None:
    """An extractor config's ``kwargs``: architecture arguments, plus ``architecture`` (a ``local-dir:`` folder's
    config.json kept by ``Router.save_pretrained``) whose model name and arguments are checked alike."""
    if not isinstance(kwargs, dict):
        raise TypeError(f"{where}: expected a mapping of architecture arguments, got {type(kwargs).__name__}")
    check_architecture_kwargs({k: v for k, v in kwargs.items() if k != "architecture"}, where)
    if "architecture" not in kwargs:
        return
    arch, at = kwargs["architecture"], f"{where}.architecture"
    if not isinstance(arch, dict):
        raise TypeError(f"{at}: expected a config.json mapping, got {type(arch).__name__}")
    name_key, args_key = ("architecture", "model_args") if "architecture" in arch else ("model_name", "model_kwargs")
    check_model_name(arch.get(name_key), f"{at}.{name_key}")
    check_architecture_kwargs(arch.get(args_key) or {}, f"{at}.{args_key}")
    for key in ("pretrained_cfg", "preprocessing"):  # preprocessing facts only: mean, std, input size, ...
        for k, v in (arch.get(key) or {}).items():
            if k in ("file", "url", "hf_hub_id", "hf_hub_filename", "state_dict") or "path" in k:
                raise ValueError(f"{at}.{key}.{k}: refused; a saved architecture holds no file or download")
            if not isinstance(v, str):  # strings here are names ("bicubic", "head.fc"), read by no loader
                _check_value(v, f"{at}.{key}.{k}")
