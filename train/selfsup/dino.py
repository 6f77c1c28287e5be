"""DINO: self-distillation with no labels (Caron et al. 2021).

A student and an EMA teacher (the same timm ViT + projection head) see multi-crop views: the teacher
only the 2 global views, the student all views. The teacher's outputs are centered (running mean) and
sharpened (low temperature, warmed up), the student's softened; the loss is the cross-entropy between
them over every (teacher view, other student view) pair. The saved extractor is the teacher backbone
(features before the projection head), as in the paper's evaluations.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from backbone_router.extractors.timm_backend import TimmExtractor
from backbone_router.train.selfsup.pretrain_config import DINOConfig


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2 normalize -> weight-normed linear to `out_dim` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        mlp: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mlp.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                mlp.append(nn.GELU())
        self.mlp = nn.Sequential(*mlp)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)  # the gain g
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


class DINOPretrainer(nn.Module):
    """Student + EMA teacher. ``forward(views)`` returns ``{"loss": ...}``; call `update_teacher` after each step.

    >>> from backbone_router.train.selfsup.pretrain_config import PretrainModelConfig, DINOConfig
    >>> from backbone_router.train.selfsup.encoder import build_encoder
    >>> dino = DINOPretrainer(build_encoder(PretrainModelConfig(kwargs={"img_size": 32, "embed_dim": 32, "depth": 1, "num_heads": 2})),
    ...                       DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=2))
    >>> dino([torch.rand(2, 3, 32, 32)] * 2 + [torch.rand(2, 3, 16, 16)] * 2)["loss"].ndim
    0
    """

    def __init__(self, encoder: TimmExtractor, cfg: DINOConfig, max_steps: int = 1):
        super().__init__()
        self.cfg = cfg
        self.max_steps = max(1, max_steps)
        head = DINOHead(encoder.info.width, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers,
                        cfg.norm_last_layer)
        self.student = nn.ModuleDict({"backbone": encoder, "head": head})
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # optimizer steps taken (schedules)

    @property
    def encoder(self) -> TimmExtractor:
        """The extractor that is saved: the teacher backbone."""
        return self.teacher["backbone"]

    def teacher_temp(self, step: int) -> float:
        """Linear warm-up from `warmup_teacher_temp` to `teacher_temp` over `teacher_temp_warmup_steps`."""
        c = self.cfg
        if step >= c.teacher_temp_warmup_steps:
            return c.teacher_temp
        return c.warmup_teacher_temp + (c.teacher_temp - c.warmup_teacher_temp) * step / max(1, c.teacher_temp_warmup_steps)

    def momentum(self, step: int) -> float:
        """Cosine schedule of the teacher EMA momentum from `momentum` to `momentum_end` over training."""
        c = self.cfg
        return c.momentum_end - (c.momentum_end - c.momentum) * (math.cos(math.pi * min(step, self.max_steps) / self.max_steps) + 1) / 2

    @staticmethod
    def _embed(net: nn.ModuleDict, views: list[torch.Tensor]) -> torch.Tensor:
        # Views of one resolution go through the backbone together (as in DINO's multi-crop wrapper).
        outs, i = [], 0
        while i < len(views):
            j = i
            while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
                j += 1
            outs.append(net["backbone"](torch.cat(views[i:j]))["pooled"])
            i = j
        return net["head"](torch.cat(outs))

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        if len(views) < 2:
            raise ValueError(f"DINO: expected 2 global views (+ local views), got {len(views)} views")
        b = views[0].shape[0]
        student = self._embed(self.student, views).float().chunk(len(views))
        with torch.no_grad():
            teacher_logits = self._embed(self.teacher, views[:2]).float()
            temp = self.teacher_temp(int(self.step))
            teacher = F.softmax((teacher_logits - self.center) / temp, dim=-1).chunk(2)
        loss, pairs = 0.0, 0
        for ti, t in enumerate(teacher):
            for si, s in enumerate(student):
                if si == ti:
                    continue  # the same view
                loss = loss + torch.sum(-t * F.log_softmax(s / self.cfg.student_temp, dim=-1), dim=-1).mean()
                pairs += 1
        if self.training:
            self.update_center(teacher_logits)
        return {"loss": loss / pairs, "teacher_temp": torch.tensor(temp), "batch": torch.tensor(b)}

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * batch mean of teacher logits (all-reduced across processes)."""
        batch_center = teacher_logits.sum(0, keepdim=True)
        count = torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            torch.distributed.all_reduce(count)
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch_center / count, alpha=1 - m)

    @torch.no_grad()
    def update_teacher(self, momentum: float | None = None) -> float:
        """teacher <- m * teacher + (1 - m) * student for every parameter; advances the step. Returns m."""
        m = self.momentum(int(self.step)) if momentum is None else momentum
        for pt, ps in zip(self.teacher.parameters(), self.student.parameters()):
            pt.mul_(m).add_(ps.detach(), alpha=1 - m)
        self.step += 1
        return m
