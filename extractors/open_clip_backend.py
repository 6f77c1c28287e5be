"""`open_clip:<arch>[/<tag or weight file>]`, `open_clip:hf-hub:<org/repo>`, `open_clip:local-dir:<dir>`: the image
tower of an open_clip model as an extractor.

``hf-hub:`` and ``local-dir:`` are open_clip's own names for a model saved by ``open_clip.push_to_hf_hub`` /
``save_for_hf`` (``open_clip_config.json`` + ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``):
the config and its ``preprocess_cfg`` come from the folder or the repo's snapshot in the HF cache (the hub unless
``HF_HUB_OFFLINE``), the weights are read safely and checked strictly. Whatever the name, the config is read
first and a tower this backend cannot serve (a timm tower such as SigLIP's, a ModifiedResNet) is refused
before any weights are fetched; a cached repo lacking its weights is an error naming the cache dir, the
files looked for and the offline setting.

Spec rule: the text after the first ``/`` names the weights. It is a weight *file* when it ends with
``.safetensors``, ``.pt``, ``.pth`` or ``.bin`` (``open_clip:ViT-B-32//abs/path/w.bin`` for an absolute
path, ``open_clip:ViT-B-32/rel/w.bin`` for a relative one) and a pretrained *tag* otherwise
(``open_clip:ViT-B-32/laion2b_s34b_b79k``). ``checkpoint=<file>`` overrides the weights of a tag while
keeping the tag's preprocessing and QuickGELU setting; a file in the spec and ``checkpoint=`` together is
an error. Tags are looked up in the HF cache only when ``HF_HUB_OFFLINE`` is set.

Outputs: dense maps are the visual transformer's block outputs with the class token dropped and
``ln_post`` applied to each (as timm's ``forward_intermediates(norm=True)``), NCHW at stride = patch.
The pooled vector is the tower's projected image embedding (``ln_post`` on the class token, or the
attentional pooler, then ``@ proj``): the vector ``CLIP.encode_image`` returns, before L2 normalization,
so it lives in the same space as the text tower's ``encode_text``.

Any H, W: the position embeddings are resampled to the input grid on the fly (open_clip's
VisionTransformer has a fixed grid). Patch dropout is skipped (dense maps need every token).

The whole CLIP model stays reachable as ``extractor.clip_model`` (not a registered submodule, so the
text tower is neither trained, saved nor moved with the extractor); ``extractor.text_encoder()`` wraps
it as an :class:`extractors.base.TextEncoder`.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Extractor, ExtractorInfo, TextEncoder, resolve_layers
from .io.weights import WEIGHT_SUFFIXES, load_state_dict_file, load_state_dict_strict
from .registry import register_extractor

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip's own model names: a Hub repo or a folder with open_clip_config.json
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                          "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
_configs_added = False


def import_open_clip():
    """`open_clip`, imported on first use (slow) with this package's model configs registered."""
    global _configs_added
    import open_clip

    if not _configs_added:
        open_clip.add_model_config(MODEL_CONFIG_DIR)  # tiny-vit-p16 and any other config shipped here
        _configs_added = True
    return open_clip


def parse_open_clip_spec(rest: str) -> tuple[str, str | None, str | None]:
    """``"<arch>[/<tag or file>]"`` -> (arch, tag, file); a file ends with a weight suffix. open_clip's own
    ``hf-hub:<org/repo>`` and ``local-dir:<dir>`` names are kept whole as the arch (their '/' is part of the name)."""
    if rest.startswith(SCHEMAS):
        schema, _, name = rest.partition(":")
        if not name:
            raise ValueError(f"open_clip spec {rest!r}: name a repo or dir after '{schema}:'")
        return rest, None, None
    arch, _, weights = rest.partition("/")
    if not arch:
        raise ValueError(f"open_clip spec {rest!r}: needs an architecture, e.g. 'open_clip:ViT-B-32/laion2b_s34b_b79k'")
    if not weights:
        return arch, None, None
    if weights.endswith(WEIGHT_SUFFIXES):
        return arch, None, weights
    return arch, weights, None


def schema_dir(arch: str) -> Path:
    """The folder holding open_clip_config.json of ``local-dir:<dir>`` or ``hf-hub:<repo>`` (its cached snapshot;
    only that config is fetched here, so a tower this backend cannot serve is refused before its weights)."""
    from .io.model_files import resolve_model_dir

    schema, _, name = arch.partition(":")
    if schema == "local-dir":
        name = str(Path(name).expanduser().resolve())  # a path, even when it looks like 'org/name'
    return resolve_model_dir(name, (OPEN_CLIP_CONFIG,), what=f"open_clip:{arch}")


