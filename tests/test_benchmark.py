"""train/benchmark.py on configs/tiny.yaml, one repetition: the JSON keys exist and the ratios are computed
from the measured numbers in the same file (a smoke test with values, not a timed assertion)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import script_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out.json"
    script_main("benchmark")(["--config", str(REPO / "configs/tiny.yaml"), "--json", str(out), "--batch-sizes", "2",
          "--resolutions", "32", "--warmup", "0", "--reps", "1", "--cache-batches", "2", "--threads", "1",
          "--ablate", "sdpa", "--peak-tflops", "1.0", "head.seg_trunk=separable"])
    return json.loads(out.read_text())


def test_model_overrides_are_applied_recorded_and_checked(summary):
    assert summary["overrides"] == ["head.seg_trunk=separable"]
    with pytest.raises(ValueError, match="unknown key 'head.seg_trunc'"):
        script_main("benchmark")(["--config", str(REPO / "configs/tiny.yaml"), "head.seg_trunc=separable"])


def median(summary, workload, phase):
    (row,) = [r for r in summary["results"] if r["workload"] == workload and r["phase"] == phase]
    return row["median_s"]


def test_json_has_the_goal_keys_and_hardware(summary):
    for key in ("routed_over_sum_of_singles", "top1_over_single", "cache_speedup", "goals", "hardware", "sync_audit"):
        assert key in summary
    assert set(summary["goals"]) == {"routed_over_sum_of_singles", "top1_over_single", "cache_speedup"}
    assert summary["hardware"]["device"] == "cpu"
    assert summary["hardware"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_ratios_are_computed_from_the_measured_medians(summary):
    singles = median(summary, "single:vit14", "inference") + median(summary, "single:clip16", "inference")
    assert math.isclose(summary["routed_over_sum_of_singles"], median(summary, "routed", "inference") / singles)
    (ratios,) = summary["ratios"]
    ran = ratios["top1_ran"]
    chosen = sum(median(summary, f"single:{n}", "inference") for n in ran)
    assert math.isclose(summary["top1_over_single"], median(summary, "routed_top1", "inference") / chosen)
    for name, value in ratios["top1_forced_over_single"].items():
        forced = median(summary, f"routed_top1->{name}", "inference")
        assert math.isclose(value, forced / median(summary, f"single:{name}", "inference"))
    cache = summary["cache"]
    assert math.isclose(summary["cache_speedup"], cache["epoch_recompute_s"] / cache["epoch_cached_s"])


def test_forced_top1_runs_only_the_chosen_extractor(summary):
    rows = [r for r in summary["results"] if r["workload"].startswith("routed_top1->")]
    assert [r["ran"] for r in rows] == [[r["workload"].split("->")[1]] for r in rows]


def test_router_only_is_the_top1_model_without_the_extractor(summary):
    """router_only->X runs the router on X's precomputed features: its FLOPs are exactly top-1 minus X's."""
    flops = {r["workload"]: r["flops"] for r in summary["results"] if r["phase"] == "inference"}
    (ratios,) = summary["ratios"]
    for name, value in ratios["router_only_over_single"].items():
        assert flops[f"router_only->{name}"] > 0
        assert flops[f"router_only->{name}"] + flops[f"single:{name}"] == flops[f"routed_top1->{name}"]
        assert math.isclose(value, median(summary, f"router_only->{name}", "inference")
                            / median(summary, f"single:{name}", "inference"))
    assert summary["router_only_over_single_worst"] == max(ratios["router_only_over_single"].values())


def test_every_row_has_time_memory_flops_and_mfu(summary):
    for r in summary["results"] + summary["ablations"]:
        assert r["median_s"] > 0 and r["images_per_s"] > 0 and r["flops"] >= 0
        assert r["peak_mem_mib"] is None or r["peak_mem_mib"] >= 0
        assert math.isclose(r["mfu"], r["tflops_per_s"] / 1.0)
    assert {(a["phase"], a["on"]) for a in summary["ablations"]} == {
        ("inference", True), ("inference", False), ("train_step", True), ("train_step", False)}


def test_the_sync_audit_blames_package_source_not_a_virtualenv_inside_the_checkout():
    """CI builds .ci-venv inside the repository: torch's optimizer lines there are a library's, not ours."""
    from types import SimpleNamespace

    from backbone_router.train.experiments.benchmarking import REPO, repo_line

    def at(rel: str):
        return SimpleNamespace(filename=str(REPO / rel), lineno=7)

    assert repo_line(at("router/model.py")) == "router/model.py:7"
    assert repo_line(at(".ci-venv/lib/python3.11/site-packages/torch/optim/adamw.py")) is None
    assert repo_line(at(".venv/lib/python3.12/site-packages/torch/optim/adam.py")) is None
    assert repo_line(at("train/benchmark.py")) is None  # the audit's own driver
    assert repo_line(SimpleNamespace(filename="/usr/lib/python3/torch/nn/functional.py", lineno=1)) is None
