"""One command that checks everything a GPU changes, in one run that fits a short GPU loan (~7 minutes).

    python train/gpu_check.py --out runs/gpu_check           # CUDA present: the full check; else the smoke mode
    python train/gpu_check.py --out /tmp/gpu_check --smoke   # tiny sizes on the CPU (~2 minutes on 2 cores)
    python train/gpu_check.py --write-reference              # regenerate train/tools/gpu_check_reference.json (CPU)

Parts, each in its own process(es) under a time limit (a failing or timed-out part is recorded and the next
one runs; DIR/gpu_check.json is rewritten atomically after every part, and the benchmark's partial figures
after every measurement, so a time-out loses nothing already measured):

1. ``bench``: the bench committee (configs/bench_cnn.yaml) and the same committee with ViT-B/16 in place of
   ViT-S/16, random weights (``pretrained: false``; speed does not depend on the values), bf16 autocast,
   batch 256 at 224 px: images/s, peak memory, FLOPs and MFU of each extractor's forward and of the routed
   model, eager / channels_last / SDPA off / torch.compile (train/benchmark.py's primitives).
2. ``quickstart``: configs/quickstart.yaml for a fixed number of steps in fp32 (TF32 off) and bf16; training
   losses and evaluation metrics against the CPU reference stored in train/tools/gpu_check_reference.json. On a GPU
   machine the CPU run is also repeated live, so that a stored reference made stale by a later model change
   is told apart from a GPU difference (``stored_reference_stale``).
3. ``parity``: ``accelerate launch`` of 1 process with batch N x b against N processes with batch b (NCCL on
   N GPUs; with one GPU, 1 GPU process against 2 CPU processes over gloo): final weights, metrics, gates.
4. ``scripts``: the tiny comparison (configs/compare_tiny.yaml) and 20 steps of MAE, SMIR and DINO
   pretraining (the ``*_gpu.yaml`` configs) on a synthetic unlabeled pool.
5. ``sync_audit``: host-device syncs in a routed training step and a top-1 inference (train/benchmark.py's
   static audit) and, on CUDA, the syncs that ``torch.cuda.set_sync_debug_mode("warn")`` reports.

Without CUDA, or with ``--smoke``, every part runs at tiny sizes on the CPU (torch.compile with the
``eager`` backend), so that a test keeps the script from rotting. Tolerances: ``TOLERANCES`` below.

>>> python train/gpu_check.py --out $OUT/gpu --work /tmp/gpu_check_work      # runs' checkpoints stay out of OUT
>>> python train/gpu_check.py --out /tmp/gc --parts quickstart parity --peak-tflops 989
"""

from __future__ import annotations

import argparse
import copy
import datetime
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

try:
    from backbone_router.extractors.io.atomic import atomic_write_bytes
    from backbone_router.train.tools.jobs import job_failed, run_jobs, slim, tail
except ImportError as e:  # a device machine gets the tree, not the install (and no network to pip from)
    raise SystemExit(f"gpu_check: the package is not installed ({e}); run `pip install --no-deps --no-build-isolation "
                     "-e .` first, or carry a wheel built here (`pip wheel --no-deps -w .whl .`) and install it with "
                     "`pip install --no-deps --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site") from None

REPO = Path(__file__).resolve().parents[1]

REFERENCE = REPO / "train" / "tools" / "gpu_check_reference.json"
PARTS = ("bench", "quickstart", "parity", "scripts", "sync_audit")

# Dense bf16 tensor-core peak TFLOP/s (vendor datasheets, no sparsity); the first pattern found in the device
# name wins, so more specific names come first. Anything else needs --peak-tflops.
PEAK_BF16_TFLOPS = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)

# Absolute tolerances. Measured on the CPU (2 cores, quickstart, 60 steps): bf16 autocast against fp32 moved
# the logged losses by <= 1.2e-3, the mean gate weights by <= 4.6e-3, accuracy by one image in 64 (0.016); the
# thread count changed nothing. "count" metrics (accuracy, balanced accuracy, foreground IoU) are argmax decisions,
# so a prediction at the boundary flips them by a whole image.
TOLERANCES = {
    "quickstart": {
        "fp32": {"loss": 2e-3, "gate": 1e-2, "mIoU": 1e-2, "pixel_accuracy": 1e-2, "count": 0.05},
        "bf16": {"loss": 1e-2, "gate": 3e-2, "mIoU": 2e-2, "pixel_accuracy": 2e-2, "count": 0.08},
    },
    # 1 process with batch N x b against N processes with batch b (tests/test_finetune.py uses the first).
    "parity": {
        "same_device": {"weights": 1e-4, "gate": 1e-4, "metric": 1e-3},
        "cpu_vs_gpu": {"weights": 1e-3, "gate": 1e-3, "metric": 0.11},  # 10 val images: one flip is 0.1
    },
}
COUNT_METRICS = ("accuracy", "balanced_accuracy", "fg_iou")
SMOOTH_METRICS = ("mIoU", "pixel_accuracy")

# Sizes of each mode.
MODES = {
    "gpu": {"bench": {"batch": 256, "resolution": 224, "warmup": 3, "reps": 10, "compile_backend": "inductor"},
            "quickstart_steps": 60, "pretrain_steps": 20, "sync_resolution": 224, "budget": 420, "threads": 4},
    "smoke": {"bench": {"batch": 2, "resolution": 32, "warmup": 1, "reps": 1, "compile_backend": "eager"},
              "quickstart_steps": 20, "pretrain_steps": 3, "sync_resolution": 64, "budget": 600, "threads": 1},
}
# Seconds: part -> ((limit, reserve) on a GPU, (limit, reserve) in smoke mode); the reserve is what the parts
# before it leave for it when the budget runs short.
LIMITS = {"bench": ((270, 40), (150, 30)), "quickstart": ((80, 35), (90, 30)), "parity": ((80, 35), (120, 40)),
          "scripts": ((110, 50), (120, 40)), "sync_audit": ((45, 20), (60, 20))}

