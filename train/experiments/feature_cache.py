"""Frozen-feature cache: each frozen extractor's outputs are computed once, stored on disk, and reused.

With frozen extractors the expensive part of a comparison (the extractor forward passes) is the same for
every variant and every seed; only the cheap aligners, gates and heads differ. This module stores the
outputs ``{"dense": [...], "pooled": ...}`` so that a second comparison on the same data runs no
extractor forward at all (dinov2 ``eval/linear.py``: many cheap heads on one frozen forward pass).

What one entry is keyed by (a change in any part is a miss; the old entries are simply never read again):

- the extractor: its spec (``info.name``) and a hash of its weights (names, dtypes, shapes and bytes of
  every tensor of the state dict, buffers included, so BatchNorm statistics count);
- its preprocessing: ``info.mean / std / patch_size / layers / widths / strides`` (and the storage dtype);
- the transform that produced the image, as a string the caller chooses (e.g. ``"eval:160x160"`` or
  ``"train:160,scale=[0.35, 1.0],hflip=True,..."``): the resolution and the augmentation parameters;
- the image id (the caller's; ``compare.py`` uses ``<dataset>/<stem>`` plus the file's size and mtime, so
  an edited image file is a miss) and the view index.

Augmentation and the cache. A cached feature is the feature of one fixed image tensor, so random
augmentation is replaced by a fixed set of V precomputed views per training image: view 0 is the
deterministic eval transform, views 1..V-1 are augmentations drawn from a seed derived from
(view seed, image id, view). The mask / label of a view is transformed with the same seed, so it
travels with the view. Training then samples a view per batch. More views cost V forward passes per
image once; every later variant and seed reuses them. Extractors that train (unfrozen) change their
features at every step and must not be cached: :meth:`FeatureCache.get_or_compute` refuses them, and
``compare.py`` runs them live.

On disk::

    <root>/<extractor key>/key.json                   the parts of the extractor key, for people
    <root>/<extractor key>/shard-<time>-<pid>-<rand>.safetensors
        tensors "<entry>/dense/<i>" and "<entry>/pooled"; metadata "entries" lists the entry keys

A shard is written atomically (temp file, fsync, rename) with the misses of one call, so concurrent
processes never see half a shard; entries written by another process are found by rescanning the folder (an entry
in two shards is read from the newer one).

Integrity: each shard's metadata holds a CRC-32 per tensor (``extractors.io.atomic.atomic_save_safetensors``). The
first read of an entry checks its tensors against them; an entry that does not match (a flipped byte on disk), or a
shard that no longer opens, is named in a warning and recomputed like a miss (a call without images then raises,
naming the shard). Shards written before the checksums existed are read unchecked.

>>> import tempfile, torch
>>> from backbone_router import create_extractor
>>> ext = create_extractor("timm:vit_small_patch16_224", pretrained=False,
...                        embed_dim=32, depth=2, num_heads=2, img_size=32).freeze()
>>> cache = FeatureCache(tempfile.mkdtemp())
>>> images = torch.rand(2, 3, 32, 32)
>>> out = cache.get_or_compute(ext, ["a", "b"], images, view=0, transform="eval:32x32")
>>> again = cache.get_or_compute(ext, ["a", "b"], None, view=0, transform="eval:32x32")
>>> (cache.misses, cache.hits, ext.forward_calls), torch.equal(out["pooled"], again["pooled"])
((2, 2, 1), True)
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from backbone_router.extractors import Extractor, ExtractorOutput
from backbone_router.extractors.io.atomic import (
    CHECKSUM_KEY,
    atomic_save_safetensors,
    atomic_write_bytes,
    tensor_crc32,
)

KEY_NAME = "key.json"
SHARD_PREFIX, SHARD_SUFFIX = "shard-", ".safetensors"
MAX_OPEN_SHARDS = 256  # safetensors handles kept open (memory-mapped) for reading


def weights_hash(module: torch.nn.Module) -> str:
    """blake2b over the names, dtypes, shapes and bytes of every tensor in the state dict (buffers too)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _fingerprint(module: torch.nn.Module) -> tuple:
    """Cheap identity of the current weights: storage, version counter and shape of each tensor.

    In-place updates (optimizer steps, ``copy_``, ``load_state_dict``) bump a tensor's version counter, so
    a changed fingerprint means the weights may have changed and the hash is recomputed.
    """
    return tuple((n, t.data_ptr(), t._version, tuple(t.shape)) for n, t in module.state_dict().items())


