"""Multi-level routing: the one-level model unchanged (format-1 outputs within float32 rounding), shapes and gate sums at every level,
top-k skipping, tap assignment, and thin lines that only the multi-level model can segment."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from backbone_router.extractors import ExtractorInfo
from backbone_router.router import Router, RouterConfig
from backbone_router.router.align import assign_taps, grid_size, resample
from backbone_router.router.config import FORMAT_VERSION, HeadConfig, TaskConfig
from backbone_router.router.outputs import output_loss

GOLDEN = Path(__file__).resolve().parent / "data" / "router_v1"
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def make_config(levels=(4, 8, 16, 32), fusion="gated", granularity="image", top_k=None, cnn_layers=(1, 2, 3, 4),
                **extra) -> RouterConfig:
    """Two tiny random ViTs (patch 14 and 16, two blocks each) and a CNN with stride 4-32 stages, two tasks."""
    return RouterConfig.from_dict({
        "extractors": [
            {"spec": "timm:vit_small_patch14_dinov2", "name": "p14", "pretrained": False, "layers": 2,
             "kwargs": {**TINY_VIT, "img_size": 28}},
            {"spec": "timm:vit_small_patch16_224", "name": "p16", "pretrained": False, "kwargs": {**TINY_VIT, "img_size": 32}},
            {"spec": "timm:test_efficientnet", "name": "cnn", "pretrained": False, "layers": list(cnn_layers)},
        ],
        "tasks": [{"name": "seg_a", "type": "seg", "classes": ["bg", "fg"]},
                  {"name": "cls_b", "type": "cls", "classes": ["x", "y", "z"]}],
        "fusion": fusion, "width": 16, "levels": list(levels),
        "gate": {"granularity": granularity, "top_k": top_k, "hidden": 16},
        "head": {"seg_hidden": 16, "cls_hidden": 16},
        **extra,
    })


@pytest.mark.parametrize("name", ["gated_image", "gated_token_concat", "concat"])
def test_format_1_checkpoints_load_as_levels_16_and_give_the_same_outputs(name):
    """Routers saved by the single-grid code (tests/data/router_v1/README.md) load as ``levels: [16]``, with
    the same parameters (renamed, none added or dropped), and reproduce their saved outputs.

    The outputs were saved on another machine and torch build: another BLAS, CPU or thread count sums in
    another order (measured 1.5e-7 to 2.8e-7 apart), so they are compared within float32 rounding
    (rtol 1e-5, atol 1e-6), while a wrong or missing weight moves them by orders of magnitude more."""
    d = GOLDEN / name
    model = Router.from_pretrained(d).eval()
    assert model.config.strides == [16] and model.config.has_detail is False and model.decoder is None
    saved = load_file(str(d / "model.safetensors"))
    own = model.state_dict()
    assert len(own) == len(saved)  # every extractor was saved (random weights): the same number of tensors
    assert sorted(v.shape for v in own.values()) == sorted(v.shape for v in saved.values())
    io = load_file(str(d / "io.safetensors"))
    with torch.no_grad():
        seg, cls = model(io["images"], task="seg_a"), model(io["images"], task="cls_b")
    for got, key in ((seg["seg"], "seg"), (cls["cls"], "cls"), (seg["gate"], "seg_gate"), (cls["gate"], "cls_gate")):
        torch.testing.assert_close(got, io[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{name} {k}: {m}")


def test_levels_16_builds_the_format_1_model_from_a_config():
    """A new config with ``levels: [16]`` (the default head: `cls_taps` and `aux_weight` add nothing at one level), or
    a format-4 one with the old ``stride: 16`` and no `levels`, builds the same modules as format 1."""
    a = make_config(levels=[16])
    old = {k: v for k, v in a.to_dict().items() if k != "levels"}
    old["head"] = {k: v for k, v in old["head"].items() if k not in ("cls_taps", "aux_weight")}
    b = RouterConfig.from_dict({**old, "format_version": 4, "stride": 16, "level_widths": None, "detail": None})
    ref = Router.from_pretrained(GOLDEN / "gated_image")
    for cfg in (a, b):
        cfg.extractors[0].layers, cfg.extractors[1].layers, cfg.extractors[2].layers = None, [0, 1], [2, 3, 4]
        model = Router(cfg)
        assert cfg.strides == [16] and cfg.has_detail is False
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


@pytest.mark.parametrize("granularity", ["task", "image", "token"])
@pytest.mark.parametrize("size,channels", [((97, 130), 3), ((61, 45), 1)])
def test_shapes_at_every_level_and_gates_sum_to_one_per_level(granularity, size, channels):
    torch.manual_seed(0)
    model = Router(make_config(granularity=granularity)).eval()
    assert model.config.has_detail is True and model.config.widths == [16, 16, 16, 16]
    images = torch.rand(2, channels, *size)
    with torch.no_grad():
        out = model(images, task="seg_a")
        cls = model(images, task="cls_b")
    assert out["seg"].shape == (2, 2, *size) and cls["cls"].shape == (2, 3)
    gate_grid = (math.ceil(size[0] / 16), math.ceil(size[1] / 16))
    expected = (2, 4, 3) + (gate_grid if granularity == "token" else ())
    assert tuple(out["gate_levels"].shape) == expected
    torch.testing.assert_close(out["gate_levels"].sum(dim=2), torch.ones_like(out["gate_levels"].sum(dim=2)))
    torch.testing.assert_close(out["gate"], out["gate_levels"].mean(dim=1))
    assert out["gate_level_mean"].shape == (4, 3)
    # The levels are gated differently (one MLP gives L x E logits, not one row repeated).
    assert not torch.allclose(out["gate_levels"][:, 0], out["gate_levels"][:, 3])
    # Each extractor gives a map at each level's grid.
    ext = model.extractors["cnn"](images)
    grids = [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (4, 8, 16, 32)]
    maps, _ = model.aligners["cnn"](ext["dense"], ext["pooled"], grids)
    assert [tuple(m.shape[-2:]) for m in maps] == grids


@pytest.mark.parametrize("size,channels", [((97, 130), 3), ((61, 45), 1)])
def test_a_stride_2_level_takes_the_cnn_stride_2_stage_and_refines_to_stride_1(size, channels):
    """Round 4's design (docs/levels.md): levels from stride 2 with a CNN's stride-2 stage (timm index 0) at its
    own stride, full 3 x 3 merges and the stride-1 refiner; outputs at the input size, gates sum per level."""
    info = ExtractorInfo("cnn", 64, (8, 24, 32, 48, 64), (2, 4, 8, 16, 32), 32, (0, 1, 2, 3, 4), (0.5,) * 3, (0.5,) * 3)
    got = {s: [(t.index, t.factor) for t in taps] for s, taps in assign_taps(info, [2, 4, 8, 16, 32]).items()}
    assert got == {2: [(0, 0)], 4: [(1, 0)], 8: [(2, 0)], 16: [(3, 0)], 32: [(4, 0)]}
    torch.manual_seed(0)
    cfg = make_config(levels=(2, 4, 8, 16, 32), cnn_layers=(0, 1, 2, 3, 4), level_widths=[8, 16, 16, 16, 16],
                      head={"seg_hidden": 16, "cls_hidden": 16, "decoder_block": "conv", "refine": [1]})
    model = Router(cfg).eval()
    assert model.extractors["cnn"].info.strides == (2, 4, 8, 16, 32)
    images = torch.rand(2, channels, *size)
    with torch.no_grad():
        out = model(images, task="seg_a")
    assert out["seg"].shape == (2, 2, *size) and tuple(out["gate_levels"].shape) == (2, 5, 3)
    torch.testing.assert_close(out["gate_levels"].sum(dim=2), torch.ones(2, 5))
    ext = model.extractors["cnn"](images)
    grids = [(math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in (2, 4, 8, 16, 32)]
    maps, _ = model.aligners["cnn"](ext["dense"], ext["pooled"], grids)
    assert [tuple(m.shape[-2:]) for m in maps] == grids and [m.shape[1] for m in maps] == [8, 16, 16, 16, 16]


@pytest.mark.parametrize("levels, read", [((4, 8, 16, 32), "16"), ((4, 8), "8"), ((8, 32), "32")])
def test_classification_aligns_only_the_level_it_reads(levels, read):
    """Classification aligns (and pools) one level: the one nearest stride 16 (in octaves; the coarser on a tie)."""
    head = {"seg_hidden": 16, "cls_hidden": 16, "cls_taps": "level"}
    model = Router(make_config(levels=levels, head=head)).eval()
    assert model.cls_head.in_dim == model.config.widths[list(levels).index(int(read))]
    assert f"cls_reads_stride={read}" in repr(model)
    calls = []
    for name, aligner in model.aligners.items():
        for s, level in aligner.levels.items():
            level.register_forward_hook(lambda m, i, o, key=(name, s): calls.append(key))
    with torch.no_grad():
        assert model(torch.rand(1, 3, 61, 45), task="cls_b")["cls"].shape == (1, 3)
    assert sorted(calls) == [("cnn", read), ("p14", read), ("p16", read)]


FORMAT_5_KEYS = {"head": {"decoder_output": "fuse", "refine_width": 8, "cls_stride": None},
                 "gate": {"top_k_levels": "shared", "entropy_weight": 0.0}}


def _format_5(config: RouterConfig, head=None, gate=None) -> dict:
    """`config` as a format-5 config.json wrote it: every removed key present at its value then."""
    d = config.to_dict()
    return {**d, "format_version": 5, "head": {**d["head"], **FORMAT_5_KEYS["head"], **(head or {})},
            "gate": {**d["gate"], **FORMAT_5_KEYS["gate"], **(gate or {})}}


def test_format_5_files_load_with_the_removed_keys_at_the_values_the_model_has():
    """A format-5 config.json names every key removed in format 6; at the value today's model behaves as (or one
    that changes nothing for that model) it loads as the same config; any other value, or the key in a format-6
    file, is one error naming the key and the last format that read it."""
    new = make_config()
    assert RouterConfig.from_dict(_format_5(new)) == new
    assert RouterConfig.from_dict(_format_5(new, head={"cls_stride": 16})) == new  # the level nearest 16 anyway
    assert RouterConfig.from_dict(_format_5(new, head={"refine_width": 4})) == new  # no refiner: nothing changes
    assert RouterConfig.from_dict(_format_5(new, gate={"top_k_levels": "each"})) == new  # no top-k: nothing changes
    one = make_config(levels=[16])
    assert RouterConfig.from_dict(_format_5(one, head={"decoder_output": "finest"})) == one  # one level: no decoder
    no_levels = {k: v for k, v in _format_5(new, head={"cls_stride": 16}).items() if k != "levels"}  # the default
    assert RouterConfig.from_dict(no_levels) == new
    concat = make_config(fusion="concat")
    assert RouterConfig.from_dict(_format_5(concat, gate={"entropy_weight": 0.1})) == concat  # no gate
    refused = [({"head": {"cls_stride": 32}}, r"head.cls_stride: 32"),
               ({"head": {"cls_stride": 16.0}}, r"head.cls_stride: 16.0"),
               ({"head": {"decoder_output": "finest"}}, r"head.decoder_output: 'finest'"),
               ({"head": {"refine": [2], "refine_width": 4}}, r"head.refine_width: 4"),
               ({"gate": {"top_k": 1, "top_k_levels": "each"}}, r"gate.top_k_levels: 'each'"),
               ({"gate": {"entropy_weight": 0.1}}, r"gate.entropy_weight: 0.1")]
    for change, message in refused:
        with pytest.raises(ValueError, match=rf"^model: {message} is no longer supported \(.*\); a model that used it "
                                             r"loads in backbone-router before format 6 only$"):
            RouterConfig.from_dict(_format_5(new, **change))
    current = new.to_dict()
    for section, keys in FORMAT_5_KEYS.items():
        for key, value in keys.items():
            with pytest.raises(ValueError, match=rf"^model: {section}.{key}: removed in format 6 \(format 5 was the last "
                                                 r"to read it\); delete the key$"):
                RouterConfig.from_dict({**current, section: {**current[section], key: value}})


def _level_hooks(model: Router) -> list[tuple[str, str]]:
    """Record (extractor, level or "cls") for every aligner of `model` that runs."""
    calls = []
    for name, aligner in model.aligners.items():
        parts = dict(aligner.levels.items()) | ({"cls": aligner.cls} if hasattr(aligner, "cls") else {})
        for key, part in parts.items():
            part.register_forward_hook(lambda m, i, o, k=(name, key): calls.append(k))
    return calls


def test_cls_taps_all_classifies_from_the_one_level_models_map():
    """head.cls_taps: all: a pyramid's classification reads its own aligners' map, every tap resampled onto the
    stride-16 grid, and aligns no level for it. Given the same weights it gives the one-level model's
    classification logits; gradients reach only that aligner."""
    torch.manual_seed(0)
    pyramid = Router(make_config(fusion="mean", head={"seg_hidden": 16, "cls_hidden": 16, "cls_taps": "all"})).eval()
    one = Router(make_config(levels=[16], fusion="mean")).eval()  # the same taps (CNN stages 1-4) on one grid
    assert "cls_taps=all" in repr(pyramid)
    cls_aligner = pyramid.aligners["cnn"].cls
    assert [t.index for t in cls_aligner.taps] == [0, 1, 2, 3] and not any(t.factor for t in cls_aligner.taps)
    state = {k: v for k, v in pyramid.state_dict().items() if k.startswith(("extractors.", "cls_head."))}
    for name in pyramid.extractor_names:
        state |= {f"aligners.{name}.levels.16.{k}": v for k, v in pyramid.aligners[name].cls.state_dict().items()}
        state |= {f"aligners.{name}.pooled_proj.{k}": v for k, v in pyramid.aligners[name].pooled_proj.state_dict().items()}
    missing, unexpected = one.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("seg_head.") for k in missing)
    calls = _level_hooks(pyramid)
    images = torch.rand(2, 3, 61, 45)
    with torch.no_grad():
        torch.testing.assert_close(pyramid(images, task="cls_b")["cls"], one(images, task="cls_b")["cls"])
    assert sorted(calls) == [("cnn", "cls"), ("p14", "cls"), ("p16", "cls")]
    pyramid.train()(images, task="cls_b")["cls"].sum().backward()
    grads = {n for n, p in pyramid.named_parameters() if p.grad is not None and n.startswith("aligners.")}
    assert grads and all(".cls." in n or ".pooled_proj." in n for n in grads)


@pytest.mark.parametrize("granularity, top_k, content", [("image", None, "pixels"), ("token", None, "pixels"),
                                                         ("image", 1, "pixels"), ("token", None, "features")])
def test_cls_taps_all_leaves_segmentation_and_routing_as_they_were(granularity, top_k, content, tmp_path):
    """With the `cls_taps: level` model's weights, the `all` model segments identically; its gate (also one that
    reads the stride-16 level's features) still sums to one per level, top-k still skips, and it saves, loads and
    names the setting in its card."""
    torch.manual_seed(0)
    gate = {"granularity": granularity, "top_k": top_k, "hidden": 16, "content": content}
    base = Router(make_config(gate=gate, head={"seg_hidden": 16, "cls_hidden": 16, "cls_taps": "level"})).eval()
    model = Router(make_config(gate=gate, head={"seg_hidden": 16, "cls_hidden": 16, "cls_taps": "all"})).eval()
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".cls." in k for k in missing)
    images = torch.rand(2, 3, 50, 70)
    with torch.no_grad():
        if top_k:  # every level's choice on "cnn"
            for m in (base, model):
                m.gate.mlp[-1].bias.view(4, 3)[:, 2] += 100.0
        torch.testing.assert_close(model(images, task="seg_a")["seg"], base(images, task="seg_a")["seg"])
        out = model(images, task="cls_b")
    assert out["cls"].shape == (2, 3)
    torch.testing.assert_close(out["gate_levels"].sum(dim=2), torch.ones_like(out["gate_levels"][:, :, 0]))
    assert out["ran"].tolist() == ([False, False, True] if top_k else [True, True, True])
    model.save_pretrained(tmp_path)
    assert "classification reads every tap resampled onto the stride-16 grid (`cls_taps: all`)" in (
        tmp_path / "README.md").read_text()
    with torch.no_grad():
        torch.testing.assert_close(Router.from_pretrained(tmp_path).eval()(images, task="cls_b")["cls"], out["cls"])


@pytest.mark.parametrize("head", [{}, {"cls_taps": "all"}, {"aux_weight": 0.4}])
def test_the_default_head_at_one_level_is_the_one_level_model(head):
    """At one level the level's map already holds every tap and the main seg head reads the stride-16 level:
    `cls_taps: all` and `aux_weight` (the defaults) build nothing more than `level` and 0."""
    torch.manual_seed(0)
    base = Router(make_config(levels=[16], head={"seg_hidden": 16, "cls_hidden": 16, "cls_taps": "level", "aux_weight": 0}))
    torch.manual_seed(0)
    model = Router(make_config(levels=[16], head={"seg_hidden": 16, "cls_hidden": 16, **head}))
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    assert "seg_aux" not in model.train()(torch.rand(1, 3, 40, 40), task="seg_a")


def test_the_defaults_are_the_recommended_pyramid():
    """Extractors and tasks alone give the shipped model (configs/mtd_camvid_flowers.yaml): levels 4-32,
    classification on every tap at stride 16, an auxiliary seg head of weight 0.4 on that map."""
    model = Router.from_config({"extractors": [{"spec": "timm:test_efficientnet", "name": "cnn", "pretrained": False}],
                                "tasks": [{"name": "s", "type": "seg", "classes": ["a", "b"]},
                                          {"name": "c", "type": "cls", "classes": ["x", "y"]}]})
    cfg = model.config
    assert cfg.strides == [4, 8, 16, 32] and cfg.has_detail and cfg.cls_reads_all_taps and cfg.has_aux_head
    assert (cfg.head.cls_taps, cfg.head.aux_weight, cfg.format_version) == ("all", 0.4, FORMAT_VERSION)
    assert model.decoder is not None and model.aux_seg_head is not None and hasattr(model.aligners["cnn"], "cls")
    shipped = RouterConfig.from_file(Path(__file__).resolve().parents[1] / "configs" / "mtd_camvid_flowers.yaml")
    assert (shipped.levels, shipped.head.cls_taps, shipped.head.aux_weight) == (cfg.levels, "all", 0.4)


def test_format_4_configs_read_missing_keys_with_the_old_defaults_and_save_every_key(tmp_path):
    """A format-4 config.json without `levels` (the one grid `stride`), `cls_taps` or `aux_weight` builds the model it
    was saved from: one level, or a pyramid whose classification reads its level and no auxiliary head; the loaded
    model saves format 5 with every key written, and that reads back to the same model."""
    torch.manual_seed(0)
    new = make_config(head={"seg_hidden": 16, "cls_hidden": 16, "cls_taps": "level", "aux_weight": 0})
    old = new.to_dict()
    old["head"] = {k: v for k, v in old["head"].items() if k not in ("cls_taps", "aux_weight")} | {"coarse_logits": False}
    v4 = RouterConfig.from_dict({**old, "format_version": 4})
    assert v4 == new and v4.format_version == FORMAT_VERSION
    one = RouterConfig.from_dict({**{k: v for k, v in old.items() if k != "levels"}, "format_version": 4, "stride": 8})
    assert one.strides == [8] and not one.has_aux_head
    assert RouterConfig.from_dict({**old, "format_version": 4, "levels": None}).strides == [16]  # stride's default
    model = Router(new)
    (tmp_path / "m").mkdir()
    model.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**old, "format_version": 4}))
    loaded = Router.from_pretrained(tmp_path / "m")
    assert loaded.config == new and loaded.aux_seg_head is None and not hasattr(loaded.aligners["cnn"], "cls")
    saved = json.loads((loaded.save_pretrained(tmp_path / "again") / "config.json").read_text())
    assert saved["format_version"] == FORMAT_VERSION and "stride" not in saved
    assert saved["levels"] == [4, 8, 16, 32] and (saved["head"]["cls_taps"], saved["head"]["aux_weight"]) == ("level", 0.0)
    assert set(saved["head"]) == {f.name for f in dataclasses.fields(HeadConfig)}
    assert Router.from_pretrained(tmp_path / "again").config == new


@pytest.mark.parametrize("version", [4, FORMAT_VERSION])
@pytest.mark.parametrize("head, key", [({"coarse_logits": True}, "head.coarse_logits"),
                                       ({"cls_taps": "shared"}, "head.cls_taps")])
def test_removed_options_are_errors_naming_the_key_and_the_last_format(version, head, key):
    """`head.coarse_logits` and `cls_taps: shared` lost their measurements and were removed in format 5: a config (or
    a saved model's config.json) that sets them is refused naming the key and format 4, the last to read it."""
    data = {**make_config().to_dict(), "format_version": version}
    data["head"] = {**data["head"], **head}
    if key == "head.cls_taps":
        message = r"'shared' was removed in format 5 \(format 4 was the last to read it\): it lost its measurements"
    elif version == 4:  # a format that read the key, set to a value the model no longer has
        message = r"True is no longer supported \(.*lost its measurements.*\); a model that used it loads in " \
                  r"backbone-router before format 5 only$"
    else:
        message = r"removed in format 5 \(format 4 was the last to read it\); delete the key$"
    with pytest.raises(ValueError, match=rf"^model: {key}: {message}"):
        RouterConfig.from_dict(data)


def test_stride_is_removed_one_grid_is_levels():
    """`stride` (the one grid before `levels`) is read only from format-4 and older configs; a current one naming it
    is told to write ``levels: [stride]``; `levels: null` is not a one grid any more."""
    data = make_config().to_dict()
    with pytest.raises(ValueError, match=r"model: stride: removed in format 5 .*one grid is `levels: \[8\]`"):
        RouterConfig.from_dict({**data, "stride": 8})
    with pytest.raises(TypeError, match=r"model.levels: expected a list, got NoneType"):
        RouterConfig.from_dict({**data, "levels": None})
    with pytest.raises(ValueError, match=r"model: stride: expected a positive number of pixels per grid cell, got 0"):
        RouterConfig.from_dict({**data, "format_version": 4, "levels": None, "stride": 0})
    assert not RouterConfig.from_dict({**data, "format_version": 4, "head": {"coarse_logits": False}}).has_aux_head


def test_bad_cls_taps_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"head.cls_taps: expected one of \('level', 'all'\), got 'every'"):
        make_config(head={"cls_taps": "every"})


