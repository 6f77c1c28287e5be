"""The local files a saved Router's extractors name: written relative to the model's folder, read back against it
(inside the snapshot for a model from the Hub), and the frozen weights a model does not hold pinned by sha256."""

from __future__ import annotations

import os
from pathlib import Path

from backbone_router.extractors.untrusted import (
    resolve_saved_path,
    spec_local_path,
    weight_files,
    weights_sha256,
)

from .config import ExtractorConfig


def local_weights(ecfg: ExtractorConfig) -> str | None:
    """The local weight file or folder an extractor loads: its `checkpoint`, or the path its spec names."""
    if ecfg.checkpoint:
        return ecfg.checkpoint
    found = spec_local_path(ecfg.spec)
    return found[1] if found else None


def paths_for_saving(ecfg: ExtractorConfig, directory: Path, pinned: bool) -> None:
    """Rewrite `ecfg` for a model saved in `directory`: relative paths become relative to `directory` (as
    :func:`paths_for_loading` reads them); with `pinned` (frozen weights left out of the model), the sha256 of its
    local weights is recorded."""
    if pinned and ecfg.pretrained and (weights := local_weights(ecfg)) and Path(weights).exists():
        ecfg.sha256 = weights_sha256(weights)
    elif not pinned:
        ecfg.sha256 = None
    found = spec_local_path(ecfg.spec)
    if found and not Path(found[1]).expanduser().is_absolute():
        ecfg.spec = found[0] + os.path.relpath(Path(found[1]).resolve(), directory.resolve())
    if ecfg.checkpoint and not Path(ecfg.checkpoint).expanduser().is_absolute():
        ecfg.checkpoint = os.path.relpath(Path(ecfg.checkpoint).resolve(), directory.resolve())


def paths_for_loading(ecfg: ExtractorConfig, directory: Path, from_hub: bool, where: str, pinned: bool) -> None:
    """Resolve `ecfg`'s paths against the saved model's `directory` (a model from the Hub may name only files inside
    its snapshot) and, with `pinned`, check its local weights against the recorded sha256 (then cleared: a save hashes
    them again). Errors name the key."""
    at = f"{where}: extractors[{ecfg.name}]"
    if found := spec_local_path(ecfg.spec):
        ecfg.spec = found[0] + resolve_saved_path(found[1], directory, from_hub, f"{at}.spec")
    if ecfg.checkpoint:
        ecfg.checkpoint = resolve_saved_path(ecfg.checkpoint, directory, from_hub, f"{at}.checkpoint")
    if pinned and ecfg.sha256 and (weights := local_weights(ecfg)):
        if not Path(weights).exists():
            raise FileNotFoundError(f"{weights}: not found; {at} takes its frozen weights from it (sha256 "
                                    f"{ecfg.sha256[:12]}...)")
        if (got := weights_sha256(weights)) != ecfg.sha256:
            raise ValueError(f"{', '.join(map(str, weight_files(weights)))}: sha256 {got[:12]}... differs from the {ecfg.sha256[:12]}... recorded in "
                             f"{at}.sha256: these are not the frozen weights the model was saved with")
    ecfg.sha256 = None  # checked; save_pretrained hashes the file again (a loaded config equals the one saved from)
