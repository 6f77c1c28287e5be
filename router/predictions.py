"""What :meth:`router.Router.predict` returns, and how it groups images into batches.

Classification: per image a list of ``{"label": class name, "score": probability}``, best first (the shape of
transformers' image-classification pipeline). Segmentation: per image a :class:`SegPrediction`, the class-index
mask at the image's own size with the class names (index = mask value) and, on request, the per-class
probabilities.

>>> top_labels(torch.tensor([0.125, 0.5, 0.375]), ["cat", "dog", "fox"], k=2)
[{'label': 'dog', 'score': 0.5}, {'label': 'fox', 'score': 0.375}]
"""

from __future__ import annotations

from typing import TypedDict

import torch


class Label(TypedDict):
    label: str  # class name (its index as text when the task has no class names)
    score: float  # softmax probability


class SegPrediction(TypedDict, total=False):
    mask: torch.Tensor  # H x W int64 class indices at the image's original size
    classes: list[str]  # class names; index = mask value
    probs: torch.Tensor  # K x H x W float softmax probabilities (only with return_probs=True)


def class_names(classes: list[str], k: int) -> list[str]:
    """The task's class names, or "0".."k-1" when it has none."""
    return list(classes) if len(classes) == k else [str(i) for i in range(k)]


def top_labels(probs: torch.Tensor, names: list[str], k: int | None) -> list[Label]:
    """The `k` most probable classes of one image (all with k None), best first, as {"label", "score"} dicts."""
    k = len(names) if k is None else min(k, len(names))
    scores, idx = probs.float().topk(k)
    return [{"label": names[i], "score": float(s)} for s, i in zip(scores.tolist(), idx.tolist())]


def same_size_batches(images: list[torch.Tensor], batch_size: int) -> list[list[int]]:
    """Indices of `images` grouped by shape (C, H, W), in order of first appearance, at most `batch_size` a group.

    >>> same_size_batches([torch.zeros(3, 4, 4), torch.zeros(3, 5, 5), torch.zeros(3, 4, 4)], 8)
    [[0, 2], [1]]
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return [g[s: s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)]
