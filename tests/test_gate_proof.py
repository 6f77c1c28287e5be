"""Proof that the gate is right: ablation importance, agreement with the gate, task spread, the oracle single."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import script_main
from PIL import Image

from backbone_router.router import Router, RouterConfig
from backbone_router.train.experiments.gate_proof import (
    ablation_scores,
    average_ranks,
    card_gate_proof,
    oracle_single,
    spearman,
    spread_matrix,
)
from backbone_router.train.experiments.reporting import (
    aggregate,
    gains,
    gate_proof_tables,
    load_run,
    primary_table,
    results_markdown,
    write_report,
)

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
TINY = Path(__file__).resolve().parents[1] / "configs" / "compare_tiny.yaml"


def tiny_router(**gate) -> Router:
    """Two tiny random ViTs (patch 14 and 16), a binary seg task and a 3-class cls task."""
    return Router(RouterConfig.from_dict({
        "extractors": [
            {"spec": "timm:vit_small_patch14_dinov2", "name": "p14", "pretrained": False, "kwargs": {**TINY_VIT, "img_size": 28}},
            {"spec": "timm:vit_small_patch16_224", "name": "p16", "pretrained": False, "kwargs": {**TINY_VIT, "img_size": 32}},
        ],
        "tasks": [{"name": "seg_a", "type": "seg", "classes": ["bg", "fg"]},
                  {"name": "cls_b", "type": "cls", "classes": ["x", "y", "z"]}],
        "width": 16, "levels": [16], "gate": {"hidden": 16, **gate}, "head": {"seg_hidden": 16, "cls_hidden": 16},
    })).eval()


# ---- Router.forward(keep=...) under a top-k gate ------------------------------------------------------------------
@pytest.mark.parametrize("task, key", [("seg_a", "seg"), ("cls_b", "cls")])
def test_keep_only_the_extractor_a_top1_gate_left_out_gives_it_weight_zero(task, key):
    """A top-1 gate picks one extractor; keeping only the other leaves nothing to fuse: it runs with weight 0, so its
    features do not change the output (no crash on an empty fusion)."""
    model = tiny_router(granularity="task", top_k=1)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        chosen = model(images, task=task)["gate_mean"]
        assert sorted(chosen.tolist()) == [0.0, 1.0]
        other = model.extractor_names[int(chosen.argmin())]
        feats = model.extractors[other](images)
        doubled = {other: {"dense": [2 * d for d in feats["dense"]], "pooled": 2 * feats["pooled"]}}
        a = model(images, task=task, keep=[other], features={other: feats})
        b = model(images, task=task, keep=[other], features=doubled)
    assert a["gate_levels"].eq(0).all()
    torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# ---- ablation at evaluation ----------------------------------------------------------------------------------------
def test_ablation_with_all_signal_in_one_extractor():
    """The task's signal is in extractor a only: removing a loses the whole metric, removing b or c loses nothing;
    a alone keeps it all, b or c alone nothing. Each keep-set is scored once."""
    calls = []

    def score(keep):
        calls.append(tuple(keep))
        return 0.8 if "a" in keep else 0.0

    rows = {r["extractor"]: r for r in ablation_scores(score, ["a", "b", "c"], full=0.8)}
    assert rows["a"] == {"extractor": "a", "full": 0.8, "without": 0.0, "only": 0.8, "drop": 0.8}
    for e in ("b", "c"):
        assert rows[e] == {"extractor": e, "full": 0.8, "without": 0.8, "only": 0.0, "drop": 0.0}
    assert sorted(calls) == sorted([("b", "c"), ("a",), ("a", "c"), ("b",), ("a", "b"), ("c",)])
    calls.clear()
    two = ablation_scores(score, ["a", "b"], full=0.8)  # without a == only b: two scores, not four
    assert len(calls) == 2 and [r["drop"] for r in two] == [0.8, 0.0]
    assert ablation_scores(score, ["a"], full=0.8) == []  # nothing to remove


# ---- statistics ----------------------------------------------------------------------------------------------------
def test_spearman_hand_computed_ties_and_undefined():
    assert spearman([0.7, 0.2, 0.1], [5.0, 1.0, 2.0]) == pytest.approx(0.5)  # 1 - 6 * (0 + 1 + 1) / (3 * 8)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ties get average ranks: [1, 2.5, 2.5, 4] against [1, 3, 2, 4]: 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert average_ranks([1, 2, 2, 3]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))
    assert spearman([0.5, 0.5], [1.0, 2.0]) is None  # a constant gate: undefined, not NaN and not a crash
    assert spearman([0.2, 0.8], [0.0, 0.0]) is None
    assert spearman([0.2], [0.1]) is None and spearman([0.2, math.nan], [0.1, 0.3]) is None


def test_spearman_equals_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 4, size=6).astype(float), rng.normal(size=6)
        want = stats.spearmanr(a, b).statistic
        got = spearman(a, b)
        assert (got is None and not np.isfinite(want)) or got == pytest.approx(want, abs=1e-12)


GATES = {  # task -> per level stride (8, 16) -> weights of (a, b, c); the level mean is logged as level None
    "t1": {8: [0.6, 0.3, 0.1], 16: [0.4, 0.3, 0.3]},  # mean [0.5, 0.3, 0.2]
    "t2": {8: [0.1, 0.1, 0.8], 16: [0.1, 0.5, 0.4]},  # mean [0.1, 0.3, 0.6]
    "t3": {8: [0.5, 0.3, 0.2], 16: [0.5, 0.3, 0.2]},  # mean [0.5, 0.3, 0.2]
}
EXTS = ["a", "b", "c"]


def gate_rows_of(variant: str, seeds=(0, 1)) -> list[dict]:
    rows = []
    for s in seeds:
        for t, per in GATES.items():
            mean = np.mean(list(per.values()), axis=0)
            rows += [{"variant": variant, "seed": s, "task": t, "extractor": e, "family": "f", "level": None,
                      "weight": float(mean[i])} for i, e in enumerate(EXTS)]
            rows += [{"variant": variant, "seed": s, "task": t, "extractor": e, "family": "f", "level": lv,
                      "weight": w[i]} for lv, w in per.items() for i, e in enumerate(EXTS)]
    return rows


def test_task_spread_hand_computed():
    assert spread_matrix(np.array([[0.5, 0.3, 0.2], [0.1, 0.3, 0.6]]))[0, 1] == pytest.approx(0.4)  # (0.4 + 0 + 0.4) / 2
    meta = {"tasks": list(GATES), "variants": ["g"], "kinds": {"g": "routed"}, "extractors": EXTS}
    spread = gate_proof_tables(meta, gate_rows_of("g"), [])["spread"]["g"]
    assert spread["tasks"] == ["t1", "t2", "t3"] and spread["levels"] == [8, 16]
    np.testing.assert_allclose(spread["overall"], [[0, 0.4, 0], [0.4, 0, 0.4], [0, 0.4, 0]], atol=1e-12)
    np.testing.assert_allclose(spread["per_level"]["8"], [[0, 0.7, 0.1], [0.7, 0, 0.6], [0.1, 0.6, 0]], atol=1e-12)
    np.testing.assert_allclose(spread["per_level"]["16"], [[0, 0.3, 0.1], [0.3, 0, 0.4], [0.1, 0.4, 0]], atol=1e-12)


def test_oracle_single_picks_the_best_single_per_task():
    values = {"single_a": {"t1": [0.5, 0.7], "t2": [0.9, 0.9]},   # t1 0.6, t2 0.9
              "solo_b": {"t1": [0.7, 0.7], "t2": [0.1, 0.3]},     # t1 0.7 (an override's own name), t2 0.2
              "gated_task": {"t1": [0.95, 0.95], "t2": [0.95, 0.95]}}  # not a single: never the oracle
    rows = [{"variant": v, "seed": s, "task": t, "metric": "m", "value": x}
            for v, per in values.items() for t, xs in per.items() for s, x in enumerate(xs)]
    meta = {"tasks": ["t1", "t2"], "primary": {"t1": "m", "t2": "m"}, "variants": list(values),
            "kinds": {"single_a": "single", "solo_b": "single", "gated_task": "routed"},
            "single_extractors": {"single_a": "a", "solo_b": "b"}, "extractors": ["a", "b"],
            "families": {"a": "semantic", "b": "geometric"}, "seeds": [0, 1]}
    agg = aggregate(rows)
    oracle = oracle_single(primary_table(agg, meta), meta)
    assert {t: (e["variant"], e["extractor"]) for t, e in oracle["per_task"].items()} == {
        "t1": ("solo_b", "b"), "t2": ("single_a", "a")}
    assert oracle["per_task"]["t1"]["mean"] == pytest.approx(0.7) and oracle["per_task"]["t2"]["n"] == 2
    assert oracle["task_mean"] == pytest.approx(0.8)
    md = results_markdown(agg, meta, gains(agg, meta))
    assert "| *oracle_single* | best single per task, chosen on val | 70.0 ± 0.0 (b) | 90.0 ± 0.0 (a) | 80.0 |" in md
    del meta["single_extractors"]  # a run from before the key: the extractor from the variant's name
    assert oracle_single(primary_table(agg, meta), meta)["per_task"]["t2"]["extractor"] == "a"


# ---- the report and the model card ---------------------------------------------------------------------------------
DROPS = {  # task -> extractor -> per-seed drops; the gate means of GATES make rho +1 (t1), -1 (t2), undefined (t3)
    "t1": {"a": [0.30, 0.10], "b": [0.05, 0.05], "c": [0.00, 0.02]},
    "t2": {"a": [0.20, 0.20], "b": [0.10, 0.10], "c": [0.00, 0.00]},
    "t3": {"a": [0.00, 0.00], "b": [0.00, 0.00], "c": [0.00, 0.00]},
}


def hand_report(out):
    """A report of one gated variant `g` with hand-made gate and ablation rows (full 0.8, only 0.5 everywhere)."""
    ablation = [{"variant": "g", "seed": s, "task": t, "metric": "m", "extractor": e, "full": 0.8, "without": 0.8 - d[s],
                 "only": 0.5, "drop": d[s]} for t, per in DROPS.items() for e, d in per.items() for s in (0, 1)]
    rows = [{"variant": "g", "seed": s, "task": t, "metric": "m", "value": 0.8} for s in (0, 1) for t in GATES]
    meta = {"tasks": list(GATES), "primary": {t: "m" for t in GATES}, "variants": ["g"], "kinds": {"g": "routed"},
            "extractors": EXTS, "families": {e: "f" for e in EXTS}, "seeds": [0, 1]}
    return write_report(out, rows, gate_rows_of("g"), [], meta, ablation), ablation


def test_report_tables_values_and_figure(tmp_path):
    paths, ablation = hand_report(tmp_path)
    summary = json.loads(paths["summary"].read_text())
    t1 = summary["ablation"]["g"]["t1"]
    assert (t1["metric"], t1["seeds"], t1["full"]) == ("m", [0, 1], pytest.approx(0.8))
    assert t1["extractors"]["a"] == pytest.approx({"gate": 0.5, "drop": 0.2, "drop_std": math.sqrt(0.02), "without": 0.6,
                                                   "only": 0.5})
    assert summary["agreement"] == {"g": {"t1": pytest.approx(1.0), "t2": pytest.approx(-1.0), "t3": None}}
    assert summary["spread"]["g"]["overall"][0] == pytest.approx([0.0, 0.4, 0.0])
    assert summary["oracle_single"] == {"per_task": {t: None for t in GATES}, "task_mean": None}  # no single variant
    assert json.loads(paths["ablation"].read_text()) == ablation
    md = paths["md"].read_text()
    assert "| variant | task | a gate / drop / only | b gate / drop / only | c gate / drop / only | ρ(gate, drop) |" in md
    assert "| g | t1 | 0.50 / +20.0 / 50.0 | 0.30 / +5.0 / 50.0 | 0.20 / +1.0 / 50.0 | 1.00 |" in md
    assert "| g | t2 | 0.10 / +20.0 / 50.0 | 0.30 / +10.0 / 50.0 | 0.60 / +0.0 / 50.0 | -1.00 |" in md
    assert md.count("| undefined |") == 1
    assert "**g** [strides 8, 16]" in md and "| t1 | 0.00 [0.00, 0.00] | 0.40 [0.70, 0.30] | 0.00 [0.10, 0.10] |" in md
    with Image.open(paths["gate_proof_png"]) as im:
        assert im.size[0] > 300 and im.size[1] > 200

    # a finished dir (no results/meta.json) rebuilds with its ablation; one from before ablation.json reports without
    assert load_run(tmp_path)[3] == ablation
    paths["ablation"].unlink()
    rows, gates, sweeps, none, meta = load_run(tmp_path)
    assert none == []
    again = write_report(tmp_path / "old", rows, gates, sweeps, meta, none)
    old = json.loads(again["summary"].read_text())
    assert old["ablation"] == {} and old["agreement"] == {} and old["spread"]["g"]["levels"] == [8, 16]
    assert "ρ(gate, drop)" not in again["md"].read_text() and again["gate_proof_png"] is None


def test_model_card_shows_the_ablation_and_checks_it(tmp_path):
    model = tiny_router(granularity="image")
    ablation = {"g": {"seg_a": {"metric": "fg_iou", "seeds": [0], "full": 0.6,
                                "extractors": {"p14": {"gate": 0.7, "drop": 0.25, "drop_std": 0.0, "without": 0.35,
                                                       "only": 0.55},
                                               "p16": {"gate": 0.3, "drop": -0.01, "drop_std": 0.0, "without": 0.61,
                                                       "only": 0.35}}}}}
    card_data = card_gate_proof(ablation, {"g": {"seg_a": 1.0}}, "g")
    assert card_data == {"ablation": {"seg_a": {"p14": {"drop": 0.25, "only": 0.55}, "p16": {"drop": -0.01, "only": 0.35}}},
                         "agreement": {"seg_a": 1.0}}
    model.save_pretrained(tmp_path / "m", card_data=card_data)
    text = (tmp_path / "m" / "README.md").read_text()
    fam = {n: e.info.family for n, e in model.extractors.items()}
    assert "## Gate check (ablation)" in text
    assert f"| task | p14 ({fam['p14']}) drop / only | p16 ({fam['p16']}) drop / only | ρ(gate, drop) |" in text
    assert "| seg_a | +25.0 / 55.0 | -1.0 / 35.0 | 1.00 |" in text
    with pytest.raises(ValueError, match=r"card_data.ablation.seg_a: unknown extractor\(s\) \['dino'\]"):
        model.save_pretrained(tmp_path / "bad", card_data={"ablation": {"seg_a": {"dino": {"drop": 0.1}}}})
    with pytest.raises(ValueError, match=r"card_data.ablation.seg_a.p14: expected \{drop, only\} numbers"):
        model.save_pretrained(tmp_path / "bad", card_data={"ablation": {"seg_a": {"p14": {"drop": "big"}}}})
    with pytest.raises(ValueError, match=r"card_data.agreement: unknown task\(s\) \['seg_x'\]"):
        model.save_pretrained(tmp_path / "bad", card_data={"agreement": {"seg_x": 0.5}})
    with pytest.raises(ValueError, match=r"card_data.agreement.seg_a: expected a rank correlation in \[-1, 1\]"):
        model.save_pretrained(tmp_path / "bad", card_data={"agreement": {"seg_a": 1.5}})


# ---- end to end: a tiny comparison (tests/test_compare.py checks the default run's entries) -------------------------
@pytest.mark.slow
def test_tiny_comparison_reports_the_gate_proof_and_rebuilds_it(tmp_path):
    """configs/compare_tiny.yaml with both singles and a top-1 token gate (the gate may pick no kept extractor):
    summary.json, results.md, the figure and the result files carry the gate proof; report.py rebuilds it, a result
    file from before the ablation still reports, and compare.ablation=false (a --resume may switch it) leaves it out."""
    out, name, tasks, exts = tmp_path / "out", "gated_token_top1", ["shape_seg", "shape_cls"], ["vit14", "vit16"]
    compare = ["--config", str(TINY), "--output-dir", str(out), f"compare.cache_dir={tmp_path / 'cache'}",
               f"compare.variants=[single, {name}]", "compare.seeds=[0]", "train.max_steps=3"]
    assert script_main("compare")(compare) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = json.loads((out / "results.json").read_text())
    assert list(summary["ablation"]) == [name] and list(summary["ablation"][name]) == tasks
    for t, entry in summary["ablation"][name].items():
        assert set(entry) == {"metric", "seeds", "full", "extractors"} and entry["seeds"] == [0]
        (full,) = [r["value"] for r in rows if (r["variant"], r["task"], r["metric"]) == (name, t, entry["metric"])]
        assert entry["full"] == pytest.approx(full, abs=1e-12)  # the main metric, as reported
        a, b = (entry["extractors"][e] for e in exts)
        assert set(a) == {"gate", "drop", "drop_std", "without", "only"}
        assert a["without"] == b["only"] and b["without"] == a["only"]  # two extractors: one left out = the other alone
        assert a["drop"] == pytest.approx(full - a["without"]) and a["gate"] + b["gate"] == pytest.approx(1.0)
        rho = summary["agreement"][name][t]
        assert rho is None or -1.0 <= rho <= 1.0
    spread = summary["spread"][name]
    assert spread["tasks"] == tasks and np.asarray(spread["overall"]).shape == (2, 2)
    assert spread["overall"][0][0] == 0.0 and spread["overall"][0][1] == spread["overall"][1][0]
    assert list(spread["per_level"]) == [str(lv) for lv in spread["levels"]]
    primary = summary["primary"]
    for t in tasks:
        best = summary["oracle_single"]["per_task"][t]
        assert best["mean"] == max(primary[v][t]["mean"] for v in ("single_vit14", "single_vit16"))
        assert best["mean"] == primary[best["variant"]][t]["mean"] and best["variant"] == f"single_{best['extractor']}"
    md = (out / "results.md").read_text()
    assert "| *oracle_single* |" in md and f"| {name} | shape_seg | " in md and f"**{name}**" in md
    assert (out / "gate_proof.png").stat().st_size > 0
    record = json.loads((out / "results" / name / "seed_0.json").read_text())
    assert len(record["ablation"]) == 2 * 2  # tasks x extractors
    assert json.loads((out / "results" / "single_vit14" / "seed_0.json").read_text())["ablation"] == []

    report = script_main("report")
    (out / "summary.json").unlink()
    assert report([str(out)]) == 0
    rebuilt = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in rebuilt.items() if k != "meta"} == {k: v for k, v in summary.items() if k != "meta"}
    del record["ablation"]  # a result file written before the ablation: the report has none, and no error
    (out / "results" / name / "seed_0.json").write_text(json.dumps(record))
    assert report([str(out)]) == 0
    old = json.loads((out / "summary.json").read_text())
    assert old["ablation"] == {} and old["primary"] == summary["primary"] and old["spread"] == summary["spread"]

    (out / "results" / name / "seed_0.json").unlink()  # --resume trains seed 0 again, here without the ablation
    assert script_main("compare")([*compare[:4], "--resume", *compare[4:], "compare.ablation=false"]) == 0
    again = json.loads((out / "summary.json").read_text())
    assert again["ablation"] == {} and again["primary"] == summary["primary"]
