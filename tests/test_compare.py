"""The comparison end to end on tiny random extractors and synthetic data, its config, and its report."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import script_main
from PIL import Image

from backbone_router.train.experiments import comparison
from backbone_router.train.experiments.compare_config import load_compare_config
from backbone_router.train.experiments.reporting import (
    aggregate,
    gains,
    plot_gate_heatmap,
    results_markdown,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "compare_tiny.yaml"


def run(out: Path, cache: Path, *extra: str) -> dict:
    argv = ["--config", str(TINY), "--output-dir", str(out), f"compare.cache_dir={cache}",
            "compare.variants=[concat, gated_token]", "compare.seeds=[0, 1]", *extra]
    assert script_main("compare")(argv) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The same comparison twice on one cache: the second one must run no extractor forward."""
    root = tmp_path_factory.mktemp("cmp")
    first = run(root / "a", root / "cache")
    second = run(root / "b", root / "cache")
    return root, first, second


def test_report_files_and_contents(two_runs):
    root, summary, _ = two_runs
    out = root / "a"
    for name in ("results.csv", "results.json", "results.md", "gates.json", "sweeps.json", "summary.json",
                 "gate_heatmaps.json", "bars.png", "gate_heatmap_gated_token.png", "sweep_shape_seg.png", "config.yaml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.size[0] > 200 and im.size[1] > 100

    rows = json.loads((out / "results.json").read_text())
    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and set(csv_rows[0]) == {"variant", "seed", "task", "metric", "value"}
    # 2 variants x 2 seeds x 2 tasks, every headline metric present and in [0, 1].
    keys = {(r["variant"], r["seed"], r["task"]) for r in rows}
    assert keys == {(v, s, t) for v in ("concat", "gated_token") for s in (0, 1) for t in ("shape_seg", "shape_cls")}
    for r in rows:
        if r["metric"] in ("fg_iou", "mIoU", "accuracy", "balanced_accuracy", "macro_f1"):
            assert r["value"] is not None and 0.0 <= r["value"] <= 1.0, r
    assert float(csv_rows[0]["value"]) == pytest.approx(rows[0]["value"])

    # results.md: the per-task mean ± std over seeds of the primary metric, as computed from the rows.
    md = (out / "results.md").read_text()
    for v in ("concat", "gated_token"):
        vals = [r["value"] for r in rows if r["variant"] == v and r["task"] == "shape_cls" and r["metric"] == "balanced_accuracy"]
        cell = f"{100 * np.mean(vals):.1f} ± {100 * np.std(vals, ddof=1):.1f}"
        assert cell in md, (cell, md)
    # 12 steps on 24 synthetic images learn nothing: the report says what it came from and concludes nothing
    assert "Data: shape_seg on shapes (24 train / 12 val images), shape_cls on shapes (24 train / 12 val images) " \
           "(synthetic: train/training/synthetic.py). Budget per variant and seed: 12 steps of batch 8; seeds [0, 1]." in md
    assert summary["gains"]["nothing_learned"] and "this run learned nothing to compare" in md
    assert "Best routed variant" not in md and "routed >= best single" not in md
    assert summary["meta"]["budget"]["max_steps"] == 12 and summary["meta"]["seeds"] == [0, 1]

    # Threshold sweep of the binary seg task: 9 thresholds, recall falls as the threshold rises.
    sweeps = json.loads((out / "sweeps.json").read_text())
    assert {(s["variant"], s["seed"]) for s in sweeps} == {(v, s) for v in ("concat", "gated_token") for s in (0, 1)}
    for s in sweeps:
        assert s["task"] == "shape_seg" and len(s["thresholds"]) == 9
        assert all(a >= b for a, b in zip(s["recall"], s["recall"][1:]))


def test_merging_runs_with_other_seeds(two_runs, capsys):
    """report.py --merge joins runs that differ only in their seeds; repeated seeds are refused."""
    report = script_main("report")

    root, _, _ = two_runs
    run(root / "c", root / "cache", "compare.seeds=[2]")
    assert report(["--merge", str(root / "a"), str(root / "c"), "--output", str(root / "ac")]) == 0
    merged = json.loads((root / "ac" / "results.json").read_text())
    parts = [json.loads((root / d / "results.json").read_text()) for d in ("a", "c")]
    assert merged == parts[0] + parts[1]
    summary = json.loads((root / "ac" / "summary.json").read_text())
    assert summary["meta"]["seeds"] == [0, 1, 2]
    assert "over 3 seed(s) [0, 1, 2]" in (root / "ac" / "results.md").read_text()
    assert report(["--merge", str(root / "a"), str(root / "b"), "--output", str(root / "ab")]) == 2
    assert "repeats seeds [0, 1]" in capsys.readouterr().err
    assert not (root / "ab").exists()


def test_heatmap_values_equal_logged_gate_means(two_runs):
    root, _, _ = two_runs
    out = root / "a"
    gates = json.loads((out / "gates.json").read_text())
    heat = json.loads((out / "gate_heatmaps.json").read_text())["gated_token"]
    assert heat["extractors"] == ["vit14", "vit16"] and heat["families"] == ["geometric", "semantic"]
    for i, task in enumerate(heat["tasks"]):
        for j, ext in enumerate(heat["extractors"]):
            logged = [g["weight"] for g in gates
                      if (g["variant"], g["task"], g["extractor"], g["level"]) == ("gated_token", task, ext, None)]
            assert len(logged) == 2  # one per seed
            assert heat["matrix"][i][j] == pytest.approx(np.mean(logged), abs=1e-12)
        assert sum(heat["matrix"][i]) == pytest.approx(1.0, abs=1e-6)  # softmax weights
    panels = plot_gate_heatmap(gates, "gated_token", heat["tasks"], heat["extractors"], {"vit14": "geometric"},
                               out / "again.png")
    if heat["levels"]:  # a model with levels: one panel per level stride, as logged
        assert [lv for lv, _ in panels] == heat["levels"]
        for (_, m), logged in zip(panels, heat["level_matrices"]):
            np.testing.assert_allclose(m, np.asarray(logged), rtol=0, atol=1e-12)
    else:  # without levels: today's single panel of the gate
        assert len(panels) == 1 and panels[0][0] is None
        np.testing.assert_allclose(panels[0][1], np.asarray(heat["matrix"]), rtol=0, atol=1e-12)


def test_gate_proof_entries(two_runs):
    """The gated variant's ablation (on by default), agreement, spread and oracle entries, as results.md shows them
    (values: tests/test_gate_proof.py)."""
    root, summary, _ = two_runs
    tasks, exts = ["shape_seg", "shape_cls"], ["vit14", "vit16"]
    assert list(summary["ablation"]) == ["gated_token"] and list(summary["agreement"]) == ["gated_token"]
    for t in tasks:
        entry = summary["ablation"]["gated_token"][t]
        assert entry["seeds"] == [0, 1] and list(entry["extractors"]) == exts
        assert entry["full"] == pytest.approx(summary["primary"]["gated_token"][t]["mean"], abs=1e-12)
    assert set(summary["agreement"]["gated_token"]) == set(tasks)
    assert np.asarray(summary["spread"]["gated_token"]["overall"]).shape == (2, 2)
    assert summary["oracle_single"] == {"per_task": {t: None for t in tasks}, "task_mean": None}  # no single variant
    md = (root / "a" / "results.md").read_text()
    assert "| gated_token | shape_seg | " in md and "Task spread" in md and (root / "a" / "gate_proof.png").is_file()
    assert len(json.loads((root / "a" / "ablation.json").read_text())) == 2 * 2 * 2  # seeds x tasks x extractors


def test_second_comparison_runs_no_extractor_forward(two_runs):
    root, first, second = two_runs
    assert first["meta"]["cache"]["misses"] > 0
    assert all(n > 0 for n in first["meta"]["cache"]["extractor_forward_calls"].values())
    assert second["meta"]["cache"]["misses"] == 0
    assert second["meta"]["cache"]["hits"] == first["meta"]["cache"]["misses"] + first["meta"]["cache"]["hits"]
    assert second["meta"]["cache"]["extractor_forward_calls"] == {"vit14": 0, "vit16": 0}
    # Same data, seeds and cached features: the same results, value for value.
    a = json.loads((root / "a" / "results.json").read_text())
    b = json.loads((root / "b" / "results.json").read_text())
    assert a == b


def test_frozen_features_count_forward_calls(tmp_path):
    """frozen_features through the cache: one forward per batch on a miss, none on a hit."""
    import torch

    from backbone_router.extractors import create_extractor
    from backbone_router.train.experiments.feature_cache import FeatureCache

    torch.manual_seed(0)
    ext = create_extractor("timm:vit_small_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2,
                           img_size=32).freeze()
    images = [(torch.rand(5, 3, 32, 32) * 255).to(torch.uint8) for _ in range(2)]
    views = comparison.ViewSet([f"d/{i}#x" for i in range(5)], ["eval:32", "train:32"], images, [torch.zeros(5)] * 2)
    cache = FeatureCache(tmp_path)
    a = comparison.frozen_features({"e": ext}, views, cache, 2, torch.float32, "cpu")
    assert ext.forward_calls == 6  # 2 views x ceil(5 / 2) batches
    b = comparison.frozen_features({"e": ext}, views, FeatureCache(tmp_path), 2, torch.float32, "cpu")
    assert ext.forward_calls == 6
    every = torch.arange(5)
    a, b = [[f.gather(every, "cpu")["e"] for f in x] for x in (a, b)]  # read back from the cache, batch by batch
    assert ext.forward_calls == 6
    assert all(torch.equal(x["pooled"], y["pooled"]) for x, y in zip(a, b))
    assert a[0]["pooled"].shape == (5, 32) and not torch.equal(a[0]["pooled"], a[1]["pooled"])
    # the same values as held in memory without a cache (float32 storage: exact)
    held = comparison.frozen_features({"e": ext}, views, None, 2, torch.float32, "cpu")
    assert ext.forward_calls == 12
    for x, h in zip(a, held):
        got = h.gather(torch.tensor([3, 1]), "cpu")["e"]
        assert torch.equal(got["pooled"], x["pooled"][[3, 1]]) and torch.equal(got["dense"][0], x["dense"][0][[3, 1]])


def test_unfrozen_variant_bypasses_the_cache(tmp_path):
    summary = run(tmp_path / "out", tmp_path / "cache", "compare.seeds=[0]", "train.max_steps=3",
                  'compare.variants=[gated_task, {name: gated_ft, base: gated_task, model: {"extractors.1.frozen": false}}]')
    assert summary["meta"]["cache"]["live"] == {"gated_ft": ["vit16"]}
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["variant"] for r in rows} == {"gated_task", "gated_ft"}


