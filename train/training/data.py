"""Datasets in the folder layout of docs/data.md, joint image/mask transforms, and the task schedule.

A dataset folder holds ``images/``, ``masks/`` (segmentation), ``splits.csv``, ``labels.csv``
(classification) and ``meta.json``. Each task of an experiment reads one folder: a seg task its masks, a
cls task its labels.csv (one folder can serve both, like MTD).

Loading a task decodes every image and mask once (a truncated file fails at start, not at step 2 or at the
first evaluation), with a progress bar, and keeps what training needs later (mask statistics for the prior).
CSVs may start with a UTF-8 BOM; image suffixes match in any case; file names and stems are compared after
Unicode NFC normalisation, and a stem without a file names the nearest file names.

Training batches are task-homogeneous. :class:`TaskSchedule` decides, as a pure function of the seed and
the global micro-batch index, which task a micro-batch serves, which items it holds and the seed of each
item's augmentation. Every process therefore draws the same task for the same step (DDP needs that), a
resumed run continues the exact sequence, and the global batch is the same for any number of processes:
process r of W takes the r-th slice of it.

>>> schedule = TaskSchedule(sizes=[100, 40], weights=[1.0, 1.0], global_batch=8, seed=0)
>>> task, keys = schedule.batch(0)
>>> len(keys)
8
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from backbone_router.extractors.io.images import HIGH_DEPTH_MODES, IMAGE_ERRORS, read_image
from backbone_router.router.config import TaskConfig, load_yaml_or_json
from backbone_router.train.training.config import (
    DATA_ENV,
    DataConfig,
    DataTaskConfig,
    ExperimentConfig,
    data_root,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---- locating datasets ------------------------------------------------------------------------------
def resolve_data_root(data: DataConfig, output_dir: str | Path | None = None) -> Path:
    """data.synthetic -> <output_dir>/data; else :func:`train.training.config.data_root` (data.root, $BACKBONE_ROUTER_DATA,
    ../shared/data next to the repository), which must be a folder."""
    if data.synthetic is not None:
        if output_dir is None:
            raise ValueError("data.synthetic: needs an output dir to write the generated dataset into")
        return Path(output_dir) / "data"
    path = data_root(data.root)
    if not path.is_dir():
        source = "data.root" if data.root else (f"${DATA_ENV}" if os.environ.get(DATA_ENV) else "the default")
        raise FileNotFoundError(
            f"data root {path} (from {source}) is not a folder; set data.root=DIR or {DATA_ENV}=DIR to the "
            "folder holding the datasets (layout: docs/data.md)"
        )
    return path


@dataclass
class Item:
    stem: str  # file stem shared by images/<stem>.* and masks/<stem>.png
    image: Path  # image file
    mask: Path | None = None  # mask file (seg tasks)
    label: int | None = None  # class index (cls tasks)


@dataclass
class TaskData:
    """One task's resolved data: classes, train and val items, image channels."""

    task: TaskConfig  # the model task, with classes and ignore_index filled in
    source: DataTaskConfig  # its data section
    folder: Path  # the dataset folder
    train: list[Item] = field(default_factory=list)
    val: list[Item] = field(default_factory=list)
    channels: int = 3  # 1 for greyscale datasets (kept as 1 channel; the extractors repeat it)
    val_carved: bool = False  # True when val was carved from train (no val split in splits.csv)
    mask_pixels: dict[Path, tuple[int, int]] = field(default_factory=dict)  # mask -> (class >= 1, non-ignored) pixels


def nfc(name: str) -> str:
    """A file name or stem in Unicode NFC (macOS writes NFD, most editors NFC)."""
    return unicodedata.normalize("NFC", name)


def _read_csv(path: Path, columns: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected a CSV with columns {','.join(columns)})")
    with path.open(newline="", encoding="utf-8-sig") as f:  # a BOM (Excel's "CSV UTF-8") is not part of the header
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; header is {reader.fieldnames}")
        return [{**row, "stem": nfc(row["stem"])} if "stem" in row else row for row in reader]


