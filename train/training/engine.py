"""The fine-tuning loop: multi-task steps under Accelerate, non-finite handling, evaluation, checkpoints.

:class:`Finetuner` holds what one run's loop shares (accelerator, model, optimizer, the phase-2 plan, the task
losses, the loss buffer) and :meth:`Finetuner.train` runs steps ``start..stop``. Following accelerate's
``examples/complete_cv_example.py``: ``accumulate`` / ``backward`` / ``clip_grad_norm_`` on sync steps,
``gather_for_metrics`` at evaluation, only the main process logs and writes. Losses stay on the device between
logging intervals (no host sync per step). ``train.on_nonfinite``: ``stop`` ends the run (exit code 3, the last
checkpoint kept), ``skip`` drops the optimizer step of a non-finite loss in every process.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.heads.losses import TaskLoss
from backbone_router.router.outputs import training_loss
from backbone_router.train.training.checkpoints import (
    disk_full_error,
    latest_checkpoint,
    replace_dir,
    save_checkpoint,
)
from backbone_router.train.training.config import ExperimentConfig
from backbone_router.train.training.data import foreground_prior
from backbone_router.train.training.evaluation import TaskEval, evaluate_task, pool_gates
from backbone_router.train.training.faults import injected_fault
from backbone_router.train.training.metrics import json_safe
from backbone_router.train.training.optim import lr_factor, set_lrs
from backbone_router.train.training.phase2 import Phase2, set_train_mode


def binary_seg_priors(tasks: dict, accelerator) -> dict[str, float]:
    """task -> measured foreground fraction of its training masks, for the binary seg tasks (measured on the main
    process, sent to the others)."""
    priors = [{n: foreground_prior(td) for n, td in tasks.items() if td.task.type == "seg" and td.task.num_classes == 2}
              if accelerator.is_main_process else None]
    return broadcast_object_list(priors)[0] if accelerator.num_processes > 1 else priors[0]


class NonFiniteLoss(RuntimeError):
    """A loss became NaN or inf; the message names the step and the task."""


@dataclass
class LossLog:
    """Per-micro-batch losses kept on the device between logging intervals, with their (step, task)."""

    size: int
    device: torch.device
    tasks: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self):
        self.values = torch.zeros(self.size, device=self.device)

    def add(self, loss: torch.Tensor, step: int, task: str) -> None:
        self.values[len(self.tasks)] = loss.detach()
        self.tasks.append((step, task))

    def flush(self, reduce_sum, output_dir: Path) -> dict[str, float]:
        """Host sync: per-task mean losses of the interval; raise NonFiniteLoss naming step and task (any process)."""
        n = len(self.tasks)
        if n == 0:
            return {}
        values = self.values[:n]
        bad = reduce_sum((~torch.isfinite(values)).float()).cpu()
        if bad.any():
            s, task = self.tasks[int(bad.nonzero()[0])]
            last = latest_checkpoint(output_dir)
            raise NonFiniteLoss(f"non-finite loss at step {s} (task {task!r}); stopping. "
                                f"Last checkpoint (kept): {last if last else 'none'}")
        vals = values.cpu().tolist()
        per_task: dict[str, list[float]] = {}
        for (_, task), v in zip(self.tasks, vals):
            per_task.setdefault(task, []).append(v)
        logs = {f"train/loss/{k}": sum(v) / len(v) for k, v in per_task.items()}
        logs["train/loss"] = sum(vals) / n
        self.tasks.clear()
        return logs


class NonFiniteSkips:
    """train.on_nonfinite=skip in one place: which micro-batches had a non-finite loss (in any process) and whether
    the optimizer step they belong to is dropped. With "stop" it does nothing (LossLog.flush stops the run)."""

    def __init__(self, policy: str, reduce_sum):
        self.on, self.reduce_sum = policy == "skip", reduce_sum
        self.skipped: list[tuple[int, str]] = []  # (step, task) of every non-finite micro-batch

    def check(self, loss: torch.Tensor, step: int, task: str) -> bool:
        """Whether this micro-batch's loss is non-finite in any process (one host sync, so all processes agree)."""
        bad = self.on and bool(self.reduce_sum((~torch.isfinite(loss.detach())).float()) > 0)
        if bad:
            self.skipped.append((step, task))
        return bad

    def drop(self, step: int, sync: bool) -> bool:
        """Whether the optimizer step `step` (on a sync micro-batch) is dropped."""
        return self.on and sync and bool(self.skipped) and self.skipped[-1][0] == step

    def steps(self) -> list[int]:
        return sorted({s for s, _ in self.skipped})