@pytest.mark.parametrize("refine", [[2, 1], [2]])
@pytest.mark.parametrize("size, channels", [((97, 130), 3), ((61, 45), 1)])
def test_refine_carries_segmentation_to_the_detail_maps_grid(refine, size, channels):
    """head.refine: the seg head goes on below stride 4 with the detail stem's stride-2 (and full-resolution)
    maps; logits come out at the input size; a gradient reaches every skip; the stem's stride-4 map is the
    same computation as without skips."""
    torch.manual_seed(0)
    model = Router(make_config(head={"seg_hidden": 16, "cls_hidden": 16, "refine": refine}))
    assert hasattr(model.detail, "full") == (1 in refine) and model.seg_head.refine_outputs["seg_a"].weight.abs().sum() == 0
    images = torch.rand(2, channels, *size)
    rgb = images.expand(-1, 3, -1, -1)
    grid = (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    stride4, skips = model.detail(rgb, grid, skips=refine)
    assert torch.equal(stride4, resample(model.detail.net((rgb - 0.5) / 0.25), grid))  # the stem as one Sequential
    assert {s: tuple(m.shape[-2:]) for s, m in skips.items()} == {
        s: (math.ceil(size[0] / s), math.ceil(size[1] / s)) for s in refine}
    grads = {}

    def keep_skip_grads(module, inputs, output):
        for s, m in output[1].items() if torch.is_grad_enabled() else ():
            m.register_hook(lambda g, s=s: grads.__setitem__(s, g))

    model.detail.register_forward_hook(keep_skip_grads)
    plain = Router(make_config(head={"seg_hidden": 16, "cls_hidden": 16, "refine": []}))
    assert not plain.load_state_dict(model.state_dict(), strict=False).missing_keys
    with torch.no_grad():  # zero-initialised fine outputs: refining to stride 1 starts as the model without it
        if 1 in refine:    # (to stride 2, the logits are resampled twice: not the same map)
            assert torch.equal(model(images, task="seg_a")["seg"], plain(images, task="seg_a")["seg"])
        model.seg_head.refine_outputs["seg_a"].weight.fill_(0.1)
    out = model(images, task="seg_a")
    assert out["seg"].shape == (2, 2, *size)
    out["seg"].square().mean().backward()
    assert sorted(grads) == sorted(refine) and all(g.abs().sum() > 0 for g in grads.values())
    assert model.detail.net[0].weight.grad.abs().sum() > 0


def test_bad_refine_settings_are_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"head.refine: expected distinct strides from \[2, 1\], descending.*got \[1, 2\]"):
        make_config(head={"refine": [1, 2]})
    with pytest.raises(ValueError, match=r"head.refine: expected .*finer than the finest level 8.*got \[4\]"):
        make_config(levels=[8, 16, 32], head={"refine": [4]})
    with pytest.raises(ValueError, match=r"head.refine: \[2\] reads the detail stem's maps; it needs `detail: true`"):
        make_config(detail=False, head={"refine": [2]})