# 1 process with batch N x b against N processes with batch b: the quickstart, shortened to the tiny run of
# tests/test_finetune.py (phase 2 from step 4 exercises the hand-reduced extractor gradients; evaluation at
# steps 4 and 8 gathers across processes).
PARITY_OVERRIDES = ["data.synthetic.n_train=40", "data.synthetic.n_val=10", "data.synthetic.size=40",
                    "data.image_size=32", "data.eval_size=32", "train.max_steps=8", "train.seed=1",
                    "train.eval_batch_size=6", "train.warmup_steps=2", "train.phase2_step=4",
                    "train.phase2_lr_scale=0.5", "train.eval_every=4", "train.save_every=4", "train.log_every=2",
                    "train.keep_last=2"]
PARITY_PER_PROCESS_BATCH = 2

# Tiny pretraining models for the smoke mode (as in tests/test_pretrain.py).
SMOKE_PRETRAIN = ["data.image_size=32", "data.preload_short_side=48",
                  "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"]
SMOKE_PRETRAIN_METHOD = {
    "mae": ["decoder.dim=32", "decoder.depth=1", "decoder.num_heads=2"],
    "smir": ["decoder.dim=32", "decoder.depth=1", "decoder.num_heads=2", "smir.partitions=2", "smir.num_masks=2",
             "smir.ssim_sigma=1.0"],
    "dino": ["dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops=2",
             "dino.local_size=16", "dino.teacher_temp_warmup_steps=2"],
}


# ---- small helpers ------------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    """Strict JSON (NaN / inf -> null), written to a temp file and renamed."""
    from backbone_router.train.training.metrics import json_safe

    atomic_write_bytes(Path(path), (json.dumps(json_safe(obj), indent=1, default=str) + "\n").encode())


def peak_tflops_for(device_name: str | None) -> tuple[float | None, str]:
    """(dense bf16 peak TFLOP/s, where it came from) for a CUDA device name, or (None, reason)."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if device_name and pattern in device_name:
            return tflops, f"table: {pattern!r} in {device_name!r} (dense bf16 datasheet figure)"
    return None, f"no table entry for {device_name!r}; pass --peak-tflops"


def child_env(ctx, **extra) -> dict:
    """Environment of every child: offline hub, a few threads, the repo importable, no GPU in smoke mode."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(ctx.threads),
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if ctx.mode == "smoke":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env.update({k: str(v) for k, v in extra.items()})
    return env


def fresh_dir(path: Path) -> Path:
    """An empty run folder of this check (a folder left by an earlier check is removed)."""
    import shutil

    shutil.rmtree(path, ignore_errors=True)
    return path


def python_cmd(*args) -> list[str]:
    return [sys.executable, *map(str, args)]


def launch_cmd(processes: int, *args) -> list[str]:
    """`accelerate launch` with every setting explicit (no accelerate config file is read for them)."""
    import socket

    with socket.socket() as s:  # a free rendezvous port: launches run back to back and side by side
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = python_cmd("-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no", "--main_process_port", port)
    cmd += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    return cmd + [str(REPO / "train" / "gpu_check.py"), *map(str, args)]


# ---- fine-tuning runs: strict fp32 wrapper, losses and metrics ---------------------------------------------
STRICT_FP32_ENV = "GPU_CHECK_STRICT_FP32"


def exec_finetune(argv: list[str]) -> int:
    """train/finetune.py's main, with TF32 off when $GPU_CHECK_STRICT_FP32=1 (fp32 means fp32 on Ampere+)."""
    if os.environ.get(STRICT_FP32_ENV) == "1":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    import runpy  # train/finetune.py is a script, not a module: run its file, as its command line does

    return runpy.run_path(str(REPO / "train" / "finetune.py"), run_name="gpu_check_finetune")["main"](argv)


