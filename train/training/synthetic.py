"""A procedural multi-task dataset for the quickstart and the tests: shapes on textured backgrounds.

Each image holds one circle, square or triangle with its own colour and stripe texture on a background of
random gratings and noise. It is written in the folder layout of docs/data.md, so it goes through the
same loading code as the real datasets:

- seg: ``masks/<stem>.png`` with 0 = background, 1 = shape and, around the shape's outline, a ring of
  ``ignore_index`` 255 (``ignore_border`` pixels wide; 0 leaves it out),
- cls: ``labels.csv`` with the kind of shape.

Not a benchmark: it exists so that a fresh clone can run `accelerate launch train/finetune.py` offline.

>>> import tempfile
>>> folder = write_synthetic_dataset(tempfile.mkdtemp(), n_train=4, n_val=2, size=32)
>>> sorted(p.name for p in folder.iterdir())
['images', 'labels.csv', 'masks', 'meta.json', 'splits.csv']
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from backbone_router.extractors.io.atomic import current_umask

SHAPES = ("circle", "square", "triangle")
IGNORE_INDEX = 255


def _texture(rng: np.random.Generator, size: int, colour: np.ndarray, strength: float) -> np.ndarray:
    """size x size x 3 float image: a colour modulated by two random gratings and pixel noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.zeros((size, size), np.float32)
    for _ in range(2):
        angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(2, 9), rng.uniform(0, 2 * np.pi)
        out += np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    out = out / 2 * strength + rng.normal(0, 0.05, (size, size)).astype(np.float32)
    return np.clip(colour[None, None, :] * (1 + out[..., None]), 0, 1)


def _shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Boolean size x size mask of one shape, 24-56% of the side across, anywhere inside the image."""
    r = rng.uniform(0.12, 0.28) * size  # half the side of the bounding box
    cy, cx = rng.uniform(r + 1, size - r - 1, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if kind == "circle":
        return dy**2 + dx**2 <= r**2
    angle = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(angle), np.sin(angle)
    if kind == "square":
        u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
        return (np.abs(u) <= r * 0.85) & (np.abs(v) <= r * 0.85)
    # Equilateral triangle with circumradius 1.3 r (about the area of the square): three half-planes.
    inside = np.ones_like(dx, dtype=bool)
    for k in range(3):
        a = angle + 2 * np.pi * k / 3
        inside &= (np.cos(a) * dx + np.sin(a) * dy) <= 0.65 * r
    return inside


def _ignore_ring(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the shape's outline (dilation minus erosion)."""
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    k = 2 * width + 1
    dilated = F.max_pool2d(m, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-m, k, stride=1, padding=width)
    return (dilated - eroded)[0, 0].numpy() > 0


def make_sample(rng: np.random.Generator, size: int, ignore_border: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(uint8 H x W x 3 image, uint8 H x W mask, shape class index)."""
    label = int(rng.integers(len(SHAPES)))
    bg_colour = rng.uniform(0.15, 0.85, size=3).astype(np.float32)
    fg_colour = np.clip(bg_colour + rng.choice([-1, 1], size=3) * rng.uniform(0.2, 0.45, size=3), 0.05, 0.95)
    background = _texture(rng, size, bg_colour, strength=0.35)
    foreground = _texture(rng, size, fg_colour.astype(np.float32), strength=0.15)
    shape = _shape_mask(rng, SHAPES[label], size)
    image = np.where(shape[..., None], foreground, background)
    mask = shape.astype(np.uint8)
    if ignore_border > 0:
        mask[_ignore_ring(shape, ignore_border)] = IGNORE_INDEX
    return (image * 255).round().astype(np.uint8), mask, label


def write_synthetic_dataset(
    root: str | Path,
    name: str = "shapes",
    n_train: int = 256,
    n_val: int = 64,
    size: int = 64,
    ignore_border: int = 1,
    seed: int = 0,
) -> Path:
    """Write `root/name` (images, masks, labels.csv, splits.csv, meta.json) atomically; return the folder.

    An existing folder written with the same arguments is reused; other arguments are an error.
    """
    folder = Path(root) / name
    params = {"n_train": n_train, "n_val": n_val, "size": size, "ignore_border": ignore_border, "seed": seed}
    meta = {
        "classes": ["background", "shape"],
        "image_classes": list(SHAPES),
        "mask_encoding": "uint8 0=background 1=shape" + (f", {IGNORE_INDEX}=outline (ignore)" if ignore_border else ""),
        "source": "train/training/synthetic.py (procedural shapes on textured backgrounds)",
        "generator": params,
    }
    if ignore_border:
        meta["ignore_index"] = IGNORE_INDEX
    if folder.is_dir():
        existing = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
        if existing.get("generator") != params:
            raise ValueError(f"{folder}: exists with generator {existing.get('generator')}, not {params}; remove it")
        return folder

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}."))
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would stay with the renamed folder
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        rng = np.random.default_rng(seed)
        splits, labels = ["stem,split"], ["stem,class_name,class_idx"]
        for i in range(n_train + n_val):
            stem = f"shape_{i:05d}"
            image, mask, label = make_sample(rng, size, ignore_border)
            Image.fromarray(image).save(tmp / "images" / f"{stem}.png")
            Image.fromarray(mask).save(tmp / "masks" / f"{stem}.png")
            splits.append(f"{stem},{'train' if i < n_train else 'val'}")
            labels.append(f"{stem},{SHAPES[label]},{label}")
        (tmp / "splits.csv").write_text("\n".join(splits) + "\n")
        (tmp / "labels.csv").write_text("\n".join(labels) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first with the same arguments
            if not folder.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder
