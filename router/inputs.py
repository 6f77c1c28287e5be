"""Images (PIL, NumPy, tensors, image files) -> float tensors in [0, 1] of shape (C, H, W), C = 1 or 3.

Files are decoded by Pillow under its decompression-bomb guard: an image above ``Image.MAX_IMAGE_PIXELS``
(89.5 M pixels) warns and one above twice that (179 M) is refused with an error naming the file; 8000 x 8000
(64 M) decodes. In-memory arrays and tensors have no pixel limit (they are in memory already).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")


def pil_to_array(img: Image.Image) -> np.ndarray:
    """Honour EXIF rotation; palette/RGBA/CMYK -> RGB; 16-bit greyscale kept at full depth."""
    img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        return np.asarray(img, dtype=np.int32).astype(np.uint16)
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # P, PA, RGBA, LA, CMYK, YCbCr, 1, F ...
    return np.asarray(img)


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """An image file as :func:`pil_to_array` gives it; a missing, empty, non-image or bomb file names the path."""
    try:
        with Image.open(path) as img:
            return pil_to_array(img)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def to_image_tensor(image, where: str = "image") -> torch.Tensor:
    """One image -> (C, H, W) float in [0, 1]. uint8 / uint16 are scaled by their range; floats kept."""
    if isinstance(image, (str, Path)):
        image = read_image_array(image)
    if isinstance(image, Image.Image):
        image = pil_to_array(image)
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise ValueError(f"{where}: expected a NumPy array (H, W) or (H, W, C) with C in 1/3/4, got {image.shape}")
        if image.shape[2] == 4:
            image = image[:, :, :3]
        if image.dtype == np.uint8:
            t = torch.from_numpy(image.astype(np.float32)) / 255.0
        elif image.dtype == np.uint16:
            t = torch.from_numpy(image.astype(np.float32)) / 65535.0
        elif np.issubdtype(image.dtype, np.floating):
            t = torch.from_numpy(image.astype(np.float32))
        else:
            raise TypeError(f"{where}: unsupported NumPy dtype {image.dtype}; expected uint8, uint16 or float")
        image = t.permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{where}: expected a PIL image, NumPy array or torch.Tensor, got {type(image).__name__}")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"{where}: expected a tensor (C, H, W) with C = 1 or 3, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    if not image.is_floating_point():
        raise TypeError(f"{where}: expected uint8 or float values in [0, 1], got dtype {image.dtype}")
    if min(image.shape[-2:]) < 1:
        raise ValueError(f"{where}: empty image of shape {tuple(image.shape)}")
    return image


def to_image_list(images) -> list[torch.Tensor]:
    """A batch tensor (B, C, H, W), a single image or file path, or a list of them -> list of (C, H, W) tensors."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [to_image_tensor(im, f"images[{i}]") for i, im in enumerate(images)]
    if isinstance(images, (list, tuple)):
        return [to_image_tensor(im, f"images[{i}]") for i, im in enumerate(images)]
    return [to_image_tensor(images)]
