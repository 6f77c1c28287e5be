"""router.align.LevelAligner's batched projection (taps projected at one resolution share one convolution) against
the per-tap projection it replaced (issue 28): the same outputs and gradients, the same parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from backbone_router.extractors import ExtractorInfo
from backbone_router.router.align import Aligner, LevelAligner, resample, shrink

# float64: the math is the same, so the stated tolerance holds with a wide margin (differences ~1e-15). float32: the
# outputs hold it too; a weight gradient is a sum over B x h x w positions whose order the one larger convolution
# changes, so its elements differ by float32 rounding of that sum (up to ~3e-6 here): atol 1e-5 there.
RTOL, ATOL = 1e-5, 1e-6
GRAD_ATOL = {torch.float64: 1e-6, torch.float32: 1e-5}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def per_tap_forward(al: LevelAligner, dense: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """The code before the batching: one 1x1 convolution per tap on its slice of the weights, summed."""
    weights = al.proj.weight.split(al.widths, dim=1)
    x = None
    for k, (tap, w) in enumerate(zip(al.taps, weights, strict=True)):
        d = dense[tap.index]
        if tap.factor:
            y = resample(al.reassemble[str(k)](F.conv2d(d, w)), grid)
        elif d.shape[-2] <= grid[0] and d.shape[-1] <= grid[1]:
            y = resample(F.conv2d(d, w), grid)
        else:
            y = F.conv2d(resample(d, grid), w)
        x = y if x is None else x + y
    return al.norm(x + al.proj.bias.view(1, -1, 1, 1))


CNN = ExtractorInfo("cnn", 40, (8, 16, 24, 40), (4, 8, 16, 32), 32, (1, 2, 3, 4), (0.5,) * 3, (0.5,) * 3)
VIT = ExtractorInfo("vit", 24, (24,) * 4, (16,) * 4, 16, (2, 5, 8, 11), (0.5,) * 3, (0.5,) * 3)
FILTERS = ExtractorInfo("bank", 6, (6, 6), (4, 8), 8, (0, 1), (0.5,) * 3, (0.5,) * 3)  # two strides, borrowed levels


def aligner_cases(info: ExtractorInfo, image: tuple[int, int]):
    """(name, LevelAligner, grid) of every level of a 4-32 pyramid and of classification's own map at stride 16."""
    levels = [4, 8, 16, 32]
    al = Aligner(info, levels, [8, 8, 16, 16], pooled_width=16, cls_width=16)
    grids = [(-(-image[0] // s), -(-image[1] // s)) for s in levels]
    cases = [(f"level {s}", la, g) for s, la, g in zip(levels, al.levels.values(), grids)]
    return [*cases, ("cls", al.cls, grids[2])]


@pytest.mark.parametrize("info", [CNN, VIT, FILTERS], ids=["cnn", "vit", "filters"])
@pytest.mark.parametrize("image", [(64, 64), (61, 90)], ids=["square", "odd"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_batched_projection_equals_per_tap(info, image, dtype):
    torch.manual_seed(0)
    dense = [torch.randn(2, w, -(-image[0] // s), -(-image[1] // s), dtype=dtype)
             for w, s in zip(info.widths, info.strides)]
    multi_tap = 0
    for name, al, grid in aligner_cases(info, image):
        al.to(dtype)
        multi_tap += len(al.taps) > 1
        outs, grads = [], []
        for forward in (per_tap_forward, lambda m, d, g: m(d, g)):
            inputs = [d.clone().requires_grad_(True) for d in dense]
            al.zero_grad(set_to_none=True)
            y = forward(al, inputs, grid)
            (y * torch.linspace(-1, 1, y.numel(), dtype=dtype).view_as(y)).sum().backward()
            outs.append(y.detach())
            grads.append({**{n: p.grad for n, p in al.named_parameters() if p.grad is not None},
                          **{f"input {i}": d.grad for i, d in enumerate(inputs) if d.grad is not None}})
        assert_close(outs[1], outs[0], ATOL, f"{info.name} {name}: outputs")
        assert grads[1].keys() == grads[0].keys()
        for key, ref in grads[0].items():
            assert_close(grads[1][key], ref, GRAD_ATOL[dtype], f"{info.name} {name}: {key}")
    assert multi_tap  # classification's map reads every tap: the batched path is exercised


def test_parameters_and_state_dict_keys_unchanged():
    al = Aligner(CNN, [4, 8, 16, 32], [8, 8, 16, 16], pooled_width=16, cls_width=16)
    assert [(n, tuple(p.shape)) for n, p in al.cls.named_parameters()] == [
        ("proj.weight", (16, 88, 1, 1)), ("proj.bias", (16,)), ("norm.weight", (16,)), ("norm.bias", (16,))]
    vit = Aligner(VIT, [4, 8, 16, 32], [8, 8, 16, 16], pooled_width=16)
    assert sorted(vit.state_dict()) == sorted(
        [f"levels.{s}.{k}" for s in (4, 8, 16, 32) for k in ("proj.weight", "proj.bias", "norm.weight", "norm.bias")]
        + ["levels.4.reassemble.0.weight", "levels.4.reassemble.0.bias", "levels.8.reassemble.0.weight",
           "levels.8.reassemble.0.bias", "levels.32.reassemble.0.0.weight", "levels.32.reassemble.0.0.bias"]
        + ["pooled_proj.0.weight", "pooled_proj.0.bias", "pooled_proj.1.weight", "pooled_proj.1.bias"])


@pytest.mark.parametrize("sizes", [((64, 64), (16, 16)), ((61, 90), (16, 23)), ((64, 64), (63, 20)),
                                   ((9, 40), (12, 10)), ((256, 256), (16, 16))], ids=str)
def test_shrink_is_resample(sizes):
    """align.shrink (two matrix products) is resample's anti-aliased bilinear shrinking, also where one side grows."""
    (h, w), size = sizes
    x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(shrink(x, size), resample(x, size), rtol=RTOL, atol=ATOL)
    (g_new,) = torch.autograd.grad(shrink(x, size).square().sum(), x)
    (g_old,) = torch.autograd.grad(resample(x, size).square().sum(), x)
    torch.testing.assert_close(g_new, g_old, rtol=RTOL, atol=ATOL)
    y = x.detach().float()
    torch.testing.assert_close(shrink(y, size), resample(y, size), rtol=RTOL, atol=ATOL)
    z = y.bfloat16()
    assert torch.equal(shrink(z, size), resample(z, size))  # bf16: resample itself
