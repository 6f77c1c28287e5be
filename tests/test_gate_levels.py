"""Per-level gate reporting: GateMeter, compare.py's gates.json and the report's one heatmap panel per level.

The Router reports ``out["gate_levels"]`` (B x L x E, or B x L x E x h x w for token gates; L = len(config.levels),
ascending strides, each level summing to 1 over extractors) next to ``out["gate"]`` (the gate averaged over levels).
Where the Router in this checkout does not report levels yet, the end-to-end test fakes that output.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import script_main
from PIL import Image

from backbone_router.router import Router, RouterConfig
from backbone_router.train.experiments.reporting import gate_panels, write_report
from backbone_router.train.training.metrics import GateMeter

TINY = Path(__file__).resolve().parents[1] / "configs" / "compare_tiny.yaml"
ROUTER_HAS_LEVELS = "levels" in {f.name for f in dataclasses.fields(RouterConfig)}


def softmax(shape, seed: int, dim: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).softmax(dim)


@pytest.mark.parametrize("grid", [(), (3, 5)], ids=["image", "token"])
def test_gate_meter_averages_each_level(grid):
    names, levels = ["a", "b", "c"], [4, 8, 16, 32]
    meter = GateMeter(names, levels)
    batches = [softmax((b, 4, 3, *grid), seed=b, dim=2) for b in (2, 5)]  # B x L x E (x h x w)
    for gl in batches:
        meter.update(gl.mean(1), gl)
    every = torch.cat(batches).double()
    per_image = every.flatten(3).mean(3) if grid else every  # B x L x E
    got = meter.compute_levels()
    assert list(got) == levels
    for i, lv in enumerate(levels):
        want = per_image[:, i].mean(0)
        assert list(got[lv]) == names and np.allclose(list(got[lv].values()), want.numpy(), atol=1e-12)
        assert sum(got[lv].values()) == pytest.approx(1.0)
    assert np.allclose(list(meter.compute().values()), per_image.mean(1).mean(0).numpy(), atol=1e-12)

    plain = GateMeter(names)  # no levels: today's behaviour, and per-level gates are refused
    plain.update(batches[0].mean(1))
    assert plain.compute_levels() is None and plain.compute() is not None
    with pytest.raises(ValueError, match="per-level gates but no levels"):
        plain.update(batches[0].mean(1), batches[0])
    with pytest.raises(ValueError, match=r"gate_levels of shape \(2, 4, 3.*expected \(2, 3, 3\)"):
        GateMeter(names, [8, 16, 32]).update(batches[0].mean(1), batches[0])


def test_report_draws_one_panel_per_level(tmp_path):
    tasks, exts, levels = ["t1", "t2"], ["a", "b"], [4, 8, 16, 32]
    rng = np.random.default_rng(0)
    gate_rows, level_w = [], {}
    for seed in (0, 1):
        for t in tasks:
            w = rng.dirichlet([1, 1], size=len(levels))  # L x E
            level_w[(seed, t)] = w
            for e_i, e in enumerate(exts):
                gate_rows.append({"variant": "gated_image", "seed": seed, "task": t, "extractor": e, "family": "f",
                                  "level": None, "weight": float(w[:, e_i].mean())})
                gate_rows += [{"variant": "gated_image", "seed": seed, "task": t, "extractor": e, "family": "f",
                               "level": lv, "weight": float(w[k, e_i])} for k, lv in enumerate(levels)]
    rows = [{"variant": "gated_image", "seed": s, "task": t, "metric": "m", "value": 0.5} for s in (0, 1) for t in tasks]
    meta = {"tasks": tasks, "primary": {t: "m" for t in tasks}, "variants": ["gated_image"],
            "kinds": {"gated_image": "routed"}, "extractors": exts, "families": {"a": "semantic", "b": "geometric"}}
    paths = write_report(tmp_path, rows, gate_rows, [], meta)
    heat = json.loads(paths["heatmap_values"].read_text())["gated_image"]
    assert heat["levels"] == levels and len(heat["level_matrices"]) == 4
    for k in range(len(levels)):
        want = np.mean([[level_w[(s, t)][k] for t in tasks] for s in (0, 1)], axis=0)  # tasks x extractors
        np.testing.assert_allclose(np.asarray(heat["level_matrices"][k]), want, atol=1e-12)
    want_mean = np.mean([[level_w[(s, t)].mean(0) for t in tasks] for s in (0, 1)], axis=0)
    np.testing.assert_allclose(np.asarray(heat["matrix"]), want_mean, atol=1e-12)
    with Image.open(paths["heatmaps"]["gated_image"]) as im:  # four panels side by side
        assert im.size[0] > 3 * im.size[1]
    # Rows without levels (runs before multi-level routing): one panel of the gate.
    old = [{k: v for k, v in r.items() if k != "level"} for r in gate_rows if r["level"] is None]
    (panel,) = gate_panels(old, "gated_image", tasks, exts)
    assert panel[0] is None
    np.testing.assert_allclose(panel[1], want_mean, atol=1e-12)


def fake_gate_levels(monkeypatch, levels=(8, 16)):
    """Until the Router reports per-level gates: two levels, the second a permutation of the first."""
    real = Router.forward

    def forward(self, images, task, features=None):
        out = real(self, images, task, features)
        if "gate_levels" not in out:
            g = out["gate"]
            out["gate_levels"] = torch.stack([g, g.roll(1, dims=1)], dim=1)
            out["gate"] = out["gate_levels"].mean(1)
            self.config.levels = list(levels)
        return out

    monkeypatch.setattr(Router, "forward", forward)


def test_compare_logs_gates_per_level(tmp_path, monkeypatch):
    extra = []
    if ROUTER_HAS_LEVELS:
        extra = ["model.levels=[8, 16]"]
    else:
        fake_gate_levels(monkeypatch)
    argv = ["--config", str(TINY), "--output-dir", str(tmp_path / "out"), f"compare.cache_dir={tmp_path / 'cache'}",
            "compare.variants=[gated_image, gated_token]", "compare.seeds=[0]", "train.max_steps=3", *extra]
    assert script_main("compare")(argv) == 0
    out = tmp_path / "out"
    if ROUTER_HAS_LEVELS:
        assert yaml.safe_load((out / "config.yaml").read_text())["model"]["levels"] == [8, 16]
    gates = json.loads((out / "gates.json").read_text())
    heat = json.loads((out / "gate_heatmaps.json").read_text())
    for variant in ("gated_image", "gated_token"):
        for task in ("shape_seg", "shape_cls"):
            mine = [g for g in gates if (g["variant"], g["task"]) == (variant, task)]
            per = {lv: {g["extractor"]: g["weight"] for g in mine if g["level"] == lv} for lv in (None, 8, 16)}
            assert {g["level"] for g in mine} == {None, 8, 16}
            for lv in (8, 16):
                assert list(per[lv]) == ["vit14", "vit16"] and sum(per[lv].values()) == pytest.approx(1.0, abs=1e-6)
            for e in ("vit14", "vit16"):  # the logged gate is the mean over levels
                assert per[None][e] == pytest.approx((per[8][e] + per[16][e]) / 2, abs=1e-6)
        assert heat[variant]["levels"] == [8, 16]


def test_report_compares_level_settings():
    """The best routed and the best variant of each level setting (read from the per-level gate rows), per task."""
    from backbone_router.train.experiments.reporting import aggregate, gains, level_table, results_markdown

    values = {"single_a": .30, "gated_image": .40, "single_a_l16": .35, "gated_image_l16": .20, "peer": .50}
    levels = {"single_a": [4, 8], "gated_image": [4, 8], "single_a_l16": [16], "gated_image_l16": [16]}
    kinds = {"single_a": "single", "gated_image": "routed", "single_a_l16": "single", "gated_image_l16": "routed",
             "peer": "peer"}
    rows = [{"variant": v, "seed": 0, "task": "t", "metric": "m", "value": x} for v, x in values.items()]
    gate_rows = [{"variant": v, "seed": 0, "task": "t", "extractor": "a", "family": "f", "level": lv, "weight": 1.0}
                 for v, lvs in levels.items() for lv in [None, *lvs]]
    meta = {"tasks": ["t"], "primary": {"t": "m"}, "variants": list(values), "kinds": kinds, "extractors": ["a"],
            "families": {"a": "f"}}
    agg = aggregate(rows)
    table = level_table(agg, meta, gate_rows)["t"]
    assert list(table) == ["[4, 8]", "[16]"]  # the peer has no level rows: left out
    assert table["[4, 8]"] == {"best_routed": "gated_image", "best_routed_value": pytest.approx(40.0),
                               "best": "gated_image", "best_value": pytest.approx(40.0)}
    assert table["[16]"]["best_routed"] == "gated_image_l16" and table["[16]"]["best"] == "single_a_l16"
    md = results_markdown(agg, meta, gains(agg, meta), gate_rows)
    assert "| t | 40.0 (gated_image) | 40.0 (gated_image) | 20.0 (gated_image_l16) | 35.0 (single_a_l16) | +5.0 |" in md
    assert "Level settings" not in results_markdown(agg, meta, gains(agg, meta))  # no level rows: no table