def train_losses(run: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the train/loss* scalars finetune logged to tensorboard."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, dict[int, float]] = {}
    for f in sorted((run / "tensorboard").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(f)).Load():
            for v in event.summary.value:
                if v.tag.startswith("train/loss"):
                    value = v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value
                    out.setdefault(v.tag, {})[int(event.step)] = float(value)
    return out


def eval_metrics(run: Path) -> dict[int, dict]:
    """{step: {task: {metric: value, "gate": {...}}}} from metrics.jsonl, the compared metrics only."""
    keep = (*COUNT_METRICS, *SMOOTH_METRICS, "gate")
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[int(record["step"])] = {t: {k: v for k, v in m.items() if k in keep} for t, m in record["tasks"].items()}
    return out


def run_summary(run: Path) -> dict:
    return {"losses": {tag: {str(s): v for s, v in steps.items()} for tag, steps in train_losses(run).items()},
            "metrics": {str(s): m for s, m in eval_metrics(run).items()}}


def compare_runs(got: dict, ref: dict, tol: dict) -> dict:
    """Largest absolute differences per kind at the steps both runs logged, and whether each is within `tol`."""
    diffs = {"loss": 0.0, "gate": 0.0, "count": 0.0, **{k: 0.0 for k in SMOOTH_METRICS}}
    compared = {"loss_steps": set(), "metric_steps": set()}
    for tag, steps in ref["losses"].items():
        for s, v in steps.items():
            if s in got["losses"].get(tag, {}):
                diffs["loss"] = max(diffs["loss"], abs(got["losses"][tag][s] - v))
                compared["loss_steps"].add(int(s))
    for s, tasks in ref["metrics"].items():
        if s not in got["metrics"]:
            continue
        compared["metric_steps"].add(int(s))
        for task, m in tasks.items():
            g = got["metrics"][s][task]
            for k, v in m.items():
                if k == "gate":
                    diffs["gate"] = max([diffs["gate"], *(abs(g["gate"][e] - w) for e, w in v.items())])
                elif v is not None and g.get(k) is not None:
                    kind = "count" if k in COUNT_METRICS else k
                    diffs[kind] = max(diffs[kind], abs(g[k] - v))
    if not compared["loss_steps"] and not compared["metric_steps"]:
        raise RuntimeError("no step in common with the reference: nothing was compared")
    within = {k: diffs[k] <= tol[k] for k in diffs}
    return {"max_abs_diff": diffs, "tolerance": tol, "within": within, "pass": all(within.values()),
            "loss_steps": sorted(compared["loss_steps"]), "metric_steps": sorted(compared["metric_steps"])}


def quickstart_args(out: Path, steps: int) -> list[str]:
    return ["--config", str(REPO / "configs" / "quickstart.yaml"), "--output-dir", str(out),
            f"train.max_steps={steps}", "train.eval_every=20", "train.log_every=10"]


def write_reference() -> dict:
    """Run the quickstart for 60 steps in fp32 on the CPU and store its losses and metrics (the reference)."""
    import tempfile

    steps = MODES["gpu"]["quickstart_steps"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_reference_") as tmp:
        out = Path(tmp) / "run"
        cmd = python_cmd(REPO / "train" / "gpu_check.py", "--exec-finetune", *quickstart_args(out, steps))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail(proc.stderr)}")
        summary = run_summary(out)
    from backbone_router.train.experiments.benchmarking import hardware

    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    ref = {"what": f"configs/quickstart.yaml, {steps} steps, fp32 on the CPU, 1 process, OMP_NUM_THREADS=1",
           "commit": commit.stdout.strip() or None,
           "command": "python train/gpu_check.py --write-reference", "steps": steps,
           "created": datetime.date.today().isoformat(), "hardware": hardware(torch.device("cpu")), **summary}
    write_json(REFERENCE, ref)
    print(f"wrote {REFERENCE} ({steps} steps; losses at {sorted(map(int, ref['losses']['train/loss']))})")
    return ref


# ---- part 1: the benchmark (child process) -------------------------------------------------------------
def bench_committees() -> dict:
    """The bench committee, the same committee with its ViT-S/16 replaced by a ViT-B/16, and the multi-level
    committee of issue 28 (configs/bench_vit.yaml: three ViT-S/16, blocks 3/6/9/12, levels 4-32)."""
    from backbone_router.router import RouterConfig

    bench = RouterConfig.from_file(REPO / "configs" / "bench_cnn.yaml")
    tree = copy.deepcopy(bench.to_dict())
    for e in tree["extractors"]:
        if e["name"] == "vits16":
            e.update(spec="timm:vit_base_patch16_224", name="vitb16")
    return {"bench": bench, "vitb16": RouterConfig.from_dict(tree, where="gpu_check ViT-B/16 committee"),
            "pyramid": RouterConfig.from_file(REPO / "configs" / "bench_vit.yaml")}


BENCH_EXTRACTORS = {"bench": ["mnv2", "effl0", "vits16"], "vitb16": ["vitb16"], "pyramid": ["vit_a", "vit_b", "vit_c"]}
SETTINGS = {  # name -> (channels_last, sdpa, compile); bf16 autocast throughout
    "eager": (False, True, False),
    "channels_last": (True, True, False),
    "no_sdpa": (False, False, False),
    "compile": (False, True, True),
}


def bench_child(args, out_path: Path) -> None:
    """Measure every workload in priority order until the part's deadline; rewrite `out_path` after each."""
    from backbone_router.train.experiments.benchmarking import (
        Settings,
        count_flops,
        hardware,
        inference_fn,
        interleaved_seconds,
        make_target,
        peak_memory_mib,
        restored_weights,
        set_sdpa,
        train_step_fn,
    )

    deadline = time.monotonic() + args.deadline_s
    mode = MODES[args.mode]["bench"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, res = mode["batch"], mode["resolution"]
    for limit in ("recompile_limit", "cache_size_limit"):  # one graph per extractor instance, not a silent eager
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    peak = args.peak_tflops
    result = {"device": str(device), "hardware": hardware(device), "batch": batch, "resolution": res,
              "dtype": "bf16 autocast", "weights": "random (pretrained: false); speed does not depend on the values",
              "warmup": mode["warmup"], "reps": mode["reps"], "compile_backend": mode["compile_backend"],
              "peak_tflops": peak, "settings": {k: dict(zip(("channels_last", "sdpa", "compile"), v))
                                                for k, v in SETTINGS.items()},
              "extractors": {}, "committees": {}, "rows": [], "skipped": []}
    write_json(out_path, result)

    class CheckSettings(Settings):
        compile_backend = mode["compile_backend"]  # smoke mode: dynamo's graph capture, no C++ build

    def settings(name):
        cl, sdpa, comp = SETTINGS[name]
        return CheckSettings(device, bf16=True, channels_last=cl, sdpa=sdpa, compile=comp)

    committees = bench_committees()
    models, flops = {}, {}

    def model_of(committee):
        if committee not in models:
            from backbone_router.router import Router

            torch.manual_seed(0)
            models[committee] = Router(committees[committee]).to(device).eval()
        return models[committee]

    def measure(committee, workload, setting, need_s):
        """One (workload, setting): time, peak memory, FLOPs (counted once per workload, eager), MFU."""
        left = deadline - time.monotonic()
        row = {"committee": committee, "workload": workload, "setting": setting, "batch": batch, "resolution": res}
        if left < need_s:
            result["skipped"].append({**row, "why": f"time limit: {left:.0f} s left, needs ~{need_s} s"})
            write_json(out_path, result)
            return None
        model = model_of(committee)
        task = model.config.tasks[0].name
        s = settings(setting)
        warmup = max(mode["warmup"], 2) if s.compile else mode["warmup"]  # the 2nd call recompiles once (dynamic int)
        t0 = time.monotonic()
        try:
            module = model if workload.startswith("routed") else model.extractors[workload.split(":", 1)[1]]
            torch.manual_seed(0)
            images = s.prepare(model, torch.rand(batch, 3, res, res, device=device))
            if workload == "routed_train_step":
                target = make_target(model, task, images)
                model.train()
                with restored_weights(model):
                    fn = train_step_fn(model, task, images, target, s)
                    timed = interleaved_seconds({"x": fn}, device, warmup, mode["reps"])["x"]
                    row["peak_mem_mib"], row["mem_method"] = peak_memory_mib(fn, device)
                    if (committee, workload) not in flops:
                        flops[(committee, workload)] = count_flops(train_step_fn(model, task, images, target, settings("eager")))
                model.eval()
            else:
                fn = inference_fn(module, images, s, task if workload == "routed" else None)
                timed = interleaved_seconds({"x": fn}, device, warmup, mode["reps"])["x"]
                row["peak_mem_mib"], row["mem_method"] = peak_memory_mib(fn, device)
                if (committee, workload) not in flops:
                    eager = settings("eager")
                    eager.prepare(model, images)
                    flops[(committee, workload)] = count_flops(
                        inference_fn(module, images, eager, task if workload == "routed" else None))
                    s.prepare(model, images)
            f = flops[(committee, workload)]
            row.update(timed)
            row.update({"images_per_s": batch / timed["median_s"], "flops": f, "gflops_per_image": f / batch / 1e9,
                        "tflops_per_s": f / timed["median_s"] / 1e12,
                        "mfu": f / timed["median_s"] / (peak * 1e12) if peak else None})
        except Exception as e:  # noqa: BLE001 - recorded, and the next measurement runs
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            if device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            settings("eager").prepare(model, torch.empty(1, 3, 8, 8, device=device))
            model.eval()
        row["wall_s"] = round(time.monotonic() - t0, 2)
        result["rows"].append(row)
        summarize(result)
        write_json(out_path, result)
        return row

    # Priority order: the eager figures (and MFU) of every extractor and routed model first, then the cheap
    # option flips, then the training step, then torch.compile (tens of seconds of compilation each): first the
    # multi-level committee's (its singles, routed forward and training step: issue 28's routed / sum of singles).
    names = BENCH_EXTRACTORS
    result["committee_extractors"] = {c: [e.name for e in committees[c].extractors] for c in names}
    for committee, exts in names.items():
        for n in exts:
            measure(committee, f"extractor:{n}", "eager", 5)
        measure(committee, "routed", "eager", 10)
    for committee, exts in names.items():
        if committee == "pyramid":  # its ViT-S/16 is the bench committee's: the option flips are measured there
            continue
        for n in exts:
            measure(committee, f"extractor:{n}", "channels_last", 5)
            if set_sdpa(model_of(committee).extractors[n], True):  # attention modules only
                measure(committee, f"extractor:{n}", "no_sdpa", 5)
        measure(committee, "routed", "channels_last", 10)
    for committee in names:
        measure(committee, "routed_train_step", "eager", 15)
    need = 60 if mode["compile_backend"] == "inductor" else 5
    for n in names["pyramid"]:
        measure("pyramid", f"extractor:{n}", "compile", need)
    if mode["compile_backend"] == "inductor":  # tracing the whole router takes minutes on a small CPU
        measure("pyramid", "routed", "compile", 90)
        measure("pyramid", "routed_train_step", "compile", 90)
    for committee, n in (("vitb16", "vitb16"), ("bench", "vits16"), ("bench", "mnv2"), ("bench", "effl0")):
        measure(committee, f"extractor:{n}", "compile", need)
    if mode["compile_backend"] == "inductor":  # tracing the whole router takes minutes on a small CPU
        measure("bench", "routed", "compile", 3 * need)
    result["complete"] = True
    write_json(out_path, result)


def summarize(result: dict) -> None:
    """Per extractor and committee: the eager figures (with `mfu`) and the best setting measured."""
    for r in result["rows"]:
        if "error" in r:
            continue
        if r["workload"].startswith("extractor:"):
            slot = result["extractors"].setdefault(r["workload"].split(":", 1)[1], {"committee": r["committee"]})
        else:
            slot = result["committees"].setdefault(r["committee"], {}).setdefault(r["workload"], {})
        slot.setdefault("by_setting", {})[r["setting"]] = {k: r[k] for k in ("images_per_s", "peak_mem_mib", "mfu",
                                                                              "tflops_per_s", "median_s")}
        slot["gflops_per_image"] = r["gflops_per_image"]
        if r["setting"] == "eager":
            slot.update({k: r[k] for k in ("images_per_s", "peak_mem_mib", "mfu", "tflops_per_s")})
        best = max(slot["by_setting"], key=lambda k: slot["by_setting"][k]["images_per_s"])
        slot["best"] = {"setting": best, **slot["by_setting"][best]}
    # Routed / sum of the single extractors by time, per setting where the routed forward and every extractor of the
    # committee were measured (an extractor two committees share is measured once, on the same input).
    for committee, names in result.get("committee_extractors", {}).items():
        routed = result["committees"].get(committee, {}).get("routed", {}).get("by_setting", {})
        singles = [result["extractors"].get(n, {}).get("by_setting", {}) for n in names]
        result["committees"].setdefault(committee, {})["routed_over_singles"] = {
            s: r["median_s"] / sum(e[s]["median_s"] for e in singles)
            for s, r in routed.items() if all(s in e for e in singles)}


# ---- part 5: host-device sync audit (child process) -------------------------------------------------------
@contextmanager
def cuda_sync_warnings():
    """Collect the warnings of torch.cuda.set_sync_debug_mode("warn") as {repository line: count}."""
    found: dict[str, int] = {}
    saved = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return saved(message, category, filename, lineno, file, line)
        from backbone_router.train.experiments.benchmarking import repo_line

        where = f"{filename}:{lineno} (a library)"
        for frame in inspect.stack()[1:]:
            if ours := repo_line(frame):
                where = ours
                break
        found[where] = found.get(where, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        try:
            yield found
        finally:
            warnings.showwarning = saved


def sync_child(args, out_path: Path) -> None:
    from backbone_router.router import Router
    from backbone_router.train.experiments.benchmarking import AUDIT_DRIVERS, Settings, sync_audit

    AUDIT_DRIVERS.add(Path(__file__).resolve())  # blame the repository line under this script, or the library

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = MODES[args.mode]["sync_resolution"]
    torch.manual_seed(0)
    model = Router(bench_committees()["bench"]).to(device).eval()
    task = model.config.tasks[0].name
    ns = SimpleNamespace(resolutions=[res], device_=device, warmup=1, reps=3)
    with cuda_sync_warnings() as found:
        audit = sync_audit(model, task, ns, Settings(device, bf16=True))
    ours = {k: v for k, v in audit["train_step_routed"].items() if not k.endswith("(a library)")}
    result = {"device": str(device), "committee": "bench", "task": task, "batch": 2, "resolution": res,
              "static": audit, "cuda_sync_debug": found if device.type == "cuda" else None,
              "cuda_sync_count": sum(found.values()) if device.type == "cuda" else None,
              "train_step_repo_calls": ours, "train_step_repo_count": sum(ours.values()),
              "note": "static: tensor calls that wait for the device if the tensor lives there (CPU tensors, e.g. "
                      "AdamW's step counters, do not); cuda_sync_debug: the syncs the CUDA runtime reported"}
    write_json(out_path, result)


# ---- the parts, run from the parent ---------------------------------------------------------------------
def torch_child(ctx, part: str, timeout: float) -> dict:
    """Run `part` (bench / sync_audit) in a child process; its JSON (partial on a time-out) is the result."""
    path = ctx.out / "parts" / f"{part}.json"
    path.unlink(missing_ok=True)
    cmd = python_cmd(REPO / "train" / "gpu_check.py", "--child", part, "--out", ctx.out, "--mode", ctx.mode,
                     "--deadline-s", max(10, timeout - 15))
    if ctx.peak_tflops:
        cmd += ["--peak-tflops", ctx.peak_tflops]
    jobs = run_jobs({part: {"cmd": cmd, "env": child_env(ctx)}}, timeout, 1, ctx.out / "logs", REPO)
    result = json.loads(path.read_text()) if path.is_file() else {}
    result["job"] = slim(jobs)[part]
    why = job_failed(jobs[part])
    if why:
        result["error"] = why
    return result


def part_bench(ctx, timeout):
    """Passes when every extractor has its eager figures (with `mfu`) and no measurement failed; a time-out
    during the later, optional measurements (compile) is recorded but keeps what was measured."""
    result = torch_child(ctx, "bench", timeout)
    errors = [r for r in result.get("rows", []) if "error" in r]
    eager = {n for n, e in result.get("extractors", {}).items() if "mfu" in e}
    result["pass"] = eager == {n for names in BENCH_EXTRACTORS.values() for n in names} and not errors
    return result


def part_sync(ctx, timeout):
    result = torch_child(ctx, "sync_audit", timeout)
    result["pass"] = "static" in result and "error" not in result
    return result


def part_quickstart(ctx, timeout):
    steps = ctx.cfg["quickstart_steps"]
    ref = json.loads(REFERENCE.read_text())
    runs = {"fp32": {STRICT_FP32_ENV: "1", "ACCELERATE_MIXED_PRECISION": "no"},
            "bf16": {"ACCELERATE_MIXED_PRECISION": "bf16"}}
    if ctx.mode == "gpu":  # the CPU run, live: tells a stale stored reference from a GPU difference
        runs["cpu_fp32"] = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "no"}
    jobs = {}
    for p, env in runs.items():
        fresh_dir(ctx.work / f"quickstart_{p}")
        jobs[f"quickstart_{p}"] = {"cmd": python_cmd(REPO / "train" / "gpu_check.py", "--exec-finetune",
                                                     *quickstart_args(ctx.work / f"quickstart_{p}", steps)),
                                   "env": child_env(ctx, **env)}
    done = run_jobs(jobs, timeout, ctx.parallel, ctx.out / "logs", REPO)
    result = {"config": "configs/quickstart.yaml", "steps": steps, "device": ctx.device,
              "reference": f"{REFERENCE.relative_to(REPO)} ({ref['what']}, {ref['created']}, {ref.get('commit')})",
              "fp32_note": "TF32 off (torch.backends.cuda.matmul / cudnn allow_tf32 = False)",
              "jobs": slim(done), "runs": {}}
    got = {}
    for p in runs:
        why = job_failed(done[f"quickstart_{p}"])
        if why:
            result["runs"][p] = {"error": why, "pass": False}
        else:
            got[p] = run_summary(ctx.work / f"quickstart_{p}")
    # The live CPU fp32 run (in smoke mode the fp32 run is one) against the stored one: equal unless the model,
    # the data or the training loop changed since the reference was written. Then the live run is the reference.
    live = "cpu_fp32" if ctx.mode == "gpu" else "fp32"
    stale = None
    if live in got:
        check = compare_runs(got[live], ref, TOLERANCES["quickstart"]["fp32"])
        stale = not check["pass"]
        result["live_cpu_vs_stored"] = check
    result["stored_reference_stale"] = stale
    if stale:
        result["note"] = (f"the stored reference is stale (the live CPU run differs by {check['max_abs_diff']}); "
                          "compared with the live CPU run instead. Regenerate: python train/gpu_check.py --write-reference")
    for p in ("fp32", "bf16"):
        if p not in got:
            continue
        tol = TOLERANCES["quickstart"][p]
        r = {"vs_stored": compare_runs(got[p], ref, tol), "seconds": done[f"quickstart_{p}"]["seconds"],
             "final_loss": got[p]["losses"].get("train/loss", {}).get(str(steps))}
        if stale:
            r["vs_live_cpu"] = compare_runs(got[p], got[live], tol)
        chosen = r["vs_live_cpu"] if stale else r["vs_stored"]
        r.update({"pass": chosen["pass"], "max_abs_diff": chosen["max_abs_diff"],
                  "compared_with": "live CPU run" if stale else "stored reference"})
        result["runs"][p] = r
    if ctx.mode == "gpu" and "cpu_fp32" in got:
        result["runs"]["cpu_fp32"] = {"pass": True, "seconds": done["quickstart_cpu_fp32"]["seconds"],
                                      "note": "the live CPU reference run"}
    result["pass"] = all(r.get("pass") for r in result["runs"].values())
    return result


def part_parity(ctx, timeout):
    b = PARITY_PER_PROCESS_BATCH
    n = ctx.n_gpus if ctx.n_gpus > 1 else 2
    many_on = "gpu (NCCL)" if ctx.n_gpus > 1 else "cpu (gloo)"
    one_on = "gpu" if ctx.mode == "gpu" else "cpu"
    hf_home = ctx.work / "hf_home"  # no accelerate config file of this machine is read

    def job(name, processes, batch, **env):
        args = ["--exec-finetune", "--config", REPO / "configs" / "quickstart.yaml", "--output-dir",
                fresh_dir(ctx.work / name), *PARITY_OVERRIDES, f"train.batch_size={batch}"]
        return {"cmd": launch_cmd(processes, *args), "env": child_env(ctx, HF_HOME=hf_home, **env)}

    jobs = {"parity_one": job("parity_one", 1, n * b, **{STRICT_FP32_ENV: "1"}),
            f"parity_{n}": job(f"parity_{n}", n, b, **({STRICT_FP32_ENV: "1"} if ctx.n_gpus > 1 else
                                                        {"CUDA_VISIBLE_DEVICES": ""}))}
    done = run_jobs(jobs, timeout, ctx.parallel, ctx.out / "logs", REPO)
    kind = "same_device" if one_on == many_on.split()[0] else "cpu_vs_gpu"
    tol = TOLERANCES["parity"][kind]
    result = {"one": {"processes": 1, "batch": n * b, "device": one_on},
              "many": {"processes": n, "batch": b, "device": many_on}, "tolerance": {kind: tol},
              "jobs": slim(done), "config": "configs/quickstart.yaml with PARITY_OVERRIDES (train/gpu_check.py)"}
    whys = {k: job_failed(v) for k, v in done.items() if job_failed(v)}
    if whys:
        return {**result, "error": "; ".join(f"{k}: {v}" for k, v in whys.items()), "pass": False}
    if f"{n} process(es) x {b}" not in done[f"parity_{n}"]["stdout"]:
        return {**result, "error": f"the {n}-process run did not report {n} processes x {b}", "pass": False}
    from safetensors.torch import load_file

    w1 = load_file(str(ctx.work / "parity_one" / "final" / "model.safetensors"))
    wn = load_file(str(ctx.work / f"parity_{n}" / "final" / "model.safetensors"))
    if w1.keys() != wn.keys():
        return {**result, "error": "the two runs saved different tensors", "pass": False}
    weights = max(float((w1[k].float() - wn[k].float()).abs().max()) for k in w1)
    m1, mn = eval_metrics(ctx.work / "parity_one"), eval_metrics(ctx.work / f"parity_{n}")
    metric = gate = 0.0
    for step in m1:
        for task, m in m1[step].items():
            for k, v in m.items():
                if k == "gate":
                    gate = max([gate, *(abs(mn[step][task]["gate"][e] - w) for e, w in v.items())])
                elif v is not None and mn[step][task].get(k) is not None:
                    metric = max(metric, abs(mn[step][task][k] - v))
    diffs = {"weights": weights, "gate": gate, "metric": metric}
    within = {k: diffs[k] <= tol[k] for k in diffs}
    return {**result, "max_abs_diff": diffs, "within": within, "pass": all(within.values()),
            "eval_steps": sorted(m1)}


def part_scripts(ctx, timeout):
    from backbone_router.train.training.synthetic import write_synthetic_dataset

    gpu = ctx.mode == "gpu"
    pool = ctx.work / "pool"
    write_synthetic_dataset(pool, "shapes", n_train=256 if gpu else 12, n_val=4, size=64 if gpu else 48, seed=1)
    steps = ctx.cfg["pretrain_steps"]
    cmp_out = fresh_dir(ctx.work / "compare")
    cmp_extra = [] if gpu else ["compare.variants=[concat, gated_token]", "compare.seeds=[0]"]
    jobs = {"compare": {"cmd": python_cmd(REPO / "train" / "compare.py", "--config", REPO / "configs" / "compare_tiny.yaml",
                                          "--output-dir", cmp_out, f"compare.cache_dir={ctx.work / 'compare_cache'}",
                                          *cmp_extra),
                        "env": child_env(ctx)}}
    for method in ("mae", "smir", "dino"):
        config = REPO / "configs" / (f"pretrain_{method}_gpu.yaml" if gpu else f"pretrain_{method}.yaml")
        extra = ["data.num_workers=4"] if gpu else [*SMOKE_PRETRAIN, *SMOKE_PRETRAIN_METHOD[method], "train.cpu_threads=1"]
        jobs[f"pretrain_{method}"] = {
            "cmd": python_cmd(REPO / "train" / "pretrain.py", "--config", config, "--output-dir",
                              fresh_dir(ctx.work / f"pretrain_{method}"),
                              f"data.root={pool}", "data.datasets=[shapes]", f"train.max_steps={steps}",
                              f"train.log_every={max(1, steps // 4)}", "train.batch_size=" + ("256" if gpu else "4"), *extra),
            "env": child_env(ctx)}
    done = run_jobs(jobs, timeout, ctx.parallel, ctx.out / "logs", REPO)
    result = {"jobs": slim(done), "pool": f"synthetic shapes ({'256' if gpu else '12'} images), not the real datasets",
              "pretrain_steps": steps, "runs": {}}
    why = job_failed(done["compare"])
    if why:
        result["runs"]["compare"] = {"error": why, "pass": False}
    else:
        summary = json.loads((cmp_out / "summary.json").read_text())
        rows = json.loads((cmp_out / "results.json").read_text())
        rows = rows["rows"] if isinstance(rows, dict) else rows
        values = [r["value"] for r in rows if isinstance(r.get("value"), (int, float))]
        result["runs"]["compare"] = {"seconds": done["compare"]["seconds"], "rows": len(rows),
                                     "variants": sorted({r["variant"] for r in rows}),
                                     "all_finite": all(math.isfinite(v) for v in values),
                                     "summary_keys": sorted(summary)[:20],
                                     "pass": bool(rows) and all(math.isfinite(v) for v in values)}
    for method in ("mae", "smir", "dino"):
        name = f"pretrain_{method}"
        why = job_failed(done[name])
        if why:
            result["runs"][name] = {"error": why, "pass": False}
            continue
        lines = [json.loads(ln) for ln in (ctx.work / name / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        final = json.loads((ctx.work / name / "final" / "config.json").read_text())["backbone_router"]  # timm's format
        losses = [r["loss"] for r in lines]
        result["runs"][name] = {"seconds": done[name]["seconds"], "steps": final["source"]["steps"],
                                "losses": losses, "sec_per_step_last": lines[-1]["sec_per_step"] if lines else None,
                                "pass": final["source"]["steps"] == steps and bool(losses)
                                and all(math.isfinite(v) for v in losses)}
    result["pass"] = all(r["pass"] for r in result["runs"].values())
    return result


PART_FUNCTIONS = {"bench": part_bench, "quickstart": part_quickstart, "parity": part_parity,
                  "scripts": part_scripts, "sync_audit": part_sync}


# ---- report -----------------------------------------------------------------------------------------------
def print_table(report: dict) -> None:
    bench = report["parts"].get("bench", {})
    print(f"\ngpu_check ({report['mode']} mode) on {report['hardware'].get('gpu') or report['hardware'].get('cpu')}; "
          f"peak {report['peak_tflops']} TFLOP/s ({report['peak_tflops_source']})")
    if bench.get("rows"):
        print(f"bench: batch {bench['batch']}, {bench['resolution']} px, {bench['dtype']}, {bench['weights']}")
        head = f"{'committee':<8} {'workload':<20} {'setting':<14} {'img/s':>9} {'peak MiB':>9} {'GFLOP/img':>9} {'TFLOP/s':>8} {'MFU':>6}"
        print(head + "\n" + "-" * len(head))
        for r in bench["rows"]:
            if "error" in r:
                print(f"{r['committee']:<8} {r['workload']:<20} {r['setting']:<14} error: {r['error'][:60]}")
                continue
            mem = "n/a" if r.get("peak_mem_mib") is None else f"{r['peak_mem_mib']:.0f}"
            mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
            print(f"{r['committee']:<8} {r['workload']:<20} {r['setting']:<14} {r['images_per_s']:>9.1f} {mem:>9} "
                  f"{r['gflops_per_image']:>9.2f} {r['tflops_per_s']:>8.2f} {mfu:>6}")
        for s in bench.get("skipped", []):
            print(f"{s['committee']:<8} {s['workload']:<20} {s['setting']:<14} skipped ({s['why']})")
    print()
    for name, part in report["parts"].items():
        status = part.get("status")
        verdict = "PASS" if part.get("pass") else "FAIL"
        print(f"{name:<11} {status:<8} {verdict:<5} {part.get('seconds', 0):>6.1f} s  {detail(name, part)}")


def detail(name: str, part: dict) -> str:
    if part.get("error"):
        return part["error"][:150]
    if name == "quickstart":
        stale = "stored reference STALE, compared with the live CPU run; " if part.get("stored_reference_stale") else ""
        return stale + "; ".join(f"{p}: loss diff {r['max_abs_diff']['loss']:.2e}, gate {r['max_abs_diff']['gate']:.2e}, "
                         f"count {r['max_abs_diff']['count']:.3f}" if "max_abs_diff" in r else f"{p}: {r.get('error')}"
                         for p, r in part.get("runs", {}).items())
    if name == "parity" and "max_abs_diff" in part:
        d = part["max_abs_diff"]
        return (f"1 x {part['one']['batch']} ({part['one']['device']}) vs {part['many']['processes']} x "
                f"{part['many']['batch']} ({part['many']['device']}): weights {d['weights']:.2e}, gate {d['gate']:.2e}, "
                f"metrics {d['metric']:.2e}")
    if name == "scripts":
        return "; ".join(f"{k} {'ok' if r.get('pass') else r.get('error', 'failed')}"
                         + (f" {r['seconds']:.0f}s" if "seconds" in r else "") for k, r in part.get("runs", {}).items())
    if name == "sync_audit" and "static" in part:
        cuda = "n/a (CPU)" if part["cuda_sync_count"] is None else part["cuda_sync_count"]
        return (f"possible syncs at repository lines in a routed train step: {part['train_step_repo_count']}; "
                f"syncs the CUDA runtime reported: {cuda}")
    if name == "bench":
        ratios = "; ".join(f"{c} routed / singles " + ", ".join(f"{s} {v:.3f}" for s, v in slot["routed_over_singles"].items())
                           for c, slot in part.get("committees", {}).items() if slot.get("routed_over_singles"))
        return f"{len(part.get('rows', []))} measurements, {len(part.get('skipped', []))} skipped" + (f"; {ratios}" if ratios else "")
    return ""


# ---- main -------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for gpu_check.json, parts/ (each part's JSON) and logs/")
    p.add_argument("--work", default=None, help="folder for the runs' outputs (checkpoints, models; default: OUT/work)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU even when CUDA is present")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS, help="run only these parts")
    p.add_argument("--budget", type=float, default=None, help="seconds for all parts (default: 420 on a GPU, 600 smoke)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for MFU (default: from the table)")
    p.add_argument("--write-reference", action="store_true", help=f"regenerate {REFERENCE.name} on the CPU and exit")
    p.add_argument("--child", choices=("bench", "sync_audit"), help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=tuple(MODES), help=argparse.SUPPRESS)
    p.add_argument("--deadline-s", type=float, default=600, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--exec-finetune"]:
        return exec_finetune(argv[1:])
    args = parse_args(argv)
    if args.write_reference:
        return write_reference()
    if args.child:
        out = Path(args.out) / "parts" / f"{args.child}.json"
        (bench_child if args.child == "bench" else sync_child)(args, out)
        return 0
    if not args.out:
        raise SystemExit("--out DIR is required")

    from backbone_router.train.experiments.benchmarking import hardware

    mode = "smoke" if args.smoke or not torch.cuda.is_available() else "gpu"
    cfg = MODES[mode]
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    for folder in (out / "parts", out / "logs", work):
        folder.mkdir(parents=True, exist_ok=True)
    hw = hardware(device)
    if mode == "gpu":
        hw.update(cuda=torch.version.cuda, gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    n_gpus = torch.cuda.device_count() if mode == "gpu" else 0
    peak, source = (args.peak_tflops, "--peak-tflops") if args.peak_tflops else (
        peak_tflops_for(hw.get("gpu")) if mode == "gpu" else (None, "CPU: no table entry; pass --peak-tflops"))
    budget = args.budget or cfg["budget"]
    cpus = os.cpu_count() or 1
    ctx = SimpleNamespace(mode=mode, cfg=cfg, device=str(device), n_gpus=n_gpus, out=out, work=work, peak_tflops=peak,
                          threads=cfg["threads"], parallel=4 if cpus >= 8 else 2)
    report = {"mode": mode, "command": "python train/gpu_check.py " + " ".join(argv),
              "started": datetime.datetime.now().isoformat(timespec="seconds"), "hardware": {**hw, "gpus": n_gpus},
              "peak_tflops": peak, "peak_tflops_source": source, "budget_s": budget,
              "tolerances": TOLERANCES, "parts": {}, "mfu": {}, "finished": False}
    json_path = out / "gpu_check.json"
    write_json(json_path, report)
    print(f"gpu_check: {mode} mode on {hw.get('gpu') or hw['cpu']}, budget {budget:.0f} s; writing {json_path}",
          flush=True)

    def on_term(signum, frame):  # the outer `timeout`: what is written stays; stop our children
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    t_start = time.monotonic()
    todo = [p for p in PARTS if p in args.parts]
    try:
        for i, name in enumerate(todo):
            left = budget - (time.monotonic() - t_start)
            slot = 0 if mode == "gpu" else 1
            reserve = sum(LIMITS[p][slot][1] for p in todo[i + 1:])
            timeout = min(LIMITS[name][slot][0], left - reserve)
            t0 = time.monotonic()
            if timeout < 10:
                report["parts"][name] = {"status": "skipped", "pass": False, "seconds": 0.0,
                                         "error": f"budget: {left:.0f} s left, {reserve} s kept for the later parts"}
            else:
                print(f"[{time.monotonic() - t_start:5.0f} s] {name} (limit {timeout:.0f} s)", flush=True)
                try:
                    part = PART_FUNCTIONS[name](ctx, timeout)
                    status = "timeout" if "timed out" in str(part.get("error", "")) else (
                        "error" if part.get("error") else "ok")
                except Exception as e:  # noqa: BLE001 - one part failing must not lose the others
                    part = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:],
                            "pass": False}
                    status = "error"
                report["parts"][name] = {"status": status, "seconds": round(time.monotonic() - t0, 1), **part}
            if name == "bench":
                report["mfu"] = {n: e.get("mfu") for n, e in report["parts"][name].get("extractors", {}).items()}
            write_json(json_path, report)
            print(f"        {name}: {report['parts'][name]['status']}, "
                  f"{'PASS' if report['parts'][name].get('pass') else 'FAIL'} - {detail(name, report['parts'][name])}",
                  flush=True)
        report["finished"] = True
    except KeyboardInterrupt as e:
        report["interrupted"] = str(e) or "KeyboardInterrupt"
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    report["pass"] = all(p.get("pass") for p in report["parts"].values()) and report["finished"]
    write_json(json_path, report)
    print_table(report)
    print(f"\n{json_path}: {'all parts passed' if report['pass'] else 'NOT all parts passed'} "
          f"({report['elapsed_s']:.0f} s)")
    return report


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