def _digest(text: str, size: int = 16) -> str:
    return hashlib.blake2b(text.encode(), digest_size=size).hexdigest()


class FeatureCache:
    """Extractor outputs on disk, keyed by extractor + weights + preprocessing + transform + image id + view.

    Args:
        root: folder of the cache (created on first write); one sub-folder per extractor key.
        dtype: storage dtype of the features (e.g. ``torch.float16`` halves the disk and memory use);
            None stores them as computed. Outputs are always returned as float32, and a miss returns the
            stored (rounded) values, so a first and a second run see identical features.

    Counters: ``hits`` and ``misses`` count images (not calls); :meth:`stats` returns both.

    >>> cache = FeatureCache("runs/feature_cache", dtype=torch.float16)
    >>> feats = cache.get_or_compute(extractor, ["mtd/exp1_num_4", "mtd/exp1_num_7"], images, view=0,
    ...                              transform="eval:160x160")
    >>> feats["dense"][0].shape, cache.stats()
    """

    def __init__(self, root: str | os.PathLike, dtype: torch.dtype | None = None):
        self.root = Path(root)
        self.dtype = dtype
        self.hits = 0
        self.misses = 0
        self._hash_memo: dict[int, tuple[tuple, str]] = {}  # id(extractor) -> (fingerprint, weights hash)
        self._index: dict[str, dict[str, Path]] = {}  # extractor key -> entry -> shard
        self._scanned: dict[str, set[str]] = {}  # extractor key -> shard names already indexed
        self._handles: OrderedDict[Path, object] = OrderedDict()
        self._sums: dict[Path, dict[str, str]] = {}  # shard -> tensor name -> CRC-32 (empty: written without them)
        self._verified: set[tuple[Path, str]] = set()  # (shard, entry) whose tensors matched their checksums

    # ---- keys ------------------------------------------------------------------------------------------
    def weights_hash(self, extractor: Extractor) -> str:
        """The extractor's weight hash, recomputed only when its tensors changed since the last call."""
        fp = _fingerprint(extractor)
        memo = self._hash_memo.get(id(extractor))
        if memo is None or memo[0] != fp:
            memo = (fp, weights_hash(extractor))
            self._hash_memo[id(extractor)] = memo
        return memo[1]

    def key_parts(self, extractor: Extractor) -> dict:
        """Everything the extractor key is made of, as plain JSON values."""
        i = extractor.info
        return {
            "spec": i.name,
            "weights": self.weights_hash(extractor),
            "preprocessing": {"mean": list(i.mean), "std": list(i.std), "patch_size": i.patch_size,
                              "layers": list(i.layers), "widths": list(i.widths), "strides": list(i.strides)},
            "storage_dtype": str(self.dtype) if self.dtype is not None else "as computed",
        }

    def extractor_key(self, extractor: Extractor) -> str:
        """Folder name of the extractor's entries: a hash of :meth:`key_parts`."""
        return _digest(json.dumps(self.key_parts(extractor), sort_keys=True), 12)

    @staticmethod
    def entry_key(image_id: str, view: int, transform: str) -> str:
        """Name of one image's features inside an extractor folder."""
        return _digest(json.dumps([str(image_id), int(view), str(transform)]))

    # ---- the index -------------------------------------------------------------------------------------
    def _folder(self, key: str) -> Path:
        return self.root / key

    def _refresh(self, key: str) -> dict[str, Path]:
        """Index shards in the extractor folder that were not indexed yet (written by us or by others)."""
        index = self._index.setdefault(key, {})
        seen = self._scanned.setdefault(key, set())
        folder = self._folder(key)
        if not folder.is_dir():
            return index
        for path in sorted(folder.glob(f"{SHARD_PREFIX}*{SHARD_SUFFIX}")):
            if path.name in seen:
                continue
            seen.add(path.name)
            try:
                with safe_open(str(path), framework="pt") as f:
                    metadata = f.metadata() or {}
                entries = json.loads(metadata.get("entries", "[]"))
                self._sums[path] = json.loads(metadata[CHECKSUM_KEY]) if CHECKSUM_KEY in metadata else {}
            except (SafetensorError, OSError, json.JSONDecodeError) as e:
                warnings.warn(f"{path}: unreadable feature-cache shard ({type(e).__name__}: {e}); its entries are "
                              "recomputed (delete it to drop it)", stacklevel=3)
                continue
            for entry in entries:
                index[entry] = path  # sorted by write time: an entry written again (recomputed) wins
        return index

    def _handle(self, path: Path):
        f = self._handles.pop(path, None)
        if f is None:
            f = safe_open(str(path), framework="pt")
            while len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)
        self._handles[path] = f
        return f

    def _read(self, path: Path, entry: str, n_dense: int) -> tuple[list[torch.Tensor], torch.Tensor] | str:
        """An entry's tensors, checked against their CRC-32 on the first read; what is wrong (a str) if they do not."""
        names = [f"{entry}/dense/{i}" for i in range(n_dense)] + [f"{entry}/pooled"]
        try:
            f = self._handle(path)
            tensors = [f.get_tensor(n) for n in names]
        except (SafetensorError, OSError) as e:
            return f"unreadable ({type(e).__name__}: {e})"
        if (path, entry) not in self._verified:
            sums = self._sums.get(path)
            if sums is None:
                with safe_open(str(path), framework="pt") as g:
                    sums = self._sums[path] = json.loads((g.metadata() or {}).get(CHECKSUM_KEY, "{}"))
            bad = [n for n, t in zip(names, tensors) if n in sums and tensor_crc32(t) != sums[n]]
            if bad:
                return f"tensor(s) {bad} do not match their CRC-32 checksum"
            self._verified.add((path, entry))
        return tensors[:-1], tensors[-1]

    def count(self, extractor: Extractor) -> int:
        """Entries stored for this extractor (its current weights and preprocessing)."""
        return len(self._refresh(self.extractor_key(extractor)))

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    def reset_stats(self) -> None:
        self.hits = self.misses = 0

    # ---- the one entry point ---------------------------------------------------------------------------
    @torch.no_grad()
    def get_or_compute(self, extractor: Extractor, image_ids: Sequence[str], images: torch.Tensor | None,
                       view: int = 0, transform: str = "") -> ExtractorOutput:
        """Features of a batch: cached entries are read, the others computed in one forward and stored.

        Args:
            extractor: a frozen extractor (``extractor.frozen`` and no trainable parameter).
            image_ids: one id per image; with `view` and `transform` it names the image tensor.
            images: B x C x H x W in [0, 1], as the extractor takes them; may be None when every entry is
                cached (the call then raises if one is missing).
            view: index of the view (0: the deterministic eval transform; 1..V-1: seeded augmentations).
            transform: the transform that made `images` (resolution and augmentation parameters).

        Returns:
            ``{"dense": [B x D_i x h_i x w_i], "pooled": B x D}`` in float32 on `images`' device (CPU when
            `images` is None).
        """
        if not isinstance(extractor, Extractor):
            raise TypeError(f"FeatureCache: expected an Extractor, got {type(extractor).__name__}")
        if not extractor.frozen or any(p.requires_grad for p in extractor.parameters()):
            raise ValueError(
                f"FeatureCache: extractor {extractor.info.name!r} is trainable; its features change as it trains, "
                "so they cannot be cached. Run it directly (unfrozen variants bypass the cache)."
            )
        ids = [str(i) for i in image_ids]
        if images is not None and images.shape[0] != len(ids):
            raise ValueError(f"FeatureCache: {len(ids)} image ids but images of shape {tuple(images.shape)}")
        key = self.extractor_key(extractor)
        entries = [self.entry_key(i, view, transform) for i in ids]
        index = self._index.get(key, {})
        if any(e not in index for e in entries):
            index = self._refresh(key)
        miss = [j for j, e in enumerate(entries) if e not in index]
        n_dense = len(extractor.info.layers)
        results: list[tuple[list[torch.Tensor], torch.Tensor] | None] = [None] * len(ids)
        for j, e in enumerate(entries):  # the hits, checked: a corrupted entry is recomputed as a miss
            if j in miss or e not in index:  # a miss, or a repeat of an entry found corrupted just now
                continue
            read = self._read(index[e], e, n_dense)
            if isinstance(read, str):
                what = f"{index[e]}: feature-cache entry {e} (image {ids[j]!r}, view {view}) {read}"
                if images is None:
                    raise ValueError(f"FeatureCache: {what}; pass the images to recompute it (or delete the shard)")
                warnings.warn(f"{what}; recomputing it", stacklevel=2)
                index.pop(e, None)
                miss.append(j)
            else:
                results[j] = read
        miss = sorted(set(miss) | {j for j, e in enumerate(entries) if e not in index})  # repeats of a corrupted id

        if miss:
            if images is None:
                raise ValueError(
                    f"FeatureCache: {len(miss)} of {len(ids)} images (e.g. {ids[miss[0]]!r}, view {view}, transform "
                    f"{transform!r}) are not cached for {extractor.info.name!r}; pass the images to compute them"
                )
            was_training = extractor.training
            extractor.eval()
            try:
                out = extractor(images[miss])
            finally:
                extractor.train(was_training)
            store = self.dtype or out["pooled"].dtype
            tensors, written = {}, []
            for k, j in enumerate(miss):
                if entries[j] in written:  # the same image twice in one batch
                    continue
                for i, d in enumerate(out["dense"]):
                    tensors[f"{entries[j]}/dense/{i}"] = d[k].to(store)
                tensors[f"{entries[j]}/pooled"] = out["pooled"][k].to(store)
                written.append(entries[j])
            folder = self._folder(key)
            if not (folder / KEY_NAME).is_file():
                atomic_write_bytes(folder / KEY_NAME, (json.dumps(self.key_parts(extractor), indent=1) + "\n").encode())
            shard = folder / f"{SHARD_PREFIX}{time.time_ns()}-{os.getpid()}-{secrets.token_hex(4)}{SHARD_SUFFIX}"
            atomic_save_safetensors(tensors, shard, metadata={"entries": json.dumps(written), "spec": extractor.info.name})
            for e in written:
                index[e] = shard
            self._scanned.setdefault(key, set()).add(shard.name)
            for k, j in enumerate(miss):  # what a later hit will read: the stored (rounded) values
                results[j] = ([d[k].to(store) for d in out["dense"]], out["pooled"][k].to(store))
        self.misses += len(miss)
        self.hits += len(ids) - len(miss)

        device = images.device if images is not None else torch.device("cpu")
        dense = []
        for i in range(n_dense):
            shapes = {tuple(r[0][i].shape) for r in results}
            if len(shapes) != 1:
                raise ValueError(
                    f"FeatureCache: dense map {i} of {extractor.info.name!r} has different shapes {sorted(shapes)} in "
                    f"one batch (ids {ids[:4]}...); batch images of one size (one transform) together"
                )
            dense.append(torch.stack([r[0][i] for r in results]).to(device=device, dtype=torch.float32))
        pooled = torch.stack([r[1] for r in results]).to(device=device, dtype=torch.float32)
        return {"dense": dense, "pooled": pooled}
