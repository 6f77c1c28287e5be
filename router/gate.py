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


def drop_extractors(weights: torch.Tensor, p: float) -> torch.Tensor:
    """Gate weights (B x L x E [x h x w]) with each extractor left out with probability `p` per image and level
    (at least one kept), the kept weights renormalised: in training, the ablation of :func:`keep_renormalized` at
    random, so that every extractor's map must serve the decoder alone or with any others."""
    b, lv, e = weights.shape[:3]
    keep = torch.rand(b, lv, e, device=weights.device) >= p
    none = ~keep.any(dim=2)
    if none.any():
        pick = torch.randint(0, e, (int(none.sum()),), device=weights.device)
        keep[none] = F.one_hot(pick, e).bool()
    kept = weights * keep.view(b, lv, e, *([1] * (weights.ndim - 3)))
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
    level this is exactly the single-grid gate. Top-k keeps the same k extractors at every level
    (``top_k_levels="shared"``, so k extractors run) or each level's own k (``"each"``).
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
            shared = self.cfg.top_k_levels == "shared" and self.num_levels > 1
            weights = top_k_renormalize(weights, self.cfg.top_k, dim=2,
                                        score=weights.mean(dim=1, keepdim=True) if shared else None)
        return weights, aux

    def aux_loss(self, weights: torch.Tensor) -> torch.Tensor:
        """Weighted load-balance (E * sum_e f_e * P_e, Switch Transformer) + mean gate entropy."""
        rows = rearrange(weights, "b l e ... -> (b l ...) e")
        loss = rows.new_zeros(())
        if self.cfg.load_balance_weight:
            routed = F.one_hot(rows.argmax(dim=1), self.num_extractors).float().mean(0)
            loss = loss + self.cfg.load_balance_weight * self.num_extractors * (routed * rows.mean(0)).sum()
        if self.cfg.entropy_weight:
            entropy = -(rows * rows.clamp_min(1e-9).log()).sum(dim=1).mean()
            loss = loss + self.cfg.entropy_weight * entropy
        return loss


class ProbeMixture(nn.Module):
    """Linear probes of each extractor's aligned map, per task and level, and the loss that trains the gate as a
    mixture of their predictions (the competitive loss of Jacobs et al. 1991, *Adaptive mixtures of local experts*).

    Summed maps let a shared decoder use every extractor whatever the gate says (it can route by level or by
    channel instead), so the fused model's loss does not ask the gate to choose by task (docs/gate.md). Here each
    extractor predicts the task on its own from its map at each level (a 1 x 1 convolution on the detached map;
    for a classification task on the map's mean), and the gate's weights are scored, per image, as a mixture of
    those predictions of the whole target: ``-log sum_e w_e p_e(mask)``, with ``log p_e(mask)`` the sum of the
    probe's log-probabilities over the image's labelled cells. Its gradient moves the weights towards the posterior
    ``w_e p_e(mask) / sum_j w_j p_j(mask)``: the gate learns, per task and level (and image), which extractor's own
    map predicts the target, and a weight that has gone to ~0 comes back once its probe is clearly better (a sum over
    cells outweighs the prior). Token weights are scored by their mean over the image. The probes are trained by
    their own cross-entropy, whatever the weights, and are used in training only.
    """

    def __init__(self, widths: list[int], num_extractors: int, tasks: dict[str, tuple[int, list[int]]]):
        """`widths`: each level's width; `tasks`: name -> (classes, indices of the levels it is probed at)."""
        super().__init__()
        self.num_extractors = num_extractors
        self.probes = nn.ModuleDict()
        for name, (classes, levels) in tasks.items():
            self.add_task(name, classes, widths, levels)

    def add_task(self, name: str, classes: int, widths: list[int], levels: list[int]) -> None:
        e = self.num_extractors
        self.probes[name] = nn.ModuleDict({str(k): nn.Conv2d(e * widths[k], e * classes, 1, groups=e) for k in levels})

    def forward(self, task: str, maps: dict[int, list[torch.Tensor]], weights: dict[int, torch.Tensor],
                target: torch.Tensor, ignore_index: int | None = None) -> torch.Tensor:
        """`maps`: level index -> the E extractors' maps (B x D x h x w); `weights`: level index -> the gate's
        weights there (B x E or B x E x h x w); `target`: B x H x W class indices (seg) or B (cls).
        Returns the mean over levels of (the probes' cross-entropy per cell, summed over extractors, + the
        mixture loss per image)."""
        probes, total = self.probes[task], 0.0
        classes = next(iter(probes.values())).out_channels // self.num_extractors
        valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
        # Each cell's share of every class (a class's area in it; ignored pixels count for none): B x K x H x W
        share = F.one_hot(torch.where(valid, target, 0).clamp(0, classes - 1), classes).float() * valid[..., None].float()
        share = share.movedim(-1, 1) if target.ndim > 1 else share[:, :, None, None]
        for k, level_maps in maps.items():
            x = torch.cat([m.detach() for m in level_maps], dim=1)
            if target.ndim == 1:  # classification: the map's mean, the label as a 1 x 1 mask
                x, q = x.mean(dim=(2, 3), keepdim=True), share
            else:
                q = F.interpolate(share, size=x.shape[-2:], mode="area")
            logits = rearrange(probes[str(k)](x), "b (e c) h w -> b e c h w", e=self.num_extractors)
            log_p = (logits.float().log_softmax(dim=2) * q[:, None]).sum(dim=2)  # B x E x h x w: log p_e(cell's labels)
            probe_loss = -log_p.sum() / q.sum().clamp_min(1)
            w = weights[k].float()
            log_w = (w if w.ndim == 2 else w.mean(dim=(2, 3))).clamp_min(1e-9).log()  # B x E
            log_mask = log_p.detach().sum(dim=(2, 3))  # B x E: log p_e(mask)
            log_mask = log_mask - log_mask.amax(dim=1, keepdim=True)  # same gradient, a loss >= 0 of size ~1
            mixture = -torch.logsumexp(log_w + log_mask, dim=1).mean()
            total = total + probe_loss + mixture
        return total / max(len(maps), 1)
