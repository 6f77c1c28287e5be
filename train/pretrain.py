"""Self-supervised pretraining of an in-domain ViT extractor: MAE, SMIR (selective masking) or DINO.

    accelerate launch train/pretrain.py --config configs/pretrain_mae.yaml --output-dir runs/mae [train.max_steps=20 ...]

Writes to the output dir: config.yaml (the resolved config), metrics.jsonl (one line per `train.log_every`
optimizer steps), tb/ (with train.tensorboard) and final/ — the encoder in timm's own format (config.json +
model.safetensors, a plain timm ViT) that ``timm.create_model("local-dir:<output-dir>/final")`` opens and
``create_extractor("timm:local-dir:<output-dir>/final")`` (or ``"local-dir:..."``) loads like any other
extractor. A run into a dir holding a previous run is refused unless --overwrite, and a dir in use by another
run is refused naming it (train/rundir.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from extractors.atomic import atomic_write_bytes
from extractors.timm_backend import save_timm_extractor
from train.errors import run_cli
from train.rundir import PRETRAIN_OUTPUTS, add_run_dir_args, claim_output_dir
from train.selfsup.config import PretrainConfig, load_pretrain_config
from train.selfsup.dino import DINOPretrainer
from train.selfsup.encoder import build_encoder, saved_model_kwargs
from train.selfsup.mae import MAEPretrainer
from train.selfsup.smir import SMIRPretrainer
from train.selfsup.unlabeled import MultiCropTransform, UnlabeledImages, crop_transform, partition_indices


# ---- the pieces a method needs -------------------------------------------------------------------------
def build_pretrainer(cfg: PretrainConfig) -> torch.nn.Module:
    """The method's trainable module around a fresh encoder; its `.encoder` is what gets saved."""
    encoder = build_encoder(cfg.model)
    if cfg.method == "mae":
        return MAEPretrainer(encoder, cfg.decoder, cfg.mae.mask_ratio, cfg.mae.norm_pix_loss)
    if cfg.method == "smir":
        s = cfg.smir
        return SMIRPretrainer(encoder, cfg.decoder, s.mask_ratio, s.ms_ssim_weight, s.l1_weight, s.ssim_sigma, s.ms_ssim_scales)
    return DINOPretrainer(encoder, cfg.dino, cfg.train.max_steps)


