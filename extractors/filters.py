"""`filters:geometric` and `filters:texture`: weight-free banks of classical filters, as extractors.

Both banks read the greyscale intensity of the image (``skimage.color.rgb2gray``'s luma weights 0.2125 R +
0.7154 G + 0.0721 B; a 1-channel image is its own grey, to float32 rounding), in [0, 1]: ``info.mean`` is 0 and
``info.std`` 1, so preprocessing leaves the values as they are, and ``patch_size`` is 1, so nothing is padded
(every filter extends the image by replicating its border pixels). All sizes are in pixels of the input. Each
bank computes its responses at full resolution; the dense map at stride s is their s x s average (a box filter,
the anti-aliasing; the last cell of an odd size averages the pixels it has), and the pooled vector is each
channel's spatial mean, then each channel's standard deviation, over the whole image. ``layers`` indexes the
strides (1, 2, 4, 8); the default (1, 2, 3) gives strides 2, 4, 8. There are no parameters: ``pretrained`` has
no meaning (either value is accepted), and ``checkpoint`` is an error.

Geometric bank (family "geometric"), 21 channels, sigma in (1, 2, 4) px. Derivatives L_x, L_xy, ... are
separable convolutions with sampled Gaussian-derivative kernels (radius 4 sigma; scipy's
``gaussian_filter(order=...)``); central differences of a smoothed image (kornia's ``spatial_gradient``) agree with
them only to r ~ 0.97 at sigma = 1. They are scale-normalised as
Lindeberg's (gamma = 1: sigma L_x, sigma^2 L_xx) and multiplied by a gain that makes an ideal structure of
contrast 1 at its best scale answer 1:

* ``edge_s{σ}``: sqrt(2 pi) sigma |grad L| (a unit step edge gives 1);
* ``orient_cos_s{σ}``, ``orient_sin_s{σ}``: ``edge`` x (cos 2 theta, sin 2 theta), theta the gradient angle from
  the column (x) axis towards the row (y, downwards) axis: the edge orientation, weighted by its strength;
* ``ridge_bright_s{σ}``, ``ridge_dark_s{σ}``: Sato's 2-D line filter (skimage ``sato``): sigma^2 max(-l_min, 0)
  and sigma^2 max(l_max, 0) of the Hessian eigenvalues, times 3 sqrt(3) / 2 (a Gaussian line of peak 1 and
  standard deviation sigma / sqrt(2) gives 1);
* ``blob_s{σ}``: -2 sigma^2 (L_xx + L_yy), the negated scale-normalised Laplacian of Gaussian (a Gaussian blob of
  peak 1 and standard deviation sigma gives 1; dark blobs are negative);
* ``coherence_r{ρ}``, rho in (1, 2, 4): (mu_1 - mu_2) / (mu_1 + mu_2 + eps) of the structure tensor of Sobel
  gradients integrated by a Gaussian of rho px (skimage ``structure_tensor``), eps = (1 / 255)^2, one grey level
  per pixel: in [0, 1), high where one orientation dominates, and 0 on flat regions rather than noise.

Texture bank (family "morphological"), 25 channels:

* ``gabor_f{f}_o{θ}``: 4 |g * I| for a complex Gabor filter (skimage ``gabor_kernel``, bandwidth 1 octave:
  sigma = 0.562 / f, kernel radius 3 sigma) at f in (0.25, 0.125, 0.0625) cycles/px and theta in 0, 45, 90, 135
  degrees (a sinusoidal grating of contrast 1 at the filter's frequency and orientation gives 1); the isotropic
  kernel is separable, so it runs as 1-D complex convolutions (skimage's own kernel box shrinks to a radius of
  2.1 sigma on the diagonals, 45 and 135 degrees);
* ``mean_w5``: the 5 x 5 box mean of the intensity, in [0, 1];
* ``contrast_w5``, ``contrast_w15``: 2 x the standard deviation in a w x w box (at most 1);
* ``lbp_u0`` ... ``lbp_u8``, ``lbp_nonuniform``: the one-hot code of the rotation-invariant uniform local binary
  pattern, 8 neighbours at radius 1 with bilinear interpolation (skimage ``local_binary_pattern(P=8, R=1,
  method="uniform")``), so the stride-s map is the LBP histogram of each s x s cell and the pooled mean is the
  image's histogram. A neighbour counts as >= the centre within 1e-6 (the bilinear interpolation's rounding).

Each response is checked against scikit-image / scipy on real images in tests/test_filters.py; the figures and
the banks' cost are in docs/extractors_filters.md.

>>> from backbone_router import create_extractor
>>> ext = create_extractor("filters:geometric")
>>> out = ext(torch.rand(2, 3, 97, 130))
>>> [tuple(t.shape[1:]) for t in out["dense"]], out["pooled"].shape
([(21, 49, 65), (21, 25, 33), (21, 13, 17)], torch.Size([2, 42]))
>>> ext.channels[:3]
('edge_s1', 'orient_cos_s1', 'orient_sin_s1')
"""

