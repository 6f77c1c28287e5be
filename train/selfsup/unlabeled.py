"""The unlabeled image pool of self-supervised pretraining: images of several dataset folders, no labels.

Every dataset folder has the shared layout (``images/<stem>.jpg|png``, ``splits.csv`` with
``stem,split``); only ``splits.csv`` is read, never labels or masks. Greyscale images become 3 channels.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T

from backbone_router.extractors.io.images import read_image
from backbone_router.train.training.data import split_images


def list_pool_images(root: Path, datasets: Sequence[str], splits: Sequence[str] = ("train",)) -> list[Path]:
    """Image files of `datasets` (folders under `root`) whose splits.csv split is in `splits`, sorted per dataset.

    The folders are read by :func:`train.training.data.split_images`, the reader of fine-tuning (BOM, Unicode and suffix case
    handled the same way).
    """
    root = Path(root)
    paths: list[Path] = []
    for name in datasets:
        folder = root / name
        split_file = folder / "splits.csv"
        if not split_file.is_file():
            raise FileNotFoundError(
                f"unlabeled pool: {split_file} does not exist; expected dataset folders with images/ and splits.csv "
                f"under data.root={root} (set data.root or $BACKBONE_ROUTER_DATA)"
            )
        found = split_images(folder, list(splits))
        if not found:
            raise ValueError(f"{split_file}: no images in splits {list(splits)}")
        paths += sorted(found)
    return paths


def load_rgb(path: Path, short_side: int | None = None) -> Image.Image:
    """An image as RGB (greyscale repeated), decoded by :func:`extractors.io.images.read_image` (EXIF orientation applied, 16-bit
    scaled); optionally its short side resized to `short_side`."""
    rgb = read_image(Path(path), 3).mul(255).round_().to(torch.uint8)
    im = Image.fromarray(rgb.permute(1, 2, 0).numpy())
    if short_side is not None and min(im.size) != short_side:
        w, h = im.size
        s = short_side / min(w, h)
        im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    return im


def crop_transform(size: int, scale: Sequence[float], hflip: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + flip -> float tensor in [0, 1], shape (3, size, size)."""
    ops = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    ops.append(T.ToTensor())
    return T.Compose(ops)


class MultiCropTransform:
    """DINO views: 2 global crops then `local_crops` local crops, each a [0, 1] tensor."""

    def __init__(self, global_size: int, local_size: int, local_crops: int, global_scale, local_scale, hflip=True):
        self.global_view = crop_transform(global_size, global_scale, hflip)
        self.local_view = crop_transform(local_size, local_scale, hflip)
        self.local_crops = local_crops

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [self.global_view(image), self.global_view(image)] + [self.local_view(image) for _ in range(self.local_crops)]


class UnlabeledImages(Dataset):
    """Images from dataset folders, transformed; items are tensors (or lists of views for multi-crop).

    >>> pool = UnlabeledImages.from_folders("../shared/data", ["mtd"], transform=crop_transform(96, (0.35, 1)))
    >>> pool[0].shape
    torch.Size([3, 96, 96])
    """

    def __init__(self, paths: Sequence[Path], transform: Callable, preload_short_side: int | None = None):
        self.paths = list(paths)
        self.transform = transform
        self.short_side = preload_short_side
        # Decoding JPEGs each step dominates small-ViT steps on a CPU: decode once, keep the resized image.
        self.images = [load_rgb(p, preload_short_side) for p in self.paths] if preload_short_side else None

    @classmethod
    def from_folders(cls, root, datasets, splits=("train",), transform=None, preload_short_side=None,
                     max_images: int | None = None, seed: int = 0) -> UnlabeledImages:
        paths = list_pool_images(Path(root), datasets, splits)
        if max_images is not None and max_images < len(paths):
            paths = sorted(random.Random(seed).sample(paths, max_images))
        return cls(paths, transform or T.ToTensor(), preload_short_side)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        image = self.images[index] if self.images is not None else load_rgb(self.paths[index])
        return self.transform(image)


def partition_indices(n: int, partitions: int, seed: int = 0) -> list[list[int]]:
    """Split range(n) into `partitions` disjoint, nearly equal parts after a seeded shuffle."""
    if not 1 <= partitions <= n:
        raise ValueError(f"cannot split a pool of {n} images into {partitions} partitions (need 1 <= P <= {n})")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    bounds = [round(i * n / partitions) for i in range(partitions + 1)]
    return [sorted(order[bounds[i] : bounds[i + 1]]) for i in range(partitions)]
