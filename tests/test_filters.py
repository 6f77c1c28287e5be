"""The weight-free filter banks `filters:geometric` and `filters:texture` (extractors/filters.py).

Known answers on synthetic structures (the gains that put responses at unit scale), every channel against
scikit-image / scipy on two real images (a CrackForest crack, a magnetic-tile crack), and the extractor contract:
odd sizes, strides, 1 vs 3 channels, info, errors, no parameters, a Router around it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from backbone_router.extractors import create_extractor, list_extractors
from backbone_router.extractors.filters import GABOR_FREQUENCIES, GABOR_THETAS, SIGMAS
from backbone_router.router import Router, RouterConfig

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BACKBONE_ROUTER_DATA", REPO.parent / "shared" / "data"))
REAL_IMAGES = {"cfd": "cfd/images/001.jpg", "mtd": "mtd/images/Crack_exp1_num_249594.jpg"}  # RGB; greyscale
CROP = 256  # real images are cut to their centre 256 x 256 at most (CFD 320 x 480 -> 256 x 256, MTD 264 x 219 -> 256 x 219)


def full_res_batch(bank: str, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Channel name -> its (B, H, W) stride-1 maps, through create_extractor and the Extractor contract."""
    ext = create_extractor(f"filters:{bank}", layers=[0])
    maps = ext(images)["dense"][0].double().numpy()
    return {name: maps[:, i] for i, name in enumerate(ext.channels)}


def full_res(bank: str, images: torch.Tensor) -> dict[str, np.ndarray]:
    """Channel name -> the (H, W) stride-1 map of the first image."""
    return {k: v[0] for k, v in full_res_batch(bank, images).items()}


# ---- known answers: the gains ---------------------------------------------------------------------------------
N, C = 129, 64  # a synthetic image and its centre pixel


def _grid():
    return torch.meshgrid(torch.arange(N, dtype=torch.float64), torch.arange(N, dtype=torch.float64), indexing="ij")


def _at_centre(bank: str, images: list[torch.Tensor]) -> list[dict[str, float]]:
    """Each channel at the centre pixel, for each (N, N) image (one batch)."""
    maps = full_res_batch(bank, torch.stack(images)[:, None].float())
    return [{k: float(v[i, C, C]) for k, v in maps.items()} for i in range(len(images))]


def test_ideal_structures_of_contrast_one_answer_one():
    y, x = _grid()
    step = (x > C).double()
    step[:, C] = 0.5  # a pixel-sharp step centred on column C
    images = [step]
    for s in SIGMAS:
        blob = torch.exp(-((x - C) ** 2 + (y - C) ** 2) / (2 * s**2))  # peak 1, std sigma
        line = torch.exp(-((x - C) ** 2) / s**2)  # peak 1, std sigma / sqrt(2)
        images += [blob, 1 - blob, line, 1 - line]
    r = _at_centre("geometric", images)
    for i, s in enumerate(SIGMAS):
        k = f"s{s:g}"
        # Sampling a pixel-sharp step at sigma = 1 loses 9 % of the continuous 1 / sqrt(2 pi); 2 % at 2, 0.5 % at 4.
        assert 0.9 <= r[0][f"edge_{k}"] <= 1.01
        blob, dark_blob, line, dark_line = r[1 + 4 * i : 5 + 4 * i]
        assert blob[f"blob_{k}"] == pytest.approx(1, abs=0.01) and dark_blob[f"blob_{k}"] == pytest.approx(-1, abs=0.01)
        assert line[f"ridge_bright_{k}"] == pytest.approx(1, abs=0.025)
        assert dark_line[f"ridge_dark_{k}"] == pytest.approx(1, abs=0.025)


def test_a_grating_of_contrast_one_gives_gabor_energy_one():
    y, x = _grid()
    angles = [math.radians(t) for t in GABOR_THETAS]
    for f in GABOR_FREQUENCIES:
        gratings = [0.5 + 0.5 * torch.cos(2 * math.pi * f * (x * math.cos(t) + y * math.sin(t))) for t in angles]
        for theta, r in zip(GABOR_THETAS, _at_centre("texture", gratings)):
            assert r[f"gabor_f{f:g}_o{theta}"] == pytest.approx(1, abs=0.01)
            assert r[f"gabor_f{f:g}_o{(theta + 90) % 180}"] < 0.02  # the orthogonal filter barely answers


