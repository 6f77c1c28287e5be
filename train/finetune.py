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
ExtractorConfig.unfreeze_last blocks of each extractor train too, at train.phase2_lr_scale x lr.

One run at a time per output dir (train/rundir.py): a lock names the run using it, and a fresh run into a dir
holding a previous run is refused unless --overwrite. A config or data error is one line (--debug: traceback).

The output dir gets config.yaml (resolved), metrics.jsonl (one line per evaluation), checkpoints/step_<n>/
(accelerator.save_state, written to a temp dir and renamed), final/ (Router.save_pretrained) and
tensorboard/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, broadcast_object_list, load, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from extractors.atomic import atomic_write_bytes
from heads.losses import BinaryCrossEntropyLoss, CrossEntropyLoss, FocalLoss, build_loss
from router import Router
from train.config import RESUMABLE_CHANGES, ExperimentConfig, config_differences
from train.data import (
    MultiTaskDataset,
    RankBatchSampler,
    TaskDataset,
    TaskSchedule,
    collate_task_batch,
    describe,
    foreground_prior,
    prepare_experiment_data,
)
from train.errors import RunError, run_cli
from train.metrics import GateMeter, json_safe, task_metrics
from train.rundir import (
    FINETUNE_OUTPUTS,
    add_run_dir_args,
    check_global_batch,
    claim_output_dir,
    read_trainer_state,
)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or inf; the message names the step and the task."""


# Fault injection, for tests only (tests/test_reliability.py); unset in real runs. "<kind>@<step>[@<rank>]":
# kind "raise" raises in that process at that step, "nan" makes that step's loss NaN (in every process, or <rank>).
FAULT_ENV = "BACKBONE_ROUTER_INJECT_FAULT"


def injected_fault(step: int, rank: int) -> str | None:
    """The fault $BACKBONE_ROUTER_INJECT_FAULT asks for at this step and process ("nan"), or None; raises for "raise"."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, at, *who = spec.split("@")
    if int(at) != step or (who and int(who[0]) != rank):
        return None
    if kind == "raise":
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec}) in process {rank} at step {step}")
    return kind


# ----------------------------------------------------------------------------------------------------
# command line
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