def test_auxiliary_head_trains_on_the_stride_16_level_and_is_not_run_at_inference(tmp_path):
    """head.aux_weight > 0 (0.4, the default; here with `cls_taps: level`): a plain seg head on the level nearest
    stride 16 gives training-mode logits ``seg_aux`` whose loss joins the task's at that weight; it is not run at
    inference, follows the prior init and add_task, and is saved and loaded with the model. With 0 there is no
    such head."""
    torch.manual_seed(0)
    head = {"seg_hidden": 16, "cls_hidden": 16, "cls_taps": "level"}
    assert not any(k.startswith("aux_seg_head.") for k in Router(make_config(head={**head, "aux_weight": 0})).state_dict())
    model = Router(make_config(head=head)).train()
    assert model.aux_seg_head.in_dim == model.config.widths[model.config.strides.index(16)]
    x, target = torch.rand(2, 3, 61, 45), torch.randint(0, 2, (2, 61, 45))
    out = model(x, task="seg_a")
    assert out["seg_aux"].shape == out["seg"].shape == (2, 2, 61, 45)
    loss = output_loss(out, "seg", F.cross_entropy, target, aux_weight=0.4)
    expected = F.cross_entropy(out["seg"], target) + 0.4 * F.cross_entropy(out["seg_aux"], target)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_seg_head.parameters())
    assert "seg_aux" not in model(x, task="cls_b")
    assert "seg_aux" not in model.eval()(x, task="seg_a")

    model.init_seg_bias_from_prior("seg_a", 0.1)
    for head in (model.seg_head, model.aux_seg_head):
        assert torch.allclose(head.outputs["seg_a"].bias, torch.tensor([0.9, 0.1]).log())
    model.add_task(TaskConfig(name="seg_c", type="seg", classes=["a", "b", "c"]))
    assert model.train()(x, task="seg_c")["seg_aux"].shape == (2, 3, 61, 45)
    model.save_pretrained(tmp_path)
    loaded = Router.from_pretrained(tmp_path)
    assert loaded.config.head.aux_weight == 0.4
    assert "trained with an auxiliary stride-16 seg head (weight 0.4)" in (tmp_path / "README.md").read_text()
    own, back = model.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)