def _read_meta(folder: Path) -> dict[str, Any]:
    """A dataset's meta.json (read by the config reader: duplicate keys, NaN, non-UTF-8 refused) with the keys that
    are read typed (docs/data.md): classes / image_classes lists of names, ignore_index an int >= 0 or null,
    channels 1 or 3. An error names the file, the key and the value."""
    path = folder / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (expected classes, ignore_index, ... see docs/data.md)")
    meta = load_yaml_or_json(path)
    for key in ("classes", "image_classes"):
        names = meta.get(key)
        if key in meta and not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
            raise ValueError(f"{path}: {key!r} must be a list of class names (strings), got {names!r}")
    ignore = meta.get("ignore_index")
    if ignore is not None and (not isinstance(ignore, int) or isinstance(ignore, bool) or ignore < 0):
        raise ValueError(f"{path}: 'ignore_index' must be an int >= 0 (the mask value left out of losses and "
                         f"metrics) or null, got {ignore!r}")
    channels = meta.get("channels")
    if "channels" in meta and (isinstance(channels, bool) or channels not in (1, 3)):
        raise ValueError(f"{path}: 'channels' must be 1 (greyscale) or 3 (RGB), got {channels!r}; leave it out to "
                         "take it from the images")
    return meta


def read_splits(folder: Path) -> dict[str, list[str]]:
    """split -> stems of a dataset folder's splits.csv, in file order; a stem in two splits is an error."""
    splits: dict[str, list[str]] = {}
    split_of: dict[str, tuple[str, int]] = {}
    for row_no, row in enumerate(_read_csv(folder / "splits.csv", ("stem", "split")), start=2):
        stem, split = row["stem"], row["split"]
        if stem in split_of and split_of[stem][0] != split:
            raise ValueError(f"{folder / 'splits.csv'}: stem {stem!r} is in split {split_of[stem][0]!r} (line "
                             f"{split_of[stem][1]}) and in split {split!r} (line {row_no}); a stem belongs to one split")
        if stem in split_of:  # listed twice in one split: it would be drawn (and scored) twice as often
            raise ValueError(f"{folder / 'splits.csv'}: stem {stem!r} is listed twice in split {split!r} (lines "
                             f"{split_of[stem][1]} and {row_no}); list each stem once")
        split_of.setdefault(stem, (split, row_no))
        splits.setdefault(split, []).append(stem)
    return splits


def split_images(folder: Path, splits: tuple[str, ...] | list[str]) -> list[Path]:
    """The image files of a dataset folder whose splits.csv split is one of `splits` (no labels or masks read)."""
    found = read_splits(folder)
    images = FileIndex(folder / "images")
    return [images.find(stem, IMAGE_SUFFIXES, "image listed in splits.csv") for s in splits for stem in found.get(s, [])]


