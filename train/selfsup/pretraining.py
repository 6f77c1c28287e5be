"""The pretraining loop of `train/pretrain.py`: the method's module, the pool, the schedule and the steps.

:func:`pretrain` runs the steps (SMIR: one phase per pool partition, the model of the previous phases choosing
the masks), appends a line to ``metrics.jsonl`` every ``train.log_every`` steps (and logs it to the
accelerator's trackers, TensorBoard with ``train.tensorboard``), and returns what :func:`save_encoder` records.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from backbone_router.extractors.timm_backend import save_timm_extractor
from backbone_router.train.selfsup.dino import DINOPretrainer
from backbone_router.train.selfsup.encoder import build_encoder, saved_model_kwargs
from backbone_router.train.selfsup.mae import MAEPretrainer
from backbone_router.train.selfsup.pretrain_config import PretrainConfig
from backbone_router.train.selfsup.smir import SMIRPretrainer
from backbone_router.train.selfsup.unlabeled import MultiCropTransform, UnlabeledImages, crop_transform
from backbone_router.train.training.optim import decay_groups, warmup_cosine


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


def make_optimizer(module: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on 2-D+ ones only (train/training/optim.py)."""
    t = cfg.train
    return torch.optim.AdamW(decay_groups((p for p in module.parameters() if p.requires_grad), t.weight_decay),
                             lr=t.lr, betas=tuple(t.betas))


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up then cosine decay to `min_lr`, as a function of the optimizer step."""
    t = cfg.train
    return warmup_cosine(step, t.warmup_steps, t.max_steps, t.lr, t.min_lr)


def phase_steps(max_steps: int, phases: int) -> list[int]:
    """Optimizer steps per phase (SMIR partition), as even as possible, summing to `max_steps`."""
    return [max_steps * (i + 1) // phases - max_steps * i // phases for i in range(phases)]



def pretrain(cfg: PretrainConfig, accelerator, model, optimizer, pool: UnlabeledImages, phases: list[list[int]],
             out: Path) -> tuple[int, float]:
    """Train `model` (prepared) for train.max_steps over the pool's `phases`; returns (steps, last logged loss)."""
    t = cfg.train
    steps_per_phase = phase_steps(t.max_steps, len(phases))
    raw = accelerator.unwrap_model(model)
    # ---- training loop ------------------------------------------------------------------------------------
    # The losses since the last log: a device sum (no host sync per micro-batch) and a count.
    step, window, count, last_loss, tic = 0, 0.0, 0, float("nan"), time.time()
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
                window, count = window + loss.detach(), count + 1
                if not accelerator.sync_gradients:
                    continue
                if cfg.method == "dino":
                    raw.update_teacher()
                step += 1
                progress.update(1)
                if step % t.log_every == 0 or step == t.max_steps:
                    last_loss = accelerator.reduce(window, reduction="mean").item() / count
                    record = {"step": step, "phase": phase, "loss": last_loss, "lr": lr_at(step - 1, cfg),
                              "sec_per_step": (time.time() - tic) / (count / t.grad_accum_steps)}
                    for key, value in outputs.items():
                        if key != "loss":
                            record[key] = float(value)
                    window, count, tic = 0.0, 0, time.time()
                    if accelerator.is_main_process:
                        with (out / "metrics.jsonl").open("a") as f:
                            f.write(json.dumps(record) + "\n")
                    accelerator.log({f"pretrain/{k}": v for k, v in record.items()}, step=step)
                    progress.set_postfix(loss=f"{last_loss:.4f}")
                if step >= end:
                    break
    progress.close()

    return step, last_loss


def save_encoder(cfg: PretrainConfig, raw, final: Path, step: int, images: int, last_loss: float, world: int) -> None:
    """The trained encoder in timm's format (a ``timm:local-dir:`` extractor), with what made it."""
    t, d = cfg.train, cfg.data
    source = {
        "method": cfg.method,
        "steps": step,
        "images": images,
        "images_seen": step * t.batch_size * t.grad_accum_steps * world,
        "datasets": d.datasets,
        "splits": d.splits,
        "image_size": d.image_size,
        "final_loss": last_loss,
        "config": cfg.to_dict(),
    }
    save_timm_extractor(raw.encoder, final, saved_model_kwargs(cfg.model), source)