def schema_weights(arch: str, directory: Path) -> str:
    """The weight file of a ``local-dir:`` / ``hf-hub:`` model, by open_clip's order of preference."""
    from .io.model_files import resolve_model_file

    schema, _, name = arch.partition(":")
    if schema == "hf-hub":
        return str(resolve_model_file(name, OPEN_CLIP_WEIGHT_NAMES, what=f"open_clip:{arch}"))
    if found := [directory / n for n in OPEN_CLIP_WEIGHT_NAMES if (directory / n).is_file()]:
        return str(found[0])
    raise FileNotFoundError(f"open_clip:{arch}: {directory} has none of {list(OPEN_CLIP_WEIGHT_NAMES)}; pass "
                            "checkpoint=<weight file> or pretrained=False")


def check_vision_tower(arch: str, model_cfg: dict) -> None:
    """Refuse, before any weights are fetched, a config whose image tower is not open_clip's VisionTransformer."""
    vision = model_cfg.get("vision_cfg") or {}
    if vision.get("timm_model_name"):
        kind = f"a timm model ({vision['timm_model_name']})"
    elif isinstance(vision.get("layers"), (list, tuple)):
        kind = "a ModifiedResNet"
    else:
        return
    raise ValueError(f"open_clip:{arch}: the image tower is {kind}; only open_clip's VisionTransformer is supported "
                     "(use the timm backend for timm or ResNet towers, e.g. 'timm:<name>' or 'timm:hf-hub:<repo>')")


def open_clip_name(arch: str) -> str:
    """The name open_clip itself is given: a named arch as it is, a schema as ``local-dir:<resolved dir>``."""
    return f"local-dir:{schema_dir(arch)}" if arch.startswith(SCHEMAS) else arch


@contextmanager
def _quiet_random_init_warning():
    # open_clip logs "Model initialized randomly" before we load the weights ourselves; drop that line.
    class _Drop(logging.Filter):
        def filter(self, record):
            return "initialized randomly" not in record.getMessage()

    root, drop = logging.getLogger(), _Drop()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def resolve_tag_file(arch: str, tag: str) -> str:
    """Local path of an open_clip pretrained tag's weights (HF cache, ~/.cache/clip or the hub)."""
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    open_clip = import_open_clip()
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        raise ValueError(
            f"open_clip:{arch}/{tag}: unknown pretrained tag {tag!r} for {arch}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(arch)}. A weight file must end with {WEIGHT_SUFFIXES}"
        )
    if cfg.get("file"):
        return cfg["file"]
    where = "the HF cache" if HF_HUB_OFFLINE else "the HF cache and the hub"
    note = " (HF_HUB_OFFLINE is set, so not on the network)" if HF_HUB_OFFLINE else ""
    if cfg.get("hf_hub"):
        from open_clip.pretrained import download_pretrained_from_hf

        repo, filename = os.path.split(cfg["hf_hub"])  # "org/repo/" means open_clip's default file name
        filename = filename or None
        try:
            return download_pretrained_from_hf(repo, filename=filename)
        except Exception as e:
            raise FileNotFoundError(
                f"open_clip:{arch}/{tag}: no weights found. Looked for hub repo {repo!r} "
                f"(file {filename or 'open_clip_pytorch_model.bin / open_clip_model.safetensors'}) in {where} "
                f"{HF_HUB_CACHE}{note}. Pass checkpoint=<weight file> or use 'open_clip:{arch}/<file.bin>', or "
                f"pretrained=False for random weights. Cause: {type(e).__name__}: {e}"
            ) from e
    url = cfg.get("url", "")
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if cached.is_file():
        return str(cached)
    if HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"open_clip:{arch}/{tag}: no weights found. Looked for {cached} (the open_clip download cache for "
            f"{url}); HF_HUB_OFFLINE is set, so not on the network. Pass checkpoint=<weight file>."
        )
    from open_clip.pretrained import download_pretrained_from_url

    return download_pretrained_from_url(url)


def load_open_clip_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """open_clip's ``load_checkpoint(model, path, weights_only=True)``, with the checks it does not make.

    Before: the file is read by :func:`load_state_dict_file` (safetensors or ``torch.load(weights_only=True)``,
    any other suffix refused, checksums verified), so an unsafe or broken file fails with its name before open_clip
    sees it; open_clip then reads it a second time (twice the I/O, not twice the memory: the first copy is freed). During: the state dict open_clip has converted (DDP prefix, third-party layouts, old text layout,
    logit shapes, resized position embeddings) is checked key by key and shape by shape before anything is
    copied into the model (:func:`load_state_dict_strict`), so a partial file is an error naming the keys.
    """
    from open_clip import load_checkpoint

    source = str(path)
    load_state_dict_file(path)

    def load_checked(sd, strict=True):  # what load_checkpoint calls last, as model.load_state_dict
        del model.load_state_dict  # the model's own method again
        load_state_dict_strict(model, sd, source)

    model.load_state_dict = load_checked
    try:
        load_checkpoint(model, source, strict=True, weights_only=True)
    finally:
        model.__dict__.pop("load_state_dict", None)


def create_open_clip_model(arch: str, tag: str | None, weights: str | None, pretrained: bool, **kwargs) -> nn.Module:
    """An open_clip CLIP model with weights from `weights` (a file), the tag, or random if not pretrained.

    `arch` is a model config name or open_clip's ``hf-hub:<repo>`` / ``local-dir:<dir>``; either way the config
    is read and an unsupported image tower refused before any weights are fetched.
    """
    open_clip = import_open_clip()
    if arch.startswith(SCHEMAS):
        directory = schema_dir(arch)
        try:
            model_cfg = json.loads((directory / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"open_clip:{arch}: {directory / OPEN_CLIP_CONFIG} is not an open_clip config with "
                             f"'model_cfg' ({type(e).__name__}: {e})") from e
        check_vision_tower(arch, model_cfg)
        if pretrained and weights is None:
            weights = schema_weights(arch, directory)
        with _quiet_random_init_warning():
            model = open_clip.create_model(f"local-dir:{directory}", load_weights=False, **kwargs)
        if pretrained:
            load_open_clip_weights(model, weights)
        return model.eval()
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ValueError(
            f"open_clip: unknown architecture {arch!r}; known: {open_clip.list_models()} (model configs in "
            f"open_clip and {MODEL_CONFIG_DIR}), or open_clip's 'hf-hub:<org/repo>' / 'local-dir:<dir>'"
        )
    check_vision_tower(f"{arch}/{tag}" if tag else arch, model_cfg)
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if tag and not tag_cfg:
        raise ValueError(
            f"open_clip:{arch}/{tag}: unknown pretrained tag {tag!r}; known tags: "
            f"{open_clip.list_pretrained_tags_by_model(arch)}. A weight file must end with {WEIGHT_SUFFIXES}"
        )
    if pretrained and weights is None and tag is None:
        raise ValueError(
            f"open_clip:{arch}: pretrained=True needs weights: a tag ('open_clip:{arch}/<tag>', known: "
            f"{open_clip.list_pretrained_tags_by_model(arch)}), a file (checkpoint=<file>), or pretrained=False"
        )
    if pretrained and weights is None:
        weights = resolve_tag_file(arch, tag)
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    with _quiet_random_init_warning():
        model = open_clip.create_model(
            arch, pretrained=None, force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_preprocess_cfg=preprocess or None, **kwargs,
        )
    if pretrained:
        load_open_clip_weights(model, weights)
    return model.eval()


class OpenClipExtractor(Extractor):
    """The visual transformer of an open_clip model; `clip_model` keeps the text tower reachable."""

    def __init__(self, clip_model: nn.Module, layers, arch: str):
        open_clip = import_open_clip()
        from open_clip.transformer import VisionTransformer

        visual = clip_model.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(
                f"open_clip:{arch}: the image tower is a {type(visual).__name__}; only open_clip's "
                "VisionTransformer is supported (use the timm backend for timm or ResNet towers)"
            )
        num_blocks = len(visual.transformer.resblocks)
        layers = resolve_layers(layers, num_blocks, default=(num_blocks - 1,))
        patch = visual.patch_size[0]
        if visual.patch_size[0] != visual.patch_size[1]:
            raise ValueError(f"open_clip:{arch}: non-square patches {visual.patch_size} are not supported")
        cfg = getattr(visual, "preprocess_cfg", {})
        width = visual.transformer.width
        info = ExtractorInfo(
            name="open_clip",
            width=visual.output_dim,
            widths=(width,) * len(layers),
            strides=(patch,) * len(layers),
            patch_size=patch,
            layers=layers,
            mean=tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            std=tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD)),
            input_size=int(visual.image_size[0]),
        )
        super().__init__(info)
        self.visual = visual
        self.arch = arch
        object.__setattr__(self, "clip_model", clip_model)  # reachable, but not a submodule

    def _embeds(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """open_clip's `VisionTransformer._embeds` with position embeddings resampled to the input grid."""
        from timm.layers import resample_abs_pos_embed

        v = self.visual
        x = v.conv1(x)
        grid = tuple(x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1)
        pos = v.positional_embedding
        if grid != tuple(v.grid_size):
            pos = resample_abs_pos_embed(pos[None], new_size=grid, old_size=v.grid_size, num_prefix_tokens=1)[0]
        x = x + pos.to(x.dtype)
        return v.ln_pre(x), grid

    def forward_features(self, x):
        v = self.visual
        tokens, (gh, gw) = self._embeds(x)
        taken = sorted(set(self.info.layers))  # open_clip returns the blocks in forward order
        tokens, intermediates = v.transformer.forward_intermediates(tokens, indices=taken)
        by_block = dict(zip(taken, intermediates))
        norm = v.ln_post if v.attn_pool is None else nn.Identity()  # ln_post has the pooler's width otherwise
        dense = [
            norm(by_block[i][:, 1:]).transpose(1, 2).reshape(x.shape[0], -1, gh, gw) for i in self.info.layers
        ]
        pooled, _ = v._pool(tokens)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return dense, pooled

    def block_modules(self):
        return list(self.visual.transformer.resblocks)

    def final_modules(self):
        v = self.visual
        return [m for m in (v.attn_pool, getattr(v, "attn_pool_contrastive", None), v.ln_post) if m is not None]

    def unfreeze_last(self, n: int) -> OpenClipExtractor:
        """As `Extractor.unfreeze_last`; the output projection `visual.proj` trains with the last block."""
        super().unfreeze_last(n)
        if n > 0 and isinstance(self.visual.proj, nn.Parameter):
            self.visual.proj.requires_grad_(True)
        return self

    def text_encoder(self):
        """The CLIP text tower of this model as a frozen :class:`OpenClipTextEncoder`."""
        tokenizer = import_open_clip().get_tokenizer(open_clip_name(self.arch))
        return OpenClipTextEncoder(self.clip_model, tokenizer, name=f"open_clip:{self.arch}")


class OpenClipTextEncoder(TextEncoder):
    """The CLIP text tower: `clip_model.encode_text(tokenizer(texts))`, L2-normalized."""

    def __init__(self, clip_model: nn.Module, tokenizer, name: str):
        super().__init__()
        self.clip_model, self.tokenizer, self.name = clip_model, tokenizer, name
        self.dim = int(clip_model.text_projection.shape[-1]) if hasattr(clip_model, "text_projection") else int(
            clip_model.visual.output_dim
        )
        self._freeze()

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        texts = self._check_texts(texts)
        device = next(self.clip_model.parameters()).device
        return F.normalize(self.clip_model.encode_text(self.tokenizer(texts).to(device)).float(), dim=-1)


def create_open_clip_text_encoder(rest: str, pretrained: bool = True) -> OpenClipTextEncoder:
    """The CLIP text tower of ``open_clip:<rest>`` (``<arch>[/<tag or weight file>]``), same weight rule as the
    extractor; :func:`extractors.text.create_text_encoder` calls it for an ``open_clip:`` spec."""
    arch, tag, weight_file = parse_open_clip_spec(rest)
    model = create_open_clip_model(arch, tag, weight_file, pretrained=pretrained)
    return OpenClipTextEncoder(model, import_open_clip().get_tokenizer(open_clip_name(arch)), name=f"open_clip:{rest}")


@register_extractor("open_clip")
def _build_open_clip(rest: str, layers=None, pretrained=True, checkpoint=None, **kwargs) -> OpenClipExtractor:
    arch, tag, weight_file = parse_open_clip_spec(rest)
    if weight_file is not None and checkpoint is not None:
        raise ValueError(
            f"open_clip:{rest}: a weight file in the spec ({weight_file}) and checkpoint={checkpoint!r}; give one"
        )
    model = create_open_clip_model(arch, tag, checkpoint or weight_file, pretrained, **kwargs)
    return OpenClipExtractor(model, layers, arch)