class FileIndex:
    """The files of one folder by (NFC stem, lower-case suffix): ``a.PNG`` serves stem ``a``, NFD names match NFC."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[tuple[str, str], list[Path]] = {}
        for p in sorted(folder.iterdir()) if folder.is_dir() else []:
            if p.is_file():
                self.files.setdefault((nfc(p.stem), p.suffix.lower()), []).append(p)

    def find(self, stem: str, suffixes: tuple[str, ...], what: str) -> Path:
        """The file for a stem (the first suffix that exists); an error naming the near misses when there is none."""
        for suffix in suffixes:
            found = self.files.get((nfc(stem), suffix))
            if found and len(found) > 1:
                raise ValueError(f"{self.folder}: {[p.name for p in found]} are the same name after Unicode "
                                 "normalisation; keep one")
            if found:
                return found[0]
        raise FileNotFoundError(f"{self.folder}/{stem}.({'|'.join(s[1:] for s in suffixes)}): no {what} for stem "
                                f"{stem!r}{self.near_miss(stem, suffixes)}")

    def near_miss(self, stem: str, suffixes: tuple[str, ...]) -> str:
        """'; near miss: ...' naming the files whose stems differ only in case or are close, or ''."""
        names = {p.name: k for k, ps in self.files.items() for p in ps}
        key = nfc(stem).casefold()
        close = [n for n, (st, _) in names.items() if st.casefold() == key]
        if not close:
            stems = {st: n for n, (st, _) in names.items()}
            close = [stems[m] for m in difflib.get_close_matches(nfc(stem), list(stems), n=3, cutoff=0.8)]
        wrong = [n for n in close if names[n][1] not in suffixes]
        note = f" (suffix not one of {list(suffixes)})" if wrong and len(wrong) == len(close) else ""
        return f"; near miss: {', '.join(map(repr, close))}{note}" if close else ""


EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageInfo:
    size: tuple[int, int]  # (w, h) as displayed: EXIF orientations 5-8 swap the stored width and height
    stored: tuple[int, int]  # (w, h) as stored in the file
    mode: str  # Pillow mode, e.g. "L", "RGB", "I;16"
    orientation: int  # EXIF orientation (1: none)


def decode_image_info(path: Path) -> ImageInfo:
    """Decode the whole file once (a truncated or corrupt file is an error naming it) and return its size and mode."""
    try:
        with Image.open(path) as im:
            im.load()
            orientation = int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
            w, h = im.size
            return ImageInfo((h, w) if orientation in (5, 6, 7, 8) else (w, h), (w, h), im.mode, orientation)
    except IMAGE_ERRORS as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def check_item_files(items: list[Item], task: TaskConfig, decoded: dict[Any, Any], progress: bool = False) -> dict:
    """Decode every image and mask once; masks must fit the classes and the displayed size of their image.

    Returns {"modes": set of image modes, "mask_pixels": {mask: (pixels of classes >= 1, non-ignored pixels)},
    "ignored": ignored pixels over all masks}. `decoded` caches results across tasks that read the same folder.
    """
    modes, pixels, ignored = set(), {}, 0
    for it in tqdm(items, desc=f"reading {task.name}", unit="file", disable=not progress, dynamic_ncols=True):
        if it.image not in decoded:
            decoded[it.image] = decode_image_info(it.image)
        info = decoded[it.image]
        modes.add(info.mode)
        if it.mask is None:
            continue
        key = (it.mask, task.num_classes, task.ignore_index)
        if key not in decoded:
            m = read_mask(it.mask, task.num_classes, task.ignore_index).numpy()
            ok = m != task.ignore_index if task.ignore_index is not None else np.ones(m.shape, dtype=bool)
            decoded[key] = ((m.shape[1], m.shape[0]), int(np.count_nonzero((m >= 1) & ok)), int(np.count_nonzero(ok)))
        msize, fg, valid = decoded[key]
        if msize != info.size:
            rotated = (f" as displayed (its EXIF orientation {info.orientation} turns the stored {info.stored[0]}x"
                       f"{info.stored[1]} by 90 degrees; save the mask in the displayed orientation or remove the "
                       "image's EXIF orientation)" if info.orientation in (5, 6, 7, 8) else "")
            raise ValueError(f"{it.mask}: mask is {msize[0]}x{msize[1]} (w x h) but its image {it.image.name} is "
                             f"{info.size[0]}x{info.size[1]}{rotated}")
        pixels[it.mask] = (fg, valid)
        ignored += msize[0] * msize[1] - valid
    return {"modes": modes, "mask_pixels": pixels, "ignored": ignored}


def check_mask_classes(task: TaskConfig, folder: Path, mask_pixels: dict[Path, tuple[int, int]], ignored: int) -> None:
    """Masks with no pixel of any class but 0 are an error that says what to do (0/255 masks with ignore_index 255
    are the usual cause: every object pixel is ignored), before any model is built."""
    if not mask_pixels or sum(fg for fg, _ in mask_pixels.values()) > 0:
        return
    valid = sum(v for _, v in mask_pixels.values())
    others = ", ".join(f"{i} = {c!r}" for i, c in enumerate(task.classes))
    if ignored and task.ignore_index is not None:
        share = 100 * ignored / (ignored + valid)
        raise ValueError(
            f"{folder / 'masks'}: the masks of task {task.name!r} hold only class 0 and ignore_index {task.ignore_index} "
            f"({share:.1f} % of pixels), no pixel of the other classes. Masks saved as 0/{task.ignore_index}? Save "
            f"class indices ({others}), e.g. Image.fromarray((np.asarray(mask) > 127).astype(np.uint8)), and keep "
            "ignore_index for pixels to leave out of the loss")
    raise ValueError(f"{folder / 'masks'}: the masks of task {task.name!r} hold only class 0 ({task.classes[0]!r}); "
                     f"a segmentation task needs pixels of its other classes ({others})")


def read_label_rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line, row) of a labels.csv; a stem listed twice with different classes is an error naming both lines."""
    rows, first = [], {}
    for line, row in enumerate(_read_csv(path, ("stem", "class_idx")), start=2):
        stem, idx, name = row["stem"], row["class_idx"].strip(), (row.get("class_name") or "").strip()
        if stem in first:
            was, was_idx, was_name = first[stem]
            if idx != was_idx or (name and was_name and name != was_name):
                raise ValueError(f"{path}: stem {stem!r} has class_idx {was_idx}{f' ({was_name})' if was_name else ''} "
                                 f"on line {was} and class_idx {idx}{f' ({name})' if name else ''} on line {line}; a "
                                 "stem has one class: keep one row")
        first.setdefault(stem, (line, idx, name))
        rows.append((line, row))
    return rows


