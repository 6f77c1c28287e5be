"""Frozen-feature linear probes (the library behind ``train/probe.py``): data, features, probes.

For every extractor, features of the train and test images are computed once (frozen, eval mode), then
a linear probe is trained on the train features and scored on the test split (dinov2 eval/linear.py):

- mtd        defect segmentation: a 1x1 conv on the dense map (`--layers n`: the last n blocks
             concatenated), logits upsampled to the mask; IoU of
             the defect class over the whole test split.
- camvid     11-class segmentation, same probe; mIoU over the 11 classes, void (11) ignored.
- flowers12  12-class classification: a linear layer on [pooled vector, mean of the dense map]; accuracy.

Images (and masks, nearest) are resized to --size x --size; metrics are computed at that resolution.
Probe features are standardized with train statistics (still a linear probe). Segmentation losses weight
classes by inverse frequency (balanced) so that rare classes (MTD defects: ~2.6% of pixels) are not
ignored, and are computed at half the mask resolution (nearest-downsampled masks) to keep CPU time low;
test metrics use the full --size resolution. Hyper-parameters are fixed (no selection on the test split). `--random NAME=SPEC` builds the
spec with random weights (same architecture): the from-scratch baseline.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from train.selfsup.unlabeled import IMAGE_SUFFIXES

TASKS = {  # dataset folder -> (kind, metric name, number of classes, ignore index)
    "mtd": ("seg", "defect_iou", 2, None),
    "camvid": ("seg", "miou", 11, 11),
    "flowers12": ("cls", "accuracy", 12, None),
}


# ---- data: images resized once, shared by all extractors ------------------------------------------------------
def load_split(root: Path, name: str, split: str, size: int) -> dict[str, torch.Tensor]:
    """uint8 images (N, 3, size, size) and masks (N, size, size) or labels (N,) of one split."""
    folder = root / name
    split_file = folder / "splits.csv"
    if not split_file.is_file():
        raise FileNotFoundError(f"probe: {split_file} does not exist (set --data-root or $BACKBONE_ROUTER_DATA)")
    with split_file.open(newline="") as f:
        stems = [r["stem"] for r in csv.DictReader(f) if r["split"] == split]
    if not stems:
        raise ValueError(f"{split_file}: no images in split {split!r}")
    images, targets = [], []
    labels = {}
    if TASKS[name][0] == "cls":
        with (folder / "labels.csv").open(newline="") as f:
            labels = {r["stem"]: int(r["class_idx"]) for r in csv.DictReader(f)}
    for stem in stems:
        path = next((folder / "images" / f"{stem}{s}" for s in IMAGE_SUFFIXES if (folder / "images" / f"{stem}{s}").is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{split_file}: stem {stem!r} has no image in {folder / 'images'}")
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size, size), Image.BICUBIC)
        images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        if TASKS[name][0] == "seg":
            with Image.open(folder / "masks" / f"{stem}.png") as m:
                targets.append(torch.from_numpy(np.asarray(m.resize((size, size), Image.NEAREST)).astype(np.int64)))
        else:
            if stem not in labels:
                raise KeyError(f"{folder / 'labels.csv'}: no label for stem {stem!r}")
            targets.append(torch.tensor(labels[stem]))
    return {"images": torch.stack(images), "targets": torch.stack(targets)}


@torch.no_grad()
def extract(extractor, images: torch.Tensor, kind: str, batch: int = 64) -> torch.Tensor:
    """Frozen features: the extractor's dense maps concatenated (N, sum D, h, w) for seg; [pooled, mean of
    dense] for cls. With ``--layers n`` the extractor returns its last n blocks (n = 1: the last one)."""
    out = []
    for i in range(0, len(images), batch):
        o = extractor(images[i : i + batch].float() / 255)
        grid = o["dense"][-1].shape[-2:]
        dense = torch.cat([F.interpolate(d, size=grid, mode="bilinear", align_corners=False)
                           if d.shape[-2:] != grid else d for d in o["dense"]], 1)
        out.append(dense if kind == "seg" else torch.cat([o["pooled"], dense.mean((2, 3))], 1))
    return torch.cat(out).float()


# ---- probes ----------------------------------------------------------------------------------------------------
def _standardize(train: torch.Tensor, test: torch.Tensor, dim) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = train.mean(dim, keepdim=True), train.std(dim, keepdim=True) + 1e-6
    return (train - mean) / std, (test - mean) / std


def class_weights(targets: torch.Tensor, classes: int, ignore: int | None) -> torch.Tensor:
    """Inverse class frequency (balanced), normalized to mean 1 over the present classes."""
    valid = targets[targets != ignore] if ignore is not None else targets.flatten()
    freq = torch.bincount(valid.flatten(), minlength=classes)[:classes].float()
    w = torch.where(freq > 0, 1 / freq.clamp_min(1), torch.zeros_like(freq))
    return w / w[freq > 0].mean()


def probe_seg(train_x, train_y, test_x, test_y, classes: int, ignore: int | None, epochs: int, lr: float, seed: int):
    """1x1-conv probe on dense maps; returns per-class IoU on the test split (NaN for absent classes)."""
    torch.manual_seed(seed)
    train_x, test_x = _standardize(train_x, test_x, (0, 2, 3))
    head = torch.nn.Conv2d(train_x.shape[1], classes, 1)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    weight = class_weights(train_y, classes, ignore)
    size = train_y.shape[-2:]
    half = (size[0] // 2, size[1] // 2)
    train_y_half = train_y[:, ::2, ::2]  # nearest downsampling
    steps = epochs * ((len(train_x) + 31) // 32)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x)).split(32):
            logits = F.interpolate(head(train_x[idx]), size=half, mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, train_y_half[idx], weight=weight, ignore_index=-100 if ignore is None else ignore)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    confusion = torch.zeros(classes, classes, dtype=torch.long)
    with torch.no_grad():
        for idx in torch.arange(len(test_x)).split(32):
            pred = F.interpolate(head(test_x[idx]), size=size, mode="bilinear", align_corners=False).argmax(1)
            y = test_y[idx]
            keep = y != ignore if ignore is not None else torch.ones_like(y, dtype=torch.bool)
            confusion += torch.bincount(y[keep] * classes + pred[keep], minlength=classes * classes).view(classes, classes)
    tp = confusion.diag().float()
    union = confusion.sum(0).float() + confusion.sum(1).float() - tp
    return torch.where(confusion.sum(1) > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))


def probe_cls(train_x, train_y, test_x, test_y, classes: int, epochs: int, lr: float, seed: int) -> float:
    """Linear classifier on pooled features; returns test accuracy."""
    torch.manual_seed(seed)
    train_x, test_x = _standardize(train_x, test_x, 0)
    head = torch.nn.Linear(train_x.shape[1], classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-3)
    steps = epochs * ((len(train_x) + 63) // 64)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x)).split(64):
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()
