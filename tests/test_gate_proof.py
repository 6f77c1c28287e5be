"""Proof that the gate is right: ablation importance, agreement with the gate, task spread, the oracle single."""

from __future__ import annotations

import pytest
import torch

from router import Router, RouterConfig

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}


def tiny_router(**gate) -> Router:
    """Two tiny random ViTs (patch 14 and 16), a binary seg task and a 3-class cls task."""
    return Router(RouterConfig.from_dict({
        "extractors": [
            {"spec": "timm:vit_small_patch14_dinov2", "name": "p14", "pretrained": False, "kwargs": {**TINY_VIT, "img_size": 28}},
            {"spec": "timm:vit_small_patch16_224", "name": "p16", "pretrained": False, "kwargs": {**TINY_VIT, "img_size": 32}},
        ],
        "tasks": [{"name": "seg_a", "type": "seg", "classes": ["bg", "fg"]},
                  {"name": "cls_b", "type": "cls", "classes": ["x", "y", "z"]}],
        "width": 16, "stride": 16, "gate": {"hidden": 16, **gate}, "head": {"seg_hidden": 16, "cls_hidden": 16},
    })).eval()


# ---- Router.forward(keep=...) under a top-k gate ------------------------------------------------------------------
@pytest.mark.parametrize("task, key", [("seg_a", "seg"), ("cls_b", "cls")])
def test_keep_only_the_extractor_a_top1_gate_left_out_gives_it_weight_zero(task, key):
    """A top-1 gate picks one extractor; keeping only the other leaves nothing to fuse: it runs with weight 0, so its
    features do not change the output (no crash on an empty fusion)."""
    model = tiny_router(granularity="task", top_k=1)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        chosen = model(images, task=task)["gate_mean"]
        assert sorted(chosen.tolist()) == [0.0, 1.0]
        other = model.extractor_names[int(chosen.argmin())]
        feats = model.extractors[other](images)
        doubled = {other: {"dense": [2 * d for d in feats["dense"]], "pooled": 2 * feats["pooled"]}}
        a = model(images, task=task, keep=[other], features={other: feats})
        b = model(images, task=task, keep=[other], features=doubled)
    assert a["gate_levels"].eq(0).all()
    torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