# ---- scikit-image / scipy on real images ----------------------------------------------------------------------
@pytest.fixture(scope="module", params=sorted(REAL_IMAGES))
def real(request):
    """(uint8 image, centre crop, float64 grey as skimage's rgb2gray, (1, C, H, W) float32 in [0, 1], geo, tex maps)."""
    from skimage.color import rgb2gray

    path = SHARED_DATA / REAL_IMAGES[request.param]
    if not path.is_file():
        pytest.skip(f"real image {path} not found (the shared datasets live at ../shared/data or $BACKBONE_ROUTER_DATA)")
    raw = np.asarray(Image.open(path))
    top, left = max(raw.shape[0] - CROP, 0) // 2, max(raw.shape[1] - CROP, 0) // 2
    raw = raw[top : top + CROP, left : left + CROP].copy()  # the centre (CFD 001: 867 crack pixels of 1831)
    grey = rgb2gray(raw) if raw.ndim == 3 else raw / 255.0
    images = torch.from_numpy(raw if raw.ndim == 3 else raw[..., None]).permute(2, 0, 1)[None].float() / 255
    return raw, grey, images, full_res("geometric", images), full_res("texture", images)


def pearson(a: np.ndarray, b: np.ndarray, margin: int) -> float:
    a, b = a[margin:-margin, margin:-margin], b[margin:-margin, margin:-margin]
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.real_data
def test_gradient_orientation_and_log_match_scipy_gaussian_derivatives(real, sigma):
    """edge, orient, blob: the same sampled Gaussian-derivative kernels and border ('nearest' = replicate) as
    scipy.ndimage: max |diff| <= 1e-5 over the whole image (values up to ~0.4)."""
    from scipy import ndimage as ndi

    _, grey, _, geo, _ = real
    s, k = sigma, f"s{sigma:g}"
    gain = math.sqrt(2 * math.pi) * s
    lx = ndi.gaussian_filter(grey, s, order=(0, 1), mode="nearest")
    ly = ndi.gaussian_filter(grey, s, order=(1, 0), mode="nearest")
    mag = np.hypot(lx, ly)
    np.testing.assert_allclose(geo[f"edge_{k}"], gain * ndi.gaussian_gradient_magnitude(grey, s, mode="nearest"),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(geo[f"orient_cos_{k}"], gain * (lx**2 - ly**2) / np.maximum(mag, 1e-12), rtol=0, atol=1e-5)
    np.testing.assert_allclose(geo[f"orient_sin_{k}"], gain * 2 * lx * ly / np.maximum(mag, 1e-12), rtol=0, atol=1e-5)
    np.testing.assert_allclose(geo[f"blob_{k}"], -2 * s**2 * ndi.gaussian_laplace(grey, s, mode="nearest"),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.real_data
def test_ridges_match_skimage_sato_and_hessian_eigenvalues(real, sigma):
    """ridge_bright / ridge_dark = 3 sqrt(3) / 2 x skimage.filters.sato(black_ridges=False / True).

    sato builds its Hessian from two first-order Gaussian derivatives at sigma / sqrt(2); this bank uses scipy's
    second-order kernels at sigma. Against sato: Pearson r >= 0.99 at sigma 1 (measured 0.994-0.997), >= 0.999
    at sigma 2 and 4 (measured >= 0.9997), away from a border of 3 sigma. Against skimage.feature's
    hessian_matrix_eigvals of scipy's second-order Gaussian derivatives: max |diff| <= 1e-5."""
    from scipy import ndimage as ndi
    from skimage.feature import hessian_matrix_eigvals
    from skimage.filters import sato

    _, grey, _, geo, _ = real
    s, k, gain = sigma, f"s{sigma:g}", 3 * math.sqrt(3) / 2
    bright, dark = geo[f"ridge_bright_{k}"], geo[f"ridge_dark_{k}"]
    floor = 0.99 if sigma == 1 else 0.999
    margin = int(3 * s) + 1
    assert pearson(bright, gain * sato(grey, [s], black_ridges=False, mode="nearest"), margin) >= floor
    assert pearson(dark, gain * sato(grey, [s], black_ridges=True, mode="nearest"), margin) >= floor

    hessian = [ndi.gaussian_filter(grey, s, order=o, mode="nearest") for o in ((2, 0), (1, 1), (0, 2))]
    l_max, l_min = hessian_matrix_eigvals(hessian)
    np.testing.assert_allclose(bright, gain * s**2 * np.maximum(-l_min, 0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(dark, gain * s**2 * np.maximum(l_max, 0), rtol=0, atol=1e-5)


@pytest.mark.real_data
def test_coherence_matches_skimage_structure_tensor(real):
    """(mu1 - mu2) / (mu1 + mu2 + eps) from skimage.feature.structure_tensor (Sobel, Gaussian rho, 'nearest') +
    structure_tensor_eigenvalues: max |diff| <= 1e-4 over the whole image (values in [0, 1))."""
    from skimage.feature import structure_tensor, structure_tensor_eigenvalues

    _, grey, _, geo, _ = real
    for rho in (1, 2, 4):
        mu1, mu2 = structure_tensor_eigenvalues(structure_tensor(grey, sigma=rho, mode="nearest", order="rc"))
        eps = 64 * (1 / 255) ** 2  # ndi.sobel is 8 x the per-pixel derivative, so the tensor is 64 x ours
        np.testing.assert_allclose(geo[f"coherence_r{rho}"], (mu1 - mu2) / (mu1 + mu2 + eps), rtol=0, atol=1e-4)


@pytest.mark.real_data
def test_gabor_energy_matches_skimage_gabor(real):
    """|skimage.filters.gabor| x 4, mode 'nearest'. At 0 and 90 degrees skimage's kernel box is the bank's
    (radius ceil(3 sigma)): max |diff| <= 1e-5. On the diagonals skimage shrinks its box to 2.1 sigma; with
    n_stds = 3 sqrt(2) it has the bank's box and max |diff| <= 1e-5; with its default box Pearson r >= 0.9
    (measured 0.933-0.997, lowest at the lowest frequency), away from a border of 3 sigma."""
    from skimage.filters import gabor

    from backbone_router.extractors.filters import GABOR_BANDWIDTH_SIGMA

    _, grey, _, _, tex = real
    for f in GABOR_FREQUENCIES:
        for theta in GABOR_THETAS:
            mine = tex[f"gabor_f{f:g}_o{theta}"]
            n_stds = 3 if theta % 90 == 0 else 3 * math.sqrt(2)
            re, im = gabor(grey, f, theta=math.radians(theta), n_stds=n_stds, mode="nearest")
            np.testing.assert_allclose(mine, 4 * np.hypot(re, im), rtol=0, atol=1e-5, err_msg=f"f={f}, theta={theta}")
            if theta % 90:
                re, im = gabor(grey, f, theta=math.radians(theta), mode="nearest")
                margin = math.ceil(3 * GABOR_BANDWIDTH_SIGMA / f)
                assert pearson(mine, 4 * np.hypot(re, im), margin) >= 0.9, (f, theta)


@pytest.mark.real_data
def test_local_mean_and_contrast_match_scipy_uniform_filter(real):
    """mean_w5 = uniform_filter(5); contrast_w = 2 sqrt(uniform_filter(x^2) - uniform_filter(x)^2), mode
    'nearest': max |diff| <= 1e-4 over the whole image (float32 cancellation near zero variance)."""
    from scipy.ndimage import uniform_filter

    _, grey, _, _, tex = real
    np.testing.assert_allclose(tex["mean_w5"], uniform_filter(grey, 5, mode="nearest"), rtol=0, atol=1e-5)
    for w in (5, 15):
        var = uniform_filter(grey**2, w, mode="nearest") - uniform_filter(grey, w, mode="nearest") ** 2
        np.testing.assert_allclose(tex[f"contrast_w{w}"], 2 * np.sqrt(np.maximum(var, 0)), rtol=0, atol=1e-4)


@pytest.mark.real_data
def test_lbp_codes_equal_skimage_local_binary_pattern(real):
    """The one-hot LBP channels encode exactly skimage's local_binary_pattern(P=8, R=1, 'uniform') of the uint8
    greyscale image on every pixel but the outermost ring (skimage reads 0 outside the image, the bank the border)."""
    from skimage.feature import local_binary_pattern

    raw = real[0]
    grey8 = np.asarray(Image.fromarray(raw).convert("L")) if raw.ndim == 3 else raw
    expected = local_binary_pattern(grey8, 8, 1, method="uniform")
    tex = full_res("texture", torch.from_numpy(grey8.copy())[None, None].float() / 255)
    onehot = np.stack([tex[f"lbp_u{k}"] for k in range(9)] + [tex["lbp_nonuniform"]])
    assert (onehot.sum(0) == 1).all()
    np.testing.assert_array_equal(onehot.argmax(0)[1:-1, 1:-1], expected[1:-1, 1:-1])


# ---- the extractor contract -----------------------------------------------------------------------------------
def cell_means(full: torch.Tensor, s: int) -> torch.Tensor:
    """Mean of each s x s cell, the last (partial) cells over the pixels they have: sum / count, by zero padding."""
    h, w = full.shape[-2:]
    pad = (0, (-w) % s, 0, (-h) % s)
    total = F.avg_pool2d(F.pad(full, pad), s, s, divisor_override=1)
    count = F.avg_pool2d(F.pad(torch.ones_like(full[:, :1]), pad), s, s, divisor_override=1)
    return total / count


@pytest.mark.parametrize("bank, channels, family", [("geometric", 21, "geometric"), ("texture", 25, "morphological")])
@pytest.mark.parametrize("size", [(97, 130), (61, 45)])
def test_maps_are_cell_means_of_the_full_resolution_responses(bank, channels, family, size):
    h, w = size
    images = torch.rand(2, 3, h, w)
    every = create_extractor(f"filters:{bank}", layers=[0, 1, 2, 3])
    assert every.info.strides == (1, 2, 4, 8) and every.info.widths == (channels,) * 4
    out = every(images)
    full = out["dense"][0]
    assert full.shape == (2, channels, h, w) and full.dtype == torch.float32 and torch.isfinite(full).all()
    for d, s in zip(out["dense"], every.info.strides):
        assert d.shape == (2, channels, math.ceil(h / s), math.ceil(w / s))
        torch.testing.assert_close(d, cell_means(full, s), rtol=1e-5, atol=1e-6)
    pooled = torch.cat([full.mean((2, 3)), full.std((2, 3), correction=0)], 1)
    torch.testing.assert_close(out["pooled"], pooled)

    default = create_extractor(f"filters:{bank}")
    i = default.info
    assert (i.name, i.family, i.layers, i.strides, i.widths, i.width, i.patch_size, i.mean, i.std) == (
        f"filters:{bank}", family, (1, 2, 3), (2, 4, 8), (channels,) * 3, 2 * channels, 1, (0.0,) * 3, (1.0,) * 3)
    assert len(default.channels) == channels == len(set(default.channels))
    for a, b in zip(default(images)["dense"], out["dense"][1:]):
        torch.testing.assert_close(a, b)
    assert [t.shape[-1] for t in create_extractor(f"filters:{bank}", layers=2)(images)["dense"]] == [
        math.ceil(w / 4), math.ceil(w / 8)]  # an int: the last n strides, as timm's indices


@pytest.mark.parametrize("bank", ["geometric", "texture"])
def test_one_and_three_channel_greys_agree_and_small_images_work(bank):
    ext = create_extractor(f"filters:{bank}", layers=[0, 3])
    grey = torch.rand(2, 1, 61, 45)
    one, three = ext(grey), ext(grey.expand(-1, 3, -1, -1))
    for a, b in zip(one["dense"] + [one["pooled"]], three["dense"] + [three["pooled"]]):
        assert torch.equal(a, b)
    tiny = ext(torch.rand(1, 3, 5, 3))  # smaller than every kernel: the border is replicated, not reflected
    assert [tuple(t.shape[-2:]) for t in tiny["dense"]] == [(5, 3), (1, 1)]


def test_no_parameters_and_the_contract_on_weights():
    for bank in ("geometric", "texture"):
        a = create_extractor(f"filters:{bank}", pretrained=True)
        b = create_extractor(f"filters:{bank}", pretrained=False)
        assert list(a.parameters()) == [] and a.state_dict() == {} and a.block_modules() == []
        assert a.unfreeze_last(0) is a and a.frozen and a.freeze().train().training
        images = torch.rand(1, 3, 33, 40)
        torch.testing.assert_close(a(images)["pooled"], b(images)["pooled"], rtol=0, atol=0)
        assert create_extractor(f"filters:{bank}", family="semantic").info.family == "semantic"
    assert "filters:" in list_extractors()
    with pytest.raises(ValueError, match=r"unknown filter bank 'nope'.*'filters:geometric', 'filters:texture'"):
        create_extractor("filters:nope")
    with pytest.raises(ValueError, match="no weights, so checkpoint="):
        create_extractor("filters:geometric", checkpoint="w.safetensors")
    with pytest.raises(ValueError, match=r"unexpected arguments \['sigma'\]"):
        create_extractor("filters:texture", sigma=3)
    with pytest.raises(ValueError, match="index 4 is outside the 4 blocks"):
        create_extractor("filters:texture", layers=[4])


def test_router_with_a_filter_bank_and_a_tiny_vit_builds_runs_and_reloads(tmp_path):
    config = RouterConfig.from_dict({
        "extractors": [
            {"spec": "filters:geometric", "name": "geo"},
            {"spec": "filters:texture", "name": "tex", "layers": [3]},
            {"spec": "timm:vit_small_patch14_dinov2", "name": "vit", "pretrained": False,
             "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}},
        ],
        "tasks": [{"name": "seg", "type": "seg", "classes": ["bg", "crack"]},
                  {"name": "cls", "type": "cls", "classes": ["a", "b", "c"]}],
        "fusion": "gated", "width": 16, "levels": [4, 8, 16],
        "gate": {"granularity": "image", "hidden": 16}, "head": {"seg_hidden": 16, "cls_hidden": 16},
    })
    model = Router(config).eval()
    assert model.extractors["geo"].info.family == "geometric" and model.extractors["tex"].info.family == "morphological"
    images = torch.rand(2, 3, 61, 45)
    with torch.no_grad():
        seg, cls = model(images, task="seg"), model(images, task="cls")
    assert seg["seg"].shape == (2, 2, 61, 45) and seg["gate"].shape == (2, 3) and cls["cls"].shape == (2, 3)
    model.save_pretrained(tmp_path / "m")
    loaded = Router.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, task="seg")["seg"], seg["seg"])
