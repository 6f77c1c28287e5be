"""Optimizer groups and the learning-rate schedule, written once for every script.

Weight decay only on 2-D+ parameters (nanoGPT's ``configure_optimizers``): norms, biases, tokens and gains
are not decayed. One AdamW holds every parameter group and updates them with torch's fused kernel where torch has
one for the parameters' device (CPU and CUDA from torch 2.4), else its foreach (multi-tensor) path: off CUDA torch
would otherwise default to a Python loop over the tensors (``_single_tensor_adamw``), 8.5 % of a comparison's step
on a CPU (issue 28). The schedule is a linear warmup then a cosine decay to a floor, a pure function of the
optimizer step (a resumed run continues it exactly).

>>> lr_factor(0, TrainConfig(warmup_steps=10))
0.1
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

try:  # private to torch (2.4 - 2.14 at least); without it, only CUDA is taken to have the fused kernel
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # pragma: no cover - depends on the torch build
    def _get_fused_kernels_supported_devices() -> list[str]:
        return ["cuda"]

from backbone_router.train.training.config import TrainConfig


def warmup_cosine(step: int, warmup: int, total: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to `floor` at `total` (and after it)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factor(step: int, t: TrainConfig) -> float:
    """The fine-tuning schedule as a multiple of train.lr: warmup, then cosine to train.min_lr_ratio."""
    return warmup_cosine(step, t.warmup_steps, t.max_steps, 1, t.min_lr_ratio)


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float, **extra) -> list[dict]:
    """Two param groups (empty ones left out): 2-D+ tensors with `weight_decay`, the others with none."""
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": ps, "weight_decay": wd, **extra} for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]


def adamw_implementation(params: Iterable[torch.nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` when every parameter is a floating-point tensor on a device for which this torch has a
    fused AdamW kernel (the list ``AdamW(fused=True)`` checks at its first step), else ``{"foreach": True}``."""
    fused_devices = set(_get_fused_kernels_supported_devices())
    params = list(params)
    if params and all(p.device.type in fused_devices and p.is_floating_point() for p in params):
        return {"fused": True}
    return {"foreach": True}


def make_optimizer(params: Iterable[torch.nn.Parameter], t: TrainConfig,
                   late: Iterable[torch.nn.Parameter] = ()) -> torch.optim.AdamW:
    """One AdamW over the router/head `params` at train.lr and the extractor parameters `late` (trained in phase 2,
    or unfrozen ones) at train.phase2_lr_scale x lr, fused or foreach (:func:`adamw_implementation`). Each group
    holds its ``base_lr`` and whether it is ``late``; the loop sets ``lr = base_lr x schedule`` every step.

    >>> opt = make_optimizer(torch.nn.Linear(2, 2).parameters(), TrainConfig(lr=1e-2))
    >>> [(g["lr"], g["weight_decay"], g["late"], g["fused"]) for g in opt.param_groups]
    [(0.01, 0.05, False, True), (0.01, 0.0, False, True)]
    """
    params, late = list(params), list(late)
    groups = decay_groups(params, t.weight_decay, lr=t.lr, base_lr=t.lr, late=False)
    scaled = t.lr * t.phase2_lr_scale
    groups += decay_groups(late, t.weight_decay, lr=scaled, base_lr=scaled, late=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), **adamw_implementation(params + late))


def set_lrs(optimizer: torch.optim.Optimizer, factor: float, late_factor: float | None = None) -> None:
    """lr = base_lr x factor in every group (x late_factor in the late groups, when given)."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * (late_factor if late_factor is not None and g.get("late") else factor)