def test_auxiliary_head_with_cls_taps_all_reads_and_trains_classifications_map(tmp_path):
    """With head.cls_taps: all the auxiliary seg head reads classification's every-tap map (as the one-level model's
    seg head reads the map its classification reads), so segmentation's loss trains classification's aligners too;
    the main segmentation is the `cls_taps: level` model's and inference runs no auxiliary head."""
    torch.manual_seed(0)
    head = {"seg_hidden": 16, "cls_hidden": 16, "aux_weight": 0.4}
    model = Router(make_config(fusion="mean", head={**head, "cls_taps": "all"})).train()
    base = Router(make_config(fusion="mean", head={**head, "cls_taps": "level"})).train()
    assert not base.load_state_dict(model.state_dict(), strict=False).missing_keys
    x = torch.rand(2, 3, 61, 45)
    out = model(x, task="seg_a")
    torch.testing.assert_close(out["seg"], base(x, task="seg_a")["seg"])
    grid = grid_size((61, 45), 16)
    with torch.no_grad():
        cls_map = sum(model.aligners[n].cls(model.extractors[n](x)["dense"], grid) for n in model.extractor_names) / 3
        torch.testing.assert_close(out["seg_aux"], model.aux_seg_head(cls_map, "seg_a", out_size=(61, 45)))
    out["seg_aux"].sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".cls." in n for n in grads) and not any(".levels." in n for n in grads)
    assert "seg_aux" not in model.eval()(x, task="seg_a")
    model.save_pretrained(tmp_path)
    assert "auxiliary stride-16 seg head (weight 0.4, on classification's every-tap map)" in (
        tmp_path / "README.md").read_text()