# ---- config --------------------------------------------------------------------------------------------
def test_variants_expand_and_errors_name_the_key():
    cfg, cmp = load_compare_config(TINY, ["compare.variants=[single, mean, gated_token_top1]"])
    variants = comparison.expand_variants(cmp, cfg.model)
    assert [v.name for v in variants] == ["single_vit14", "single_vit16", "mean", "gated_token_top1"]
    assert [v.kind for v in variants] == ["single", "single", "mean", "routed"]
    assert variants[1].model.fusion == "single" and variants[1].model.single == "vit16"
    assert variants[3].model.gate.granularity == "token" and variants[3].model.gate.top_k == 1
    with pytest.raises(ValueError, match=r"compare.variants\[0\]: unknown variant 'gated_pixel'"):
        comparison.expand_variants(load_compare_config(TINY, ["compare.variants=[gated_pixel]"])[1], cfg.model)
    with pytest.raises(ValueError, match="unknown key 'compare.seed'"):
        load_compare_config(TINY, ["compare.seed=3"])
    with pytest.raises(ValueError, match="compare.views: must be >= 1"):
        load_compare_config(TINY, ["compare.views=0"])


# ---- report values -------------------------------------------------------------------------------------
def test_a_run_at_chance_bolds_nothing_and_concludes_nothing():
    """Every variant at chance (1/3 within two binomial SEs on 30 val images) or at 0 IoU: no bold, no best routed,
    no "routed >= best single"; a task above chance gets its bold back."""
    values = {"single_a": {"seg": 0.0, "cls": 0.30}, "concat": {"seg": 0.001, "cls": 0.40},
              "gated_task": {"seg": 0.0, "cls": 0.45}}
    rows = [{"variant": v, "seed": s, "task": t, "metric": "fg_iou" if t == "seg" else "balanced_accuracy",
             "value": x} for v, per in values.items() for t, x in per.items() for s in (0, 1)]
    meta = {"tasks": ["seg", "cls"], "primary": {"seg": "fg_iou", "cls": "balanced_accuracy"},
            "num_classes": {"seg": 2, "cls": 3}, "variants": list(values),
            "kinds": {"single_a": "single", "concat": "concat", "gated_task": "routed"}, "seeds": [0, 1],
            "extractors": ["a"], "families": {"a": "semantic"}, "datasets": {"seg": "parts", "cls": "parts"},
            "budget": {"max_steps": 40, "batch_size": 4, "train_items": {"seg": 90, "cls": 90},
                       "val_items": {"seg": 30, "cls": 30}}}
    agg = aggregate(rows)
    g = gains(agg, meta)
    md = results_markdown(agg, meta, g)
    assert g["nothing_learned"] and g["best_routed"] is None and "**" not in md
    assert md.startswith("Data: seg on parts (90 train / 30 val images), cls on parts (90 train / 30 val images). "
                         "Budget per variant and seed: 40 steps of batch 4; seeds [0, 1].")
    assert "none is in bold" in md and "this run learned nothing to compare" in md and "routed >=" not in md
    rows += [{"variant": "gated_task", "seed": 2, "task": "cls", "metric": "balanced_accuracy", "value": 0.95}]
    agg = aggregate(rows)  # gated_task on cls: mean (0.45 + 0.45 + 0.95) / 3 = 0.62 > 1/3 + 2 x 0.086
    g = gains(agg, meta)
    md = results_markdown(agg, meta, g)
    assert not g["nothing_learned"] and g["best_routed"] == "gated_task"
    assert "except on seg, where every variant is at chance or 0" in md and "| **61.7 ± 28.9** |" in md


