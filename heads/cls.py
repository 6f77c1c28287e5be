"""Shared classification head: pool the fused map, a shared MLP, one linear output per task.

Pooling is either the spatial mean or attention pooling (one learned query attending over the h*w
tokens, with no positional encoding, so it is invariant to permutations of the spatial positions).
If the router's fused pooled vector is given it is concatenated to the pooled map before the MLP
(each part has its own LayerNorm; a missing vector contributes zeros, so one head serves both calls).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from einops import rearrange, repeat
from torch import nn

from backbone_router.heads.seg import prior_logits

POOLINGS = ("mean", "attention")


class ClsHead(nn.Module):
    """Pooling + shared MLP + per-task linear outputs.

    Args:
        in_dim: channels D of the fused feature map.
        num_classes: task name -> number of classes K.
        pooling: "mean" (spatial average) or "attention" (a learned query over the h*w tokens).
        hidden: width of the shared MLP.
        dropout: dropout probability after the MLP's activation.
        pooled_dim: width of the optional pooled vector passed to ``forward``; None means in_dim.
            The MLP computes Linear([LN(pooled map), LN(pooled vector)]) -> GELU -> Dropout; when
            ``forward`` gets no pooled vector its normalized half is replaced by zeros.
        num_heads: attention heads of the attention pooling (must divide in_dim).

    Example:
        >>> head = ClsHead(32, {"grade": 4}, pooling="attention")
        >>> head(torch.randn(2, 32, 7, 7), "grade", pooled=torch.randn(2, 32)).shape
        torch.Size([2, 4])
        >>> head(torch.randn(2, 32, 7, 7), "grade").shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: dict[str, int],
        pooling: str = "mean",
        hidden: int = 256,
        dropout: float = 0.0,
        pooled_dim: int | None = None,
        num_heads: int = 1,
    ):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"ClsHead.pooling: expected one of {POOLINGS}, got {pooling!r}")
        self.in_dim = in_dim
        self.pooling = pooling
        self.hidden = hidden
        self.pooled_dim = in_dim if pooled_dim is None else pooled_dim
        if pooling == "attention":
            if in_dim % num_heads:
                raise ValueError(f"ClsHead.num_heads: {num_heads} does not divide in_dim {in_dim}")
            self.query = nn.Parameter(torch.zeros(1, 1, in_dim))
            nn.init.trunc_normal_(self.query, std=0.02)
            self.token_norm = nn.LayerNorm(in_dim)
            self.attn = nn.MultiheadAttention(in_dim, num_heads, batch_first=True)
        self.map_norm = nn.LayerNorm(in_dim)
        self.pooled_norm = nn.LayerNorm(self.pooled_dim)
        self.fc = nn.Linear(in_dim + self.pooled_dim, hidden)
        self.mlp_out = nn.Sequential(nn.GELU(), nn.Dropout(dropout))
        self.outputs = nn.ModuleDict()
        for name, k in num_classes.items():
            self.add_task(name, k)

    @property
    def num_classes(self) -> dict[str, int]:
        """Task name -> number of output classes."""
        return {name: lin.out_features for name, lin in self.outputs.items()}

    def add_task(self, name: str, num_classes: int) -> None:
        """Add a linear output for a new task (on the MLP's device and dtype)."""
        if name in self.outputs:
            raise ValueError(
                f"ClsHead.add_task: task {name!r} already exists with {self.num_classes[name]} classes"
            )
        if num_classes < 2:
            raise ValueError(f"ClsHead.add_task({name!r}): need >= 2 classes, got {num_classes}")
        ref = self.fc.weight
        self.outputs[name] = nn.Linear(self.hidden, num_classes).to(device=ref.device, dtype=ref.dtype)

    @torch.no_grad()
    def init_bias_from_prior(self, task: str, prior: float | Sequence[float]) -> None:
        """Set a task's output bias to the log class prior (same convention as SegHead's)."""
        lin = self._output(task)
        lin.bias.copy_(prior_logits(prior, lin.out_features, where=f"ClsHead.init_bias_from_prior({task!r})"))

    def _output(self, task: str) -> nn.Linear:
        if task not in self.outputs:
            raise KeyError(
                f"ClsHead: unknown task {task!r}; known classification tasks: {sorted(self.outputs)}"
            )
        return self.outputs[task]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pool a B x D x h x w map to B x D (mean or attention)."""
        if x.ndim != 4 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"ClsHead: feature map has shape {tuple(x.shape)}, expected B x {self.in_dim} x h x w"
            )
        if self.pooling == "mean":
            return x.mean(dim=(2, 3))
        tokens = self.token_norm(rearrange(x, "b d h w -> b (h w) d"))
        query = repeat(self.query, "1 1 d -> b 1 d", b=x.shape[0])
        out, _ = self.attn(query, tokens, tokens, need_weights=False)
        return rearrange(out, "b 1 d -> b d")

    def forward(self, x: torch.Tensor, task: str, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Logits B x K for ``task``; ``pooled`` is an optional B x pooled_dim vector (see the class doc)."""
        lin = self._output(task)
        feats = self.map_norm(self.pool(x))
        if pooled is None:
            vec = feats.new_zeros(feats.shape[0], self.pooled_dim)
        elif pooled.shape != (x.shape[0], self.pooled_dim):
            raise ValueError(
                f"ClsHead: pooled vector has shape {tuple(pooled.shape)}, expected ({x.shape[0]}, {self.pooled_dim})"
            )
        else:
            vec = self.pooled_norm(pooled.to(feats.dtype))
        return lin(self.mlp_out(self.fc(torch.cat([feats, vec], dim=1))))