def test_bad_aux_weight_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"head.aux_weight: expected a finite loss weight >= 0.*got -0.4"):
        make_config(head={"aux_weight": -0.4})


def test_top_k_skips_extractors_unused_at_every_level():
    torch.manual_seed(0)
    model = Router(make_config(top_k=1)).eval()
    with torch.no_grad():  # force every level's choice onto "cnn" with a large logit bias
        model.gate.mlp[-1].bias.view(4, 3)[:, 2] += 100.0
    for ext in model.extractors.values():
        ext.forward_calls = 0
    with torch.no_grad():
        out = model(torch.rand(2, 3, 50, 70), task="seg_a")
    assert out["ran"].tolist() == [False, False, True]
    assert [e.forward_calls for e in model.extractors.values()] == [0, 0, 1]
    assert out["gate_levels"][:, :, 2].eq(1).all()


def test_top_1_shared_across_levels_runs_one_extractor():
    """Levels that prefer different extractors: top-1 keeps the one with the largest weight averaged over levels
    at every level, so one extractor runs (each level's own choice would run two)."""
    model = Router(make_config(top_k=1, gate={"granularity": "image", "top_k": 1, "hidden": 16})).eval()
    bias = torch.tensor([[9.0, 0, 0], [0, 9.2, 0], [0, 9.2, 0], [9.0, 0, 0]])  # p14, p16, p16, p14 by level:
    with torch.no_grad():                                                       # p16 has the larger mean
        model.gate.mlp[-1].weight.zero_()
        model.gate.mlp[-1].bias.copy_(bias.flatten())
        out = model(torch.rand(2, 3, 50, 70), task="seg_a")
    assert out["ran"].tolist() == [False, True, False]
    assert out["gate_levels"].argmax(dim=2)[0].tolist() == [1, 1, 1, 1]
    assert out["gate_levels"].max(dim=2).values.eq(1).all()


