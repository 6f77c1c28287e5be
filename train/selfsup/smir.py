"""SMIR: selective masking for image reconstruction (arXiv 2512.06981).

The unlabeled pool is split into P partitions trained in order. Partition 0 trains an MAE-style model
with random masks. Before partition p > 0 the model trained so far (a frozen snapshot) scores every
training image: it reconstructs the image under K random masks, computes a per-patch loss
(1 - SSIM, averaged over the patch, + L1), averages each patch's loss over the masks that hid it, and
the training mask hides the `mask_ratio` fraction of patches with the highest loss. Training loss:
(1 - MS-SSIM) of the reconstructed image + L1 on the masked patches, both in [0, 1] pixel space.

Choices where the paper leaves room (documented in docs/pretraining.md):

- Scoring happens online per batch (after the crop/flip augmentation, so the mask fits the view the model
  sees) with the snapshot taken at the start of the partition.
- A patch hidden by none of the K masks has no loss of its own; it gets its image's mean scored loss.
- Ties: patches with equal scores are taken in increasing patch index (a stable descending sort).
- MS-SSIM needs large images: with crops too small for 5 scales, fewer scales are used (the first n of
  the standard weights, renormalized to sum 1); see `ms_ssim_scales`. MS-SSIM is relu-normalized (as
  torchmetrics' ``normalize="relu"``) so that negative contrast terms cannot give NaN gradients.
- SSIM / MS-SSIM are computed here with the separable Gaussian window applied as matrix products: the
  same values as torchmetrics (checked in tests/test_pretrain.py), several times faster on a CPU, where
  torchmetrics' grouped 2-D convolution dominated the SMIR step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import reduce

from backbone_router.extractors.timm_backend import TimmExtractor
from backbone_router.train.selfsup.pretrain_config import DecoderConfig

from .encoder import patchify, unpatchify
from .mae import MAEPretrainer, num_masked, random_mask

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, as in torchmetrics
K1, K2 = 0.01, 0.03  # SSIM stabilizing constants (times the data range, squared)


def ssim_window(sigma: float) -> int:
    """Taps of the Gaussian SSIM window for `sigma` (torchmetrics' rule: 11 for sigma 1.5)."""
    return int(3.5 * sigma + 0.5) * 2 + 1


def ms_ssim_scales(size: int, window: int, max_scales: int = 5) -> int:
    """The most scales (<= max_scales) whose coarsest level is >= `window` pixels (and torchmetrics' size rule).

    >>> ms_ssim_scales(224, 11), ms_ssim_scales(112, 11), ms_ssim_scales(96, 11), ms_ssim_scales(32, 7)
    (5, 4, 3, 3)
    """
    for n in range(max_scales, 0, -1):
        if size // 2 ** (n - 1) >= window and size // max(1, n - 1) ** 2 > window - 1 and size >= 2**n:
            return n
    raise ValueError(f"images of side {size} are smaller than the SSIM window {window}; use a larger data.image_size")


def ms_ssim_betas(scales: int) -> tuple[float, ...]:
    """The first `scales` standard MS-SSIM exponents, renormalized to sum to 1."""
    betas = MS_SSIM_BETAS[:scales]
    return tuple(b / sum(betas) for b in betas)


def blur_matrix(n: int, sigma: float, dtype=torch.float32, device=None) -> torch.Tensor:
    """(n, n) matrix M with M @ v = reflect-pad v by the window radius, then a valid 1-D Gaussian filter."""
    win = ssim_window(sigma)
    pad = (win - 1) // 2
    if n <= pad:
        raise ValueError(f"SSIM: a side of {n} px is too small for a {win}-tap window (reflect padding needs > {pad})")
    dist = torch.arange(win, dtype=torch.float64) - pad
    g = torch.exp(-((dist / sigma) ** 2) / 2)
    g = g / g.sum()
    reflect = F.pad(torch.eye(n, dtype=torch.float64)[None, None], (0, 0, pad, pad), mode="reflect")[0, 0]  # (n + 2p, n)
    filt = torch.zeros(n, n + 2 * pad, dtype=torch.float64)
    for i in range(n):
        filt[i, i : i + win] = g
    return (filt @ reflect).to(dtype=dtype, device=device)


def ssim_maps(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, data_range: float = 1.0):
    """Per-pixel SSIM and contrast-structure maps, (B, C, H, W) each.

    The same values as torchmetrics' `structural_similarity_index_measure(..., return_full_image=True)`
    (reflect padding, Gaussian window of `ssim_window(sigma)` taps); the separable window is applied as two
    small matrix products, which is several times faster on a CPU than a grouped 2-D convolution.
    """
    h, w = x.shape[-2:]
    blur_h, blur_w = blur_matrix(h, sigma, x.dtype, x.device), blur_matrix(w, sigma, x.dtype, x.device)
    stack = torch.stack([x, y, x * x, y * y, x * y])  # (5, B, C, H, W)
    mu_x, mu_y, xx, yy, xy = blur_h @ stack @ blur_w.T
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    var_x = (xx - mu_x.pow(2)).clamp_min(0)
    var_y = (yy - mu_y.pow(2)).clamp_min(0)
    cov = xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x.pow(2) + mu_y.pow(2) + c1) * cs
    return ssim, cs


