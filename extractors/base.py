"""The extractor contract shared by every backend.

An extractor takes images in [0, 1], shape (B, C, H, W) with C = 1 or 3, normalizes them with its own
mean/std, pads them to its patch multiple, and returns::

    {"dense": [B x D_i x h_i x w_i for each requested layer], "pooled": B x D}

Prefix tokens (CLS, registers) are dropped from the dense maps. A backend implements
:meth:`Extractor.forward_features` on the normalized, padded input and lists its blocks in
:meth:`Extractor.block_modules` (used by :meth:`Extractor.unfreeze_last`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TypedDict

import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("geometric", "morphological", "semantic")


@dataclass(frozen=True)
class ExtractorInfo:
    """What a downstream module needs to know about an extractor's outputs and preprocessing."""

    name: str  # the spec the extractor was created from, e.g. "timm:vit_small_patch14_dinov2.lvd142m"
    width: int  # channels of the pooled vector
    widths: tuple[int, ...]  # channels of each dense map, in the order of `layers`
    strides: tuple[int, ...]  # input pixels per dense-map cell, per layer (ViT: the patch size)
    patch_size: int  # inputs are padded to a multiple of this (ViT patch, CNN total stride)
    layers: tuple[int, ...]  # block indices the dense maps come from
    mean: tuple[float, ...]  # per-channel normalization applied inside the extractor
    std: tuple[float, ...]
    family: str = "semantic"  # characteristic family: geometric / morphological / semantic
    input_size: int = 224  # the resolution the weights were trained at (a hint, not a requirement)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ExtractorInfo.family must be one of {FAMILIES}, got {self.family!r}")
        if not (len(self.widths) == len(self.strides) == len(self.layers)):
            raise ValueError(
                f"ExtractorInfo: widths {self.widths}, strides {self.strides} and layers {self.layers} "
                "must have one entry per dense layer"
            )


class ExtractorOutput(TypedDict):
    dense: list[torch.Tensor]
    pooled: torch.Tensor


