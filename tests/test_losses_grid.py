"""Losses of segmentation logits on a coarser grid than the target (heads.losses, issue 28: the auxiliary head scored
on its own grid, ``head.aux_on_grid``): exactly the loss of those logits nearest-upsampled to the target's size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_levels import make_config

from backbone_router.heads.losses import build_loss
from backbone_router.router import Router
from backbone_router.router.align import grid_size
from backbone_router.router.outputs import output_loss

SPECS = [
    "ce",
    {"name": "ce", "class_weights": [1.0, 2.0, 0.5], "label_smoothing": 0.1},
    {"name": "dice", "per_image": True},
    {"name": "dice", "classes": "all", "smooth": 0.0},
    {"name": "tversky", "alpha": 0.3, "beta": 0.7},
    {"name": "focal", "gamma": 2.0, "alpha": [0.2, 0.5, 0.3]},
    [{"name": "ce"}, {"name": "dice", "per_image": True}],
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: str(s))
@pytest.mark.parametrize("sizes", [((4, 4), (64, 64)), ((5, 7), (61, 90))], ids=["divides", "odd"])
def test_coarse_logits_score_as_nearest_upsampled(spec, sizes):
    (h, w), (height, width) = sizes
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 3, (2, height, width), generator=gen)
    target[0, :9, :13] = 255  # ignored pixels
    loss = build_loss(spec)
    coarse = loss(logits, target, ignore_index=255)["loss"]
    (g_coarse,) = torch.autograd.grad(coarse, logits)
    full = loss(F.interpolate(logits, size=(height, width), mode="nearest"), target, ignore_index=255)["loss"]
    (g_full,) = torch.autograd.grad(full, logits)
    torch.testing.assert_close(coarse, full, rtol=1e-5, atol=1e-6)  # float32 inside the losses: summation order
    torch.testing.assert_close(g_coarse, g_full, rtol=1e-5, atol=1e-6)


def test_bce_on_two_classes_and_all_ignored():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 2, 4, 4, generator=gen, requires_grad=True)
    target = torch.randint(0, 2, (2, 32, 32), generator=gen)
    loss = build_loss({"name": "bce", "pos_weight": 3.0})
    up = F.interpolate(logits, size=(32, 32), mode="nearest")
    torch.testing.assert_close(loss(logits, target)["loss"], loss(up, target)["loss"], rtol=1e-5, atol=1e-6)
    value = build_loss(["ce", "dice"])(logits, torch.full_like(target, 255), ignore_index=255)["loss"]
    value.backward()
    assert value.item() == 0.0 and logits.grad.abs().max().item() == 0.0


def test_coarse_logits_errors():
    logits, target = torch.randn(1, 2, 4, 4), torch.randint(0, 2, (1, 16, 16))
    with pytest.raises(ValueError, match="hard negatives"):
        build_loss({"name": "bce", "neg_ratio": 3.0})(logits, target)
    with pytest.raises(ValueError, match="TotalVariationLoss: needs logits at the target's size"):
        build_loss("tv")(logits, target)
    with pytest.raises(ValueError, match="target has shape"):  # finer logits than the target stay an error
        build_loss("ce")(torch.randn(1, 2, 32, 32), target)
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 2\)"):
        build_loss("ce")(logits, torch.full_like(target, 3))


def test_auxiliary_head_on_its_grid_scores_as_nearest_upsampled():
    """head.aux_on_grid (issue 28, off by default): ``seg_aux`` stays on the auxiliary head's stride-16 grid and the
    task loss scores it against each cell's class counts: the loss of those logits nearest-upsampled to the image
    (ignored pixels left out); the main head's logits and the weights are those of the model without the option."""
    torch.manual_seed(0)
    head = {"seg_hidden": 16, "cls_hidden": 16, "cls_taps": "level", "dropout": 0.0}
    model = Router(make_config(head={**head, "aux_on_grid": True})).train()
    base = Router(make_config(head=head)).train()
    base.load_state_dict(model.state_dict())
    x, target = torch.rand(2, 3, 61, 45), torch.randint(0, 2, (2, 61, 45))
    target[1, :10] = 255
    out, ref = model(x, task="seg_a"), base(x, task="seg_a")
    assert out["seg_aux"].shape == (2, 2, *grid_size((61, 45), 16)) and ref["seg_aux"].shape == (2, 2, 61, 45)
    torch.testing.assert_close(out["seg"], ref["seg"])
    loss_fn = build_loss([{"name": "ce"}, {"name": "dice", "per_image": True}])
    loss = output_loss(out, "seg", loss_fn, target, ignore_index=255, aux_weight=0.4)
    nearest = F.interpolate(out["seg_aux"], size=(61, 45), mode="nearest")
    expected = (loss_fn(out["seg"], target, ignore_index=255)["loss"]
                + 0.4 * loss_fn(nearest, target, ignore_index=255)["loss"])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="head.aux_on_grid: expected bool"):
        make_config(head={"aux_on_grid": "yes"})
