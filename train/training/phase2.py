"""Two-phase fine-tuning as one object: which extractor blocks unfreeze, when, at which learning rate.

Phase 1 trains the router and heads with the extractors frozen. From ``train.phase2_step`` the last
``ExtractorConfig.unfreeze_last`` blocks of each extractor train too (the whole extractor when it is not
``frozen``), at ``train.phase2_lr_scale`` x lr after a linear warmup of ``train.phase2_warmup_steps``.
The extractors were frozen when DDP wrapped the model, so DDP does not reduce their gradients:
:meth:`Phase2.reduce_grads` averages them across processes on sync steps.

>>> from backbone_router.train.training.config import ExperimentConfig
>>> cfg = ExperimentConfig.from_file("configs/quickstart.yaml")
>>> phase2 = Phase2(cfg.model.extractors, cfg.train)
>>> phase2.blocks, phase2.active(99), phase2.active(100)
({'vit14': 2, 'clip16': 2}, False, True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from backbone_router.train.training.config import TrainConfig
from backbone_router.train.training.optim import lr_factor


def set_train_mode(model: torch.nn.Module, freeze_bn_stats: bool) -> None:
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


class Phase2:
    """The phase-2 plan of a run: ``blocks`` maps extractor name -> blocks unfrozen (None: the whole extractor)."""

    def __init__(self, extractors: list, t: TrainConfig):
        self.t = t
        self.blocks: dict[str, int | None] = {}
        if t.phase2_step is not None:
            for e in extractors:
                if not e.frozen:
                    self.blocks[e.name] = None
                elif e.unfreeze_last > 0:
                    self.blocks[e.name] = e.unfreeze_last
        self.entered = False
        self.params: list[torch.nn.Parameter] = []

    def late_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters that start training in phase 2 (frozen now); remembered for :meth:`reduce_grads`."""
        self.params = [p for n in self.blocks for p in model.extractors[n].parameters()]
        return self.params

    def active(self, step: int) -> bool:
        """Whether `step` belongs to phase 2."""
        return self.t.phase2_step is not None and step >= self.t.phase2_step

    def lr_factor(self, step: int) -> float:
        """0 before phase 2, then a linear warmup over phase2_warmup_steps (times the shared schedule)."""
        if not self.active(step):
            return 0.0
        return min(1.0, (step - self.t.phase2_step + 1) / max(1, self.t.phase2_warmup_steps)) * lr_factor(step, self.t)

    def enter(self, model: torch.nn.Module) -> None:
        """Unfreeze the planned blocks of the (unwrapped) model and put it back in train mode."""
        for name, n_blocks in self.blocks.items():
            ext = model.extractors[name]
            ext.unfreeze() if n_blocks is None else ext.unfreeze_last(n_blocks)
        set_train_mode(model, self.t.freeze_bn_stats)
        self.entered = True

    def reduce_grads(self, mean: Callable[[torch.Tensor], torch.Tensor], world: int) -> None:
        """Average the late parameters' gradients over the `world` processes with `mean` (one flat collective)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if world == 1 or not grads:
            return
        flat = mean(torch.cat([g.flatten() for g in grads]))
        for g, v in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(v.view_as(g))