def test_gains_and_table_values(tmp_path):
    values = {  # variant -> task -> per-seed values
        "single_a": {"t1": [0.50, 0.52], "t2": [0.70, 0.70]},
        "single_b": {"t1": [0.60, 0.60], "t2": [0.60, 0.62]},
        "concat": {"t1": [0.58, 0.60], "t2": [0.69, 0.71]},
        "gated_task": {"t1": [0.62, 0.62], "t2": [0.72, 0.72]},
        "gated_image": {"t1": [0.64, 0.64], "t2": [0.60, 0.60]},
    }
    rows = [{"variant": v, "seed": s, "task": t, "metric": "m", "value": x}
            for v, per in values.items() for t, xs in per.items() for s, x in enumerate(xs)]
    meta = {"tasks": ["t1", "t2"], "primary": {"t1": "m", "t2": "m"}, "variants": list(values),
            "kinds": {"single_a": "single", "single_b": "single", "concat": "concat", "gated_task": "routed",
                      "gated_image": "routed"},
            "extractors": ["a", "b"], "families": {"a": "semantic", "b": "morphological"}, "seeds": [0, 1]}
    agg = aggregate(rows)
    g = gains(agg, meta)
    assert g["best_routed"] == "gated_task"  # task mean 67.0 vs 62.0
    assert g["per_task"]["t1"]["best_single"] == "single_b" and g["per_task"]["t2"]["best_single"] == "single_a"
    assert g["per_task"]["t1"]["vs_best_single"] == pytest.approx(2.0)
    assert g["per_task"]["t2"]["vs_best_single"] == pytest.approx(2.0)
    assert g["per_task"]["t1"]["vs_concat"] == pytest.approx(3.0) and g["per_task"]["t2"]["vs_concat"] == pytest.approx(2.0)
    assert g["vs_concat_avg"] == pytest.approx(2.5)
    assert g["routed_ge_best_single_every_task"] is True and g["routed_ge_concat_plus_1_avg"] is True
    md = results_markdown(agg, meta, g)
    assert "| gated_image | routed | **64.0 ± 0.0** | 60.0 ± 0.0 | 62.0 |" in md
    assert "| gated_task | routed | 62.0 ± 0.0 | **72.0 ± 0.0** | **67.0** |" in md
    assert "| single_a | single | 51.0 ± 1.4 | 70.0 ± 0.0 | 60.5 |" in md
    assert "| **average** | | | +2.0 | | +2.5 |" in md
    assert "this run learned nothing" not in md and not g["nothing_learned"]  # metric "m": chance unknown
    paths = write_report(tmp_path, rows, [], [], meta)
    assert paths["sweeps_png"] == {} and set(paths["heatmaps"]) == {"gated_task", "gated_image"}
    heat = json.loads(paths["heatmap_values"].read_text())
    assert all(math.isnan(x) if x is not None else True for row in heat["gated_task"]["matrix"] for x in row)