def check_images(images: torch.Tensor, where: str = "images") -> torch.Tensor:
    """Validate a (B, C, H, W) batch with C in {1, 3} and return it as 3-channel float."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor of shape (B, C, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{where}: expected shape (B, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] not in (1, 3):
        raise ValueError(
            f"{where}: expected C = 1 (greyscale, repeated to 3) or C = 3 (RGB) channels, got shape "
            f"{tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"{where}: expected float values in [0, 1], got dtype {images.dtype}")
    if images.dtype != torch.float32:  # float16 / bfloat16 / float64 in [0, 1]: the weights are float32 (mixed
        images = images.float()        # precision runs under autocast, which casts per operation)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


class Extractor(nn.Module):
    """Base class: preprocessing, the output contract, freezing. Backends fill in the rest.

    >>> from backbone_router import create_extractor
    >>> ext = create_extractor("timm:resnet18", pretrained=False)
    >>> out = ext(torch.rand(2, 3, 97, 130))
    >>> [tuple(t.shape[2:]) for t in out["dense"]], out["pooled"].shape
    ([(13, 17), (7, 9), (4, 5)], torch.Size([2, 512]))
    """

    info: ExtractorInfo

    def __init__(self, info: ExtractorInfo):
        super().__init__()
        self.info = info
        self.register_buffer("_mean", torch.tensor(info.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(info.std).view(1, -1, 1, 1), persistent=False)
        self.frozen = False
        self.forward_calls = 0  # counted so that tests and benchmarks can see skipped extractors

    # ---- to implement in a backend -------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Normalized, padded (B, 3, H, W) input -> (dense maps NCHW per layer, pooled B x D)."""
        raise NotImplementedError

    def block_modules(self) -> list[nn.Module]:
        """The extractor's blocks in forward order (transformer blocks or CNN stages)."""
        raise NotImplementedError

    def final_modules(self) -> list[nn.Module]:
        """Modules after the last block (final norm) that are trained with the last block."""
        return []

    # ---- shared behaviour ----------------------------------------------------------------------
    def set_family(self, family: str) -> Extractor:
        """Set the characteristic family tag (geometric / morphological / semantic)."""
        self.info = replace(self.info, family=family)
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (C = 1 or 3) -> normalized 3-channel input padded to the patch multiple."""
        x = check_images(images, f"{self.info.name} input")
        x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        p = self.info.patch_size
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % p, (-w) % p
        if pad_h or pad_w:  # zero after normalization = the dataset mean
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return x

    def forward(self, images: torch.Tensor) -> ExtractorOutput:
        if images.ndim == 4 and images.shape[0] == 0:  # an empty batch: empty maps of the shapes one image gets
            one = self.forward(images.new_zeros(1, *images.shape[1:]))
            return {"dense": [d[:0] for d in one["dense"]], "pooled": one["pooled"][:0]}
        self.forward_calls += 1
        h, w = images.shape[-2:]
        dense, pooled = self.forward_features(self.preprocess(images))
        # Crop the cells that only cover padding, so a map covers the image and nothing else.
        dense = [
            d[..., : math.ceil(h / s), : math.ceil(w / s)] for d, s in zip(dense, self.info.strides)
        ]
        return {"dense": dense, "pooled": pooled}

    def freeze(self) -> Extractor:
        """Stop gradients to every parameter and keep norm/dropout layers in eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.frozen = True
        return self.train(self.training)

    def unfreeze_last(self, n: int) -> Extractor:
        """Freeze everything, then make the last `n` blocks (and the final norm) trainable."""
        blocks = self.block_modules()
        if not 0 <= n <= len(blocks):
            raise ValueError(f"{self.info.name}: unfreeze_last(n) needs 0 <= n <= {len(blocks)} blocks, got {n}")
        self.freeze()
        if n == 0:
            return self
        for module in blocks[len(blocks) - n :] + self.final_modules():
            for p in module.parameters():
                p.requires_grad_(True)
        self.frozen = False
        return self.train(self.training)

    def unfreeze(self) -> Extractor:
        """Make every parameter trainable."""
        for p in self.parameters():
            p.requires_grad_(True)
        self.frozen = False
        return self.train(self.training)

    def train(self, mode: bool = True) -> Extractor:
        super().train(mode)
        if mode:
            # Frozen parts stay in eval mode: frozen batch-norm statistics, no dropout noise.
            for module in self.modules():
                own = list(module.parameters(recurse=False))
                if module is not self and own and not any(p.requires_grad for p in own):
                    module.eval()
            for block in self.block_modules():
                if not any(p.requires_grad for p in block.parameters()):
                    block.eval()
        return self

    def extra_repr(self) -> str:
        i = self.info
        return f"name={i.name!r}, family={i.family}, layers={i.layers}, widths={i.widths}, strides={i.strides}"


class TextEncoder(nn.Module):
    """A frozen text encoder: `encode(texts) -> (N, dim)` L2-normalized rows (:mod:`extractors.text` builds them;
    an open_clip extractor's ``text_encoder()`` gives its CLIP text tower)."""

    dim: int
    name: str

    def encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _check_texts(self, texts) -> list[str]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{self.name}.encode: expected a list of strings, got {texts!r:.80}")
        if not texts:
            raise ValueError(f"{self.name}.encode: expected at least one text, got an empty list")
        return list(texts)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> TextEncoder:
        return super().train(False)  # always frozen: no dropout


def resolve_layers(layers: int | tuple[int, ...] | None, num_blocks: int, default: tuple[int, ...]) -> tuple[int, ...]:
    """timm's convention (``feature_take_indices``): int n -> the last n blocks; a sequence -> those indices
    (negatives wrap); None -> `default`. An index outside the blocks is a ValueError naming it."""
    from timm.models._features import feature_take_indices

    if layers is None:
        return default
    try:
        take, _ = feature_take_indices(num_blocks, layers if isinstance(layers, int) else list(layers))
    except AssertionError:
        if isinstance(layers, int):
            raise ValueError(f"layers={layers}: expected 1..{num_blocks} (the last n of {num_blocks} blocks)") from None
        bad = next(i for i in layers if not 0 <= (i + num_blocks if i < 0 else i) < num_blocks)
        raise ValueError(f"layers={list(layers)}: index {bad} is outside the {num_blocks} blocks") from None
    return tuple(take)
