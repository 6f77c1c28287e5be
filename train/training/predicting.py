"""Run a saved Router on image files: find the images, write masks as palette PNGs and classifications as CSV.

The library of ``train/predict.py``. A mask PNG holds the class index of each pixel (so it is a mask of the layout
of docs/data.md too) and a palette: the dataset's class colours when its meta.json has ``colors`` (one
``[r, g, b]`` per class), else :func:`default_palette` (Pascal VOC's colour map: class 0 black).

>>> default_palette()[:3]
[(0, 0, 0), (128, 0, 0), (0, 128, 0)]
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backbone_router.router.config import load_yaml_or_json
from backbone_router.train.training.data import IMAGE_SUFFIXES

Colour = tuple[int, int, int]


def default_palette(n: int = 256) -> list[Colour]:
    """Pascal VOC's colour map: class i's bits spread over the high bits of r, g, b (0 black, 1 dark red, ...)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append((r, g, b))
    return out


def find_images(inputs: list[str | Path]) -> list[Path]:
    """The image files named by `inputs`: a file as it is, a folder's image files (sorted, not recursive).

    A missing input, a folder without images or two images with the same stem (their outputs would collide) is an
    error naming them.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"{item}: a folder with no image files ({', '.join(IMAGE_SUFFIXES)})")
            found += files
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image file or folder")
    stems: dict[str, Path] = {}
    for p in found:
        if p.stem in stems:
            raise ValueError(f"{stems[p.stem]} and {p} have the same name stem {p.stem!r}: their outputs would "
                             "collide; predict them in separate runs")
        stems[p.stem] = p
    return found


def class_colours(meta_path: Path | None, num_classes: int) -> tuple[list[Colour], str]:
    """The palette of a task's mask PNGs and where it came from: meta.json's ``colors`` (one [r, g, b] per class,
    checked), else the default palette."""
    if meta_path is None:
        return default_palette(), "default palette"
    meta = load_yaml_or_json(Path(meta_path))
    colours = meta.get("colors")
    if colours is None:
        return default_palette(), f"default palette ({meta_path} has no 'colors')"
    if (not isinstance(colours, list) or len(colours) < num_classes
            or not all(isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                       for c in colours)):
        raise ValueError(f"{meta_path}: 'colors' must list {num_classes} [r, g, b] values in 0..255 (one per class), "
                         f"got {colours!r}")
    return [tuple(c) for c in colours] + default_palette()[len(colours):], f"the class colours of {meta_path}"


def run_meta(model_dir: Path, task: str) -> Path | None:
    """The meta.json of the dataset `task` was trained on, when `model_dir` is a run's ``final/`` whose run folder
    still has its config.yaml and data; None otherwise."""
    config = Path(model_dir).parent / "config.yaml"
    if Path(model_dir).name != "final" or not config.is_file():
        return None
    from backbone_router.train.training.config import data_root, load_config_file

    data = load_config_file(config).get("data") or {}
    source = next((t for t in data.get("tasks") or [] if t.get("name") == task), None)
    if source is None:
        return None
    root = config.parent / "data" if data.get("synthetic") else data_root(data.get("root"))
    meta = root / source["dataset"] / "meta.json"
    return meta if meta.is_file() else None


def mask_png(mask: torch.Tensor, palette: list[Colour]) -> bytes:
    """An H x W class-index mask as the bytes of a palette PNG (mode P; the pixel values are the class indices)."""
    values = mask.cpu().numpy()
    if values.size and (values.min() < 0 or values.max() > 255):
        raise ValueError(f"mask values {int(values.min())}..{int(values.max())}: a PNG palette holds classes 0..255")
    image = Image.fromarray(values.astype(np.uint8), mode="P")
    image.putpalette([v for c in palette[:256] for v in c])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def labels_csv(rows: list[tuple[Path, list[dict]]], top_k: int) -> bytes:
    """One row per image: image, label, score, then label_2, score_2, ... up to `top_k`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "label", "score"] + [f"{k}_{i}" for i in range(2, top_k + 1) for k in ("label", "score")])
    for path, top in rows:
        w.writerow([str(path)] + [x for d in top for x in (d["label"], f"{d['score']:.6f}")])
    return buf.getvalue().encode()

