"""Frozen-feature linear probes (the library behind ``train/probe.py``): data, features, probes.

Any dataset folder in the layout of docs/data.md can be probed: it is read by the reader fine-tuning uses
(:func:`train.training.data.load_task_data`, the train and ``test`` splits; without a test split, val is carved from
backbone_router.train as in fine-tuning) through a :class:`train.training.config.DataConfig`, and every image (mask: nearest) is resized
by the fine-tuning eval transform to --size x --size. A folder with ``masks/`` is a segmentation task (name
``folder:cls`` to probe its labels.csv instead); classes and the ignore index come from its meta.json.

For every extractor, features of the train and test images are computed once (frozen, eval mode), then
a linear probe is trained on the train features and scored on the test split (dinov2 eval/linear.py):

- segmentation: a 1x1 conv on the dense map (`--layers n`: the last n blocks concatenated), logits upsampled to
  the mask; scored by torchmetrics (train/training/metrics.py) over the whole test split: the foreground IoU of a binary
  task (``fg_iou``), else the mIoU over the classes (``mIoU``), ignore_index ignored.
- classification: a linear layer on [pooled vector, mean of the dense map]; ``accuracy``.

Probe features are standardized with train statistics (still a linear probe). Segmentation losses weight
classes by inverse frequency (balanced) so that rare classes (MTD defects: ~2.6% of pixels) are not
ignored, and are computed at half the mask resolution (nearest-downsampled masks) to keep CPU time low;
test metrics use the full --size resolution. Hyper-parameters are fixed (no selection on the test split).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from backbone_router.heads.losses import class_argmax
from backbone_router.router.config import TaskConfig
from backbone_router.train.training.config import DataConfig, DataTaskConfig
from backbone_router.train.training.data import TaskData, TaskDataset, load_task_data
from backbone_router.train.training.metrics import primary_metric, task_metrics


# ---- data: images resized once, shared by all extractors ------------------------------------------------------
def probe_task(entry: str) -> tuple[str, str | None]:
    """``folder`` or ``folder:seg|cls`` -> (folder, task type or None: seg when the folder has masks/)."""
    folder, _, kind = entry.partition(":")
    if kind not in ("", "seg", "cls"):
        raise ValueError(f"--tasks {entry!r}: expected FOLDER or FOLDER:seg / FOLDER:cls")
    return folder, kind or None


def load_probe_data(root: Path, entries: list[str], size: int) -> tuple[dict[str, TaskData], DataConfig]:
    """Each dataset folder as one task (train split, test split as val), read and checked as fine-tuning does;
    returns the tasks and the data config they were read through."""
    tasks, sources = [], []
    for entry in entries:
        folder, kind = probe_task(entry)
        name = folder if kind is None else f"{folder}_{kind}"
        kind = kind or ("seg" if (root / folder / "masks").is_dir() else "cls")
        tasks.append(TaskConfig(name=name, type=kind))
        sources.append(DataTaskConfig(name=name, dataset=folder, val_split="test"))
    data = DataConfig(tasks=sources, root=str(root), image_size=size, eval_size=size)
    return {t.name: load_task_data(t, s, root, data, progress=True) for t, s in zip(tasks, sources)}, data


def load_split(td: TaskData, split: str, data: DataConfig) -> dict[str, torch.Tensor]:
    """uint8 images (N, C, size, size) and masks (N, size, size) or labels (N,) of one split ("train" or "val")."""
    ds = TaskDataset(td, split, data)
    samples = [ds[i] for i in range(len(ds))]  # the eval transform (no augmentation seed)
    images = torch.stack([s["image"].mul(255).round_().to(torch.uint8) for s in samples])
    return {"images": images, "targets": torch.stack([s["target"] for s in samples])}


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


def fit_head(head: torch.nn.Module, train_x: torch.Tensor, loss_of, epochs: int, batch: int, lr: float,
             weight_decay: float) -> torch.nn.Module:
    """AdamW with a cosine schedule over `epochs` shuffled passes; ``loss_of(logits, idx)`` is a batch's loss."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(train_x) + batch - 1) // batch))
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x)).split(batch):
            loss = loss_of(head(train_x[idx]), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return head


def probe_seg(train_x, train_y, test_x, test_y, classes: int, ignore: int | None, epochs: int, lr: float,
              seed: int) -> dict:
    """1x1-conv probe on dense maps; returns the test split's segmentation metrics (train/training/metrics.py)."""
    torch.manual_seed(seed)
    train_x, test_x = _standardize(train_x, test_x, (0, 2, 3))
    head = torch.nn.Conv2d(train_x.shape[1], classes, 1)
    weight = class_weights(train_y, classes, ignore)
    size = train_y.shape[-2:]
    half = (size[0] // 2, size[1] // 2)
    train_y_half = train_y[:, ::2, ::2]  # nearest downsampling

    def loss_of(logits, idx):
        logits = F.interpolate(logits, size=half, mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, train_y_half[idx], weight=weight, ignore_index=-100 if ignore is None else ignore)

    fit_head(head, train_x, loss_of, epochs, 32, lr, 1e-4)
    meter = task_metrics("seg", [str(c) for c in range(classes)], ignore)
    with torch.no_grad():
        for idx in torch.arange(len(test_x)).split(32):
            pred = class_argmax(F.interpolate(head(test_x[idx]), size=size, mode="bilinear", align_corners=False))
            meter.update(pred, test_y[idx])
    return meter.compute()


def probe_cls(train_x, train_y, test_x, test_y, classes: int, epochs: int, lr: float, seed: int) -> float:
    """Linear classifier on pooled features; returns test accuracy."""
    torch.manual_seed(seed)
    train_x, test_x = _standardize(train_x, test_x, 0)
    head = torch.nn.Linear(train_x.shape[1], classes)
    fit_head(head, train_x, lambda logits, idx: F.cross_entropy(logits, train_y[idx]), epochs, 64, lr, 1e-3)
    meter = task_metrics("cls", [str(c) for c in range(classes)], None)
    with torch.no_grad():
        meter.update(head(test_x).argmax(1), test_y)
    return meter.compute()["accuracy"]


def probe_metric(td: TaskData) -> str:
    """The number a probe reports for a task: fg_iou (binary seg), mIoU (seg), accuracy (cls)."""
    return primary_metric(td.task.type, td.task.num_classes, cls_metric="accuracy")
