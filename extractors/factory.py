"""The extractor registry: `create_extractor`, `list_extractors`, `register_extractor`.

Specs name the library and the model the way users know them::

    timm:<name>[.<tag>]                 timm.create_model(name, pretrained=...)
    timm:local-dir:<dir>, timm:hf-hub:<org/repo>   timm's own saved format (save_for_hf / push_to_hf_hub)
    open_clip:<arch>[/<tag or file>]    the image tower of an open_clip model
    open_clip:hf-hub:<org/repo>         ... saved in open_clip's own format, from the HF cache / the hub
    open_clip:local-dir:<dir>           ... or from a folder
    hf:<repo id or local dir>           a transformers vision model (Dinov2Model, CLIPVisionModel, ...)
    local-dir:<dir>                     a checkpoint this package wrote (config.json + model.safetensors)
    filters:geometric, filters:texture  weight-free banks of classical filters (extractors/filters.py)
    <registered name>                   anything added with `register_extractor`
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

from .base import Extractor
from .io.model_files import looks_like_path
from .io.weights import WEIGHT_SUFFIXES
from .registry import BACKENDS, BUILDERS, register_extractor

LOCAL_SCHEMAS = ("local-dir:", "timm:local-dir:", "open_clip:local-dir:")  # specs that name a folder on this machine


def _load_backends() -> None:
    # Imported lazily so that `import backbone_router.extractors` stays cheap; each module registers its prefix.
    # open_clip and transformers themselves are imported on first use of their backend.
    from . import filters, hf_backend, local_dir, open_clip_backend, timm_backend  # noqa: F401


def list_extractors(pattern: str = "*", backend: str | None = None) -> list[str]:
    """Names `create_extractor` accepts.

    With no backend: the registered full names and the backend prefixes (``"timm:"``, ...). With
    ``backend="timm"`` or ``"open_clip"``: that library's model names, as specs.

    >>> "timm:vit_small_patch14_dinov2.lvd142m" in list_extractors("*dinov2*", backend="timm")
    True
    """
    _load_backends()
    if backend == "timm":
        import timm

        names = [f"timm:{n}" for n in timm.list_models(pretrained=True)]
    elif backend == "open_clip":
        import open_clip

        names = [f"open_clip:{arch}/{tag}" if tag else f"open_clip:{arch}" for arch, tag in open_clip.list_pretrained()]
    elif backend is None:
        names = [n for n in BUILDERS if n not in BACKENDS]
        names += [f"{b}:" for b in BACKENDS]
    else:
        raise ValueError(f"list_extractors: unknown backend {backend!r}; expected one of {BACKENDS} or None")
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def create_extractor(
    spec: str,
    layers: int | list[int] | tuple[int, ...] | None = None,
    pretrained: bool = True,
    checkpoint: str | None = None,
    family: str | None = None,
    **kwargs,
) -> Extractor:
    """Build an extractor from a spec.

    Args:
        spec: ``"backend:model"`` (see the module docstring) or a registered name.
        layers: dense-map layers, as in timm's ``forward_intermediates``: an int n means the last n
            blocks, a list means those block indices (negative counts from the end). Default: the
            backend's choice (last block for ViTs, the stride 8/16/32 stages for CNNs).
        pretrained: load weights (from ``checkpoint``, a local dir, the HF cache or the hub). With no
            weights found this raises; random weights only with ``pretrained=False``.
        checkpoint: a local weight file or directory that overrides where the weights come from.
        family: characteristic family tag: "geometric", "morphological" or "semantic".
        **kwargs: passed to the library's model constructor (e.g. ``embed_dim=32, depth=2``).

    >>> ext = create_extractor("timm:vit_small_patch14_dinov2", pretrained=False,
    ...                        embed_dim=32, depth=2, num_heads=2, img_size=28)
    >>> ext.info.patch_size, ext.info.widths
    (14, (32,))
    """
    _load_backends()
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"create_extractor: spec must be a non-empty string, got {spec!r}")
    if spec in BUILDERS:
        prefix, rest = spec, ""
    elif ":" in spec:
        prefix, rest = spec.split(":", 1)
        if prefix not in BUILDERS:
            raise ValueError(
                f"create_extractor: unknown backend {prefix!r} in spec {spec!r}; known backends: "
                f"{sorted(b for b in BUILDERS if b in BACKENDS)}, registered names: "
                f"{sorted(b for b in BUILDERS if b not in BACKENDS)}"
            )
    else:
        raise ValueError(
            f"create_extractor: cannot place spec {spec!r}; expected 'timm:<model>', 'open_clip:<arch>[/<tag>]', "
            f"'hf:<repo or dir>', 'local-dir:<dir>' or a registered name {sorted(b for b in BUILDERS if b not in BACKENDS)}"
        )
    if isinstance(layers, list):
        layers = tuple(layers)
    extractor = BUILDERS[prefix](rest, layers=layers, pretrained=pretrained, checkpoint=checkpoint, **kwargs)
    extractor.info = type(extractor.info)(**{**extractor.info.__dict__, "name": spec})
    if family is not None:
        extractor.set_family(family)
    return extractor


def local_files_needed(spec: str, checkpoint: str | None = None, weights_saved: bool = False) -> str | None:
    """What an extractor needs from this machine to be rebuilt on another (e.g. by a Hub user); None: nothing.

    Args:
        spec, checkpoint: as given to :func:`create_extractor`.
        weights_saved: its weights travel with the model (a Router's model.safetensors), so only its architecture
            must be found elsewhere: a hub or library name, or the config.json of a ``local-dir:`` /
            ``timm:local-dir:`` folder, which ``Router.save_pretrained`` keeps as ``architecture=``. The folders of
            ``open_clip:local-dir:`` and ``hf:<dir>`` are read even for random weights, and are not kept.

    >>> local_files_needed("timm:local-dir:runs/mae/final", weights_saved=True) is None
    True
    """
    backend, _, rest = spec.partition(":")
    if weights_saved:
        if spec.startswith("open_clip:local-dir:") or (backend == "hf" and (looks_like_path(rest) or Path(rest).exists())):
            return f"its architecture, from the folder {rest.removeprefix('local-dir:')}"
        return None
    if checkpoint:
        return f"its weights, from {checkpoint}"
    if spec.startswith(LOCAL_SCHEMAS) or Path(rest).expanduser().exists() or rest.endswith(WEIGHT_SUFFIXES):
        return f"its weights, from {rest.removeprefix('local-dir:')}"
    return None


__all__ = ["create_extractor", "list_extractors", "local_files_needed", "register_extractor"]
