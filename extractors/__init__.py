"""Extractors: images -> dense feature maps + pooled vectors, each with its own preprocessing."""

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