def read_image_labels(folder: Path) -> dict[str, str]:
    """stem -> image class name from a dataset folder's labels.csv (its class_name, else class_idx as text)."""
    return {row["stem"]: row.get("class_name") or row["class_idx"] for _, row in read_label_rows(folder / "labels.csv")}


def load_task_data(task: TaskConfig, source: DataTaskConfig, root: Path, data: DataConfig, progress: bool = False,
                   decoded: dict | None = None) -> TaskData:
    """Read one task's folder, check it (decoding every file once), fill in its classes / ignore_index, split it."""
    folder = root / source.dataset
    if not folder.is_dir():
        raise FileNotFoundError(f"data.tasks[{task.name}].dataset: {folder} is not a folder (root {root})")
    meta = _read_meta(folder)
    meta_path = folder / "meta.json"

    # Classes: for seg the mask classes, for cls the image classes; config and meta.json must agree.
    if task.type == "seg":
        known = meta.get("classes")
        if "ignore_index" in meta and task.ignore_index is not None and task.ignore_index != meta["ignore_index"]:
            raise ValueError(
                f"model.tasks[{task.name}].ignore_index {task.ignore_index} differs from {meta_path} ignore_index "
                f"{meta['ignore_index']}; the masks mark ignored pixels with meta.json's value, so leave ignore_index "
                "out of the config to take it (or correct meta.json)"
            )
        if task.ignore_index is None and meta.get("ignore_index") is not None:
            task.ignore_index = meta["ignore_index"]
    else:
        known = meta.get("image_classes", meta.get("classes"))
    if known is not None and task.classes and list(task.classes) != list(known):
        raise ValueError(
            f"model.tasks[{task.name}].classes {task.classes} differ from {meta_path} {known}; leave classes "
            "empty to take them from meta.json"
        )
    if not task.classes:
        if known is None:
            raise ValueError(f"{meta_path}: no 'classes' to take for task {task.name!r}; list them in model.tasks")
        task.classes = list(known)
    num_classes = len(task.classes)
    if num_classes < 2:
        raise ValueError(f"model.tasks[{task.name}].classes: need at least 2 classes, got {task.classes}")

    # Splits and labels.
    splits = read_splits(folder)
    labels: dict[str, int] = {}
    labels_path = folder / "labels.csv"
    if task.type == "cls":
        if not labels_path.is_file():
            raise FileNotFoundError(f"{labels_path}: missing; cls task {task.name!r} reads its labels from it")
        for _, row in read_label_rows(labels_path):
            try:
                idx = int(row["class_idx"])
            except ValueError:
                raise ValueError(f"{labels_path}: stem {row['stem']!r} has class_idx {row['class_idx']!r}, not an int") from None
            if not 0 <= idx < num_classes:
                raise ValueError(f"{labels_path}: stem {row['stem']!r} has class_idx {idx}, expected 0..{num_classes - 1}")
            name = row.get("class_name")
            if name and name != task.classes[idx]:
                raise ValueError(
                    f"{labels_path}: stem {row['stem']!r} has class_name {name!r} but class {idx} is "
                    f"{task.classes[idx]!r} in {meta_path}"
                )
            labels[row["stem"]] = idx
    elif not (folder / "masks").is_dir():
        raise FileNotFoundError(f"{folder / 'masks'}: missing; seg task {task.name!r} reads its masks from it")
    images = FileIndex(folder / "images")
    masks = FileIndex(folder / "masks") if task.type == "seg" else None

    def items_of(split: str) -> list[Item]:
        stems = splits.get(split, [])
        if not stems:
            raise ValueError(
                f"{folder / 'splits.csv'}: split {split!r} has no items (task {task.name!r}); splits present: "
                f"{ {k: len(v) for k, v in splits.items()} }"
            )
        out = []
        for stem in stems:
            image = images.find(stem, IMAGE_SUFFIXES, "image listed in splits.csv")
            if masks is not None:
                out.append(Item(stem, image, mask=masks.find(stem, (".png",), f"mask (task {task.name!r})")))
            else:
                if stem not in labels:
                    raise ValueError(f"{labels_path}: no label for stem {stem!r} listed in splits.csv")
                out.append(Item(stem, image, label=labels[stem]))
        return out

    train = items_of(source.train_split)
    carved = source.val_split not in splits
    if carved:  # a fixed-seed carve-off, stratified by class when there are labels
        if len(train) < 2:
            raise ValueError(f"{folder / 'splits.csv'}: no {source.val_split!r} split and too few train items to carve one")
        rng = np.random.default_rng(data.val_seed)
        groups: dict[int, list[int]] = {}
        for i, it in enumerate(train):
            groups.setdefault(it.label if it.label is not None else -1, []).append(i)
        val_idx: set[int] = set()
        for key in sorted(groups):
            members = groups[key]
            n_val = max(1, round(len(members) * data.val_fraction)) if len(members) > 1 else 0
            val_idx.update(members[k] for k in rng.permutation(len(members))[:n_val])
        val = [it for i, it in enumerate(train) if i in val_idx]
        train = [it for i, it in enumerate(train) if i not in val_idx]
    else:
        val = items_of(source.val_split)
    if source.max_val_items is not None:
        val = val[: source.max_val_items]

    # Every file decoded once: truncated images, mask values and sizes fail here, before any training.
    checked = check_item_files(train + val, task, {} if decoded is None else decoded, progress)
    if task.type == "seg":
        check_mask_classes(task, folder, checked["mask_pixels"], checked["ignored"])
    channels = int(meta.get("channels", 1 if checked["modes"] <= {"L", "1", *HIGH_DEPTH_MODES} else 3))
    return TaskData(task, source, folder, train, val, channels, carved, checked["mask_pixels"])