def test_tap_assignment_cnn_by_stride_vit_by_depth_and_borrowing():
    cnn = ExtractorInfo("cnn", 64, (24, 32, 48, 64), (4, 8, 16, 32), 32, (1, 2, 3, 4), (0.5,) * 3, (0.5,) * 3)
    got = {s: [(t.index, t.factor) for t in taps] for s, taps in assign_taps(cnn, [4, 8, 16, 32]).items()}
    assert got == {4: [(0, 0)], 8: [(1, 0)], 16: [(2, 0)], 32: [(3, 0)]}  # every stage at its own stride
    late = ExtractorInfo("cnn", 64, (48, 64), (16, 32), 32, (3, 4), (0.5,) * 3, (0.5,) * 3)
    got = {s: [(t.index, t.factor) for t in taps] for s, taps in assign_taps(late, [4, 8, 16, 32]).items()}
    assert got == {4: [(0, 4)], 8: [(0, 2)], 16: [(0, 0)], 32: [(1, 0)]}  # fine levels borrow, learned up
    vit = ExtractorInfo("vit", 32, (32, 32), (14, 14), 14, (0, 1), (0.5,) * 3, (0.5,) * 3)
    got = {s: [(t.index, t.factor) for t in taps] for s, taps in assign_taps(vit, [4, 8, 16, 32]).items()}
    assert got == {4: [(0, 4)], 8: [(0, 2)], 16: [(1, 0)], 32: [(1, -2)]}  # DPT: shallow block to fine levels
    assert {s: [t.factor for t in taps] for s, taps in assign_taps(cnn, [16]).items()} == {16: [0, 0, 0, 0]}


