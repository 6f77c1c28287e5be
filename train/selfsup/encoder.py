"""The encoder all pretraining methods train: a plain timm ViT inside a `TimmExtractor`.

`encode_visible` runs timm's own ViT pieces (patch_embed, position embedding, blocks, norm) on the kept
tokens only, so the trained weights are an ordinary timm state dict that `save_timm_extractor` writes.
"""

from __future__ import annotations

import torch
from einops import rearrange

from backbone_router.extractors.timm_backend import TimmExtractor, create_timm_model, is_vit
from backbone_router.train.selfsup.pretrain_config import PretrainModelConfig


def build_encoder(cfg: PretrainModelConfig) -> TimmExtractor:
    """A randomly initialized timm ViT extractor with the config's normalization, family and layers.

    >>> enc = build_encoder(PretrainModelConfig(kwargs={"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}))
    >>> enc.info.patch_size, enc.info.width
    (16, 32)
    """
    model = create_timm_model(cfg.name, pretrained=False, checkpoint=None, num_classes=0, **cfg.kwargs)
    if not is_vit(model):
        raise ValueError(f"model.name {cfg.name!r}: pretraining needs a timm ViT (patch_embed, blocks), got {type(model).__name__}")
    img = model.patch_embed.img_size[0]
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(cfg.mean), "std": tuple(cfg.std), "input_size": (3, img, img)}
    encoder = TimmExtractor(model, cfg.layers)
    return encoder.set_family(cfg.family)


def saved_model_kwargs(cfg: PretrainModelConfig) -> dict:
    """The timm kwargs a `local-dir` checkpoint needs to rebuild the encoder (num_classes=0: no classifier)."""
    return {**cfg.kwargs, "num_classes": 0}


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches in row-major order."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch, p2=patch)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, patch * patch * C) -> (B, C, H, W); inverse of `patchify`."""
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid[0], w=grid[1], p1=patch, p2=patch)


def kept_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the unmasked patches of a (B, N) bool mask (True = masked), ascending per row.

    Every row must mask the same number of patches (the masking functions here guarantee it).
    """
    counts = mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"mask: every image must mask the same number of patches, got counts {counts.tolist()}")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # unmasked (0) first, in index order
    return order[:, : mask.shape[1] - int(counts[0])]


def encode_visible(encoder: TimmExtractor, images: torch.Tensor, mask: torch.Tensor | None = None):
    """Encode [0, 1] images keeping only unmasked patches.

    Returns (tokens (B, prefix + kept, D) after the final norm, grid (h, w), kept indices (B, kept)).
    With `mask=None` every patch is kept (equal to the timm forward_features).
    """
    model = encoder.model
    x = encoder.preprocess(images)
    h, w = x.shape[-2] // encoder.info.patch_size, x.shape[-1] // encoder.info.patch_size
    t = model.patch_embed(x)  # (B, h, w, D) with dynamic_img_size, else (B, N, D)
    t = model._pos_embed(t)  # prepends CLS/register tokens, adds (interpolated) position embeddings
    prefix = model.num_prefix_tokens
    if mask is None:
        keep = torch.arange(h * w, device=t.device).expand(t.shape[0], -1)
    else:
        if mask.shape != (t.shape[0], h * w):
            raise ValueError(f"mask: expected shape {(t.shape[0], h * w)} (batch, patches), got {tuple(mask.shape)}")
        keep = kept_indices(mask)
        patches = torch.gather(t[:, prefix:], 1, keep[..., None].expand(-1, -1, t.shape[-1]))
        t = torch.cat([t[:, :prefix], patches], dim=1)
    t = model.norm_pre(model.patch_drop(t))
    t = model.blocks(t)
    return model.norm(t), (h, w), keep