def prepare_experiment_data(cfg: ExperimentConfig, output_dir: Path, is_main_process: bool,
                            wait_for_everyone: Callable[[], None]) -> tuple[Path, dict[str, TaskData]]:
    """Write the built-in synthetic dataset first when the config asks for one (main process), then load every task.

    Returns the data root and the loaded tasks.
    """
    if cfg.data.synthetic is not None:
        from backbone_router.train.training.synthetic import write_synthetic_dataset

        if is_main_process:
            s = cfg.data.synthetic
            write_synthetic_dataset(output_dir / "data", s.name, s.n_train, s.n_val, s.size, s.ignore_border, s.seed)
        wait_for_everyone()
    root = resolve_data_root(cfg.data, output_dir)
    return root, load_experiment_data(cfg, root, progress=is_main_process)


def load_experiment_data(cfg: ExperimentConfig, root: Path, progress: bool = False) -> dict[str, TaskData]:
    """Every task's data, in model.tasks order; fills model task classes / ignore_index from meta.json.

    A file read by several tasks (seg and cls on one folder) is decoded once.
    """
    decoded: dict = {}
    return {t.name: load_task_data(t, cfg.data.task(t.name), root, cfg.data, progress, decoded)
            for t in cfg.model.tasks}


# ---- reading files ------------------------------------------------------------------------------------
def read_mask(path: Path, num_classes: int, ignore_index: int | None) -> torch.Tensor:
    """H x W int64 class indices; values other than 0..K-1 and ignore_index are an error naming the file."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"{path}: mask mode {im.mode!r}; expected a single-channel class-index PNG (mode L or P)")
            arr = np.asarray(im).astype(np.int64)
    except IMAGE_ERRORS as e:
        raise ValueError(f"{path}: unreadable mask ({type(e).__name__}: {e})") from e
    bad = (arr >= num_classes) | (arr < 0)
    if ignore_index is not None:
        bad &= arr != ignore_index
    if bad.any():
        values = sorted(np.unique(arr[bad]).tolist())[:10]
        allowed = f"0..{num_classes - 1}" + (f" or ignore_index {ignore_index}" if ignore_index is not None else "")
        hint = ("; masks saved as 0/255? Save class indices, e.g. (np.asarray(mask) > 127).astype(np.uint8)"
                if values == [255] and num_classes == 2 else "")
        raise ValueError(f"{path}: mask values {values} outside the classes ({allowed}){hint}")
    return torch.from_numpy(arr)


# ---- transforms (image and mask together) -------------------------------------------------------------
def _size2(size: int | list[int]) -> list[int]:
    return [size, size] if isinstance(size, int) else list(size)


def random_resized_crop_params(h: int, w: int, scale: list[float], ratio: list[float], gen: torch.Generator):
    """(top, left, height, width) as torchvision's RandomResizedCrop, drawn from `gen`."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    # Fallback: the central crop with the ratio clamped into range.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        ch, cw = h, round(h * ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_transform(
    image: torch.Tensor, mask: torch.Tensor | None, size: int, data: DataConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random resized crop + flips (mask follows with nearest) + light colour jitter (image only)."""
    h, w = image.shape[-2:]
    top, left, ch, cw = random_resized_crop_params(h, w, data.crop_scale, data.crop_ratio, gen)
    image = TF.resized_crop(image, top, left, ch, cw, [size, size], InterpolationMode.BILINEAR, antialias=True)
    if mask is not None:
        mask = TF.resized_crop(mask[None], top, left, ch, cw, [size, size], InterpolationMode.NEAREST_EXACT)[0]
    flips = torch.rand(2, generator=gen).tolist()
    if data.hflip and flips[0] < 0.5:
        image, mask = image.flip(-1), (mask.flip(-1) if mask is not None else None)
    if data.vflip and flips[1] < 0.5:
        image, mask = image.flip(-2), (mask.flip(-2) if mask is not None else None)
    if data.color_jitter > 0:
        s = data.color_jitter
        b, c, sat = (1 + s * (2 * torch.rand(3, generator=gen) - 1)).tolist()
        image = image * b
        mean = image.mean()
        image = (image - mean) * c + mean
        if image.shape[0] == 3:
            grey = (0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2])[None]
            image = (image - grey) * sat + grey
        image = image.clamp_(0, 1)
    return image.contiguous(), (mask.contiguous() if mask is not None else None)


def eval_transform(
    image: torch.Tensor, mask: torch.Tensor | None, size: int | list[int]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Deterministic resize to a fixed size (seg is scored at this size)."""
    hw = _size2(size)
    image = TF.resize(image, hw, InterpolationMode.BILINEAR, antialias=True)
    if mask is not None:
        mask = TF.resize(mask[None], hw, InterpolationMode.NEAREST_EXACT)[0]
    return image.contiguous(), mask


