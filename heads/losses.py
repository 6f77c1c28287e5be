"""Losses for segmentation logits (B x K x H x W) and classification logits (B x K).

Every loss takes ``forward(logits, target, ignore_index=None)`` with an integer ``target`` of shape
B x H x W (seg) or B (cls). Positions whose target equals ``ignore_index`` contribute nothing; when every
position is ignored the loss is an exact 0 that still carries a ``grad_fn`` (its gradient is 0, never
NaN). Losses are computed in float32 whatever the logits' dtype.

Binary segmentation tasks have K = 2 softmax logits (background, foreground); the binary losses use the
foreground logit z = l1 - l0, for which sigmoid(z) equals softmax(l)[1].

``build_loss`` turns a config such as ``[{"name": "ce", "weight": 1.0}, {"name": "dice", "weight": 0.5}]``
into one module that returns ``{"loss": total, "ce": ..., "dice": ...}``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "CrossEntropyLoss",
    "BinaryCrossEntropyLoss",
    "DiceLoss",
    "TverskyLoss",
    "FocalLoss",
    "TotalVariationLoss",
    "CombinedLoss",
    "LossTermConfig",
    "LOSSES",
    "build_loss",
    "hard_negative_mask",
    "TaskLoss",
    "logits_loss",
    "is_pixel_mean",
]


# ----------------------------------------------------------------------------------------------------
# shared plumbing


def _flatten(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None, where: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check shapes and return (B x P x K float logits, B x P target with ignored -> 0, B x P valid mask)."""
    if logits.ndim < 2:
        raise ValueError(f"{where}: logits must be B x K or B x K x H x W, got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{where}: target has shape {tuple(target.shape)}, expected {expected} for logits of shape "
            f"{tuple(logits.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"{where}: target must hold integer class indices, got dtype {target.dtype}")
    num_classes = logits.shape[1]
    valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    message = f"{where}: target values must lie in [0, {num_classes}) or equal ignore_index={ignore_index}"
    if target.device.type != "cpu":  # checked on the device: no host sync in the training step
        torch._assert_async(~bad.any(), message)
    elif bad.any():
        raise ValueError(f"{message}; found {target[bad].unique()[:8].tolist()}")
    target = torch.where(valid, target, torch.zeros_like(target)).long()
    logits = rearrange(logits.float(), "b k ... -> b (...) k")
    return logits, rearrange(target, "b ... -> b (...)"), rearrange(valid, "b ... -> b (...)")


def class_softmax(logits: torch.Tensor, log: bool = False) -> torch.Tensor:
    """Softmax (``log``: log-softmax) of B x P x K logits over the classes K, computed along dim 1 of their B x K x P
    view: torch's CPU kernel over a short last dim is ~10x slower (8 x 2 x 256 x 256 forward and backward: 37 vs 3.7 ms
    on one thread). The same values up to float rounding (tests/test_losses_layout.py)."""
    return (F.log_softmax if log else F.softmax)(logits.transpose(1, 2), dim=1).transpose(1, 2)


def class_argmax(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The class index of the largest logit along `dim` (B x K x H x W: dim 1), as ``logits.argmax(dim)`` gives it
    (ties: the first; NaN counts as the largest), through ``max(dim).indices``: torch's CPU argmax over a non-last
    dim is ~10x slower (32 x 2 x 160 x 160 on one thread: 90 vs 7 ms). Equal to argmax (tests/test_losses_layout.py)."""
    return logits.max(dim).indices


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, or an exact 0 (still attached to num's graph) where den is 0."""
    return torch.where(den > 0, num / den.clamp_min(1e-12), num * 0.0)


def _require_binary(logits: torch.Tensor, where: str) -> None:
    if logits.shape[1] != 2:
        raise ValueError(
            f"{where}: needs 2-class logits (background, foreground), got K={logits.shape[1]} in shape "
            f"{tuple(logits.shape)}"
        )


def _class_indices(classes: str | Sequence[int], num_classes: int, where: str) -> list[int]:
    if classes == "foreground":
        return list(range(1, num_classes))
    if classes == "all":
        return list(range(num_classes))
    if isinstance(classes, str):
        raise ValueError(
            f"{where}.classes: expected 'foreground', 'all' or a list of class indices, got {classes!r}"
        )
    idx = [int(c) for c in classes]
    if not idx or any(not 0 <= c < num_classes for c in idx):
        raise ValueError(f"{where}.classes: {idx} must be a non-empty list of indices in [0, {num_classes})")
    return idx


def hard_negative_mask(
    loss: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    ratio: float,
    min_negatives: int = 0,
) -> torch.Tensor:
    """Boolean B x P mask: all positives plus each image's hardest negatives.

    Per image b, k_b = min(#neg_b, max(ceil(ratio * #pos_b), min_negatives)) negatives with the largest
    ``loss`` are kept (ties broken by position). ``loss``, ``positive`` and ``negative`` are B x P; the
    selection does not backpropagate.
    """
    loss = loss.detach()
    n_pos = positive.sum(dim=1)
    n_neg = negative.sum(dim=1)
    k = torch.ceil(ratio * n_pos.float()).long().clamp_min(min_negatives)
    k = torch.minimum(k, n_neg)
    scores = loss.masked_fill(~negative, float("-inf"))
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = order.argsort(dim=1)
    return positive | (negative & (rank < k[:, None]))


class _Loss(nn.Module):
    """Base: validates inputs, then calls ``compute(logits B x P x K, target B x P, valid B x P)``."""

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
    ) -> torch.Tensor:
        flat_logits, flat_target, valid = _flatten(logits, target, ignore_index, type(self).__name__)
        return self.compute(flat_logits, flat_target, valid)

    def compute(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _optional_buffer(module: nn.Module, name: str, values: Sequence[float] | float | None) -> None:
    module.register_buffer(name, None if values is None else torch.as_tensor(values, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------
# losses


class CrossEntropyLoss(_Loss):
    """Softmax cross-entropy, matching ``F.cross_entropy(..., ignore_index, weight, label_smoothing)``.

    Args:
        class_weights: optional K per-class weights; the mean is weighted by the target classes' weights.
        label_smoothing: epsilon of label smoothing (0 disables it).

    Example:
        >>> loss = CrossEntropyLoss(class_weights=[1.0, 3.0])
        >>> logits, target = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8))
        >>> target[0, 0, 0] = 255
        >>> bool(torch.isclose(loss(logits, target, ignore_index=255),
        ...     F.cross_entropy(logits, target, weight=torch.tensor([1.0, 3.0]), ignore_index=255)))
        True
    """

    def __init__(self, class_weights: Sequence[float] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(
                f"CrossEntropyLoss.label_smoothing: expected a value in [0, 1], got {label_smoothing}"
            )
        _optional_buffer(self, "class_weights", class_weights)
        self.label_smoothing = label_smoothing

    def compute(self, logits, target, valid):
        num_classes = logits.shape[-1]
        logp = class_softmax(logits, log=True)
        nll = -logp.gather(-1, target[..., None])[..., 0]
        if self.class_weights is None:
            w_target = torch.ones_like(nll)
            smooth = -logp.mean(dim=-1)
        else:
            cw = self.class_weights.to(logits.device)
            if cw.shape != (num_classes,):
                raise ValueError(
                    f"CrossEntropyLoss.class_weights: has {cw.numel()} entries, logits have K={num_classes}"
                )
            w_target = cw[target]
            smooth = -(logp * cw).sum(dim=-1) / num_classes
            nll = nll * w_target
        eps = self.label_smoothing
        per = (1.0 - eps) * nll + eps * smooth
        return _safe_div((per * valid).sum(), (w_target * valid).sum())


class BinaryCrossEntropyLoss(_Loss):
    """Weighted BCE on the foreground logit z = l1 - l0 of 2-class logits, with optional hard negatives.

    Equals ``F.binary_cross_entropy_with_logits(z, y, pos_weight=pos_weight)`` over non-ignored positions
    (a plain mean over positions, as torch does). With ``neg_ratio`` set, only the positives and, per
    image, the ``max(ceil(neg_ratio * #pos), min_negatives)`` negatives with the largest BCE are kept
    (see :func:`hard_negative_mask`); the loss is the mean over the kept positions.

    Args:
        pos_weight: multiplies the loss of foreground positions (e.g. #neg / #pos); None means 1.
        neg_ratio: hard negative mining ratio r (None disables mining).
        min_negatives: at least this many negatives per image are kept when mining (if available).

    Example:
        >>> loss = BinaryCrossEntropyLoss(pos_weight=5.0, neg_ratio=3.0, min_negatives=16)
        >>> loss(torch.randn(2, 2, 16, 16), torch.randint(0, 2, (2, 16, 16))).shape
        torch.Size([])
    """

    def __init__(
        self, pos_weight: float | None = None, neg_ratio: float | None = None, min_negatives: int = 0
    ):
        super().__init__()
        if neg_ratio is not None and neg_ratio < 0:
            raise ValueError(f"BinaryCrossEntropyLoss.neg_ratio: expected >= 0 or None, got {neg_ratio}")
        _optional_buffer(self, "pos_weight", pos_weight)
        self.neg_ratio = neg_ratio
        self.min_negatives = int(min_negatives)

    def forward(self, logits, target, ignore_index=None):
        _require_binary(logits, "BinaryCrossEntropyLoss")
        return super().forward(logits, target, ignore_index)

    def compute(self, logits, target, valid):
        z = logits[..., 1] - logits[..., 0]
        y = (target == 1).float()
        pw = None if self.pos_weight is None else self.pos_weight.to(z.device)
        per = F.binary_cross_entropy_with_logits(z, y, pos_weight=pw, reduction="none")
        keep = valid
        if self.neg_ratio is not None:
            positive = valid & (target == 1)
            keep = hard_negative_mask(
                per, positive, valid & (target == 0), self.neg_ratio, self.min_negatives
            )
        keep = keep.float()
        return _safe_div((per * keep).sum(), keep.sum())


def _soft_counts(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, per_image: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft TP, FP, FN per class: (K,) summed over the batch, or (B, K) per image."""
    mask = valid[..., None].float()
    probs = class_softmax(logits) * mask
    onehot = F.one_hot(target, logits.shape[-1]).float() * mask
    dims = (1,) if per_image else (0, 1)
    tp = (probs * onehot).sum(dim=dims)
    return tp, probs.sum(dim=dims) - tp, onehot.sum(dim=dims) - tp


class TverskyLoss(_Loss):
    """Soft Tversky loss 1 - (TP + s) / (TP + alpha * FP + beta * FN + s), averaged over the chosen classes.

    TP, FP and FN are soft counts from the softmax probabilities over non-ignored positions, summed over
    the whole batch (``per_image=False``) or per image and then averaged. alpha weights false positives,
    beta false negatives; alpha = beta = 0.5 gives the Dice loss (exactly so with ``smooth=0``). A class
    absent from both prediction and target scores 1 (loss 0) when ``smooth > 0``.

    Args:
        alpha: weight of false positives.
        beta: weight of false negatives (beta > alpha favours recall).
        classes: "foreground" (every class but 0), "all", or a list of class indices.
        smooth: additive smoothing s of numerator and denominator.
        per_image: compute the index per image and average, instead of over the pooled batch.

    Example:
        >>> loss = TverskyLoss(alpha=0.3, beta=0.7)
        >>> loss(torch.randn(2, 2, 16, 16), torch.randint(0, 2, (2, 16, 16))).shape
        torch.Size([])
    """

    def __init__(
        self,
        alpha: float = 0.5,
        beta: float = 0.5,
        classes: str | Sequence[int] = "foreground",
        smooth: float = 1.0,
        per_image: bool = False,
    ):
        super().__init__()
        self.alpha, self.beta = alpha, beta
        self.classes, self.smooth, self.per_image = classes, smooth, per_image

    def compute(self, logits, target, valid):
        idx = _class_indices(self.classes, logits.shape[-1], type(self).__name__)
        tp, fp, fn = _soft_counts(logits, target, valid, self.per_image)
        den = tp + self.alpha * fp + self.beta * fn + self.smooth
        index = _safe_div(tp + self.smooth, den)[..., idx]
        return (1.0 - index).mean() * valid.any().float()


class DiceLoss(_Loss):
    """Soft Dice loss 1 - (2 TP + s) / (sum p + sum g + s), averaged over the chosen classes.

    Counts are as in :class:`TverskyLoss` (softmax probabilities p, one-hot targets g, ignored positions
    dropped, pooled over the batch unless ``per_image``).

    Args:
        classes: "foreground" (every class but 0; for K = 2 the foreground), "all", or class indices.
        smooth: additive smoothing s; with s > 0 a class absent from prediction and target scores 1.
        per_image: compute Dice per image and average.

    Example:
        >>> target = torch.randint(0, 2, (1, 8, 8))
        >>> logits = 20.0 * F.one_hot(target, 2).permute(0, 3, 1, 2).float()
        >>> round(float(DiceLoss()(logits, target)), 6)
        0.0
    """

    def __init__(
        self, classes: str | Sequence[int] = "foreground", smooth: float = 1.0, per_image: bool = False
    ):
        super().__init__()
        self.classes, self.smooth, self.per_image = classes, smooth, per_image

    def compute(self, logits, target, valid):
        idx = _class_indices(self.classes, logits.shape[-1], type(self).__name__)
        tp, fp, fn = _soft_counts(logits, target, valid, self.per_image)
        dice = _safe_div(2.0 * tp + self.smooth, 2.0 * tp + fp + fn + self.smooth)[..., idx]
        return (1.0 - dice).mean() * valid.any().float()


class FocalLoss(_Loss):
    """Softmax focal loss -alpha_t (1 - p_t)^gamma log p_t, averaged over non-ignored positions.

    Args:
        gamma: focusing exponent (0 gives cross-entropy, times alpha_t).
        alpha: None (alpha_t = 1); a float a for 2-class logits (foreground a, background 1 - a, as in
            RetinaNet); or a list of K per-class weights.

    Example:
        >>> logits, target = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
        >>> bool(torch.isclose(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target)))
        True
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None):
        super().__init__()
        if gamma < 0:
            raise ValueError(f"FocalLoss.gamma: expected >= 0, got {gamma}")
        self.gamma = gamma
        if isinstance(alpha, (int, float)):
            alpha = [1.0 - float(alpha), float(alpha)]
            self.binary_alpha = True
        else:
            self.binary_alpha = False
        _optional_buffer(self, "alpha", alpha)

    def compute(self, logits, target, valid):
        logp_t = class_softmax(logits, log=True).gather(-1, target[..., None])[..., 0]
        per = -((1.0 - logp_t.exp()).clamp_min(0.0) ** self.gamma) * logp_t
        if self.alpha is not None:
            alpha = self.alpha.to(logits.device)
            if alpha.shape != (logits.shape[-1],):
                what = (
                    "a float alpha needs K=2" if self.binary_alpha else f"alpha has {alpha.numel()} entries"
                )
                raise ValueError(f"FocalLoss: {what}, logits have K={logits.shape[-1]}")
            per = per * alpha[target]
        valid = valid.float()
        return _safe_div((per * valid).sum(), valid.sum())


class TotalVariationLoss(nn.Module):
    """Total variation of the foreground probability map, a smoothness prior for segmentation.

    The foreground map is f = 1 - softmax(logits)[:, 0] (for K = 2: the foreground probability). The loss
    is the mean of |f[i+1, j] - f[i, j]| and |f[i, j+1] - f[i, j]| (squared if ``squared``) over all
    vertical and horizontal neighbour pairs whose two pixels are both non-ignored. A constant map
    scores 0; a checkerboard alternating between probabilities a and b scores |a - b|.

    Args:
        squared: use squared differences instead of absolute ones.

    Example:
        >>> TotalVariationLoss()(torch.zeros(1, 2, 5, 5), torch.zeros(1, 5, 5, dtype=torch.long)).item()
        0.0
    """

    def __init__(self, squared: bool = False):
        super().__init__()
        self.squared = squared

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
    ) -> torch.Tensor:
        if logits.ndim != 4:
            raise ValueError(
                f"TotalVariationLoss: needs B x K x H x W logits, got shape {tuple(logits.shape)}"
            )
        _flatten(logits, target, ignore_index, "TotalVariationLoss")  # shape / value checks
        valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
        fg = 1.0 - F.softmax(logits.float(), dim=1)[:, 0]
        dv = fg[:, 1:, :] - fg[:, :-1, :]
        dh = fg[:, :, 1:] - fg[:, :, :-1]
        dv, dh = (dv.square(), dh.square()) if self.squared else (dv.abs(), dh.abs())
        mv = (valid[:, 1:, :] & valid[:, :-1, :]).float()
        mh = (valid[:, :, 1:] & valid[:, :, :-1]).float()
        return _safe_div((dv * mv).sum() + (dh * mh).sum(), mv.sum() + mh.sum())


# ----------------------------------------------------------------------------------------------------
# building a weighted sum from a config

LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "bce": BinaryCrossEntropyLoss,
    "dice": DiceLoss,
    "tversky": TverskyLoss,
    "focal": FocalLoss,
    "tv": TotalVariationLoss,
}


@dataclass
class LossTermConfig:
    name: str  # one of LOSSES: ce, bce, dice, tversky, focal, tv
    weight: float = 1.0  # multiplies this term in the total
    params: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the loss class

    def __post_init__(self):
        if self.name not in LOSSES:
            raise ValueError(f"loss name {self.name!r} is unknown; expected one of {sorted(LOSSES)}")
        allowed = [p for p in inspect.signature(LOSSES[self.name].__init__).parameters if p != "self"]
        unknown = sorted(set(self.params) - set(allowed))
        if unknown:
            raise ValueError(
                f"loss {self.name!r}: unknown parameter(s) {unknown}; allowed: ['name', 'weight'] + {allowed}"
            )
        if not math.isfinite(float(self.weight)):
            raise ValueError(f"loss {self.name!r}: weight must be a finite number, got {self.weight}")

    @classmethod
    def from_spec(cls, spec: str | dict[str, Any]) -> LossTermConfig:
        """Parse ``"dice"`` or ``{"name": "dice", "weight": 0.5, "smooth": 1.0}``."""
        if isinstance(spec, str):
            return cls(name=spec)
        if not isinstance(spec, dict) or "name" not in spec:
            raise ValueError(f"loss spec {spec!r}: expected a name or a dict with a 'name' key")
        params = {k: v for k, v in spec.items() if k not in ("name", "weight")}
        return cls(name=spec["name"], weight=spec.get("weight", 1.0), params=params)


class CombinedLoss(nn.Module):
    """Weighted sum of loss terms; ``forward`` returns {"loss": total, "<key>": each unweighted term}.

    Term keys are the loss names, with ``_2``, ``_3``... appended when a name repeats. The per-term
    values are detached (for logging); only "loss" carries gradients.
    """

    def __init__(self, terms: Sequence[LossTermConfig]):
        super().__init__()
        if not terms:
            raise ValueError("build_loss: the loss spec is empty; give at least one term, e.g. 'ce'")
        self.losses = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        for term in terms:
            key, n = term.name, 1
            while key in self.losses:
                n += 1
                key = f"{term.name}_{n}"
            self.losses[key] = LOSSES[term.name](**term.params)
            self.weights[key] = float(term.weight)

    def forward(
        self, logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None = None
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        total = None
        for key, loss in self.losses.items():
            value = loss(logits, target, ignore_index=ignore_index)
            out[key] = value.detach()
            total = self.weights[key] * value if total is None else total + self.weights[key] * value
        return {"loss": total, **out}


def build_loss(spec: str | dict[str, Any] | Sequence[str | dict[str, Any]]) -> CombinedLoss:
    """Build a weighted sum of losses from a name, a term dict, or a list of them.

    Each term is ``{"name": <ce|bce|dice|tversky|focal|tv>, "weight": float (default 1), **params}``
    where params are the loss class's keyword arguments (e.g. ``class_weights`` for ce, ``pos_weight``
    and ``neg_ratio`` for bce). Unknown names or parameters raise a ValueError naming them.

    Example:
        >>> loss = build_loss([{"name": "ce", "weight": 1.0}, {"name": "dice", "weight": 0.5, "smooth": 1.0}])
        >>> out = loss(torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8)), ignore_index=255)
        >>> sorted(out)
        ['ce', 'dice', 'loss']
        >>> bool(torch.isclose(out["loss"], out["ce"] + 0.5 * out["dice"]))
        True
    """
    items = [spec] if isinstance(spec, (str, dict)) else list(spec)
    return CombinedLoss([LossTermConfig.from_spec(item) for item in items])


def is_pixel_mean(term: nn.Module) -> bool:
    """Whether a loss term is a plain mean over the batch's non-ignored positions (ce without class weights,
    bce without hard-negative mining, focal): such a term can be re-weighted by a process's share of them."""
    if isinstance(term, CrossEntropyLoss):
        return term.class_weights is None
    if isinstance(term, BinaryCrossEntropyLoss):
        return term.neg_ratio is None
    return isinstance(term, FocalLoss)


class TaskLoss(nn.Module):
    """One task's weighted loss, exact under data parallelism when ignored pixels make the processes' counts differ.

    On one process (or ``global_mean_valid=None``, or no ``ignore_index``, or a classification task) it is
    ``build_loss(spec)(logits, target, ignore_index)["loss"]``. Otherwise each pixel-mean term (see
    :func:`is_pixel_mean`) is weighted by this process's share of the non-ignored pixels, so that the mean of
    the processes' gradients (what DDP takes) is the gradient of the mean over the global batch: exact for
    ce / bce / focal; per-image Dice and Tversky average over images, which processes hold equally;
    batch-pooled Dice stays per process.

    Args:
        spec: a loss spec for :func:`build_loss`.
        task_type: "seg" or "cls".
        ignore_index: the target value that is ignored, or None.

    Example:
        >>> loss = TaskLoss("ce", "seg", ignore_index=255)
        >>> logits, target = torch.randn(2, 2, 8, 8), torch.randint(0, 2, (2, 8, 8))
        >>> same = loss(logits, target, global_mean_valid=lambda n: n)  # one process: its share is 1
        >>> bool(torch.isclose(same, loss(logits, target)))
        True
    """

    def __init__(self, spec: Any, task_type: str, ignore_index: int | None = None):
        super().__init__()
        self.loss = build_loss(spec)
        self.task_type = task_type
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor, global_mean_valid=None) -> torch.Tensor:
        """``global_mean_valid(count)``: the mean of a per-process count over the processes (e.g. accelerate's
        ``reduce(count, reduction="mean")``); None on one process."""
        if global_mean_valid is None or self.ignore_index is None or self.task_type != "seg":
            return self.loss(logits, target, ignore_index=self.ignore_index)["loss"]
        valid = (target != self.ignore_index).sum().float()
        share = valid / global_mean_valid(valid.clone()).clamp_min(1.0)
        total = logits.new_zeros(())
        for key, term in self.loss.losses.items():
            value = term(logits, target, ignore_index=self.ignore_index)
            total = total + self.loss.weights[key] * value * (share if is_pixel_mean(term) else 1.0)
        return total


def logits_loss(logits: torch.Tensor, loss, *args, **kwargs) -> torch.Tensor:
    """``loss(logits, *args, **kwargs)`` with the logits in float32; a dict result (:func:`build_loss`'s) gives its
    ``"loss"``.

    >>> value = logits_loss(torch.randn(2, 3).half(), build_loss("ce"), torch.tensor([0, 2]))
    """
    result = loss(logits.float(), *args, **kwargs)
    return result["loss"] if isinstance(result, dict) else result

