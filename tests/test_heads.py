"""CPU value tests for heads/: SegHead, ClsHead and the losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from backbone_router.heads import (
    LOSSES,
    BinaryCrossEntropyLoss,
    ClsHead,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    SegHead,
    TotalVariationLoss,
    TverskyLoss,
    build_loss,
    hard_negative_mask,
)

IGNORE = 255


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def binary_logits(p1: list[float]) -> torch.Tensor:
    """1 x 2 x 1 x N logits with l0 = 0 and l1 = logit(p1), so softmax foreground = p1."""
    p = torch.tensor(p1, dtype=torch.float64)
    l1 = torch.log(p / (1 - p)).float()
    return rearrange(torch.stack([torch.zeros_like(l1), l1]), "k n -> 1 k 1 n")


# ----------------------------------------------------------------------------------------------------
# cross-entropy / BCE / focal


@pytest.mark.parametrize("class_weights", [None, [0.5, 2.0, 1.0]])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_ce_matches_torch_with_ignore(class_weights, label_smoothing):
    logits = torch.randn(2, 3, 5, 6)
    target = torch.randint(0, 3, (2, 5, 6))
    target[0, :2] = IGNORE
    target[1, 4, 5] = IGNORE
    w = None if class_weights is None else torch.tensor(class_weights)
    ref = F.cross_entropy(logits, target, weight=w, ignore_index=IGNORE, label_smoothing=label_smoothing)
    got = CrossEntropyLoss(class_weights=class_weights, label_smoothing=label_smoothing)(
        logits, target, IGNORE
    )
    torch.testing.assert_close(got, ref)


def test_ce_on_classification_logits():
    logits, target = torch.randn(6, 4), torch.tensor([0, 3, 1, IGNORE, 2, 2])
    torch.testing.assert_close(
        CrossEntropyLoss()(logits, target, ignore_index=IGNORE),
        F.cross_entropy(logits, target, ignore_index=IGNORE),
    )


def test_bce_pos_weight_matches_torch_on_foreground_logit():
    logits = torch.randn(2, 2, 7, 5)
    target = torch.randint(0, 2, (2, 7, 5))
    target[1, 3:] = IGNORE
    valid = target != IGNORE
    z = logits[:, 1] - logits[:, 0]
    ref = F.binary_cross_entropy_with_logits(z[valid], target[valid].float(), pos_weight=torch.tensor(4.0))
    got = BinaryCrossEntropyLoss(pos_weight=4.0)(logits, target, ignore_index=IGNORE)
    torch.testing.assert_close(got, ref)
    # sigmoid(l1 - l0) is the softmax foreground probability
    torch.testing.assert_close(torch.sigmoid(z), logits.softmax(1)[:, 1])


def test_bce_rejects_multiclass_logits():
    with pytest.raises(ValueError, match="K=3"):
        BinaryCrossEntropyLoss()(torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_focal_gamma0_equals_ce_and_hand_value():
    logits = torch.randn(3, 4, 6, 6)
    target = torch.randint(0, 4, (3, 6, 6))
    target[2] = IGNORE
    torch.testing.assert_close(
        FocalLoss(gamma=0.0)(logits, target, IGNORE), F.cross_entropy(logits, target, ignore_index=IGNORE)
    )
    # one position, target prob 0.8, gamma 2, binary alpha 0.25 on the foreground
    lg = binary_logits([0.8])
    t = torch.ones(1, 1, 1, dtype=torch.long)
    expected = -0.25 * (0.2**2) * math.log(0.8)
    assert FocalLoss(gamma=2.0, alpha=0.25)(lg, t).item() == pytest.approx(expected, rel=1e-5)
    # background target gets weight 1 - alpha
    expected_bg = -0.75 * (0.8**2) * math.log(0.2)
    assert FocalLoss(gamma=2.0, alpha=0.25)(lg, t * 0).item() == pytest.approx(expected_bg, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# Dice / Tversky / TV


def test_dice_zero_for_confident_correct_logits():
    target = torch.randint(0, 3, (2, 9, 11))
    logits = 30.0 * rearrange(F.one_hot(target, 3).float(), "b h w k -> b k h w")
    for classes in ("foreground", "all"):
        for per_image in (False, True):
            loss = DiceLoss(classes=classes, per_image=per_image, smooth=0.0)(logits, target)
            assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # and wrong confident logits give the maximum
    wrong = 30.0 * torch.tensor([1.0, -1.0])[None, :, None, None].expand(2, 2, 9, 11)  # all background
    fg = torch.ones(2, 9, 11, dtype=torch.long)
    assert DiceLoss(smooth=0.0)(wrong, fg).item() == pytest.approx(1.0, abs=1e-6)


def test_dice_hand_computed():
    logits = binary_logits([0.9, 0.2, 0.6, 0.1])
    target = torch.tensor([[[1, 0, 1, 1]]])
    # TP = 0.9 + 0.6 + 0.1 = 1.6, sum p = 1.8, sum g = 3
    assert DiceLoss(smooth=0.0)(logits, target).item() == pytest.approx(1 - 3.2 / 4.8, rel=1e-5)
    assert DiceLoss(smooth=1.0)(logits, target).item() == pytest.approx(1 - 4.2 / 5.8, rel=1e-5)
    # ignoring the last pixel: TP = 1.5, sum p = 1.7, sum g = 2
    target_ign = torch.tensor([[[1, 0, 1, IGNORE]]])
    assert DiceLoss(smooth=0.0)(logits, target_ign, IGNORE).item() == pytest.approx(1 - 3.0 / 3.7, rel=1e-5)
    # both classes: background TP = 0.8, sum p = 2.2, sum g = 1 -> dice 1.6 / 3.2
    both = 1 - 0.5 * (3.2 / 4.8 + 1.6 / 3.2)
    assert DiceLoss(classes="all", smooth=0.0)(logits, target).item() == pytest.approx(both, rel=1e-5)


def test_tversky_hand_value_and_equals_dice_at_half():
    logits = binary_logits([0.9, 0.2, 0.6, 0.1])
    target = torch.tensor([[[1, 0, 1, 1]]])
    # TP 1.6, FP 0.2, FN 1.4
    got = TverskyLoss(alpha=0.3, beta=0.7, smooth=0.0)(logits, target).item()
    assert got == pytest.approx(1 - 1.6 / (1.6 + 0.3 * 0.2 + 0.7 * 1.4), rel=1e-5)
    logits = torch.randn(3, 4, 8, 8)
    target = torch.randint(0, 4, (3, 8, 8))
    target[0, :3] = IGNORE
    for kw in ({"classes": "foreground"}, {"classes": "all", "per_image": True}, {"classes": [2]}):
        torch.testing.assert_close(
            TverskyLoss(alpha=0.5, beta=0.5, smooth=0.0, **kw)(logits, target, IGNORE),
            DiceLoss(smooth=0.0, **kw)(logits, target, IGNORE),
        )


def test_total_variation_constant_and_checkerboard():
    target = torch.zeros(2, 6, 7, dtype=torch.long)
    const = torch.randn(2, 2, 1, 1).expand(2, 2, 6, 7)
    assert TotalVariationLoss()(const, target).item() == pytest.approx(0.0, abs=1e-7)
    m = 2.0
    sign = (torch.arange(6)[:, None] + torch.arange(7)[None, :]) % 2 * 2 - 1  # +-1 checkerboard
    logits = torch.stack([torch.zeros(6, 7), m * sign.float()])[None].repeat(2, 1, 1, 1)
    diff = torch.sigmoid(torch.tensor(m)) - torch.sigmoid(torch.tensor(-m))  # = tanh(m / 2)
    assert TotalVariationLoss()(logits, target).item() == pytest.approx(diff.item(), rel=1e-5)
    assert TotalVariationLoss(squared=True)(logits, target).item() == pytest.approx(
        diff.item() ** 2, rel=1e-5
    )
    # ignoring half the rows: remaining pairs all still differ by `diff`, and a constant block adds zeros
    target[:, :3] = IGNORE
    logits[:, 1, :3] = 5.0
    assert TotalVariationLoss()(logits, target, IGNORE).item() == pytest.approx(diff.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# ignore_index edge cases, hard negative mining, build_loss


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_all_ignored_gives_zero_with_grad(name):
    logits = torch.randn(2, 2, 5, 5, requires_grad=True)
    target = torch.full((2, 5, 5), IGNORE)
    out = build_loss(name)(logits, target, ignore_index=IGNORE)
    assert out["loss"].item() == 0.0
    assert out["loss"].grad_fn is not None
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_hard_negative_mining_selects_hardest_negatives():
    # one image, 10 pixels; positives at 1 and 6; negative foreground logits planted
    z = torch.tensor([[0.5, 3.0, -2.0, 2.0, -1.0, 4.0, 1.0, 0.0, 1.5, -3.0]])
    target = torch.tensor([[0, 1, 0, 0, 0, 0, 1, 0, 0, IGNORE]])
    logits = rearrange(torch.stack([torch.zeros_like(z), z]), "k b n -> b k 1 n")
    target = rearrange(target, "b n -> b 1 n")
    # 2 positives, ratio 1.5 -> 3 negatives; the hardest (largest z among negatives) are 5, 3, 8
    loss = BinaryCrossEntropyLoss(neg_ratio=1.5)
    got = loss(logits, target, ignore_index=IGNORE)
    keep = [1, 6, 5, 3, 8]
    y = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    ref = F.binary_cross_entropy_with_logits(z[0, keep], y)
    torch.testing.assert_close(got, ref)
    # the mask itself, plus min_negatives and per-image counts
    per = F.binary_cross_entropy_with_logits(z, (target[:, 0] == 1).float(), reduction="none")
    pos = target[:, 0] == 1
    neg = target[:, 0] == 0
    mask = hard_negative_mask(per, pos, neg, ratio=1.5)
    assert mask[0].nonzero().flatten().tolist() == sorted(keep)
    mask = hard_negative_mask(per, pos, neg, ratio=0.0, min_negatives=4)
    assert mask[0].nonzero().flatten().tolist() == sorted([1, 6, 5, 3, 8, 0])
    # an image with no positives keeps min_negatives; more than available keeps all negatives
    two = hard_negative_mask(
        per.repeat(2, 1),
        torch.stack([pos[0], torch.zeros(10, dtype=torch.bool)]),
        neg.repeat(2, 1),
        ratio=10.0,
        min_negatives=2,
    )
    assert two[0].sum().item() == 2 + 7  # all 7 negatives
    assert two[1].nonzero().flatten().tolist() == [3, 5]


def test_build_loss_total_and_terms():
    logits = torch.randn(2, 2, 6, 6, requires_grad=True)
    target = torch.randint(0, 2, (2, 6, 6))
    target[0, 0] = IGNORE
    loss = build_loss(
        [
            {"name": "ce", "weight": 1.0, "label_smoothing": 0.05},
            {"name": "dice", "weight": 0.5},
            {"name": "bce", "weight": 2.0, "pos_weight": 3.0},
            "tv",
            {"name": "dice", "weight": 0.25, "classes": "all"},
        ]
    )
    out = loss(logits, target, ignore_index=IGNORE)
    assert sorted(out) == ["bce", "ce", "dice", "dice_2", "loss", "tv"]
    expected = out["ce"] + 0.5 * out["dice"] + 2.0 * out["bce"] + out["tv"] + 0.25 * out["dice_2"]
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(
        out["ce"], F.cross_entropy(logits.detach(), target, ignore_index=IGNORE, label_smoothing=0.05)
    )
    assert all(not out[k].requires_grad for k in out if k != "loss")
    out["loss"].backward()
    assert logits.grad.abs().sum() > 0


def test_build_loss_errors_name_the_problem():
    with pytest.raises(ValueError, match="'lovasz'"):
        build_loss("lovasz")
    with pytest.raises(ValueError, match="'gama'"):
        build_loss([{"name": "focal", "gama": 2.0}])
    with pytest.raises(ValueError, match="'name'"):
        build_loss([{"weight": 1.0}])
    with pytest.raises(ValueError, match=r"target has shape \(2, 4, 4\), expected \(2, 5, 5\)"):
        build_loss("ce")(torch.randn(2, 3, 5, 5), torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        build_loss("ce")(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 7))


# ----------------------------------------------------------------------------------------------------
# SegHead


def test_seg_bias_init_gives_prior_probability():
    head = SegHead(16, {"lesion": 2, "organs": 3})
    head.init_bias_from_prior("lesion", 0.03)
    b = head.outputs["lesion"].bias
    assert (b[1] - b[0]).item() == pytest.approx(math.log(0.03 / 0.97), rel=1e-5)
    head.init_bias_from_prior("organs", [5.0, 3.0, 2.0])
    with torch.no_grad():
        head.outputs["lesion"].weight.zero_()
        head.outputs["organs"].weight.zero_()
    x = torch.randn(2, 16, 5, 6)
    p = head(x, "lesion", out_size=(20, 24)).softmax(1)
    torch.testing.assert_close(p[:, 1], torch.full((2, 20, 24), 0.03), atol=1e-6, rtol=0)
    p = head(x, "organs", out_size=(5, 6)).softmax(1)
    torch.testing.assert_close(p, torch.tensor([0.5, 0.3, 0.2])[None, :, None, None].expand(2, 3, 5, 6))
    with pytest.raises(ValueError, match="2-class"):
        head.init_bias_from_prior("organs", 0.1)
    with pytest.raises(ValueError, match="expected 3 class frequencies"):
        head.init_bias_from_prior("organs", [0.5, 0.5])


def test_seg_output_size_and_class_counts():
    head = SegHead(16, {"a": 2, "b": 5}, hidden=8, depth=2, dropout=0.1)
    x = torch.randn(3, 16, 7, 9)
    assert head(x, "a", out_size=(97, 130)).shape == (3, 2, 97, 130)
    assert head(x, "b", out_size=(97, 130)).shape == (3, 5, 97, 130)
    assert head(x, "b").shape == (3, 5, 7, 9)
    assert head.num_classes == {"a": 2, "b": 5}
    with pytest.raises(KeyError, match="unknown task 'c'"):
        head(x, "c", out_size=(8, 8))
    with pytest.raises(ValueError, match=r"expected B x 16 x h x w"):
        head(torch.randn(3, 8, 7, 9), "a", out_size=(8, 8))


def test_separable_trunk_is_depthwise_plus_pointwise_with_the_same_contract():
    conv = SegHead(32, {"a": 2}, hidden=32, depth=2)
    sep = SegHead(32, {"a": 2}, hidden=32, depth=2, trunk="separable")
    depthwise = [m for m in sep.trunk if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert [(m.groups, m.kernel_size) for m in depthwise] == [(32, (3, 3)), (32, (3, 3))]
    trunk_params = lambda h: sum(p.numel() for p in h.trunk.parameters())  # noqa: E731
    # per block: 3x3 conv 32*32*9 + 32 against depthwise 32*9 + 32 and pointwise 32*32 + 32
    assert trunk_params(conv) - 64 == 2 * (32 * 32 * 9 + 32)
    assert trunk_params(sep) - 64 == 2 * (32 * 9 + 32 + 32 * 32 + 32)
    x = torch.randn(2, 32, 7, 9, requires_grad=True)
    out = sep(x, "a", out_size=(97, 130))
    assert out.shape == (2, 2, 97, 130)
    out.sum().backward()
    assert all(p.grad is not None for p in sep.trunk.parameters())
    with pytest.raises(ValueError, match="SegHead.trunk: expected one of"):
        SegHead(32, {"a": 2}, trunk="dense")


def test_seg_upsampling_is_bilinear_of_grid_logits():
    head = SegHead(8, {"a": 3}).eval()
    x = torch.randn(1, 8, 4, 5)
    grid = head(x, "a")
    up = head(x, "a", out_size=(33, 41))
    torch.testing.assert_close(up, F.interpolate(grid, size=(33, 41), mode="bilinear", align_corners=False))


def test_seg_multi_layer_input_is_resampled_sum():
    head = SegHead(8, {"a": 2}).eval()
    x, y, small = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6), torch.randn(2, 8, 3, 3)
    torch.testing.assert_close(head([x, y], "a", (12, 12)), head(x + y, "a", (12, 12)))
    resampled = F.interpolate(small, size=(6, 6), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head([x, small], "a", (12, 12)), head(x + resampled, "a", (12, 12)))


def test_seg_add_task_and_gradients_reach_trunk():
    head = SegHead(8, {"a": 2}, hidden=8, depth=2)
    head.add_task("b", 4)
    with pytest.raises(ValueError, match="already exists"):
        head.add_task("a", 2)
    x = torch.randn(2, 8, 5, 5)
    assert head(x, "b", out_size=(10, 10)).shape == (2, 4, 10, 10)
    for task in ("a", "b"):
        head.zero_grad(set_to_none=True)
        target = torch.randint(0, head.num_classes[task], (2, 10, 10))
        F.cross_entropy(head(x, task, out_size=(10, 10)), target).backward()
        for p in head.trunk.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0
        other = "b" if task == "a" else "a"
        assert head.outputs[other].weight.grad is None


# ----------------------------------------------------------------------------------------------------
# ClsHead


def test_attention_pooling_is_permutation_invariant_and_matches_reference():
    head = ClsHead(16, {"grade": 4}, pooling="attention", hidden=8, num_heads=2).eval()
    x = torch.randn(3, 16, 5, 7)
    perm = torch.randperm(35)
    shuffled = rearrange(rearrange(x, "b d h w -> b d (h w)")[:, :, perm], "b d (h w) -> b d h w", h=7)
    assert not torch.equal(x, shuffled)
    torch.testing.assert_close(head(x, "grade"), head(shuffled, "grade"), atol=1e-5, rtol=1e-5)
    # reference: softmax(q k^T / sqrt(d_head)) v per head, then the output projection
    attn = head.attn
    tokens = head.token_norm(rearrange(x, "b d h w -> b (h w) d"))
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q = rearrange(head.query @ wq.T + bq, "1 1 (n e) -> n e", n=2)
    k = rearrange(tokens @ wk.T + bk, "b t (n e) -> b n t e", n=2)
    v = rearrange(tokens @ wv.T + bv, "b t (n e) -> b n t e", n=2)
    weights = torch.einsum("ne,bnte->bnt", q, k).div(math.sqrt(8)).softmax(-1)
    pooled = rearrange(torch.einsum("bnt,bnte->bne", weights, v), "b n e -> b (n e)")
    pooled = attn.out_proj(pooled)
    torch.testing.assert_close(head.pool(x), pooled, atol=1e-5, rtol=1e-5)


def test_cls_mean_pooling_with_pooled_vector_concatenates():
    head = ClsHead(16, {"a": 3, "b": 2}, pooling="mean", hidden=8, pooled_dim=12).eval()
    with torch.no_grad():  # non-trivial norm affine params so the reference is not accidentally the same
        for p in (*head.map_norm.parameters(), *head.pooled_norm.parameters()):
            p.normal_()
    x, pooled = torch.randn(2, 16, 4, 4), torch.randn(2, 12)
    mean = x.mean(dim=(2, 3))
    ln = F.layer_norm
    map_part = ln(mean, (16,), head.map_norm.weight, head.map_norm.bias, eps=1e-5)
    vec_part = ln(pooled, (12,), head.pooled_norm.weight, head.pooled_norm.bias, eps=1e-5)
    ref = head.outputs["a"](
        F.gelu(F.linear(torch.cat([map_part, vec_part], 1), head.fc.weight, head.fc.bias))
    )
    torch.testing.assert_close(head(x, "a", pooled=pooled), ref)
    # without the pooled vector its half of the linear input is zero
    ref_none = head.outputs["a"](F.gelu(F.linear(map_part, head.fc.weight[:, :16], head.fc.bias)))
    torch.testing.assert_close(head(x, "a"), ref_none)
    assert head(x, "b", pooled=pooled).shape == (2, 2)
    with pytest.raises(ValueError, match=r"pooled vector has shape \(2, 16\), expected \(2, 12\)"):
        head(x, "a", pooled=torch.randn(2, 16))


def test_cls_add_task_bias_init_and_gradients_reach_shared_mlp():
    for pooling in ("mean", "attention"):
        head = ClsHead(16, {"a": 3}, pooling=pooling, hidden=8)
        head.add_task("b", 5)
        assert head.num_classes == {"a": 3, "b": 5}
        x = torch.randn(4, 16, 3, 3)
        for task in ("a", "b"):
            head.zero_grad(set_to_none=True)
            logits = head(x, task)
            assert logits.shape == (4, head.num_classes[task])
            F.cross_entropy(logits, torch.randint(0, head.num_classes[task], (4,))).backward()
            assert head.fc.weight.grad.abs().sum() > 0
            if pooling == "attention":
                assert head.query.grad.abs().sum() > 0
    head.init_bias_from_prior("b", [1, 1, 2, 0, 4])
    with torch.no_grad():
        head.outputs["b"].weight.zero_()
    probs = head(x, "b").softmax(-1)
    torch.testing.assert_close(probs[0], torch.tensor([0.125, 0.125, 0.25, 1e-6, 0.5]), atol=1e-6, rtol=0)
