"""Fine-tune a Router on several tasks at once with Accelerate.

    accelerate launch train/finetune.py                                  # configs/quickstart.yaml
    accelerate launch train/finetune.py --config configs/mtd_camvid_flowers.yaml --output-dir runs/x \\
        train.max_steps=2000 model.fusion=concat
    accelerate launch train/finetune.py --output-dir runs/x --resume     # continue from the latest checkpoint
    accelerate launch train/finetune.py --output-dir runs/x --overwrite  # start afresh where a run was
    accelerate launch --multi_gpu --num_processes 2 train/finetune.py ...   # two processes (CPU: gloo)

Each training batch holds one task (drawn by the data.tasks weights from a seeded schedule, so every process
draws the same task at the same step). The global batch is train.batch_size x processes and is split across
processes, so two processes with batch b follow a one-process run with batch 2b.
Phase 1 trains router and heads with the extractors frozen; from train.phase2_step the last
ExtractorConfig.unfreeze_last blocks of each extractor train too, at train.phase2_lr_scale x lr (train/training/phase2.py).

One run at a time per output dir (train/training/rundir.py): a lock names the run using it, and a fresh run into a dir
holding a previous run is refused unless --overwrite. A config or data error is one line (--debug: traceback).

The output dir gets config.yaml (resolved), metrics.jsonl (one line per evaluation), checkpoints/step_<n>/
(accelerator.save_state, written to a temp dir and renamed: train/training/checkpoints.py), final/ (Router.save_pretrained)
and tensorboard/. The loop itself is train/training/engine.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed

from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.router import Router
from backbone_router.train.training import checkpoints
from backbone_router.train.training.config import ExperimentConfig
from backbone_router.train.training.data import (
    TaskDataset,
    TaskSchedule,
    describe,
    eval_loaders,
    prepare_experiment_data,
    train_loader,
)
from backbone_router.train.training.engine import Finetuner, binary_seg_priors
from backbone_router.train.training.errors import RunError, run_cli
from backbone_router.train.training.optim import make_optimizer
from backbone_router.train.training.phase2 import Phase2
from backbone_router.train.training.rundir import (
    FINETUNE_OUTPUTS,
    add_run_dir_args,
    claim_output_dir,
    with_run_dir,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help=f"experiment YAML/JSON (default: {DEFAULT_CONFIG.name}, or "
                   "the output dir's config.yaml with --resume)")
    p.add_argument("--output-dir", default=None, help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    p.add_argument("--change-global-batch", action="store_true",
                   help="with --resume: allow another global batch (processes x train.batch_size) than the checkpoint's")
    add_run_dir_args(p)
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="checkpoint and exit after this step, as an interruption would (the schedule still "
                        "runs to train.max_steps); continue later with --resume")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.max_steps=20 model.fusion=concat")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return with_run_dir(run, parse_args(argv))


def run(args: argparse.Namespace, run_dir: contextlib.ExitStack) -> int:
    # ---- config (--resume without --config: the run's own config; never a silent quickstart)
    if args.resume and args.config is None:
        if args.output_dir is None or not (Path(args.output_dir) / "config.yaml").is_file():
            where = f"{args.output_dir} holds no run (no config.yaml)" if args.output_dir else "no --output-dir given"
            raise RunError(f"--resume: {where}; pass the --output-dir of an earlier run, or --config to start one")
        config_path = Path(args.output_dir) / "config.yaml"
    else:
        config_path = Path(args.config) if args.config else DEFAULT_CONFIG
        if not args.config and not DEFAULT_CONFIG.is_file():  # run by module from an installed wheel: no configs/
            raise RunError(f"no --config, and the default {DEFAULT_CONFIG} does not exist: the scripts in train/ "
                           "run from a source checkout (README, Install); pass --config to run elsewhere")
    cfg = ExperimentConfig.from_file(config_path, args.overrides)
    output_dir = Path(args.output_dir or Path("runs") / config_path.stem)
    t = cfg.train
    checkpoints.check_output_dir(output_dir)

    # ---- accelerator (`accelerate launch --multi_gpu` without GPUs: Accelerate joins the processes with gloo
    # only when told to use the CPU); each batch serves one task, so the other heads get no gradient in a step
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu or None, gradient_accumulation_steps=t.grad_accum_steps, log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main_process, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    say = accelerator.print
    run_dir.enter_context(claim_output_dir(output_dir, "finetune", FINETUNE_OUTPUTS, resume=args.resume,
                                           overwrite=args.overwrite, accelerator=accelerator))
    if args.resume and (note := checkpoints.finished_run(output_dir, t.max_steps)):
        say(note)  # final/ is written once: a finished run stays as it is
        return 0
    if cfg.data.synthetic is not None and all(not e.pretrained for e in cfg.model.extractors):
        say("quickstart: synthetic data + tiny random extractors; not a real model")
    elif all(not e.pretrained for e in cfg.model.extractors):
        say("note: every extractor has random weights (pretrained: false); not a real model")

    # ---- data (also fills model.tasks classes / ignore_index from meta.json; every file decoded once, now)
    root, tasks = prepare_experiment_data(cfg, output_dir, main_process, accelerator.wait_for_everyone)
    saved_config = output_dir / "config.yaml"
    resume_from = checkpoints.latest_checkpoint(output_dir) if args.resume else None
    if args.resume and saved_config.is_file():
        note = checkpoints.check_resume_config(saved_config, cfg.to_dict(), resume_from, world, t.batch_size,
                                               args.change_global_batch)
        if note:
            say(f"note: {note}")
    if main_process:
        atomic_write_bytes(saved_config, cfg.to_yaml().encode())
    say(f"data root {root}\n{describe(tasks)}")
    train_sets = [TaskDataset(td, "train", cfg.data) for td in tasks.values()]
    schedule = TaskSchedule([len(d) for d in train_sets], [td.source.weight for td in tasks.values()],
                            global_batch=t.batch_size * world, seed=t.seed)
    val_loaders = eval_loaders(tasks, cfg.data, t.eval_batch_size)

    # ---- model (phase 1: extractors frozen; binary seg biases from the foreground prior) and optimizer
    set_seed(t.seed)  # the same initial weights in every process
    model = Router(cfg.model)
    for ext in model.extractors.values():
        ext.freeze()
    if t.prior_init:
        for n, p in binary_seg_priors(tasks, accelerator).items():
            with torch.no_grad():
                model.init_seg_bias_from_prior(n, p)
            say(f"  {n}: foreground prior {p:.4f} (seg bias initialised from it)")
    phase2 = Phase2(cfg.model.extractors, t)
    head_params = [p for n, p in model.named_parameters() if not n.startswith("extractors.") and p.requires_grad]
    late_params = phase2.late_params(model)
    optimizer = make_optimizer(head_params, t, late_params)
    n_train = sum(p.numel() for p in head_params)
    checkpoints.check_free_space(output_dir, model, n_train + sum(p.numel() for p in late_params), t.keep_last)
    say(f"model: fusion {cfg.model.fusion}, extractors {model.extractor_names}; {n_train:,} router/head params"
        + (f", phase 2 from step {t.phase2_step}: {phase2.blocks}" if phase2.blocks else ""))

    # ---- prepare, resume, train (train/training/engine.py)
    model, optimizer = accelerator.prepare(model, optimizer)
    val_loaders = {n: accelerator.prepare(dl) for n, dl in val_loaders.items()}
    start = checkpoints.resume_run(accelerator, model, resume_from, output_dir, phase2, say) if args.resume else 0
    loop = Finetuner(cfg, accelerator, model, optimizer, tasks, val_loaders, phase2, output_dir, say)
    loop.keep_metrics_until(start, args.resume)  # evaluations after the checkpoint are redone
    accelerator.init_trackers("tensorboard")
    A = t.grad_accum_steps
    batches = train_loader(train_sets, schedule, rank, world, start * A, t.max_steps * A, cfg.data.num_workers)
    return loop.run(batches, start, min(t.max_steps, args.stop_at) if args.stop_at is not None else t.max_steps)

if __name__ == "__main__":
    sys.exit(run_cli(main))