@pytest.mark.parametrize("size", [(97, 130), (61, 45)])
def test_fuse_decoder_output_reads_every_level_at_the_stride_16_width(size):
    """The decoder's fuse: the seg head reads all levels mixed at `width` channels, at the finest grid;
    every level's decoded map reaches the fuse (a gradient reaches each level's merge and the coarsest map)."""
    torch.manual_seed(0)
    cfg = make_config(level_widths=[8, 8, 16, 24], head={"seg_hidden": 16, "cls_hidden": 16})
    model = Router(cfg)
    assert model.decoder.out_width == 16 and model.seg_head.in_dim == 16
    assert model.decoder.fuse[0].in_channels == 8 + 8 + 16 + 24
    maps = [torch.rand(2, w, math.ceil(size[0] / s), math.ceil(size[1] / s), requires_grad=True)
            for w, s in zip([8, 8, 16, 24], [4, 8, 16, 32])]
    fused = model.decoder(maps)
    assert tuple(fused.shape) == (2, 16, *maps[0].shape[-2:])
    fused.square().sum().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in maps)
    # Each level's slice of the 1x1 weights on its own grid, then resampled and summed: the same map as
    # resampling every level to the finest grid, concatenating and applying the 1x1 convolution there.
    dec, merged = model.decoder, []
    x = maps[-1]
    merged.append(x)
    for i in range(len(maps) - 2, -1, -1):
        x = dec.merge[i](maps[i] + F.interpolate(dec.lateral[i](x), size=maps[i].shape[-2:], mode="bilinear"))
        merged.append(x)
    grid = maps[0].shape[-2:]
    cat = torch.cat([F.interpolate(m, size=grid, mode="bilinear") for m in reversed(merged)], dim=1)
    torch.testing.assert_close(fused, dec.fuse(cat), atol=1e-5, rtol=1e-5)
    out = model(torch.rand(2, 3, *size), task="seg_a")
    assert out["seg"].shape == (2, 2, *size)


