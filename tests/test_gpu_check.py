"""train/gpu_check.py: the smoke mode end to end (every part, tiny sizes, CPU) with its values checked, and
the helpers that decide pass or fail (peak table, tolerances, time limits) on their own."""

from __future__ import annotations

import json
import math
import sys
import time

import pytest

from backbone_router.train import gpu_check
from backbone_router.train.tools.jobs import job_failed, run_jobs

EXTRACTORS = {"mnv2", "effl0", "vits16", "vitb16", "vit_a", "vit_b", "vit_c"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    t0 = time.monotonic()
    result = gpu_check.main(["--out", str(out), "--smoke", "--peak-tflops", "1.0"])
    result["_test_seconds"] = time.monotonic() - t0
    return out, result


@pytest.mark.slow
def test_smoke_run_writes_one_json_with_every_part_passing(report):
    out, result = report
    on_disk = json.loads((out / "gpu_check.json").read_text())
    assert on_disk["parts"].keys() == set(gpu_check.PARTS) and on_disk["finished"] is True
    assert not list(out.glob(".gpu_check.json.*"))  # atomic writes leave no temp file
    assert on_disk["mode"] == "smoke" and on_disk["peak_tflops"] == 1.0
    failed = {n: p.get("error") or p for n, p in on_disk["parts"].items() if not p["pass"] or p["status"] != "ok"}
    assert not failed, failed
    assert on_disk["pass"] is True


@pytest.mark.slow
def test_bench_has_finite_figures_and_an_mfu_per_extractor(report):
    _, result = report
    bench = result["parts"]["bench"]
    assert set(bench["extractors"]) == EXTRACTORS and set(result["mfu"]) == EXTRACTORS
    for name, e in bench["extractors"].items():
        for key in ("mfu", "images_per_s", "gflops_per_image", "tflops_per_s"):
            assert math.isfinite(e[key]) and e[key] > 0, (name, key, e[key])
        assert e["mfu"] == pytest.approx(e["tflops_per_s"] / 1.0)  # --peak-tflops 1
        assert result["mfu"][name] == e["mfu"]
    # A ViT-B/16 does ~4x the work of a ViT-S/16 (width 768 vs 384): FLOPs are counted, not guessed.
    ratio = bench["extractors"]["vitb16"]["gflops_per_image"] / bench["extractors"]["vits16"]["gflops_per_image"]
    assert 3.0 < ratio < 4.5, ratio
    settings = {(r["workload"], r["setting"]) for r in bench["rows"] if "error" not in r}
    for setting in ("eager", "channels_last", "no_sdpa", "compile"):
        assert ("extractor:vitb16", setting) in settings
    assert {("routed", "eager"), ("routed_train_step", "eager")} <= settings
    assert set(bench["committees"]) == {"bench", "vitb16", "pyramid"}
    # Issue 28: the multi-level committee's routed forward over the sum of its three singles (compiled on a GPU only:
    # tracing the whole router takes minutes on a small CPU), and its singles compiled.
    pyramid = bench["committees"]["pyramid"]
    assert {("extractor:vit_c", "compile"), ("routed_train_step", "eager")} <= settings
    singles = sum(bench["extractors"][n]["by_setting"]["eager"]["median_s"] for n in ("vit_a", "vit_b", "vit_c"))
    expected = pyramid["routed"]["by_setting"]["eager"]["median_s"] / singles
    assert pyramid["routed_over_singles"] == {"eager": pytest.approx(expected)}


@pytest.mark.slow
def test_quickstart_matches_the_stored_cpu_reference(report):
    _, result = report
    q = result["parts"]["quickstart"]
    fp32, bf16 = q["runs"]["fp32"], q["runs"]["bf16"]
    assert fp32["vs_stored"]["loss_steps"] == [10, 20] and fp32["vs_stored"]["metric_steps"] == [20]
    # A model change since the reference was written makes it stale: then the live CPU run is the reference.
    assert q["stored_reference_stale"] is (not q["live_cpu_vs_stored"]["pass"])
    assert fp32["compared_with"] == ("live CPU run" if q["stored_reference_stale"] else "stored reference")
    assert fp32["max_abs_diff"]["loss"] <= 1e-5  # same CPU, same code: equal up to rounding
    assert 0 < bf16["max_abs_diff"]["loss"] <= gpu_check.TOLERANCES["quickstart"]["bf16"]["loss"]
    assert math.isfinite(fp32["final_loss"]) and math.isfinite(bf16["final_loss"])


@pytest.mark.slow
def test_parity_of_one_process_and_two(report):
    _, result = report
    p = result["parts"]["parity"]
    assert p["one"] == {"processes": 1, "batch": 4, "device": "cpu"}
    assert p["many"]["processes"] == 2 and p["many"]["batch"] == 2
    assert p["max_abs_diff"]["weights"] < 1e-4 and p["max_abs_diff"]["gate"] < 1e-4
    assert p["eval_steps"] == [4, 8] and p["pass"] is True


@pytest.mark.slow
def test_comparison_pretraining_and_sync_audit_ran(report):
    _, result = report
    runs = result["parts"]["scripts"]["runs"]
    assert runs["compare"]["rows"] > 0 and runs["compare"]["all_finite"]
    for method in ("mae", "smir", "dino"):
        r = runs[f"pretrain_{method}"]
        assert r["steps"] == 3 and len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"])
    audit = result["parts"]["sync_audit"]
    assert {"train_step_routed", "train_step_single", "inference_top1"} <= set(audit["static"])
    assert audit["cuda_sync_count"] is None  # CPU: no runtime check
    # AdamW's step counters are CPU tensors: never blamed on this repository.
    assert not any("optim" in k for k in audit["train_step_repo_calls"])


def test_peak_table_prefers_the_specific_name():
    assert gpu_check.peak_tflops_for("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert gpu_check.peak_tflops_for("NVIDIA H100 PCIe")[0] == 756.0
    assert gpu_check.peak_tflops_for("NVIDIA H200")[0] == 989.0
    assert gpu_check.peak_tflops_for("NVIDIA L40S")[0] == 362.0 and gpu_check.peak_tflops_for("NVIDIA L4")[0] == 121.0
    assert gpu_check.peak_tflops_for("Some Future GPU") == (None, "no table entry for 'Some Future GPU'; pass --peak-tflops")


def test_compare_runs_uses_the_stated_tolerances():
    ref = {"losses": {"train/loss": {"10": 1.0, "20": 0.9}},
           "metrics": {"20": {"seg": {"mIoU": 0.5, "pixel_accuracy": 0.9, "fg_iou": 0.2, "gate": {"a": 0.6, "b": 0.4}}}}}
    near = json.loads(json.dumps(ref))
    near["losses"]["train/loss"]["20"] += 1e-3
    near["metrics"]["20"]["seg"]["fg_iou"] += 0.03
    tol = gpu_check.TOLERANCES["quickstart"]["fp32"]
    r = gpu_check.compare_runs(near, ref, tol)
    assert r["pass"] and r["max_abs_diff"]["loss"] == pytest.approx(1e-3) and r["max_abs_diff"]["count"] == pytest.approx(0.03)
    near["metrics"]["20"]["seg"]["gate"]["a"] += 0.02
    r = gpu_check.compare_runs(near, ref, tol)
    assert not r["pass"] and r["within"]["gate"] is False and r["within"]["loss"] is True
    with pytest.raises(RuntimeError, match="no step in common"):
        gpu_check.compare_runs({"losses": {}, "metrics": {}}, ref, tol)


def test_run_jobs_stops_a_job_at_its_time_limit(tmp_path):
    sleeper = {"cmd": [sys.executable, "-c", "import time; time.sleep(60)"], "env": None}
    quick = {"cmd": [sys.executable, "-c", "print('done')"], "env": None}
    t0 = time.monotonic()
    done = run_jobs({"quick": quick, "sleeper": sleeper}, timeout=3, parallel=2, logs=tmp_path)
    assert time.monotonic() - t0 < 20
    assert done["quick"]["rc"] == 0 and done["quick"]["stdout"] == "done\n" and job_failed(done["quick"]) is None
    assert done["sleeper"]["timed_out"] and job_failed(done["sleeper"]).startswith("timed out")