# ---- datasets -----------------------------------------------------------------------------------------
class TaskDataset(Dataset):
    """One task's split. Eval: ``ds[i]``; training: ``ds[(i, aug_seed)]`` (the seed fixes the augmentation)."""

    def __init__(self, td: TaskData, split: str, data: DataConfig):
        if split not in ("train", "val"):
            raise ValueError(f"TaskDataset: split must be 'train' or 'val', got {split!r}")
        self.td, self.split, self.data = td, split, data
        self.items = td.train if split == "train" else td.val
        self.image_size = td.source.image_size or data.image_size
        self.eval_size = td.source.eval_size or data.eval_size

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        item = self.items[index]
        task = self.td.task
        image = read_image(item.image, self.td.channels)
        mask = read_mask(item.mask, task.num_classes, task.ignore_index) if item.mask is not None else None
        if mask is not None and tuple(mask.shape) != tuple(image.shape[-2:]):
            raise ValueError(f"{item.mask}: mask is {tuple(mask.shape)} (h, w) but its image is {tuple(image.shape[-2:])}")
        if seed is None:
            image, mask = eval_transform(image, mask, self.eval_size)
        else:
            gen = torch.Generator().manual_seed(int(seed))
            image, mask = train_transform(image, mask, self.image_size, self.data, gen)
        target = mask.long() if mask is not None else torch.tensor(item.label, dtype=torch.long)
        return {"task": task.name, "image": image, "target": target}