class Finetuner:
    """One fine-tuning run's loop over a prepared model, optimizer and eval loaders (see the module docstring)."""

    def __init__(self, cfg: ExperimentConfig, accelerator, model, optimizer, tasks: dict, eval_loaders: dict,
                 phase2: Phase2, output_dir: Path, say=print):
        self.cfg, self.t = cfg, cfg.train
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.unwrapped = accelerator.unwrap_model(model)
        self.tasks, self.eval_loaders, self.phase2 = tasks, eval_loaders, phase2
        self.output_dir, self.say = output_dir, say
        self.metrics_path = output_dir / "metrics.jsonl"
        self.losses = {n: TaskLoss(self.t.loss[n], td.task.type, td.task.ignore_index) for n, td in tasks.items()}
        self.aux_weight = cfg.model.head.aux_weight
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        self.main_process = accelerator.is_main_process

    # ---- evaluation and metrics.jsonl ------------------------------------------------------------------
    def keep_metrics_until(self, step: int, resume: bool) -> None:
        """metrics.jsonl keeps the evaluations up to `step` (a resumed run redoes the later ones), else starts empty."""
        if not self.main_process:
            return
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.is_file() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= step] if resume else []
        atomic_write_bytes(self.metrics_path, "".join(ln + "\n" for ln in kept).encode())

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, TaskEval]:
        """Every task's metrics and gates (main process; {} elsewhere), appended to metrics.jsonl and logged."""
        acc, model = self.accelerator, self.unwrapped
        model.eval()

        def outputs(task: str, loader):
            for batch in loader:
                with acc.autocast():
                    out = model(batch["images"], task=task)
                yield out, batch["target"]

        results = {}
        for n, loader in self.eval_loaders.items():
            r = evaluate_task(outputs(n, loader), self.tasks[n].task, model.extractor_names, model.config.strides,
                              acc.device, gather=lambda part: acc.gather_for_metrics(pool_gates(part)),
                              keep=self.main_process)
            if r is not None:
                results[n] = r
        set_train_mode(model, self.t.freeze_bn_stats)
        if self.main_process:
            record = {"step": step, "tasks": {n: {**r.metrics, "gate": r.gate} for n, r in results.items()}}
            lines = self.metrics_path.read_text() if self.metrics_path.is_file() else ""
            atomic_write_bytes(self.metrics_path, (lines + json.dumps(json_safe(record)) + "\n").encode())
            flat = {}
            for n, r in results.items():
                flat.update({f"eval/{n}/{k}": v for k, v in r.headline.items()})
                flat.update({f"gate/{n}/{e}": w for e, w in (r.gate or {}).items()})
            acc.log({k: v for k, v in flat.items() if v is not None and math.isfinite(v)}, step=step)
        return results

    # ---- training ----------------------------------------------------------------------------------------
    def train(self, batches, start: int, stop: int) -> tuple[int, dict[str, TaskEval], int | None, int | None]:
        """Steps start..stop; returns (exit code, the last evaluation, its step, the last checkpoint's step)."""
        acc, t, A, world = self.accelerator, self.t, self.t.grad_accum_steps, self.world
        log = LossLog(t.log_every * A, acc.device)
        grad_norm = torch.zeros((), device=acc.device)
        trainable = list(self.unwrapped.parameters())
        nonfinite = NonFiniteSkips(t.on_nonfinite, lambda x: acc.reduce(x, reduction="sum"))
        mean_valid = (lambda v: acc.reduce(v, reduction="mean")) if world > 1 else None
        progress = tqdm(total=t.max_steps, initial=start, disable=not acc.is_local_main_process, desc="finetune",
                        dynamic_ncols=True)
        set_train_mode(self.unwrapped, t.freeze_bn_stats)
        batches = iter(batches)
        last_eval = last_save = None
        results: dict = {}
        tick, images_since = time.perf_counter(), 0
        try:
            for step in range(start, stop):
                if self.phase2.active(step) and not self.phase2.entered:
                    self.phase2.enter(self.unwrapped)
                    self.say(f"step {step}: phase 2, unfreezing {self.phase2.blocks} at lr x {t.phase2_lr_scale}")
                set_lrs(self.optimizer, lr_factor(step, t), self.phase2.lr_factor(step))
                for _ in range(A):
                    batch = next(batches)
                    task = batch["task"]
                    images = batch["images"].to(acc.device, non_blocking=True)
                    target = batch["target"].to(acc.device, non_blocking=True)
                    with acc.accumulate(self.model):
                        out = self.model(images, task=task)
                        loss = training_loss(out, self.tasks[task].task.type, self.losses[task], target, mean_valid,
                                             loss_weight=t.loss_weights[task], aux_weight=self.aux_weight,
                                             aux_loss_weight=t.aux_loss_weight)
                        if injected_fault(step, self.rank) == "nan":
                            loss = loss * float("nan")
                        acc.backward(loss)
                        bad = nonfinite.check(loss, step, task)
                        drop = nonfinite.drop(step, acc.sync_gradients)
                        if acc.sync_gradients and not drop:
                            if self.phase2.entered:
                                self.phase2.reduce_grads(lambda x: acc.reduce(x, reduction="mean"), world)
                            if t.grad_clip > 0:
                                grad_norm = acc.clip_grad_norm_(trainable, t.grad_clip)
                        if not drop:
                            self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    if drop:
                        self.say(f"step {step}: non-finite loss (task {nonfinite.skipped[-1][1]!r}); optimizer "
                                 f"step skipped (train.on_nonfinite=skip, {len(nonfinite.steps())} step(s) "
                                 "skipped so far)")
                    if not bad:
                        log.add(loss, step, task)
                    images_since += images.shape[0] * world

                done = step + 1
                progress.update(1)
                is_last = done == stop
                if done % t.log_every == 0 or is_last or done % t.eval_every == 0 or done % t.save_every == 0:
                    now = time.perf_counter()
                    logs = log.flush(lambda x: acc.reduce(x, reduction="sum"), self.output_dir)
                    if logs:
                        logs["train/lr"] = lr_factor(done - 1, t) * t.lr
                        logs["train/grad_norm"] = float(grad_norm)
                        logs["train/images_per_s"] = images_since / max(now - tick, 1e-9)
                    tick, images_since = now, 0
                    if logs:
                        acc.log(logs, step=done)
                        progress.set_postfix(loss=f"{logs['train/loss']:.4f}",
                                             img_s=f"{logs['train/images_per_s']:.1f}")
                if done % t.eval_every == 0 or done == t.max_steps:
                    results = self.evaluate(done)
                    last_eval = done
                    if self.main_process:
                        progress.write(f"step {done}: " + "; ".join(
                            f"{n} " + " ".join(f"{k} {v:.3f}" for k, v in r.headline.items() if v is not None)
                            for n, r in results.items()))
                if done % t.save_every == 0 or is_last:
                    save_checkpoint(acc, self.output_dir, done, t.keep_last)
                    last_save = done
        except NonFiniteLoss as e:
            progress.close()
            acc.end_training()
            self.say(f"error: {e}")
            return 3, results, last_eval, last_save
        except BaseException:  # an error line (a full disk, a config error) starts on a line of its own
            progress.close()
            raise
        progress.close()
        if steps := nonfinite.steps():
            self.say(f"{len(steps)} optimizer step(s) skipped for a non-finite loss: {steps[:20]}")
        return 0, results, last_eval, last_save

    def run(self, batches, start: int, stop: int) -> int:
        """Steps start..stop, then (at train.max_steps) the last evaluation and checkpoint and final/; the exit code."""
        t, acc = self.t, self.accelerator
        if start >= t.max_steps:
            self.say(f"already at step {start} >= train.max_steps {t.max_steps}; nothing to train")
        self.say(f"training steps {start}..{stop} of {t.max_steps}: global batch {t.batch_size * self.world} "
                 f"({self.world} process(es) x {t.batch_size}) x {t.grad_accum_steps} accumulation step(s)")
        code, results, last_eval, last_save = self.train(batches, start, stop)
        if code:
            return code
        if stop < t.max_steps:
            self.say(f"stopped after step {stop} as asked (--stop-at); checkpoint {latest_checkpoint(self.output_dir)}; "
                     f"continue with --resume --output-dir {self.output_dir}")
            acc.end_training()
            return 0
        if start >= t.max_steps:  # resumed at the last checkpoint without final/ (killed while writing it): its
            #                       evaluation again for final/'s card, replacing the same line of metrics.jsonl
            self.keep_metrics_until(t.max_steps - 1, resume=True)
            results = self.evaluate(t.max_steps)
        elif last_eval != t.max_steps:
            results = self.evaluate(t.max_steps)
        if last_save != t.max_steps and start < t.max_steps:
            save_checkpoint(acc, self.output_dir, t.max_steps, t.keep_last)
        self.save_final(results)
        acc.end_training()
        return 0

    # ---- the final model -----------------------------------------------------------------------------------
    def save_final(self, results: dict[str, TaskEval]) -> None:
        """final/ (save_pretrained, its model card with the run's metrics and gates, atomically) and a summary."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.main_process:
            final, tmp = self.output_dir / "final", self.output_dir / ".tmp_final"
            shutil.rmtree(tmp, ignore_errors=True)
            card = {"metrics": {n: r.metrics for n, r in results.items()},
                    "gate": {n: r.gate_levels for n, r in results.items() if r.gate_levels}}
            try:
                self.unwrapped.save_pretrained(tmp, card_data=card)
                replace_dir(tmp, final)
            except OSError as e:
                if (error := disk_full_error(e, "final/", self.output_dir)) is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                raise error from e
            self.say(f"\nrun finished: {self.output_dir} (step {self.t.max_steps})")
            for n, r in results.items():
                head = ", ".join(f"{k} {v:.4f}" for k, v in r.headline.items() if v is not None)
                gate = ", ".join(f"{e} {w:.2f}" for e, w in (r.gate or {}).items())
                self.say(f"  {n:<24} {head}  | gate: {gate}")
            self.say(f"  final model: {final}  (Router.from_pretrained('{final}'))\n  metrics: {self.metrics_path}")
        acc.wait_for_everyone()