def ms_ssim(x: torch.Tensor, y: torch.Tensor, scales: int, sigma: float = 1.5, data_range: float = 1.0) -> torch.Tensor:
    """Multi-scale SSIM per image (B,), relu-normalized for training, with `ms_ssim_betas(scales)`.

    Equals torchmetrics' `multiscale_structural_similarity_index_measure(..., betas=ms_ssim_betas(scales),
    normalize="relu", reduction="none")` (including its crop of the contrast term by the window radius).
    """
    pad = (ssim_window(sigma) - 1) // 2
    values = []
    for i in range(scales):
        ssim, cs = ssim_maps(x, y, sigma, data_range)
        if i == scales - 1:
            values.append(ssim.flatten(1).mean(1).relu())
        else:
            values.append(cs[..., pad:-pad, pad:-pad].flatten(1).mean(1).relu())
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    betas = torch.tensor(ms_ssim_betas(scales), dtype=x.dtype, device=x.device)
    return torch.prod(torch.stack(values) ** betas[:, None], dim=0)


def per_patch_loss(recon: torch.Tensor, images: torch.Tensor, patch: int, sigma: float = 1.5) -> torch.Tensor:
    """(1 - SSIM map averaged over each patch) + mean absolute error per patch: (B, N)."""
    ssim, _ = ssim_maps(recon, images, sigma)
    ssim = reduce(ssim, "b c (h p1) (w p2) -> b (h w)", "mean", p1=patch, p2=patch)
    l1 = reduce((recon - images).abs(), "b c (h p1) (w p2) -> b (h w)", "mean", p1=patch, p2=patch)
    return (1 - ssim) + l1


def aggregate_patch_losses(losses: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(K, B, N) losses and masks -> (B, N): each patch's mean loss over the masks that hid it.

    Patches hidden by none of the K masks get the mean of their image's scored patches.
    """
    m = masks.to(losses.dtype)
    count = m.sum(0)
    per_patch = (losses * m).sum(0) / count.clamp_min(1)
    scored = count > 0
    image_mean = (per_patch * scored).sum(1, keepdim=True) / scored.sum(1, keepdim=True).clamp_min(1)
    return torch.where(scored, per_patch, image_mean.expand_as(per_patch))


def highest_loss_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """(B, N) scores -> (B, N) bool mask of the `num_masked(N, ratio)` highest scores per row.

    Ties are broken by patch index: among equal scores the lower index is masked first.

    >>> highest_loss_mask(torch.tensor([[0.1, 0.9, 0.5, 0.9]]), 0.5)
    tensor([[False,  True, False,  True]])
    """
    k = num_masked(scores.shape[1], ratio)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, order[:, :k], True)


def compose(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """The reconstructed image: predicted pixels on masked patches, the input on visible ones."""
    target = patchify(images, patch)
    mixed = torch.where(mask[..., None], pred, target)
    return unpatchify(mixed, patch, (images.shape[-2] // patch, images.shape[-1] // patch))


class SMIRPretrainer(MAEPretrainer):
    """Masked reconstruction in [0, 1] pixel space with an MS-SSIM + L1 loss; masks random or selective.

    >>> from backbone_router.train.selfsup.pretrain_config import DecoderConfig, PretrainModelConfig
    >>> from backbone_router.train.selfsup.encoder import build_encoder
    >>> smir = SMIRPretrainer(build_encoder(PretrainModelConfig(kwargs={"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2})),
    ...                       DecoderConfig(dim=32, depth=1, num_heads=2), ssim_sigma=1.0)
    >>> x = torch.rand(2, 3, 32, 32)
    >>> smir(x, mask=smir.selective_mask(x, num_masks=2))["loss"].ndim
    0
    """

    def __init__(self, encoder: TimmExtractor, decoder: DecoderConfig, mask_ratio: float = 0.5,
                 ms_ssim_weight: float = 1.0, l1_weight: float = 1.0, ssim_sigma: float = 1.5,
                 ms_ssim_scales: int | None = None):
        super().__init__(encoder, decoder, mask_ratio, norm_pix_loss=False)
        self.ms_ssim_weight, self.l1_weight = ms_ssim_weight, l1_weight
        self.sigma = ssim_sigma
        self.scales = ms_ssim_scales

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        pred, mask = self.reconstruct(images, mask, generator)
        recon = compose(pred, images, mask, self.mae.patch)
        scales = self.scales or ms_ssim_scales(min(images.shape[-2:]), ssim_window(self.sigma))
        similarity = ms_ssim(recon.float(), images.float(), scales, self.sigma).mean()
        per_patch_l1 = (pred - patchify(images, self.mae.patch)).abs().mean(-1)
        m = mask.to(per_patch_l1.dtype)
        l1 = (per_patch_l1 * m).sum() / m.sum().clamp_min(1)
        loss = self.ms_ssim_weight * (1 - similarity) + self.l1_weight * l1
        return {"loss": loss, "ms_ssim": similarity.detach(), "l1": l1.detach()}

    @torch.no_grad()
    def patch_scores(self, images: torch.Tensor, num_masks: int, generator: torch.Generator | None = None):
        """Each patch's loss averaged over the `num_masks` random masks that hid it: (B, N)."""
        b, n = images.shape[0], self.mae.num_patches(images)
        losses, masks = [], []
        for _ in range(num_masks):
            mask = random_mask(b, n, self.mask_ratio, images.device, generator)
            recon = compose(self.mae(images, mask), images, mask, self.mae.patch)
            losses.append(per_patch_loss(recon.float(), images.float(), self.mae.patch, self.sigma))
            masks.append(mask)
        return aggregate_patch_losses(torch.stack(losses), torch.stack(masks))

    @torch.no_grad()
    def selective_mask(self, images: torch.Tensor, num_masks: int = 5, generator: torch.Generator | None = None):
        """The SMIR mask: the `mask_ratio` fraction of patches this model reconstructs worst."""
        was_training = self.training
        self.eval()
        try:
            return highest_loss_mask(self.patch_scores(images, num_masks, generator), self.mask_ratio)
        finally:
            self.train(was_training)
