"""The extractor registry: names and backend prefixes -> builders (timm's ``_registry.py``).

Backends (``timm_backend``, ``open_clip_backend``, ``hf_backend``, ``local_dir``, ``filters``) register their prefix
here; :mod:`extractors.factory` looks builders up here. Neither the backends nor this module import the factory.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Extractor

# backend prefix ("timm") or full name ("my-extractor") -> builder(name_after_prefix, **kwargs)
BUILDERS: dict[str, Callable[..., Extractor]] = {}
BACKENDS = ("timm", "open_clip", "hf", "local-dir", "filters")


def register_extractor(name: str, builder: Callable[..., Extractor] | None = None):
    """Register a builder under a backend prefix or a full extractor name (usable as a decorator).

    A builder is called as ``builder(rest, layers=..., pretrained=..., checkpoint=..., **kwargs)``
    where ``rest`` is what follows ``name:`` in the spec ("" for a full name).

    >>> @register_extractor("my-tiny-vit")
    ... def _build(rest, **kw):
    ...     return create_extractor("timm:vit_small_patch16_224", embed_dim=32, depth=2, num_heads=2, **kw)
    """

    def _register(fn: Callable[..., Extractor]) -> Callable[..., Extractor]:
        if name in BUILDERS and BUILDERS[name] is not fn:
            raise ValueError(f"register_extractor: {name!r} is already registered")
        BUILDERS[name] = fn
        return fn

    return _register(builder) if builder is not None else _register
