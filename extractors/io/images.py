"""Images (PIL, NumPy, tensors, image files) -> float tensors in [0, 1] of shape (C, H, W), C = 1 or 3.

Files are decoded by Pillow under its decompression-bomb guard: an image above ``Image.MAX_IMAGE_PIXELS``
(89.5 M pixels) warns and one above twice that (179 M) is refused with an error naming the file; 8000 x 8000
(64 M) decodes. In-memory arrays and tensors have no pixel limit (they are in memory already); the model's cost
grows with the pixels, so :func:`fit_pixel_budget` shrinks an image above a budget before it is predicted.

Values: uint8 / 16-bit images are scaled by their type's range; PIL mode ``I`` (32-bit integers) by the range its
values occupy (255, 65535 or 2^31 - 1); float images must already be in [0, 1] (0-255 floats are refused, naming
the range seen, instead of being used as they are).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L")
HIGH_DEPTH_MODES = (*SIXTEEN_BIT_MODES, "I")  # greyscale modes read at full depth (Pillow's "L" would clip at 255)
FLOAT_TOLERANCE = 1e-3  # float images may stray this far outside [0, 1] (resampling overshoot); they are clamped
DEFAULT_MAX_PIXELS = 4_000_000  # Router.predict's default pixel budget per image (about 2000 x 2000)
IMAGE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError)  # a file Pillow cannot read


def high_depth_to_unit(img: Image.Image, where: str = "image") -> np.ndarray:
    """A 16- or 32-bit greyscale PIL image as float32 in [0, 1] (H, W).

    ``I;16*`` are divided by 65535. Mode ``I`` holds 32-bit integers of unknown depth: it is divided by the range
    its values occupy, 255, 65535 or 2^31 - 1 (so an 8-bit image saved as mode I reads as it would as mode L);
    negative values are an error naming the image.
    """
    arr = np.asarray(img).astype(np.int64)
    if img.mode in SIXTEEN_BIT_MODES:
        scale = 65535
    else:
        lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if lo < 0:
            raise ValueError(f"{where}: mode I image with negative values (min {lo}); expected intensities >= 0")
        scale = 255 if hi <= 255 else 65535 if hi <= 65535 else 2**31 - 1
    return (arr / scale).astype(np.float32)


def pil_to_array(img: Image.Image, where: str = "image") -> np.ndarray:
    """Honour EXIF rotation; palette/RGBA/CMYK -> RGB; 16/32-bit greyscale as float32 in [0, 1] at full depth."""
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_DEPTH_MODES:
        return high_depth_to_unit(img, where)
    if img.mode == "F":  # 32-bit float greyscale: its values as they are (checked to lie in [0, 1] by the caller);
        return np.asarray(img, dtype=np.float32)  # Pillow's convert("RGB") would truncate [0, 1] to zeros
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")  # P, PA, RGBA, LA, CMYK, YCbCr, 1 ...
    return np.asarray(img)


def read_image(path: str | os.PathLike, channels: int) -> torch.Tensor:
    """An image file as C x H x W float in [0, 1] with C = `channels` (1 or 3): the datasets' decoder (training,
    evaluation, the pretraining pool). As :func:`read_image_array` (EXIF rotation, palette / RGBA / CMYK via
    Pillow's RGB conversion, 16-bit scaled by 65535, mode I by the range its values occupy), then Pillow's own
    conversion to the dataset's channel count (greyscale repeated to RGB, RGB to Pillow's luma)."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in HIGH_DEPTH_MODES:  # Pillow's convert("L") would clip these at 255
                t = torch.from_numpy(high_depth_to_unit(im, str(path)))[None]
                return t.expand(channels, -1, -1).contiguous()
            if im.mode == "F":  # float values as they are, in [0, 1] (convert("L") would truncate them to 0)
                t = check_unit_range(torch.from_numpy(np.asarray(im, dtype=np.float32).copy())[None], str(path))
                return t.expand(channels, -1, -1).contiguous()
            im = im.convert("L" if channels == 1 else "RGB")
            arr = np.asarray(im, dtype=np.uint8).copy()
    except IMAGE_ERRORS as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e
    t = torch.from_numpy(arr)
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
    return t.float().div_(255.0)


def read_image_array(path: str | os.PathLike) -> np.ndarray:
    """An image file as :func:`pil_to_array` gives it; a missing, empty, non-image or bomb file names the path."""
    try:
        with Image.open(path) as img:
            return pil_to_array(img, str(path))
    except IMAGE_ERRORS as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from e


def to_image_tensor(image, where: str = "image") -> torch.Tensor:
    """One image -> (C, H, W) float in [0, 1]. uint8 / uint16 are scaled by their range; floats kept."""
    if isinstance(image, (str, Path)):
        image = read_image_array(image)
    if isinstance(image, Image.Image):
        image = pil_to_array(image, where)
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
    return check_unit_range(image, where)


def check_unit_range(image: torch.Tensor, where: str = "image") -> torch.Tensor:
    """A float image in [0, 1] (clamped within FLOAT_TOLERANCE); NaN or values outside are an error naming the range."""
    lo, hi = torch.aminmax(image.detach().float()) if image.numel() else (image.new_zeros(()), image.new_zeros(()))
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):  # aminmax propagates NaN
        raise ValueError(f"{where}: float values include NaN or inf; expected values in [0, 1]")
    if lo < -FLOAT_TOLERANCE or hi > 1 + FLOAT_TOLERANCE:
        hint = ("divide 0-255 data by 255 or pass uint8" if hi > 1 + FLOAT_TOLERANCE and hi <= 255 + FLOAT_TOLERANCE
                and lo >= -FLOAT_TOLERANCE else "pass un-normalised images (the extractors apply their own mean/std)")
        raise ValueError(f"{where}: float values in [{lo:.4g}, {hi:.4g}]; expected [0, 1] ({hint})")
    return image.clamp(0.0, 1.0) if lo < 0 or hi > 1 else image


def fit_pixel_budget(image: torch.Tensor, max_pixels: int | None, where: str = "image") -> tuple[torch.Tensor, str | None]:
    """Shrink a (C, H, W) image to at most `max_pixels` pixels, keeping its aspect (antialiased bilinear).

    Returns the image (unchanged when it fits or `max_pixels` is None) and a note saying what was done, or None.
    The caller predicts on the smaller image and resizes the prediction back to (H, W).

    >>> small, note = fit_pixel_budget(torch.rand(3, 3000, 4000), 4_000_000)
    >>> tuple(small.shape), note is not None
    ((3, 1732, 2309), True)
    """
    h, w = image.shape[-2:]
    if max_pixels is None or h * w <= max_pixels:
        return image, None
    if max_pixels < 1:
        raise ValueError(f"max_pixels: must be >= 1 or None, got {max_pixels}")
    scale = math.sqrt(max_pixels / (h * w))
    nh, nw = max(1, math.floor(h * scale)), max(1, math.floor(w * scale))
    small = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    note = (f"{where}: {h}x{w} ({h * w / 1e6:.1f} M pixels) is above max_pixels={max_pixels:,}; predicted at {nh}x{nw} "
            "and resized back (pass max_pixels=None to predict at full size)")
    return small.clamp_(0.0, 1.0), note


def to_image_list(images) -> list[torch.Tensor]:
    """A batch tensor (B, C, H, W), a single image or file path, or a list of them -> list of (C, H, W) tensors."""
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        return [to_image_tensor(im, f"images[{i}]") for i, im in enumerate(images)]
    if isinstance(images, (list, tuple)):
        return [to_image_tensor(im, f"images[{i}]") for i, im in enumerate(images)]
    return [to_image_tensor(images)]
