"""Atomic file writes: a temp file in the same folder, fsync, then rename. Never a half-written file."""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from pathlib import Path

import torch
from safetensors.torch import save


def current_umask() -> int:
    """The process umask (from /proc where it can be read without changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: never a half-written file.

    The file gets the mode an ordinary ``open(path, "wb")`` would give (0666 less the umask), not mkstemp's 0600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


CHECKSUM_KEY = "crc32"  # safetensors metadata: JSON {tensor name: CRC-32 of its bytes}; a flipped byte names its tensor


def tensor_crc32(t: torch.Tensor) -> str:
    return f"{zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()):08x}"


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors with a CRC-32 per tensor in the metadata (checked by `verify_checksums` when read)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**(metadata or {}), CHECKSUM_KEY: json.dumps({k: tensor_crc32(v) for k, v in tensors.items()})}
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def verify_checksums(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None, source: str) -> None:
    """Compare each tensor with its CRC-32 from `atomic_save_safetensors`; files without them pass unchecked."""
    if not metadata or CHECKSUM_KEY not in metadata:
        return
    try:
        sums = json.loads(metadata[CHECKSUM_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: metadata {CHECKSUM_KEY!r} is not JSON; the file is corrupted") from e
    bad = [k for k, v in tensors.items() if k in sums and tensor_crc32(v) != sums[k]]
    if bad:
        raise ValueError(f"{source}: tensor(s) {bad[:8]} do not match their CRC-32 checksum; the file is corrupted "
                         "(re-copy or re-save it)")