class MultiTaskDataset(Dataset):
    """The training datasets of every task; keys are ``(task_index, item_index, aug_seed)``."""

    def __init__(self, datasets: list[TaskDataset]):
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        t, i, seed = key
        return self.datasets[t][(i, seed)]


def collate_task_batch(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack one task's samples: {"task": name, "images": B x C x H x W, "target": B x H x W or B}."""
    tasks = {s["task"] for s in samples}
    if len(tasks) != 1:
        raise ValueError(f"collate_task_batch: a batch must hold one task, got {sorted(tasks)}")
    return {
        "task": samples[0]["task"],
        "images": torch.stack([s["image"] for s in samples]),
        "target": torch.stack([s["target"] for s in samples]),
    }


# ---- the task schedule ----------------------------------------------------------------------------------
class TaskSchedule:
    """Which task, items and augmentation seeds each global micro-batch gets: a pure function of the seed.

    Micro-batch i serves task ``tasks[i]`` (drawn by the sampling weights). Each task walks an endless stream
    of seeded per-epoch permutations of its items; the k-th batch of task t takes stream positions
    ``k*G .. k*G+G-1`` (G = global batch). Item j of micro-batch i is augmented with seed (seed, i, j).
    """

    BLOCK = 4096  # task draws are generated in blocks of this many micro-batches

    def __init__(self, sizes: list[int], weights: list[float], global_batch: int, seed: int):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(f"TaskSchedule: one size per weight, got sizes {sizes} and weights {weights}")
        if any(n < 1 for n, w in zip(sizes, weights) if w > 0):
            raise ValueError(f"TaskSchedule: every sampled task needs items, got sizes {sizes}")
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.sizes, self.global_batch, self.seed = list(sizes), int(global_batch), int(seed)
        self._tasks = np.zeros(0, dtype=np.int64)  # task of each micro-batch drawn so far
        self._rank = np.zeros(0, dtype=np.int64)  # how many earlier micro-batches served the same task
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _extend(self, n: int) -> None:
        while len(self._tasks) < n:
            block = len(self._tasks) // self.BLOCK
            rng = np.random.default_rng([self.seed, 0x7A5C, block])
            self._tasks = np.concatenate([self._tasks, rng.choice(len(self.p), size=self.BLOCK, p=self.p)])
        if len(self._rank) < len(self._tasks):
            rank = np.zeros(len(self._tasks), dtype=np.int64)
            for t in range(len(self.p)):
                where = np.nonzero(self._tasks == t)[0]
                rank[where] = np.arange(len(where))
            self._rank = rank

    def task_of(self, i: int) -> int:
        self._extend(i + 1)
        return int(self._tasks[i])

    def _perm(self, task: int, epoch: int) -> np.ndarray:
        key = (task, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, 0xE90C, task, epoch]).permutation(self.sizes[task])
            while len(self._perms) > 4 * len(self.sizes):
                self._perms.popitem(last=False)
        return self._perms[key]

    def batch(self, i: int) -> tuple[int, list[tuple[int, int]]]:
        """(task, [(item index, augmentation seed)] of the whole global micro-batch i)."""
        self._extend(i + 1)
        t, k = int(self._tasks[i]), int(self._rank[i])
        n, g = self.sizes[t], self.global_batch
        out = []
        for j in range(g):
            pos = k * g + j
            item = int(self._perm(t, pos // n)[pos % n])
            aug_seed = int(np.random.SeedSequence([self.seed, i, j]).generate_state(1)[0])
            out.append((item, aug_seed))
        return t, out


class RankBatchSampler(Sampler):
    """This process's slice of the global micro-batches ``start .. stop-1`` of a :class:`TaskSchedule`."""

    def __init__(self, schedule: TaskSchedule, rank: int, world: int, start: int, stop: int):
        if schedule.global_batch % world:
            raise ValueError(f"global batch {schedule.global_batch} does not split over {world} processes")
        self.schedule, self.rank, self.world, self.start, self.stop = schedule, rank, world, start, stop
        self.per_rank = schedule.global_batch // world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        lo = self.rank * self.per_rank
        for i in range(self.start, self.stop):
            t, keys = self.schedule.batch(i)
            yield [(t, item, seed) for item, seed in keys[lo : lo + self.per_rank]]


# ---- statistics of the training masks -----------------------------------------------------------------
def eval_loaders(tasks: dict[str, TaskData], data: DataConfig, batch_size: int) -> dict[str, DataLoader]:
    """task -> a DataLoader over its val split (eval transform, in order)."""
    return {n: DataLoader(TaskDataset(td, "val", data), batch_size=batch_size, shuffle=False,
                          collate_fn=collate_task_batch, num_workers=data.num_workers) for n, td in tasks.items()}


def train_loader(datasets: list[TaskDataset], schedule: TaskSchedule, rank: int, world: int, start: int, stop: int,
                 num_workers: int = 0) -> DataLoader:
    """This process's slice of the global micro-batches ``start..stop`` of `schedule` (see :class:`RankBatchSampler`)."""
    sampler = RankBatchSampler(schedule, rank, world, start=start, stop=stop)
    return DataLoader(MultiTaskDataset(datasets), batch_sampler=sampler, collate_fn=collate_task_batch,
                      num_workers=num_workers)


def foreground_prior(td: TaskData) -> float:
    """Fraction of foreground (class 1) pixels over non-ignored pixels of the training masks (binary seg)."""
    if td.task.type != "seg" or td.task.num_classes != 2:
        raise ValueError(f"foreground_prior: task {td.task.name!r} is not binary segmentation")
    missing = [it for it in td.train if it.mask not in td.mask_pixels]  # counted when the task was loaded
    if missing:
        td.mask_pixels.update(check_item_files(missing, td.task, {})["mask_pixels"])
    fg = valid = 0
    for it in td.train:
        f, v = td.mask_pixels[it.mask]
        fg, valid = fg + f, valid + v
    if valid == 0:
        raise ValueError(f"{td.folder}: the training masks of task {td.task.name!r} have no non-ignored pixels")
    return fg / valid


def describe(tasks: dict[str, TaskData]) -> str:
    """One line per task for the start-of-run log."""
    lines = []
    for name, td in tasks.items():
        kind = f"seg, {td.task.num_classes} classes" if td.task.type == "seg" else f"cls, {td.task.num_classes} classes"
        carved = " (val carved from train)" if td.val_carved else ""
        grey = ", greyscale" if td.channels == 1 else ""
        lines.append(
            f"  {name}: {td.folder.name} ({kind}{grey}) train {len(td.train)} / val {len(td.val)}{carved}, "
            f"weight {td.source.weight}"
        )
    return "\n".join(lines)