def lr_factor(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio at max_steps (a pure function of the step)."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def backbone_factor(step: int, cfg) -> float:
    """0 before phase 2, then a linear warmup over phase2_warmup_steps (times the shared schedule)."""
    t = cfg.train
    if t.phase2_step is None or step < t.phase2_step:
        return 0.0
    return min(1.0, (step - t.phase2_step + 1) / max(1, t.phase2_warmup_steps)) * lr_factor(step, cfg)


def set_train_mode(model: Router, freeze_bn_stats: bool) -> None:
    """model.train(); with freeze_bn_stats the extractors' BatchNorm layers stay in eval mode.

    Task-homogeneous batches come from different domains (greyscale tiles, street scenes, flowers): batch
    statistics of unfrozen CNN blocks would average them into running statistics that fit none, and would
    differ with the per-process batch. Their affine weights still train.
    """
    model.train()
    if freeze_bn_stats:
        for m in model.extractors.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def latest_checkpoint(output_dir: Path) -> Path | None:
    """checkpoints/step_<n> with the largest n that was completely written (it holds trainer_state.json)."""
    root = output_dir / "checkpoints"
    done = [d for d in root.glob("step_*") if d.name[5:].isdigit() and (d / "trainer_state.json").is_file()]
    return max(done, key=lambda d: int(d.name[5:]), default=None)


def check_output_dir(output_dir: Path) -> None:
    """Create the output dir and write a probe file in it: an unusable dir fails here, before any work."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SystemExit(f"--output-dir {output_dir}: cannot write there ({type(e).__name__}: {e}); "
                         "pick another --output-dir") from e


def check_free_space(output_dir: Path, model: torch.nn.Module, trainable: int, keep_last: int) -> None:
    """Fail at start when the disk cannot hold keep_last + 1 checkpoints and the final model."""
    state = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    need = (keep_last + 1) * (state + 2 * 4 * trainable) + state  # model + AdamW moments per checkpoint, + final/
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise SystemExit(f"--output-dir {output_dir}: {free / 2**20:.1f} MiB free, but {keep_last + 1} checkpoints "
                         f"and the final model need about {need / 2**20:.1f} MiB (train.keep_last={keep_last}); free "
                         "space or pick another --output-dir")


CHECKPOINT_FILES = ("model.safetensors", "trainer_state.json")


def check_checkpoint(ckpt: Path) -> int:
    """The step of a checkpoint dir, after reading every pickle-format file in it with weights_only=True.

    accelerate's load_state reads optimizer.bin with weights_only=True but skips random_states_<rank>.pkl
    silently when it cannot be read, and would read a pytorch_model.bin when model.safetensors is missing: a
    file we did not write is refused here, naming it.
    """
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file():
            raise SystemExit(f"--resume: {ckpt / name} is missing; {ckpt} was not written by train/finetune.py")
    step = read_trainer_state(ckpt)["step"]
    for f in sorted(ckpt.iterdir()):
        if f.suffix in (".bin", ".pkl", ".pt", ".pth"):
            try:
                load(f, map_location="cpu", weights_only=True)  # accelerate's torch.load, with numpy RNG globals
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else ""
                raise SystemExit(f"--resume: {f} refused or unreadable with torch.load(weights_only=True) "
                                 f"({type(e).__name__}: {first}); delete {ckpt} to resume from an earlier "
                                 "checkpoint") from e
    return int(step)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder into place (the old one, if any, is removed first)."""
    if final.exists():
        trash = final.with_name(f".old_{final.name}_{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as run_dir:  # releases the output dir's lock however the run ends
        return run(args, run_dir)


def run(args: argparse.Namespace, run_dir: contextlib.ExitStack) -> int:
    # ------------------------------------------------------------------------------------------------
    # config
    if args.resume and args.config is None:  # the run's own config; never a silent quickstart
        if args.output_dir is None or not (Path(args.output_dir) / "config.yaml").is_file():
            where = f"{args.output_dir} holds no run (no config.yaml)" if args.output_dir else "no --output-dir given"
            raise RunError(f"--resume: {where}; pass the --output-dir of an earlier run, or --config to start one")
        config_path = Path(args.output_dir) / "config.yaml"
    else:
        config_path = Path(args.config) if args.config else DEFAULT_CONFIG
    cfg = ExperimentConfig.from_file(config_path, args.overrides)
    output_dir = Path(args.output_dir or Path("runs") / config_path.stem)
    t = cfg.train
    check_output_dir(output_dir)

    # ------------------------------------------------------------------------------------------------
    # accelerator (mixed precision and the process count come from `accelerate launch`)
    # `accelerate launch --multi_gpu` on a machine without GPUs starts the processes but Accelerate only joins
    # them (gloo) when told to use the CPU.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu or None,
        gradient_accumulation_steps=t.grad_accum_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir)),
        # Each batch serves one task, so the other tasks' head outputs get no gradient in that step.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    main_process, world, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    say = accelerator.print
    run_dir.enter_context(claim_output_dir(output_dir, "finetune", FINETUNE_OUTPUTS, resume=args.resume,
                                           overwrite=args.overwrite, accelerator=accelerator))
    if cfg.data.synthetic is not None and all(not e.pretrained for e in cfg.model.extractors):
        say("quickstart: synthetic data + tiny random extractors; not a real model")
    elif all(not e.pretrained for e in cfg.model.extractors):
        say("note: every extractor has random weights (pretrained: false); not a real model")

    # ------------------------------------------------------------------------------------------------
    # data
    # Also fills model.tasks classes / ignore_index from meta.json.
    # Every image and mask decoded once: a truncated file or a class count that does not fit the masks fails now.
    root, tasks = prepare_experiment_data(cfg, output_dir, main_process, accelerator.wait_for_everyone)
    task_names = list(tasks)
    resolved = cfg.to_dict()
    saved_config = output_dir / "config.yaml"
    resume_from = latest_checkpoint(output_dir) if args.resume else None
    if args.resume and saved_config.is_file():
        import yaml

        saved = yaml.safe_load(saved_config.read_text())
        changed = [k for k in config_differences(saved, resolved) if k not in RESUMABLE_CHANGES]
        if resume_from is not None:  # train.batch_size may change when the global batch stays (another process count)
            note = check_global_batch(read_trainer_state(resume_from), saved["train"]["batch_size"], world,
                                      t.batch_size, args.change_global_batch, resume_from)
            if note is None or args.change_global_batch:
                changed = [k for k in changed if k != "train.batch_size"]
            if note:
                say(f"note: {note}")
        if changed:
            raise SystemExit(f"--resume: the config differs from {saved_config} in {changed}; only "
                             f"{list(RESUMABLE_CHANGES)} may change when resuming")
    if main_process:
        atomic_write_bytes(saved_config, cfg.to_yaml().encode())
    say(f"data root {root}\n{describe(tasks)}")

    train_sets = [TaskDataset(tasks[n], "train", cfg.data) for n in task_names]
    schedule = TaskSchedule([len(d) for d in train_sets], [tasks[n].source.weight for n in task_names],
                            global_batch=t.batch_size * world, seed=t.seed)
    eval_loaders = {
        n: DataLoader(TaskDataset(tasks[n], "val", cfg.data), batch_size=t.eval_batch_size, shuffle=False,
                      collate_fn=collate_task_batch, num_workers=cfg.data.num_workers)
        for n in task_names
    }

    # ------------------------------------------------------------------------------------------------
    # model, losses, optimizer
    set_seed(t.seed)  # the same initial weights in every process
    model = Router(cfg.model)
    for ext in model.extractors.values():  # phase 1: extractors frozen
        ext.freeze()
    if t.prior_init:  # measured on the main process, sent to the others
        priors = [{n: foreground_prior(td) for n, td in tasks.items() if td.task.type == "seg" and td.task.num_classes == 2}
                  if main_process else None]
        priors = broadcast_object_list(priors)[0] if world > 1 else priors[0]
        with torch.no_grad():
            for n, p in priors.items():
                model.seg_head.init_bias_from_prior(n, p)
                say(f"  {n}: foreground prior {p:.4f} (seg bias initialised from it)")
    loss_fns = {n: build_loss(t.loss[n]) for n in task_names}
    ignore = {n: tasks[n].task.ignore_index for n in task_names}

    def pixel_mean(term) -> bool:
        """A loss term that is a plain mean over the non-ignored pixels of the batch."""
        if isinstance(term, CrossEntropyLoss):
            return term.class_weights is None
        if isinstance(term, BinaryCrossEntropyLoss):
            return term.neg_ratio is None
        return isinstance(term, FocalLoss)

    def task_loss(task: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's weighted loss, averaged so that DDP's gradient mean is the mean over the global batch.

        With ignored pixels each process's pixel-mean terms average over a different number of pixels; they are
        weighted by this process's share of the global count (exact for ce / bce / focal; per-image Dice and
        Tversky average over images, which processes hold equally; batch-pooled Dice stays per process).
        """
        fn = loss_fns[task]
        if world == 1 or ignore[task] is None or tasks[task].task.type != "seg":
            return fn(logits, target, ignore_index=ignore[task])["loss"]
        valid = (target != ignore[task]).sum().float()
        share = valid / accelerator.reduce(valid.clone(), reduction="mean").clamp_min(1.0)
        total = logits.new_zeros(())
        for key, term in fn.losses.items():
            value = term(logits, target, ignore_index=ignore[task])
            total = total + fn.weights[key] * value * (share if pixel_mean(term) else 1.0)
        return total

    # Param groups: no weight decay on 1-D params (norms, biases); extractor params train only in phase 2.
    def phase2_extractors() -> dict[str, int | None]:
        """name -> blocks unfrozen in phase 2 (None: the whole extractor, ExtractorConfig.frozen = False)."""
        out = {}
        for e in cfg.model.extractors:
            if not e.frozen:
                out[e.name] = None
            elif e.unfreeze_last > 0:
                out[e.name] = e.unfreeze_last
        return out if t.phase2_step is not None else {}

    late = phase2_extractors()
    head_params = [p for n, p in model.named_parameters() if not n.startswith("extractors.") and p.requires_grad]
    late_params = [p for n in late for p in model.extractors[n].parameters()]
    groups = []
    for params, scale, is_late in ((head_params, 1.0, False), (late_params, t.phase2_lr_scale, True)):
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for ps, wd in ((decay, t.weight_decay), (no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "weight_decay": wd, "base_lr": t.lr * scale, "late": is_late})
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas))
    n_train = sum(p.numel() for p in head_params)
    check_free_space(output_dir, model, n_train + sum(p.numel() for p in late_params), t.keep_last)
    say(f"model: fusion {cfg.model.fusion}, extractors {model.extractor_names}; {n_train:,} router/head params"
        + (f", phase 2 from step {t.phase2_step}: {late}" if late else ""))

    # Extractors were frozen when DDP wrapped the model, so DDP does not reduce their gradients in phase 2:
    # they are averaged across processes here, on sync steps.
    def enter_phase2() -> None:
        for name, n_blocks in late.items():
            ext = accelerator.unwrap_model(model).extractors[name]
            ext.unfreeze() if n_blocks is None else ext.unfreeze_last(n_blocks)
        set_train_mode(accelerator.unwrap_model(model), t.freeze_bn_stats)

    def reduce_late_grads() -> None:
        grads = [p.grad for p in late_params if p.grad is not None]
        if world == 1 or not grads:
            return
        flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))

    # ------------------------------------------------------------------------------------------------
    # prepare, resume
    model, optimizer = accelerator.prepare(model, optimizer)
    eval_loaders = {n: accelerator.prepare(dl) for n, dl in eval_loaders.items()}
    start_step = 0
    metrics_path = output_dir / "metrics.jsonl"
    if args.resume:
        ckpt = resume_from
        if ckpt is None:
            say(f"--resume: no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
        else:
            start_step = check_checkpoint(ckpt)
            if t.phase2_step is not None and start_step >= t.phase2_step:
                enter_phase2()
            try:
                accelerator.load_state(str(ckpt), load_kwargs={"weights_only": True})
            except Exception as e:
                raise SystemExit(f"--resume: {ckpt} does not load into this run ({type(e).__name__}: {e})") from e
            say(f"resumed from {ckpt} (step {start_step})")
    if main_process:  # evaluations after the checkpoint are redone; keep the file consistent with the weights
        lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start_step] if args.resume else []
        atomic_write_bytes(metrics_path, "".join(ln + "\n" for ln in kept).encode())
    accelerator.init_trackers("tensorboard")

    A = t.grad_accum_steps
    sampler = RankBatchSampler(schedule, rank, world, start=start_step * A, stop=t.max_steps * A)
    train_loader = DataLoader(MultiTaskDataset(train_sets), batch_sampler=sampler, collate_fn=collate_task_batch,
                              num_workers=cfg.data.num_workers)
    unwrapped = accelerator.unwrap_model(model)
    names = unwrapped.extractor_names

    # ------------------------------------------------------------------------------------------------
    # evaluation
    @torch.no_grad()
    def evaluate(step: int) -> dict:
        unwrapped.eval()
        results = {}
        for n, loader in eval_loaders.items():
            tcfg = tasks[n].task
            meter = task_metrics(tcfg.type, tcfg.classes, tcfg.ignore_index, accelerator.device)
            gates = GateMeter(names, levels=unwrapped.config.strides)
            for batch in loader:
                with accelerator.autocast():
                    out = unwrapped(batch["images"], task=n)
                logits = out[tcfg.type].float()
                gate, levels = out["gate"].float(), out["gate_levels"].float()
                part = {"pred": logits.argmax(1), "target": batch["target"],
                        "gate": gate if gate.ndim == 2 else gate.mean(dim=(2, 3)),
                        "gate_levels": levels if levels.ndim == 3 else levels.mean(dim=(3, 4))}
                if tcfg.type == "seg" and tcfg.num_classes == 2:
                    part["fg_prob"] = F.softmax(logits, dim=1)[:, 1]
                part = accelerator.gather_for_metrics(part)
                if main_process:
                    meter.update(part["pred"], part["target"], part.get("fg_prob"))
                    gates.update(part["gate"], part["gate_levels"])
            if main_process:
                results[n] = {**meter.compute(), "gate": gates.compute(), "_gate_levels": gates.compute_levels()}
                results[n]["_headline"] = meter.headline(results[n])
        set_train_mode(unwrapped, t.freeze_bn_stats)
        if main_process:
            record = {"step": step, "tasks": {n: {k: v for k, v in r.items() if not k.startswith("_")} for n, r in results.items()}}
            lines = metrics_path.read_text() if metrics_path.is_file() else ""
            atomic_write_bytes(metrics_path, (lines + json.dumps(json_safe(record)) + "\n").encode())
            flat = {}
            for n, r in results.items():
                flat.update({f"eval/{n}/{k}": v for k, v in r["_headline"].items()})
                flat.update({f"gate/{n}/{e}": w for e, w in (r["gate"] or {}).items()})
            accelerator.log({k: v for k, v in flat.items() if v is not None and math.isfinite(v)}, step=step)
        return results

    def save_checkpoint(step: int) -> Path:
        ckpt_root = output_dir / "checkpoints"
        tmp, final = ckpt_root / f".tmp_step_{step}", ckpt_root / f"step_{step}"
        if main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))  # every process: model/optimizer (main) and its own RNG states
        accelerator.wait_for_everyone()
        if main_process:
            atomic_write_bytes(tmp / "trainer_state.json", json.dumps({"step": step, "world": world}).encode())
            replace_dir(tmp, final)
            done = sorted((d for d in ckpt_root.glob("step_*") if d.name[5:].isdigit()), key=lambda d: int(d.name[5:]))
            for old in done[: -t.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return final

    # ------------------------------------------------------------------------------------------------
    # training loop
    # Losses stay on the device between logging intervals (no host sync per step); NaN/inf is caught there.
    buf = torch.zeros(t.log_every * A, device=accelerator.device)
    buf_tasks: list[tuple[int, str]] = []
    grad_norm = torch.zeros((), device=accelerator.device)
    trainable = [p for p in unwrapped.parameters()]
    in_phase2 = t.phase2_step is not None and start_step >= t.phase2_step
    skip_nonfinite, skipped = t.on_nonfinite == "skip", []

    def check_and_log(step: int, elapsed: float, images: int) -> dict[str, float]:
        """Host sync: per-task mean losses of the interval; stop on a non-finite loss naming step and task."""
        n = len(buf_tasks)
        if n == 0:
            return {}
        values = buf[:n]
        bad = accelerator.reduce((~torch.isfinite(values)).float(), reduction="sum").cpu()
        if bad.any():
            k = int(bad.nonzero()[0])
            s, task = buf_tasks[k]
            last = latest_checkpoint(output_dir)
            raise NonFiniteLoss(f"non-finite loss at step {s} (task {task!r}); stopping. "
                                f"Last checkpoint (kept): {last if last else 'none'}")
        vals = values.cpu().tolist()
        per_task: dict[str, list[float]] = {}
        for (_, task), v in zip(buf_tasks, vals):
            per_task.setdefault(task, []).append(v)
        logs = {f"train/loss/{k}": sum(v) / len(v) for k, v in per_task.items()}
        logs["train/loss"] = sum(vals) / n
        logs["train/lr"] = lr_factor(step - 1, cfg) * t.lr
        logs["train/grad_norm"] = float(grad_norm)
        logs["train/images_per_s"] = images / max(elapsed, 1e-9)
        buf_tasks.clear()
        return logs

    if start_step >= t.max_steps:
        say(f"already at step {start_step} >= train.max_steps {t.max_steps}; nothing to train")
    stop_step = min(t.max_steps, args.stop_at) if args.stop_at is not None else t.max_steps
    say(f"training steps {start_step}..{stop_step} of {t.max_steps}: global batch {t.batch_size * world} "
        f"({world} process(es) x {t.batch_size}) x {A} accumulation step(s)")
    progress = tqdm(total=t.max_steps, initial=start_step, disable=not accelerator.is_local_main_process,
                    desc="finetune", dynamic_ncols=True)
    set_train_mode(unwrapped, t.freeze_bn_stats)
    batches = iter(train_loader)
    last_eval = last_save = None
    results: dict = {}
    tick, images_since = time.perf_counter(), 0
    try:
        for step in range(start_step, stop_step):
            if t.phase2_step is not None and step >= t.phase2_step and not in_phase2:
                enter_phase2()
                in_phase2 = True
                say(f"step {step}: phase 2, unfreezing {late} at lr x {t.phase2_lr_scale}")
            f_head, f_late = lr_factor(step, cfg), backbone_factor(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * (f_late if g["late"] else f_head)

            for _ in range(A):
                batch = next(batches)
                task = batch["task"]
                images = batch["images"].to(accelerator.device, non_blocking=True)
                target = batch["target"].to(accelerator.device, non_blocking=True)
                with accelerator.accumulate(model):
                    out = model(images, task=task)
                    task_value = task_loss(task, out[tasks[task].task.type].float(), target)
                    loss = t.loss_weights[task] * task_value + t.aux_loss_weight * out["aux_loss"]
                    if injected_fault(step, rank) == "nan":
                        loss = loss * float("nan")
                    accelerator.backward(loss)
                    # train.on_nonfinite=skip: one host sync per micro-batch, so every process drops the same step.
                    bad = skip_nonfinite and bool(accelerator.reduce((~torch.isfinite(loss.detach())).float(),
                                                                     reduction="sum") > 0)
                    if bad:
                        skipped.append((step, task))
                    drop = skip_nonfinite and accelerator.sync_gradients and bool(skipped) and skipped[-1][0] == step
                    if accelerator.sync_gradients and not drop:
                        if in_phase2:
                            reduce_late_grads()
                        if t.grad_clip > 0:
                            grad_norm = accelerator.clip_grad_norm_(trainable, t.grad_clip)
                    if not drop:
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                if drop:
                    say(f"step {step}: non-finite loss (task {skipped[-1][1]!r}); optimizer step skipped "
                        f"(train.on_nonfinite=skip, {len({s for s, _ in skipped})} step(s) skipped so far)")
                if not bad:
                    buf[len(buf_tasks)] = loss.detach()
                    buf_tasks.append((step, task))
                images_since += images.shape[0] * world

            done = step + 1
            progress.update(1)
            is_last = done == stop_step
            if done % t.log_every == 0 or is_last or done % t.eval_every == 0 or done % t.save_every == 0:
                now = time.perf_counter()
                logs = check_and_log(done, now - tick, images_since)
                tick, images_since = now, 0
                if logs:
                    accelerator.log(logs, step=done)
                    progress.set_postfix(loss=f"{logs['train/loss']:.4f}", img_s=f"{logs['train/images_per_s']:.1f}")
            if done % t.eval_every == 0 or done == t.max_steps:
                results = evaluate(done)
                last_eval = done
                if main_process:
                    progress.write(f"step {done}: " + "; ".join(
                        f"{n} " + " ".join(f"{k} {v:.3f}" for k, v in r["_headline"].items() if v is not None)
                        for n, r in results.items()))
            if done % t.save_every == 0 or is_last:
                save_checkpoint(done)
                last_save = done
    except NonFiniteLoss as e:
        progress.close()
        accelerator.end_training()
        say(f"error: {e}")
        return 3
    progress.close()
    if skipped:
        say(f"{len({s for s, _ in skipped})} optimizer step(s) skipped for a non-finite loss: "
            f"{sorted({s for s, _ in skipped})[:20]}")

    # ------------------------------------------------------------------------------------------------
    # final model and summary
    if stop_step < t.max_steps:
        say(f"stopped after step {stop_step} as asked (--stop-at); checkpoint {latest_checkpoint(output_dir)}; "
            f"continue with --resume --output-dir {output_dir}")
        accelerator.end_training()
        return 0
    if last_eval != t.max_steps and start_step < t.max_steps:
        results = evaluate(t.max_steps)
    if last_save != t.max_steps and start_step < t.max_steps:
        save_checkpoint(t.max_steps)
    accelerator.wait_for_everyone()
    if main_process:
        final, tmp = output_dir / "final", output_dir / ".tmp_final"
        shutil.rmtree(tmp, ignore_errors=True)
        card = {"metrics": {n: {k: v for k, v in r.items() if not k.startswith("_") and k != "gate"} for n, r in results.items()},
                "gate": {n: r["_gate_levels"] for n, r in results.items() if r.get("_gate_levels")}}
        unwrapped.save_pretrained(tmp, card_data=card)  # the model card carries the run's metrics and gates
        replace_dir(tmp, final)
        say(f"\nrun finished: {output_dir} (step {t.max_steps})")
        for n, r in results.items():
            head = ", ".join(f"{k} {v:.4f}" for k, v in r["_headline"].items() if v is not None)
            gate = ", ".join(f"{e} {w:.2f}" for e, w in (r["gate"] or {}).items())
            say(f"  {n:<24} {head}  | gate: {gate}")
        say(f"  final model: {final}  (Router.from_pretrained('{final}'))\n  metrics: {metrics_path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
