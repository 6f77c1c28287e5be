"""FeatureCache: hits, misses and invalidation with values, counted with Extractor.forward_calls."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from backbone_router.extractors import create_extractor
from backbone_router.train.experiments.feature_cache import FeatureCache, weights_hash

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 32}


def tiny(seed: int = 0, layers=None):
    torch.manual_seed(seed)
    return create_extractor("timm:vit_small_patch16_224", pretrained=False, layers=layers, **TINY_VIT).freeze().eval()


@pytest.fixture
def images():
    return torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(1))


def test_miss_then_hit_without_forward(tmp_path, images):
    ext = tiny()
    cache = FeatureCache(tmp_path)
    first = cache.get_or_compute(ext, ["a", "b", "c"], images, view=0, transform="eval:32x48")
    assert (cache.misses, cache.hits, ext.forward_calls) == (3, 0, 1)
    with torch.no_grad():
        direct = ext(images)
    assert ext.forward_calls == 2
    for got, want in zip(first["dense"] + [first["pooled"]], direct["dense"] + [direct["pooled"]]):
        assert got.dtype == torch.float32 and torch.equal(got, want)  # float32 storage: exact

    calls = ext.forward_calls
    again = FeatureCache(tmp_path).get_or_compute(ext, ["c", "a"], None, view=0, transform="eval:32x48")  # new instance
    assert ext.forward_calls == calls  # read from disk, no forward
    assert torch.equal(again["pooled"], first["pooled"][[2, 0]])
    assert torch.equal(again["dense"][0], first["dense"][0][[2, 0]])


def test_partial_batch_computes_only_the_misses(tmp_path, images):
    ext = tiny()
    cache = FeatureCache(tmp_path)
    cache.get_or_compute(ext, ["a"], images[:1], view=0, transform="t")
    out = cache.get_or_compute(ext, ["a", "b", "c"], images, view=0, transform="t")
    assert cache.stats() == {"hits": 1, "misses": 3} and ext.forward_calls == 2
    with torch.no_grad():
        want = ext(images)["pooled"]
    assert torch.equal(out["pooled"], want)
    assert cache.count(ext) == 3


def test_invalidation(tmp_path, images):
    ext = tiny()
    cache = FeatureCache(tmp_path)
    ids = ["a", "b", "c"]
    base = cache.get_or_compute(ext, ids, images, view=1, transform="train:32")
    key = cache.extractor_key(ext)

    # Same everything: a hit, no forward.
    cache.reset_stats()
    calls = ext.forward_calls
    cache.get_or_compute(ext, ids, images, view=1, transform="train:32")
    assert cache.stats() == {"hits": 3, "misses": 0} and ext.forward_calls == calls

    # Another view or transform of the same image ids: misses.
    for view, transform in ((2, "train:32"), (1, "train:48")):
        cache.reset_stats()
        cache.get_or_compute(ext, ids, images, view=view, transform=transform)
        assert cache.stats() == {"hits": 0, "misses": 3}

    # Changed weights (in place, as an optimizer would): a new key, misses, new values.
    with torch.no_grad():
        ext.model.blocks[-1].mlp.fc2.bias.add_(0.5)
    assert cache.extractor_key(ext) != key
    cache.reset_stats()
    changed = cache.get_or_compute(ext, ids, images, view=1, transform="train:32")
    assert cache.stats() == {"hits": 0, "misses": 3}
    assert not torch.equal(changed["dense"][0], base["dense"][0])
    with torch.no_grad():  # and back: the old entries are found again
        ext.model.blocks[-1].mlp.fc2.bias.sub_(0.5)
    cache.reset_stats()
    cache.get_or_compute(ext, ids, images, view=1, transform="train:32")
    assert cache.extractor_key(ext) == key and cache.stats() == {"hits": 3, "misses": 0}

    # Changed preprocessing: normalization, or other layers: misses.
    other_mean = tiny()
    other_mean.info = dataclasses.replace(other_mean.info, mean=(0.4, 0.4, 0.4))
    other_mean._mean.fill_(0.4)
    other_layers = tiny(layers=[0, 1])
    for other in (other_mean, other_layers):
        assert weights_hash(other) == weights_hash(ext)
        cache.reset_stats()
        cache.get_or_compute(other, ids, images, view=1, transform="train:32")
        assert cache.stats() == {"hits": 0, "misses": 3}

    # Same weights in another object: a hit.
    twin = tiny()
    cache.reset_stats()
    cache.get_or_compute(twin, ids, images, view=1, transform="train:32")
    assert cache.stats() == {"hits": 3, "misses": 0} and twin.forward_calls == 0


def test_half_storage_returns_the_stored_values(tmp_path, images):
    ext = tiny()
    cache = FeatureCache(tmp_path, dtype=torch.float16)
    miss = cache.get_or_compute(ext, ["a", "b", "c"], images, view=0, transform="t")
    hit = FeatureCache(tmp_path, dtype=torch.float16).get_or_compute(ext, ["a", "b", "c"], None, view=0, transform="t")
    assert torch.equal(miss["pooled"], hit["pooled"]) and miss["pooled"].dtype == torch.float32
    with torch.no_grad():
        exact = ext(images)["pooled"]
    assert torch.allclose(miss["pooled"], exact, atol=1e-2, rtol=1e-2) and not torch.equal(miss["pooled"], exact)
    # The storage dtype is part of the key: a float32 cache on the same root does not read half values.
    full = FeatureCache(tmp_path)
    full.get_or_compute(ext, ["a"], images[:1], view=0, transform="t")
    assert full.misses == 1


def test_errors_name_the_problem(tmp_path, images):
    ext = tiny()
    cache = FeatureCache(tmp_path)
    with pytest.raises(ValueError, match="'zz'.*not cached"):
        cache.get_or_compute(ext, ["zz"], None, view=0, transform="t")
    with pytest.raises(ValueError, match="2 image ids but images of shape"):
        cache.get_or_compute(ext, ["a", "b"], images, view=0, transform="t")
    trainable = tiny().unfreeze()
    with pytest.raises(ValueError, match="trainable"):
        cache.get_or_compute(trainable, ["a"], images[:1], view=0, transform="t")
    cache.get_or_compute(ext, ["small"], torch.rand(1, 3, 16, 16), view=0, transform="t")
    with pytest.raises(ValueError, match="different shapes"):
        cache.get_or_compute(ext, ["small", "a"], torch.cat([torch.rand(1, 3, 32, 48), images[:1]]), view=0,
                             transform="t")


def test_keys_differ_per_tap_set(tmp_path):
    """A CNN's stage taps (issue 11: stride 4/8 stages for multi-level routing) are part of the key: another tap set
    of the same weights is a miss, never a read of the other set's maps; the same set is a hit."""
    torch.manual_seed(0)
    state = create_extractor("timm:mobilenetv2_100", pretrained=False).state_dict()
    taps = {}
    for layers in ([3, 4], [1, 2, 3, 4], [1, 2], [2, 1]):
        ext = create_extractor("timm:mobilenetv2_100", pretrained=False, layers=layers)
        ext.load_state_dict(state)
        taps[tuple(layers)] = ext.freeze().eval()
    assert taps[(1, 2, 3, 4)].info.strides == (4, 8, 16, 32)
    cache = FeatureCache(tmp_path)
    keys = {layers: cache.extractor_key(ext) for layers, ext in taps.items()}
    assert len(set(weights_hash(e) for e in taps.values())) == 1  # same weights: only the taps differ
    assert len(set(keys.values())) == len(keys), keys

    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    for layers, ext in taps.items():
        cache.reset_stats()
        out = cache.get_or_compute(ext, ["a", "b"], images, view=0, transform="eval:64")
        assert cache.stats() == {"hits": 0, "misses": 2}, layers
        assert [d.shape[1] for d in out["dense"]] == list(ext.info.widths)
    again = create_extractor("timm:mobilenetv2_100", pretrained=False, layers=[1, 2, 3, 4])
    again.load_state_dict(state)  # the same taps in a new cache object: read from disk (images=None)
    out = FeatureCache(tmp_path).get_or_compute(again.freeze().eval(), ["a", "b"], None, view=0, transform="eval:64")
    assert [tuple(d.shape[-2:]) for d in out["dense"]] == [(16, 16), (8, 8), (4, 4), (2, 2)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_held_val_features_equal_the_cached_ones_read_per_batch(tmp_path, dtype):
    """The comparison holds its val features in memory (read once, widened to float32); every batch, by index or by
    slice as evaluation reads them, gives the values the cache would."""
    from backbone_router.train.experiments.comparison import CachedFeatures

    ext = tiny(layers=[0, 1])
    images = torch.rand(7, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    ids = [f"img{i}" for i in range(7)]
    cache = FeatureCache(tmp_path, dtype=dtype)
    cache.get_or_compute(ext, ids, images, view=0, transform="eval")
    cached = CachedFeatures(cache, {"vit": ext}, ids, 0, "eval")
    held = cached.held(torch.float32, batch=3)
    for idx in (torch.tensor([0, 1, 2]), torch.tensor([6, 3]), torch.arange(7), slice(2, 5), slice(4, 10)):
        a, b = cached.gather(idx, "cpu")["vit"], held.gather(idx, "cpu")["vit"]
        assert all(torch.equal(x, y) and y.dtype == torch.float32 for x, y in zip(a["dense"], b["dense"]))
        assert torch.equal(a["pooled"], b["pooled"])
    assert held.feats["vit"]["pooled"].dtype == torch.float32