def build_pool(cfg: PretrainConfig) -> UnlabeledImages:
    """The unlabeled image pool with the method's augmentation (one crop, or DINO multi-crop)."""
    d = cfg.data
    if cfg.method == "dino":
        c = cfg.dino
        transform = MultiCropTransform(d.image_size, c.local_size, c.local_crops, c.global_scale, c.local_scale, d.hflip)
    else:
        transform = crop_transform(d.image_size, d.crop_scale, d.hflip)
    return UnlabeledImages.from_folders(d.resolved_root(), d.datasets, d.splits, transform, d.preload_short_side,
                                        d.max_images, cfg.train.seed)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D+ parameters only (nanoGPT); biases, norms, tokens and gains are not decayed."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to `min_lr`, as a function of the optimizer step."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    return t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def phase_steps(max_steps: int, phases: int) -> list[int]:
    """Optimizer steps per phase (SMIR partition), as even as possible, summing to `max_steps`."""
    return [max_steps * (i + 1) // phases - max_steps * i // phases for i in range(phases)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML/JSON pretraining config (configs/pretrain_*.yaml)")
    parser.add_argument("--output-dir", required=True, help="run folder: config.yaml, metrics.jsonl, final/")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=20")
    add_run_dir_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    with contextlib.ExitStack() as run_dir:  # releases the output dir's lock however the run ends
        return run(args, run_dir)


def run(args: argparse.Namespace, run_dir: contextlib.ExitStack) -> Path:
    cfg = load_pretrain_config(args.config, args.overrides)
    t = cfg.train
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum_steps, mixed_precision=t.mixed_precision)
    run_dir.enter_context(claim_output_dir(Path(args.output_dir), "pretrain", PRETRAIN_OUTPUTS,
                                           overwrite=args.overwrite, accelerator=accelerator))
    set_seed(t.seed)
    if t.cpu_threads is not None and accelerator.device.type == "cpu":
        torch.set_num_threads(t.cpu_threads)
    out = Path(args.output_dir)

    # ---- data: the pool, split into partitions for SMIR -------------------------------------------------
    pool = build_pool(cfg)
    phases = partition_indices(len(pool), cfg.smir.partitions, t.seed) if cfg.method == "smir" else [list(range(len(pool)))]
    steps_per_phase = phase_steps(t.max_steps, len(phases))
    if min(len(p) for p in phases) < t.batch_size:
        accelerator.print(f"note: a pool part has {min(len(p) for p in phases)} images < batch {t.batch_size}; "
                          "batches are smaller there")

    # ---- model and optimizer ------------------------------------------------------------------------------
    model = build_pretrainer(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)

    writer = None
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        (out / "metrics.jsonl").write_text("")
        if t.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        accelerator.print(f"{cfg.method}: {len(pool)} images from {cfg.data.datasets} ({cfg.data.splits}) under "
                          f"{cfg.data.resolved_root()}; {t.max_steps} steps in {len(phases)} phase(s)")

    # ---- training loop ------------------------------------------------------------------------------------
    step, window, last_loss, tic = 0, [], float("nan"), time.time()
    progress = tqdm(total=t.max_steps, disable=not accelerator.is_local_main_process, desc=cfg.method)
    for phase, (indices, n_steps) in enumerate(zip(phases, steps_per_phase)):
        loader = DataLoader(Subset(pool, indices), batch_size=t.batch_size, shuffle=True,
                            drop_last=len(indices) >= t.batch_size * accelerator.num_processes,
                            num_workers=cfg.data.num_workers, persistent_workers=False)
        loader = accelerator.prepare(loader)
        # SMIR: from the second partition on, the model trained so far (frozen) picks the masks.
        scorer = None
        if cfg.method == "smir" and phase > 0:
            scorer = copy.deepcopy(raw).eval().requires_grad_(False)
        end = step + n_steps
        while step < end:
            for batch in loader:
                with accelerator.accumulate(model):
                    if cfg.method == "smir":
                        mask = scorer.selective_mask(batch, cfg.smir.num_masks) if scorer is not None else None
                        outputs = model(batch, mask=mask)
                    else:
                        outputs = model(batch)
                    loss = outputs["loss"]
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t.clip_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(step, cfg)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                window.append(accelerator.reduce(loss.detach(), reduction="mean").item())
                if not accelerator.sync_gradients:
                    continue
                if cfg.method == "dino":
                    raw.update_teacher()
                step += 1
                progress.update(1)
                if step % t.log_every == 0 or step == t.max_steps:
                    last_loss = sum(window) / len(window)
                    record = {"step": step, "phase": phase, "loss": last_loss, "lr": lr_at(step - 1, cfg),
                              "sec_per_step": (time.time() - tic) / (len(window) / t.grad_accum_steps)}
                    for key, value in outputs.items():
                        if key != "loss":
                            record[key] = float(value)
                    window, tic = [], time.time()
                    if accelerator.is_main_process:
                        with (out / "metrics.jsonl").open("a") as f:
                            f.write(json.dumps(record) + "\n")
                        if writer is not None:
                            for key, value in record.items():
                                writer.add_scalar(f"pretrain/{key}", value, step)
                    progress.set_postfix(loss=f"{last_loss:.4f}")
                if step >= end:
                    break
    progress.close()

    # ---- save the encoder as an extractor -------------------------------------------------------------------
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        d = cfg.data
        source = {
            "method": cfg.method,
            "steps": step,
            "images": len(pool),
            "images_seen": step * t.batch_size * t.grad_accum_steps * accelerator.num_processes,
            "datasets": d.datasets,
            "splits": d.splits,
            "image_size": d.image_size,
            "final_loss": last_loss,
            "config": cfg.to_dict(),
        }
        save_timm_extractor(raw.encoder, final, saved_model_kwargs(cfg.model), source)
        if writer is not None:
            writer.close()
        accelerator.print(f"saved {final} (load with create_extractor('local-dir:{final}'))")
    accelerator.end_training()
    return final


if __name__ == "__main__":
    sys.exit(run_cli(main))