def test_levels_config_expands():
    """configs/compare_levels.yaml: every fusion variant at the multi-level default and at levels [16], plus the peers."""
    cfg, cmp = load_compare_config(REPO / "configs" / "compare_levels.yaml")
    assert [t.name for t in cfg.model.tasks] == ["mtd_defect_seg", "mtd_defect_type", "cfd_seg", "camvid_seg", "flowers_cls"]
    assert {e.name: list(e.layers) for e in cfg.model.extractors} == {
        "mnv2": [1, 2, 3, 4], "effl0": [1, 2, 3, 4], "ssl_r50": [1, 2, 3, 4], "mae": [1, 3, 5]}
    variants = {v.name: v for v in comparison.expand_variants(cmp, cfg.model)}
    fusions = ["single_mnv2", "single_effl0", "single_ssl_r50", "single_mae", "mean", "concat", "gated_task",
               "gated_image", "gated_token", "gatedcat_image"]
    assert list(variants) == fusions + [f"{f}_l16" for f in fusions] + ["peer_unet_frozen", "peer_unet_finetuned"]
    for f in fusions:
        multi, one = variants[f].model, variants[f"{f}_l16"].model
        assert multi.strides == [4, 8, 16, 32] and one.strides == [16]
        assert multi.has_detail and not one.has_detail  # the detail stem comes with the stride-4 level
        one_as_multi = dataclasses.replace(one, levels=multi.levels)
        assert one_as_multi.to_dict() == multi.to_dict(), f  # the pair differs in its levels only
    assert variants["gatedcat_image"].model.gate.combine == "concat"
    assert cmp.peer_checkpoint.endswith("mobilenet_v2-b0353104.pth")
    budget = load_compare_config(REPO / "configs" / "compare_shared.yaml")[0].train
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.lr) == (budget.max_steps, budget.batch_size, budget.lr)