from __future__ import annotations

import math

import kornia.filters as KF
import torch
import torch.nn.functional as F
from torch import nn

from .base import Extractor, ExtractorInfo, resolve_layers
from .registry import register_extractor

STRIDES = (1, 2, 4, 8)  # what `layers` indexes
DEFAULT_LAYERS = (1, 2, 3)  # strides 2, 4, 8
LUMA = (0.2125, 0.7154, 0.0721)  # skimage.color.rgb2gray
SIGMAS = (1.0, 2.0, 4.0)  # geometric bank: derivative scales, px
RHOS = (1.0, 2.0, 4.0)  # structure-tensor integration scales, px
COHERENCE_EPS = (1 / 255) ** 2  # squared gradient of one grey level per pixel
GABOR_FREQUENCIES = (0.25, 0.125, 0.0625)  # cycles per pixel
GABOR_THETAS = (0, 45, 90, 135)  # degrees from the column axis towards the row axis
GABOR_BANDWIDTH_SIGMA = 1 / math.pi * math.sqrt(math.log(2) / 2) * 3  # sigma * f for a 1-octave bandwidth
CONTRAST_WINDOWS = (5, 15)
MEAN_WINDOW = 5
LBP_TOLERANCE = 1e-6
EDGE_GAIN = math.sqrt(2 * math.pi)
RIDGE_GAIN = 3 * math.sqrt(3) / 2
BLOB_GAIN = 2.0
GABOR_GAIN = 4.0


GEOMETRIC_CHANNELS = tuple(
    [f"{kind}_s{s:g}" for s in SIGMAS
     for kind in ("edge", "orient_cos", "orient_sin", "ridge_bright", "ridge_dark", "blob")]
    + [f"coherence_r{r:g}" for r in RHOS]
)
TEXTURE_CHANNELS = tuple(
    [f"gabor_f{f:g}_o{t}" for f in GABOR_FREQUENCIES for t in GABOR_THETAS]
    + [f"mean_w{MEAN_WINDOW}"] + [f"contrast_w{w}" for w in CONTRAST_WINDOWS]
    + [f"lbp_u{k}" for k in range(9)] + ["lbp_nonuniform"]
)


