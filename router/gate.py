"""The task-conditioned gate: how much each extractor counts, per task x level, per image or per location."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import nn

from .config import GateConfig


def top_k_renormalize(weights: torch.Tensor, k: int, dim: int = 1, score: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the k largest weights along `dim` (ties: the lower index), zero the rest, renormalize to 1.

    With `score` (broadcastable to `weights`), the k entries are those with the largest score instead, e.g.
    the weights averaged over levels, so that every level keeps the same k extractors.

    >>> w = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.5, 0.4]]])     # 1 image x 2 levels x 3 extractors
    >>> top_k_renormalize(w, 1, dim=2)                               # per level: two extractors would run
    tensor([[[1., 0., 0.],
             [0., 1., 0.]]])
    >>> top_k_renormalize(w, 1, dim=2, score=w.mean(1, keepdim=True))   # shared: one runs
    tensor([[[0., 1., 0.],
             [0., 1., 0.]]])
    """
    idx = (weights if score is None else score.expand_as(weights)).topk(k, dim=dim).indices
    kept = torch.zeros_like(weights).scatter(dim, idx, weights.gather(dim, idx))
    return kept / kept.sum(dim=dim, keepdim=True)


def keep_renormalized(weights: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Gate weights (B x L x E [x h x w]) with every extractor outside `keep` zeroed and the rest renormalised
    to sum to 1 over E: the model as if only those extractors were in the committee (ablation at evaluation).

    >>> keep_renormalized(torch.tensor([[[0.5, 0.3, 0.2]]]), [1, 2])
    tensor([[[0.0000, 0.6000, 0.4000]]])
    """
    mask = torch.zeros(weights.shape[2], dtype=weights.dtype, device=weights.device)
    mask[keep] = 1.0
    kept = weights * mask.view(1, 1, -1, *([1] * (weights.ndim - 3)))
    return kept / kept.sum(dim=2, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


class PixelStem(nn.Module):
    """A small conv stem that looks at the image itself, so the gate can decide before any extractor runs.

    The stem has stride 8 and sees the image resized to ``scale`` pixels per grid cell, so its cost follows
    the grid, not the input resolution. ``scale = 8``: its output is the grid (at stride 16 that is the
    image at half resolution, a quarter of the work). ``scale = 4`` or ``2``: a quarter / a sixteenth of that
    again, the output (grid / 2 or grid / 4) bilinearly resampled to the grid.
    """

    def __init__(self, hidden: int, scale: int = 8):
        super().__init__()
        self.scale = scale
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(32, hidden, 3, stride=2, padding=1),
        )  # fmt: skip

    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        size = (grid[0] * self.scale, grid[1] * self.scale)
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        out = self.net((x - 0.5) / 0.25)
        if tuple(out.shape[-2:]) != tuple(grid):
            out = F.interpolate(out, size=grid, mode="bilinear", align_corners=False)
        return out


class TaskGate(nn.Module):
    """Softmax weights over E extractors at each of L levels, conditioned on the task and (for image/token)
    the content; they sum to 1 over the extractors at every level.

    Granularity ``task``: one L x E weight table per task (B x L x E, equal rows). ``image``: task embedding
    plus the pooled content (B x L x E). ``token``: task embedding plus the local content at every cell of
    the gate's grid (B x L x E x h x w). Content comes from a small pixel stem (``content="pixels"``) or
    from the aligned extractor maps (``content="features"``). One MLP gives all L x E logits, so with one
    level this is exactly the single-grid gate. Top-k keeps the same k extractors at every level (those with
    the largest weight averaged over levels), so k extractors run.
    """

    def __init__(self, num_extractors: int, task_names: list[str], cfg: GateConfig, feature_width: int,
                 text_embeddings: dict[str, torch.Tensor] | None = None, num_levels: int = 1):
        super().__init__()
        self.cfg = cfg
        self.num_extractors = num_extractors
        self.num_levels = num_levels
        h = cfg.hidden
        # Task embeddings: learned vectors, or frozen text embeddings projected by a learned layer.
        self.task_vectors = nn.ParameterDict()
        if cfg.task_embedding == "text":
            if text_embeddings is None:
                raise ValueError("TaskGate: gate.task_embedding is 'text' but no text embeddings were given")
            self.text_proj = nn.Linear(next(iter(text_embeddings.values())).numel(), h)
        for name in task_names:
            self.add_task(name, None if text_embeddings is None else text_embeddings[name])
        if cfg.granularity != "task":
            self.content = PixelStem(h, cfg.stem_scale) if cfg.content == "pixels" else nn.Conv2d(feature_width, h, 1)
            self.content_norm = nn.LayerNorm(h)
        # Task and content enter side by side, each layer-normed, so neither drowns the other (an added
        # task vector is swamped by a larger content signal and the gate stops telling tasks apart).
        self.task_norm = nn.LayerNorm(h)
        width_in = h if cfg.granularity == "task" else 2 * h
        self.mlp = nn.Sequential(nn.Linear(width_in, h), nn.GELU(), nn.Linear(h, num_levels * num_extractors))

    @property
    def needs_features(self) -> bool:
        """True when the gate reads the extractors' aligned maps, so every extractor must run first."""
        return self.cfg.granularity != "task" and self.cfg.content == "features"

    def add_task(self, name: str, text_embedding: torch.Tensor | None = None) -> None:
        if self.cfg.task_embedding == "text":
            if text_embedding is None:
                raise ValueError(f"TaskGate.add_task({name!r}): a text embedding is needed with task_embedding='text'")
            self.task_vectors[name] = nn.Parameter(text_embedding.detach().flatten().clone(), requires_grad=False)
        else:
            self.task_vectors[name] = nn.Parameter(torch.randn(self.cfg.hidden))

    def task_vector(self, task: str) -> torch.Tensor:
        v = self.task_vectors[task]
        return self.text_proj(v) if self.cfg.task_embedding == "text" else v

    def forward(self, task: str, batch: int, grid: tuple[int, int], images: torch.Tensor | None = None,
                features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (weights, aux_loss): B x L x E (task / image) or B x L x E x h x w (token), and a scalar."""
        # Functional call: a learned task vector is a leaf parameter, and module input hooks (torch's
        # FlopCounterMode / ModuleTracker) fail on a leaf that requires grad under no_grad.
        t = F.layer_norm(self.task_vector(task), (self.cfg.hidden,), self.task_norm.weight, self.task_norm.bias)
        if self.cfg.granularity == "task":
            logits = self.mlp(t).expand(batch, -1)
        else:
            content = self.content(images, grid) if self.cfg.content == "pixels" else self.content(features)
            if self.cfg.granularity == "image":
                c = self.content_norm(reduce(content, "b c h w -> b c", "mean"))
                logits = self.mlp(torch.cat([t.expand_as(c), c], dim=-1))
            else:
                c = self.content_norm(rearrange(content, "b c h w -> b h w c"))
                logits = rearrange(self.mlp(torch.cat([t.expand_as(c), c], dim=-1)), "b h w e -> b e h w")
        logits = rearrange(logits, "b (l e) ... -> b l e ...", l=self.num_levels)
        weights = (logits / self.cfg.temperature).softmax(dim=2)
        aux = self.aux_loss(weights)
        if self.cfg.top_k is not None and self.cfg.top_k < self.num_extractors:
            weights = top_k_renormalize(weights, self.cfg.top_k, dim=2, score=weights.mean(dim=1, keepdim=True))
        return weights, aux

    def aux_loss(self, weights: torch.Tensor) -> torch.Tensor:
        """Weighted load-balance loss, E * sum_e f_e * P_e (Switch Transformer); 0 with no weight."""
        rows = rearrange(weights, "b l e ... -> (b l ...) e")
        loss = rows.new_zeros(())
        if self.cfg.load_balance_weight:
            routed = F.one_hot(rows.argmax(dim=1), self.num_extractors).float().mean(0)
            loss = loss + self.cfg.load_balance_weight * self.num_extractors * (routed * rows.mean(0)).sum()
        return loss

