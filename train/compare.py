"""Single versus routed extractors: every fusion variant on the same frozen features, data and budget.

    accelerate launch train/compare.py --config configs/compare_shared.yaml --output-dir runs/cmp
    accelerate launch train/compare.py --config configs/compare_tiny.yaml --output-dir runs/cmp_tiny \\
        compare.seeds=[0,1] train.max_steps=50

One config names the extractors and tasks (``model:``), the datasets (``data:``), the budget (``train:``) and the
comparison (``compare:``, :class:`train.experiments.compare_config.CompareConfig`). The variants, views, frozen features and the
per-seed training are :mod:`train.experiments.comparison`; results are written per (variant, seed) the moment they are done
(:mod:`train.experiments.results`), the report by :mod:`train.experiments.reporting`. ``--resume`` trains the seeds that still miss a
result; one run at a time per output dir, no overwrite without --overwrite (:mod:`train.training.rundir`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.train.experiments.compare_config import load_compare_config
from backbone_router.train.experiments.comparison import DTYPES, Comparison, expand_variants
from backbone_router.train.experiments.feature_cache import FeatureCache
from backbone_router.train.experiments.peers import encoder_state
from backbone_router.train.experiments.reporting import write_report
from backbone_router.train.experiments.results import (
    ResultStore,
    collect,
    missing_notes,
    publish_plan,
    read_plan,
    remove_plan,
)
from backbone_router.train.training.data import prepare_experiment_data
from backbone_router.train.training.errors import run_cli
from backbone_router.train.training.metrics import primary_metric
from backbone_router.train.training.rundir import (
    COMPARE_OUTPUTS,
    add_run_dir_args,
    claim_output_dir,
    with_run_dir,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML with model / data / train / compare sections")
    p.add_argument("--output-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="train only the seeds whose results the output dir misses")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=200 compare.seeds=[0,1]")
    add_run_dir_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return with_run_dir(run, parse_args(argv))


def run(args: argparse.Namespace, run_dir: contextlib.ExitStack) -> int:
    cfg, cmp = load_compare_config(args.config, args.overrides)
    output_dir = Path(args.output_dir or Path("runs") / Path(args.config).stem)
    t = cfg.train
    if cmp.threads:
        torch.set_num_threads(cmp.threads)

    # ---- accelerator: seeds are split across processes (each trains every variant for its seeds)
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(cpu=multi_cpu or None)
    main_process, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    say, bars = accelerator.print, accelerator.is_local_main_process
    lock = run_dir.enter_context(claim_output_dir(output_dir, "compare", COMPARE_OUTPUTS, resume=args.resume,
                                                  overwrite=args.overwrite, accelerator=accelerator))
    timings: dict[str, float] = {}

    # ---- data and views
    t0 = time.perf_counter()
    _, tasks = prepare_experiment_data(cfg, output_dir, main_process, accelerator.wait_for_everyone)
    task_names = list(tasks)
    variants = expand_variants(cmp, cfg.model)  # after the tasks got their classes from meta.json
    primary = {n: cmp.metrics.get(n) or primary_metric(td.task.type, td.task.num_classes) for n, td in tasks.items()}
    if unknown := sorted(set(cmp.metrics) - set(task_names)):
        raise ValueError(f"compare.metrics: unknown task(s) {unknown}; tasks are {task_names}")
    job = Comparison(cfg, cmp, tasks, variants, accelerator.device, progress=bars, say=say)
    peer_names = [v.name for v in variants if v.kind == "peer"]
    if peer_names and not job.seg_classes:
        raise ValueError(f"compare.variants: peer variants {peer_names} serve segmentation tasks only; there is none")
    peer_state = encoder_state(cmp.peer_checkpoint) if peer_names else None  # the peers' encoder, read once
    notes = {p: f"segmentation tasks only (an smp U-Net): no rows for {[n for n in task_names if n not in job.seg_classes]}"
             for p in peer_names if len(job.seg_classes) < len(task_names)}
    resolved = {**cfg.to_dict(), "compare": dataclasses.asdict(cmp)}
    pairs = ResultStore(output_dir, resolved, {v.name: {"kind": v.kind, **v.model.to_dict()} for v in variants})
    todo = pairs.seeds_to_train(cmp.seeds)  # a result of other settings in the dir is an error here, in every process
    if args.resume:
        say(f"--resume: {len(variants) * len(cmp.seeds) - len(pairs.missing(cmp.seeds))} of "
            f"{len(variants) * len(cmp.seeds)} (variant, seed) results done; training seed(s) {todo}")
    if main_process:
        atomic_write_bytes(output_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False).encode())
    job.build_views(primary)
    timings["views_s"] = time.perf_counter() - t0

    # ---- extractors (built once, shared by all variants) and their frozen features; the main process fills the
    # cache first, the others then read it (no collective)
    t0 = time.perf_counter()
    job.load_extractors()
    timings["extractors_load_s"] = time.perf_counter() - t0
    cache = FeatureCache(cmp.cache_dir, dtype=DTYPES[cmp.cache_dtype]) if cmp.cache_dir else None
    calls_before = {n: e.forward_calls for n, e in job.shared.items()}
    t0 = time.perf_counter()
    plan = {}
    job.compute_features(cache, None if main_process else lambda: plan.setdefault("todo", read_plan(output_dir, lock.token)))
    todo = plan.get("todo", todo)
    if main_process:
        publish_plan(output_dir, lock.token, todo)
    timings["features_s"] = time.perf_counter() - t0
    forward_calls = {n: e.forward_calls - calls_before[n] for n, e in job.shared.items()}
    cache_stats = cache.stats() if cache is not None else {"hits": 0, "misses": 0}
    say(f"features in {timings['features_s']:.1f}s: cache {cmp.cache_dir} {cache_stats}, extractor forward calls "
        f"{forward_calls}" + "".join(f"; {k} runs {x} live (unfrozen, not cached)" for k, x in job.live.items() if x))
    job.prepare_training()
    if t.grad_accum_steps != 1 and main_process:
        say(f"note: train.grad_accum_steps={t.grad_accum_steps}: each optimizer step accumulates that many batches")
    meta = {
        "tasks": task_names, "task_types": {n: tasks[n].task.type for n in task_names}, "primary": primary,
        "num_classes": {n: tasks[n].task.num_classes for n in task_names},
        "datasets": {n: tasks[n].folder.name for n in task_names}, "synthetic": cfg.data.synthetic is not None,
        "variants": [v.name for v in variants], "kinds": {v.name: v.kind for v in variants}, "notes": notes,
        "single_extractors": {v.name: v.model.single for v in variants if v.kind == "single"},
        "peer_checkpoint": cmp.peer_checkpoint if peer_names else None,
        "extractors": list(job.shared), "families": {n: ext.info.family for n, ext in job.shared.items()},
        "seeds": cmp.seeds,
        "budget": {"max_steps": t.max_steps, "batch_size": t.batch_size, "lr": t.lr, "views": cmp.views,
                   "image_size": cfg.data.image_size, "eval_size": cfg.data.eval_size,
                   "train_items": {n: len(job.views[n]["train"]) for n in task_names},
                   "val_items": {n: len(job.views[n]["val"]) for n in task_names}},
        "cache": {"dir": cmp.cache_dir, **cache_stats, "extractor_forward_calls": forward_calls,
                  "live": {k: x for k, x in job.live.items() if x}},
        "timings_s": dict(timings),
        "command": " ".join(["accelerate launch train/compare.py", "--config", str(args.config), "--output-dir",
                             str(output_dir), *args.overrides]),
    }
    if main_process:  # what a report of a run that has not finished needs (report.py <output dir>)
        pairs.save_meta(meta)

    # ---- training: per seed, every variant on the same batches
    for seed in todo[rank::world]:
        job.train_seed(seed, peer_state, pairs.save, progress=bars)

    # ---- the report, from the result files: the main process waits for the others' files (no collective)
    if main_process:
        pairs.wait(cmp.seeds, say=say)
        remove_plan(output_dir, lock.token)
        done = collect(pairs, cmp.seeds)
        meta["notes"] = {**notes, **missing_notes(done["missing"])}
        meta["timings_s"]["train_per_variant"] = done["train_s"]
        paths = write_report(output_dir, done["rows"], done["gates"], done["sweeps"], meta, done["ablation"])
        say(f"\nreport: {paths['md']}\n" + Path(paths["md"]).read_text())
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