# ---- the filters: (B, 1, H, W) grey in [0, 1] -> (B, k, H, W) responses ----------------------------------------
def grey_from_rgb(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB -> (B, 1, H, W) luma, as ``skimage.color.rgb2gray``."""
    w = images.new_tensor(LUMA).view(1, 3, 1, 1)
    return (images * w).sum(1, keepdim=True)


def gaussian_smoothed(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Each channel of `x` smoothed by a sampled Gaussian of `sigma` px, radius 4 sigma (scipy's ``truncate=4``),
    border replicated."""
    k = 2 * math.ceil(4 * sigma) + 1
    return KF.gaussian_blur2d(x, (k, k), (sigma, sigma), border_type="replicate")


def gaussian_derivative_kernels(sigma: float) -> torch.Tensor:
    """Sampled Gaussian of `sigma` px (radius 4 sigma, sum 1) and its first and second derivatives, as scipy's
    ``gaussian_filter(order=...)``, in correlation order; (3, 2 r + 1)."""
    r = math.ceil(4 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    phi = torch.exp(-(t**2) / (2 * sigma**2))
    phi = phi / phi.sum()
    return torch.stack([phi, t / sigma**2 * phi, (t**2 / sigma**4 - 1 / sigma**2) * phi]).float()


def gaussian_derivatives(grey: torch.Tensor, kernels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(L_x, L_y, L_xx, L_xy, L_yy) of `grey` by the separable kernels of :func:`gaussian_derivative_kernels` (x:
    columns, y: rows), border replicated: one row pass with (G, G', G''), one grouped column pass."""
    k = kernels.shape[-1]
    r = k // 2
    rows = F.conv2d(F.pad(grey, (r, r, r, r), mode="replicate"), kernels.view(3, 1, 1, k))  # G, G', G'' along x
    g, d1, d2 = kernels
    columns = torch.stack([d1, d2, g, d1, g, g]).view(6, 1, k, 1)  # G: (G', G''), G': (G, G'), G'': (G, unused)
    ly, lyy, lx, lxy, lxx, _ = F.conv2d(rows, columns, groups=3).unbind(1)
    return tuple(t.unsqueeze(1) for t in (lx, ly, lxx, lxy, lyy))


def geometric_responses(grey: torch.Tensor, derivative_kernels: list[torch.Tensor]) -> torch.Tensor:
    """The geometric bank's channels (``GEOMETRIC_CHANNELS``, see the module docstring) at full resolution;
    `derivative_kernels`: :func:`gaussian_derivative_kernels` per sigma in ``SIGMAS``."""
    out = []
    for s, kernels in zip(SIGMAS, derivative_kernels):
        lx, ly, lxx, lxy, lyy = gaussian_derivatives(grey, kernels)
        mag = torch.sqrt(lx**2 + ly**2)
        edge = EDGE_GAIN * s * mag
        scale = EDGE_GAIN * s / mag.clamp_min(1e-12)  # edge * (cos 2theta, sin 2theta) = scale * (lx^2 - ly^2, 2 lx ly)
        half_trace = (lxx + lyy) / 2
        disc = torch.sqrt(((lxx - lyy) / 2) ** 2 + lxy**2)
        l_max, l_min = half_trace + disc, half_trace - disc
        out += [edge, scale * (lx**2 - ly**2), scale * 2 * lx * ly,
                RIDGE_GAIN * s**2 * torch.relu(-l_min), RIDGE_GAIN * s**2 * torch.relu(l_max),
                -BLOB_GAIN * s**2 * (lxx + lyy)]
    gx, gy = KF.spatial_gradient(grey, mode="sobel", order=1).unbind(2)  # Sobel / 8: the per-pixel derivative
    products = torch.cat([gx * gx, gx * gy, gy * gy], 1)
    for r in RHOS:
        jxx, jxy, jyy = gaussian_smoothed(products, r).unbind(1)
        diff = torch.sqrt((jxx - jyy) ** 2 + 4 * jxy**2)  # mu_1 - mu_2
        out.append((diff / (jxx + jyy + COHERENCE_EPS)).unsqueeze(1))
    return torch.cat(out, 1)


def gabor_1d_kernels(frequency: float, thetas_deg=GABOR_THETAS) -> tuple[torch.Tensor, torch.Tensor]:
    """Complex 1-D factors of skimage's isotropic ``gabor_kernel`` (bandwidth 1): g(y, x) = b(y) a(x), with
    a = exp(-x^2 / 2 sigma^2 + 2 pi i f x cos theta) / (2 pi sigma^2) and b = exp(-y^2 / 2 sigma^2 + 2 pi i f y sin
    theta); radius ceil(3 sigma). Returns (a, b), each (n_thetas, 2, k): real and imaginary parts."""
    sigma = GABOR_BANDWIDTH_SIGMA / frequency
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    envelope = torch.exp(-(t**2) / (2 * sigma**2))
    a, b = [], []
    for deg in thetas_deg:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        pa, pb = 2 * math.pi * frequency * c * t, 2 * math.pi * frequency * s * t
        a.append(torch.stack([torch.cos(pa), torch.sin(pa)]) * envelope / (2 * math.pi * sigma**2))
        b.append(torch.stack([torch.cos(pb), torch.sin(pb)]) * envelope)
    return torch.stack(a).float(), torch.stack(b).float()


def gabor_energy(grey: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|g * I| per orientation for the separable complex kernels of :func:`gabor_1d_kernels`: a row pass with
    Re a and Im a, a column pass with Re b and Im b, then (Re, Im) = (aR bR - aI bI, aR bI + aI bR)."""
    n, _, k = a.shape
    r = k // 2
    padded = F.pad(grey, (r, r, r, r), mode="replicate")
    rows = F.conv2d(padded, a.reshape(2 * n, 1, 1, k))  # (B, 2n, H + 2r, W): per theta [aR, aI]
    col_w = b.repeat_interleave(2, 0).reshape(4 * n, 1, k, 1)  # per theta, per row channel: [bR, bI]
    both = F.conv2d(rows, col_w, groups=2 * n).unflatten(1, (n, 4))  # [aR bR, aR bI, aI bR, aI bI]
    real = both[:, :, 0] - both[:, :, 3]
    imag = both[:, :, 1] + both[:, :, 2]
    return torch.sqrt(real**2 + imag**2)


def box_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    """Mean over a window x window box (scipy's ``uniform_filter``), border replicated."""
    return KF.box_blur(x, (window, window), border_type="replicate", separable=True)


def local_std(grey: torch.Tensor, window: int) -> torch.Tensor:
    """Standard deviation of the intensity in a window x window box (centred on 0.5 for float32 accuracy)."""
    x = grey - 0.5
    return torch.sqrt(torch.relu(box_mean(x * x, window) - box_mean(x, window) ** 2))


def lbp_uniform_codes(grey: torch.Tensor) -> torch.Tensor:
    """Rotation-invariant uniform LBP codes (0..8: bits set in a uniform pattern, 9: not uniform) of 8 neighbours
    at radius 1, diagonals interpolated bilinearly in skimage's order; (B, 1, H, W) long."""
    h, w = grey.shape[-2:]
    p = F.pad(grey, (1, 1, 1, 1), mode="replicate")

    def at(dr: int, dc: int) -> torch.Tensor:
        return p[..., 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w]

    d = round(math.sqrt(0.5), 5)  # skimage rounds the sample offsets to 5 decimals

    def diagonal(sr: int, sc: int) -> torch.Tensor:  # at (sr * d, sc * d), as skimage's bilinear_interpolation
        r0, c0 = min(sr, 0), min(sc, 0)  # floor of the offset
        fr, fc = sr * d - r0, sc * d - c0  # fractional parts from the floor
        top = (1 - fc) * at(r0, c0) + fc * at(r0, c0 + 1)
        bottom = (1 - fc) * at(r0 + 1, c0) + fc * at(r0 + 1, c0 + 1)
        return (1 - fr) * top + fr * bottom

    # angle 2 pi k / 8 from the column axis, counter-clockwise on screen: (row, col) = (-sin, cos)
    neighbours = [at(0, 1), diagonal(-1, 1), at(-1, 0), diagonal(-1, -1), at(0, -1), diagonal(1, -1), at(1, 0),
                  diagonal(1, 1)]
    bits = torch.cat([(n - grey >= -LBP_TOLERANCE) for n in neighbours], 1).to(torch.int64)
    transitions = (bits != bits.roll(1, dims=1)).sum(1, keepdim=True)
    return torch.where(transitions <= 2, bits.sum(1, keepdim=True), torch.full_like(transitions, 9))


def texture_responses(grey: torch.Tensor, gabor: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The texture bank's channels (``TEXTURE_CHANNELS``, see the module docstring) at full resolution; `gabor`:
    the (a, b) kernels of :func:`gabor_1d_kernels` per frequency."""
    out = [GABOR_GAIN * gabor_energy(grey, a, b) for a, b in gabor]
    out.append(box_mean(grey, MEAN_WINDOW))
    out += [2 * local_std(grey, w) for w in CONTRAST_WINDOWS]
    codes = lbp_uniform_codes(grey)
    out.append((codes == torch.arange(10, device=grey.device).view(1, -1, 1, 1)).to(grey.dtype))
    return torch.cat(out, 1)


# ---- the extractor ---------------------------------------------------------------------------------------------
BANKS = {"geometric": (GEOMETRIC_CHANNELS, "geometric"), "texture": (TEXTURE_CHANNELS, "morphological")}


class FilterBankExtractor(Extractor):
    """A fixed filter bank (``"geometric"`` or ``"texture"``) as an extractor; see the module docstring."""

    def __init__(self, bank: str, layers=None):
        channels, family = BANKS[bank]
        layers = resolve_layers(layers, len(STRIDES), default=DEFAULT_LAYERS)
        info = ExtractorInfo(
            name=f"filters:{bank}",
            width=2 * len(channels),
            widths=(len(channels),) * len(layers),
            strides=tuple(STRIDES[i] for i in layers),
            patch_size=1,
            layers=layers,
            mean=(0.0, 0.0, 0.0),
            std=(1.0, 1.0, 1.0),
            family=family,
        )
        super().__init__(info)
        self.bank, self.channels = bank, channels
        # The kernels are buffers, so that .to(device) moves them, and not persistent: nothing is saved.
        kernels = ([gaussian_derivative_kernels(s) for s in SIGMAS] if bank == "geometric"
                   else [k for f in GABOR_FREQUENCIES for k in gabor_1d_kernels(f)])
        for i, k in enumerate(kernels):
            self.register_buffer(f"_kernel{i}", k, persistent=False)
        self._num_kernels = len(kernels)

    def responses(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed (B, 3, H, W) input -> (B, len(channels), H, W) full-resolution responses, float32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            grey = grey_from_rgb(x.float())
            kernels = [getattr(self, f"_kernel{i}").float() for i in range(self._num_kernels)]
            if self.bank == "geometric":
                return geometric_responses(grey, kernels)
            return texture_responses(grey, list(zip(kernels[::2], kernels[1::2])))

    def forward_features(self, x):
        r = self.responses(x)
        dense = [r if s == 1 else F.avg_pool2d(r, s, s, ceil_mode=True) for s in self.info.strides]
        pooled = torch.cat([r.mean((2, 3)), r.std((2, 3), correction=0)], 1)
        return dense, pooled

    def block_modules(self) -> list[nn.Module]:
        return []


@register_extractor("filters")
def _build_filters(name: str, layers=None, pretrained=True, checkpoint=None, **kwargs) -> FilterBankExtractor:
    known = [f"filters:{b}" for b in BANKS]
    if name not in BANKS:
        raise ValueError(f"filters:{name}: unknown filter bank {name!r}; known banks: {known}")
    if checkpoint is not None:
        raise ValueError(f"filters:{name}: a filter bank has no weights, so checkpoint={checkpoint!r} has no meaning")
    if kwargs:
        raise ValueError(f"filters:{name}: unexpected arguments {sorted(kwargs)}; a filter bank takes only layers")
    del pretrained  # no weights: either value builds the same bank
    return FilterBankExtractor(name, layers)
