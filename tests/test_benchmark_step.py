"""train/benchmark.py --train-step: the comparison's training step of a routed pyramid from cached features next to
the U-Net peers, on configs/compare_tiny.yaml with a four-level pyramid (tiny random extractors, synthetic task
classes): what the profile and FLOP breakdown add up to, the option agreement, and the random features' shapes.
No timing is asserted."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import script_main

from backbone_router.extractors import create_extractor
from backbone_router.router import Router
from backbone_router.train.experiments.benchmarking import Settings, part_labels, random_features

REPO = Path(__file__).resolve().parents[1]
PYRAMID = ["model.levels=[4,8,16,32]", "model.head.aux_weight=0.4"]


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    """compile with dynamo's `eager` backend (graph capture, no code generation: seconds instead of minutes)."""
    out = tmp_path_factory.mktemp("step") / "step.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Settings, "compile_backend", "eager")
        script_main("benchmark")(["--train-step", "--config", str(REPO / "configs/compare_tiny.yaml"), "--variant",
                                  "gated_image", "--batch-sizes", "2", "--resolutions", "40", "--warmup", "0", "--reps",
                                  "2", "--threads", "1", "--features", "random", "--ablate", "bf16", "channels_last",
                                  "compile", "--out", str(out), *PYRAMID])
    torch._dynamo.reset()
    return json.loads(out.read_text())


def test_the_routed_step_and_both_peers_are_measured_at_one_batch_and_crop(summary):
    (size,) = summary["sizes"]
    assert (size["batch"], size["resolution"], size["task"]) == (2, 40, "shape_seg")
    assert list(size["models"]) == ["routed", "peer_unet_frozen", "peer_unet_finetuned"]
    assert summary["features"] == "random" and summary["variant"] == "gated_image"
    for name, ratio in size["ratios"].items():
        peer = name.removeprefix("routed_over_")
        assert math.isclose(ratio, size["models"]["routed"]["median_s"] / size["models"][peer]["median_s"])
    goal = summary["goals"]["routed_over_peer_unet_frozen"]
    assert goal["value"] == size["ratios"]["routed_over_peer_unet_frozen"] and goal["met"] == (goal["value"] <= 0.5)


def test_the_profile_splits_each_step_into_its_parts(summary):
    (size,) = summary["sizes"]
    for name, r in size["models"].items():
        parts = r["parts"]
        assert math.isclose(sum(p["share"] for p in parts.values()), 1.0, abs_tol=1e-9)
        assert math.isclose(sum(p["seconds"] for p in parts.values()), r["profiled_step_s"], rel_tol=1e-9)
        for part in ("decoder", "heads", "loss", "backward", "clip", "optimizer"):
            assert parts[part]["seconds"] > 0, (name, part)
    routed = size["models"]["routed"]["parts"]
    assert all(routed[p]["seconds"] > 0 for p in ("align", "gate", "fuse", "detail")) and "encoder" not in routed
    assert size["models"]["peer_unet_frozen"]["parts"]["encoder"]["seconds"] > 0 and "align" not in size["models"][
        "peer_unet_frozen"]["parts"]


def test_the_flops_of_the_parts_add_up_to_the_step(summary):
    """With the features given, every matmul / conv of the Router's forward is in one of its module parts (a U-Net's
    in its encoder, decoder or head): nothing is left to "other"; the backward's FLOPs are the step's minus the
    forward's; a frozen encoder computes no weight gradients, so the fine-tuned peer's step costs more."""
    (size,) = summary["sizes"]
    for name, r in size["models"].items():
        parts = r["parts"]
        assert parts["other"]["flops"] == 0 and r["flops_forward"] > 0, name
        assert sum(p["flops"] for k, p in parts.items() if k != "backward") == r["flops_forward"]
        assert parts["backward"]["flops"] == r["flops_step"] - r["flops_forward"] > 0
        assert parts["loss"]["flops"] == parts["optimizer"]["flops"] == 0  # elementwise: not counted
    routed = size["models"]["routed"]["parts"]
    assert all(routed[p]["flops"] > 0 for p in ("align", "gate", "detail", "decoder", "heads"))
    frozen, tuned = size["models"]["peer_unet_frozen"], size["models"]["peer_unet_finetuned"]
    assert frozen["flops_forward"] == tuned["flops_forward"] and frozen["flops_step"] < tuned["flops_step"]
    assert frozen["params_trained"] < tuned["params_trained"]


def test_channels_last_and_compile_are_exact_to_float32_rounding_and_bf16_is_not(summary):
    (size,) = summary["sizes"]
    cl, bf = size["options"]["channels_last"]["agreement"], size["options"]["bf16"]["agreement"]
    assert cl["output_max_rel"] < 1e-5 and cl["grad_rel_norm"] < 1e-5
    compiled = size["options"]["compile"]
    assert compiled["agreement"]["output_max_rel"] < 1e-5 and compiled["agreement"]["grad_rel_norm"] < 1e-5
    assert compiled["first_call_s"] > 0 and "first_call_s" not in size["options"]["bf16"]
    assert bf["output_max_rel"] > 1e-4 and bf["grad_rel_norm"] > 1e-4  # bf16 keeps 8 bits of mantissa: it did run
    for o in size["options"].values():
        assert math.isclose(o["speedup"], o["fp32_median_s"] / o["median_s"])
    assert set(size["optimizer_step_s"]) == {"single_tensor", "foreach", "fused", "train/training/optim.py"}


@pytest.mark.parametrize("spec, kwargs, layers", [
    ("timm:vit_small_patch14_dinov2", {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}, 2),
    ("timm:mobilenetv2_100", {}, [1, 2, 3, 4]),
    ("filters:geometric", {}, [2, 3]),
])
def test_random_features_have_the_shapes_the_extractor_gives(spec, kwargs, layers):
    ext = create_extractor(spec, layers=layers, pretrained=False, **kwargs).eval()
    with torch.no_grad():
        real = ext(torch.rand(3, 3, 37, 50))
    fake = random_features(ext.info, 3, (37, 50), torch.Generator().manual_seed(0))
    assert [d.shape for d in fake["dense"]] == [d.shape for d in real["dense"]]
    assert fake["pooled"].shape == real["pooled"].shape


def test_part_labels_leave_the_model_as_it_was():
    model = Router.from_config("configs/tiny.yaml")
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x, task="demo_seg")["seg"]
    with part_labels(model), torch.no_grad():
        assert "_fuse" in model.__dict__
        torch.testing.assert_close(model(x, task="demo_seg")["seg"], before, rtol=0, atol=0)
    assert "_fuse" not in model.__dict__ and "_fuse_pooled" not in model.__dict__
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