def test_format_2_and_3_pyramids_are_refused_one_level_models_load():
    """A format-2 pyramid's head read the finest level and a format-3 pyramid classified at its coarsest: options
    removed in format 6, so such a config.json is one error naming the key; a one-level model of either format, and a
    format-3 pyramid without a classification task, which the options did not change, load; an invalid `levels` is
    named as such."""
    old = make_config().to_dict()
    with pytest.raises(ValueError, match=r"^model: head.decoder_output: 'finest' is no longer supported"):
        RouterConfig.from_dict({**old, "format_version": 2})
    with pytest.raises(ValueError, match=r"^model: head.cls_stride: 32 is no longer supported"):
        RouterConfig.from_dict({**old, "format_version": 3})
    one = make_config(levels=[16])
    for version in (2, 3):
        assert RouterConfig.from_dict({**one.to_dict(), "format_version": version}) == one
    # A format-3 pyramid that only segments (no head.cls_taps / aux_weight: format 4's "level" and 0): the
    # classification level changed nothing it uses.
    head = {k: v for k, v in old["head"].items() if k not in ("cls_taps", "aux_weight")}
    seg_only = {**old, "tasks": old["tasks"][:1], "head": head, "format_version": 3}
    assert RouterConfig.from_dict(seg_only).strides == [4, 8, 16, 32]
    with pytest.raises(ValueError, match=r"^model: head.cls_stride: 32 is no longer supported"):  # its aux head read it
        RouterConfig.from_dict({**seg_only, "head": {**head, "cls_taps": "all", "aux_weight": 0.4}})
    with pytest.raises(TypeError, match=r"^model.levels\[1\]: expected int, got str '32'"):  # not the removed key
        RouterConfig.from_dict({**old, "levels": [16, "32"], "format_version": 2})


def test_bad_levels_are_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"levels: expected distinct positive strides in ascending order"):
        make_config(levels=[16, 8])
    with pytest.raises(ValueError, match=r"level_widths: expected 2 positive channel counts"):
        make_config(levels=[8, 16], level_widths=[16])
    with pytest.raises(ValueError, match=r"levels: expected distinct positive strides"):
        make_config(levels=[])


def thin_lines(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greyscale texture with 2-4 random straight lines 1-2 pixels wide, slightly darker: images and masks."""
    g = torch.Generator().manual_seed(seed)
    noise = F.avg_pool2d(torch.rand(n, 1, size + 2, size + 2, generator=g), 3, stride=1)
    images, masks = 0.35 + noise * 0.6, torch.zeros(n, size, size, dtype=torch.long)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for i in range(n):
        for _ in range(int(torch.randint(2, 5, (), generator=g))):
            angle = float(torch.rand((), generator=g)) * math.pi
            c = torch.rand(2, generator=g) * size
            dist = ((xx - c[0]) * math.sin(angle) - (yy - c[1]) * math.cos(angle)).abs()
            masks[i][dist < 0.5 + float(torch.rand((), generator=g))] = 1
    images = images - 0.25 * masks[:, None]
    return images.clamp(0, 1), masks


def train_thin_lines(levels: list[int], steps: int = 120, head: dict | None = None) -> float:
    """Foreground IoU on held-out images after a short training of the router on frozen random ViT features."""
    torch.manual_seed(0)
    cfg = RouterConfig.from_dict({
        "extractors": [{"spec": "timm:vit_small_patch16_224", "name": "vit", "pretrained": False,
                        "kwargs": {**TINY_VIT, "img_size": 48}}],
        "tasks": [{"name": "lines", "type": "seg", "classes": ["bg", "line"]}],
        "fusion": "single", "width": 32, "levels": levels,  # the plain pyramid head (the loop trains no auxiliary loss)
        "head": {"seg_hidden": 32, "cls_taps": "level", "aux_weight": 0, **(head or {})},
    })
    model = Router(cfg)
    x, y = thin_lines(96, 48, seed=1)
    vx, vy = thin_lines(32, 48, seed=2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    weight = torch.tensor([1.0, 5.0])  # lines cover ~8 % of the pixels
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(x)
        loss = F.cross_entropy(model(x[idx], task="lines")["seg"], y[idx], weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(vx, task="lines")["seg"].argmax(1)
    inter, union = ((pred == 1) & (vy == 1)).sum(), ((pred == 1) | (vy == 1)).sum()
    return float(inter / union)


def test_thin_lines_need_the_multi_level_model():
    """Lines one or two pixels wide on texture: on one stride-16 grid they are lost; with levels 4-32 and the
    detail stem they are found (0.199 vs 0.530 foreground IoU after 120 steps, seed 0, fuse decoder output; 0.549 with "finest")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: more threads only contend on a shared 2-core machine
    try:
        single, multi = train_thin_lines([16]), train_thin_lines([4, 8, 16, 32])
    finally:
        torch.set_num_threads(threads)
    assert multi > 0.4 and multi > single + 0.2, f"fg IoU levels [16] {single:.3f}, levels [4, 8, 16, 32] {multi:.3f}"


def test_refining_to_stride_1_draws_the_thin_lines():
    """head.refine: [2, 1] (width 8) carries the same model on to full resolution with the detail stem's maps:
    0.530 -> 0.952 foreground IoU on the thin lines (120 steps, seed 0); [2] alone gives 0.658."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain, refined = train_thin_lines([4, 8, 16, 32]), train_thin_lines([4, 8, 16, 32], head={"refine": [2, 1]})
    finally:
        torch.set_num_threads(threads)
    assert refined > 0.85 and refined > plain + 0.3, f"fg IoU without refiner {plain:.3f}, with [2, 1] {refined:.3f}"
