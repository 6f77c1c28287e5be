"""MAE: random masking, a timm ViT encoder on the visible patches, a light transformer decoder.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (2021). The loss is the MSE between the
predicted and the (per-patch normalized) pixels of the masked patches only.
"""

from __future__ import annotations

import torch
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from backbone_router.extractors.timm_backend import TimmExtractor
from backbone_router.train.selfsup.pretrain_config import DecoderConfig

from .encoder import encode_visible, patchify


def num_masked(num_patches: int, ratio: float) -> int:
    """Patches masked per image: round(N * ratio), at least 1 and at most N - 1."""
    return min(max(int(round(num_patches * ratio)), 1), num_patches - 1)


def random_mask(batch: int, num_patches: int, ratio: float, device=None, generator: torch.Generator | None = None):
    """(B, N) bool mask, True = masked, exactly `num_masked(N, ratio)` True per row, uniformly at random."""
    noise = torch.rand(batch, num_patches, generator=generator, device=device)
    order = torch.argsort(noise, dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    return mask.scatter_(1, order[:, : num_masked(num_patches, ratio)], True)


class MAEDecoder(nn.Module):
    """Encoder tokens of the visible patches + mask tokens -> predicted pixels of every patch."""

    def __init__(self, embed_dim: int, num_prefix: int, patch: int, cfg: DecoderConfig, out_chans: int = 3):
        super().__init__()
        if cfg.dim % 4:
            raise ValueError(f"decoder.dim must be a multiple of 4 for the 2-D sin-cos embedding, got {cfg.dim}")
        self.num_prefix = num_prefix
        self.embed = nn.Linear(embed_dim, cfg.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.Sequential(*[Block(cfg.dim, cfg.num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim)
        self.pred = nn.Linear(cfg.dim, patch * patch * out_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """tokens (B, prefix + kept, D), kept indices (B, kept) -> (B, N, patch * patch * C)."""
        x = self.embed(tokens)
        prefix, visible = x[:, : self.num_prefix], x[:, self.num_prefix :]
        b, n, d = x.shape[0], grid[0] * grid[1], x.shape[-1]
        full = self.mask_token.to(x.dtype).expand(b, n, d)
        full = full.scatter(1, keep[..., None].expand(-1, -1, d), visible)  # visible tokens back in place
        full = full + build_sincos2d_pos_embed(list(grid), d, device=x.device, dtype=x.dtype)  # fixed 2-D sin-cos
        x = self.norm(self.blocks(torch.cat([prefix, full], dim=1)))
        return self.pred(x[:, self.num_prefix :])


class MaskedAutoencoder(nn.Module):
    """The ViT encoder (a `TimmExtractor`, saved as the result) and the decoder; forward gives predictions."""

    def __init__(self, encoder: TimmExtractor, decoder: DecoderConfig):
        super().__init__()
        self.encoder = encoder
        model = encoder.model
        self.patch = encoder.info.patch_size
        self.decoder = MAEDecoder(model.embed_dim, model.num_prefix_tokens, self.patch, decoder)

    def num_patches(self, images: torch.Tensor) -> int:
        h, w = images.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"images: H and W must be multiples of the patch size {self.patch}, got {tuple(images.shape)}")
        return (h // self.patch) * (w // self.patch)

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[0, 1] images (B, 3, H, W), mask (B, N) True = masked -> predicted patches (B, N, p * p * 3)."""
        tokens, grid, keep = encode_visible(self.encoder, images, mask)
        return self.decoder(tokens, keep, grid)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True) -> torch.Tensor:
    """Mean squared error over the masked patches; targets normalized per patch when `norm_pix`."""
    if norm_pix:
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1)


class MAEPretrainer(nn.Module):
    """MAE with random masking. ``forward(images)`` returns ``{"loss": ...}``.

    >>> from backbone_router.train.selfsup.pretrain_config import DecoderConfig, PretrainModelConfig
    >>> from backbone_router.train.selfsup.encoder import build_encoder
    >>> mae = MAEPretrainer(build_encoder(PretrainModelConfig(kwargs={"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2})),
    ...                     DecoderConfig(dim=32, depth=1, num_heads=2))
    >>> mae(torch.rand(2, 3, 32, 32))["loss"].ndim
    0
    """

    def __init__(self, encoder: TimmExtractor, decoder: DecoderConfig, mask_ratio: float = 0.75, norm_pix_loss: bool = True):
        super().__init__()
        self.mae = MaskedAutoencoder(encoder, decoder)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss

    @property
    def encoder(self) -> TimmExtractor:
        return self.mae.encoder

    def reconstruct(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted patches, mask): a random mask at `mask_ratio` unless one is given."""
        if mask is None:
            mask = random_mask(images.shape[0], self.mae.num_patches(images), self.mask_ratio, images.device, generator)
        return self.mae(images, mask), mask

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        pred, mask = self.reconstruct(images, mask, generator)
        # Targets in the encoder's normalized space, as in MAE (the per-patch normalization then removes it).
        target = patchify(self.encoder.preprocess(images), self.mae.patch)
        loss = mae_loss(pred, target, mask, self.norm_pix_loss)
        return {"loss": loss}
