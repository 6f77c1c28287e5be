"""Extractors: images -> dense feature maps + pooled vectors, each with its own preprocessing."""

if __name__ == "extractors":  # the old import name (deprecated): the same module as backbone_router.extractors
    from backbone_router._compat import alias_old_name

    alias_old_name(__name__)

from .base import FAMILIES, Extractor, ExtractorInfo, ExtractorOutput, check_images
from .factory import create_extractor, list_extractors, register_extractor

__all__ = [
    "FAMILIES",
    "Extractor",
    "ExtractorInfo",
    "ExtractorOutput",
    "check_images",
    "create_extractor",
    "list_extractors",
    "register_extractor",
]
