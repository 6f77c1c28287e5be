"""Peer rows of the comparison: smp U-Nets on the MobileNetV2 weights, frozen and fine-tuned (train/experiments/peers.py)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("segmentation_models_pytorch", reason="the peers extra: pip install -e '.[peers]'")
torchvision = pytest.importorskip("torchvision")

from conftest import script_main  # noqa: E402

from backbone_router.train.experiments import comparison, peers  # noqa: E402
from backbone_router.train.experiments.compare_config import load_compare_config  # noqa: E402
from backbone_router.train.training.config import TrainConfig  # noqa: E402

TINY = Path(__file__).resolve().parents[1] / "configs" / "compare_tiny.yaml"


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    """A torchvision MobileNetV2 state dict with random weights (classifier included), as the real file is laid out."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2-stand-in.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    return path


def test_shared_weights_load_strictly_into_the_encoder(shared_weights):
    path = shared_weights / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        pytest.skip(f"real weights {path} not found (set BACKBONE_ROUTER_WEIGHTS or put them in ../shared/weights)")
    full = torch.load(path, map_location="cpu", weights_only=True)
    state = peers.encoder_state(path)
    assert set(full) - set(state) == {"classifier.1.weight", "classifier.1.bias"}
    peer = peers.build_peer("peer_unet_frozen", {"cracks": 2}, path)
    encoder = peer.unets["cracks"].encoder
    assert set(encoder.state_dict()) == set(state)  # strict: every key of the encoder, nothing else
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, state[k]), k
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(full, strict=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        # the peers' U-Nets run in channels_last: the same values within float rounding
        torch.testing.assert_close(encoder(x)[-1], reference.eval().features(x), rtol=1e-4, atol=1e-5)


def test_wrong_layout_is_an_error_that_names_keys(tmp_path, stand_in):
    state = peers.encoder_state(stand_in)
    bad = tmp_path / "timm_layout.pth"
    torch.save({"conv_stem.weight": torch.zeros(32, 3, 3, 3), **{k: v for k, v in state.items() if "features.0." not in k}}, bad)
    with pytest.raises(ValueError, match=r"missing \['features\.0\.0\.weight'.*unexpected \['conv_stem\.weight'\]"):
        peers.build_peer("peer_unet_frozen", {"t": 2}, bad)
    with pytest.raises(ValueError, match="compare.peer_checkpoint: the peer variants"):
        peers.build_peer("peer_unet_finetuned", {"t": 2}, None)
    with pytest.raises(FileNotFoundError, match="compare.peer_checkpoint: .*missing.pth is not a file"):
        peers.encoder_state(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown peer variant 'peer_unet'"):
        peers.build_peer("peer_unet", {"t": 2}, stand_in)


def test_frozen_encoder_stays_put_and_finetuned_one_trains(stand_in):
    """One optimizer step as compare.py takes it: the frozen encoder (BN in eval) is untouched, the other moves."""
    t = TrainConfig(lr=1e-2, phase2_lr_scale=0.1, warmup_steps=0)
    images, target = torch.rand(4, 1, 45, 70), torch.randint(0, 2, (4, 45, 70))
    state = peers.encoder_state(stand_in)
    for name, trains in peers.PEER_VARIANTS.items():
        peer = peers.build_peer(name, {"seg": 2, "other": 3}, None, state, priors={"seg": 0.1})
        peer.train()
        enc = peer.unets["seg"].encoder
        assert enc.training is trains and peer.unets["seg"].decoder.training
        bias = peer.unets["seg"].segmentation_head[0].bias
        assert (bias[1] - bias[0]).item() == pytest.approx(math.log(0.1 / 0.9), abs=1e-6)
        before = {k: v.clone() for k, v in enc.state_dict().items()}
        opt = comparison.variant_optimizer(peer, t)
        lrs = sorted({g["lr"] for g in opt.param_groups})
        assert lrs == ([1e-3, 1e-2] if trains else [1e-2])  # the encoder at phase2_lr_scale x lr
        out = peer(images, task="seg")
        assert out["seg"].shape == (4, 2, 45, 70) and out["aux_loss"].item() == 0
        torch.nn.functional.cross_entropy(out["seg"], target).backward()
        opt.step()
        changed = [k for k, v in enc.state_dict().items() if not torch.equal(v, before[k])]
        assert bool(changed) is trains, (name, changed[:3])
        if trains:  # BatchNorm statistics move too when the encoder trains
            assert any(k.endswith("running_mean") for k in changed)
        assert all(p.grad is None for p in peer.unets["other"].parameters())  # the other task's U-Net: untouched
        # 1 channel is the grey image repeated to 3
        peer.eval()
        with torch.no_grad():
            torch.testing.assert_close(peer(images, task="seg")["seg"], peer(images.expand(-1, 3, -1, -1), task="seg")["seg"])


@pytest.mark.slow
def test_peer_variants_in_the_tiny_comparison(tmp_path, stand_in):
    argv = ["--config", str(TINY), "--output-dir", str(tmp_path / "out"), f"compare.cache_dir={tmp_path / 'cache'}",
            "compare.variants=[gated_task, peer_unet_frozen, peer_unet_finetuned]", "compare.seeds=[0]",
            "train.max_steps=4", f"compare.peer_checkpoint={stand_in}"]
    assert script_main("compare")(argv) == 0
    out = tmp_path / "out"
    rows = json.loads((out / "results.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    for p in peers.PEER_VARIANTS:
        mine = [r for r in rows if r["variant"] == p]
        assert {r["task"] for r in mine} == {"shape_seg"}  # the cls task is skipped, with a note
        values = {r["metric"]: r["value"] for r in mine}
        for k in ("fg_iou", "mIoU", "fg_dice", "pixel_accuracy"):
            assert values[k] is not None and math.isfinite(values[k]) and 0 <= values[k] <= 1, (p, k, values[k])
        assert summary["meta"]["kinds"][p] == "peer" and "shape_cls" in summary["meta"]["notes"][p]
        assert p in summary["peers"]["shape_seg"]["peers"]
        assert summary["meta"]["timings_s"]["train_per_variant"][p] > 0
    assert summary["meta"]["peer_checkpoint"] == str(stand_in)
    gates = json.loads((out / "gates.json").read_text())
    assert {g["variant"] for g in gates} == {"gated_task"}  # a peer has no gate
    sweeps = json.loads((out / "sweeps.json").read_text())
    assert {s["variant"] for s in sweeps} == {"gated_task", *peers.PEER_VARIANTS}
    md = (out / "results.md").read_text()
    assert "| peer_unet_frozen | peer |" in md and "| peer_unet_finetuned | peer |" in md
    assert "routed - peer_unet_frozen" in md and "segmentation tasks only" in md


def test_peer_variant_errors():
    cfg, cmp = load_compare_config(TINY, ['compare.variants=[{name: p2, base: peer_unet_frozen, model: {width: 8}}]'])
    with pytest.raises(ValueError, match=r"compare.variants\[0\].base: peer variant 'peer_unet_frozen' is not a Router"):
        comparison.expand_variants(cmp, cfg.model)
    cfg, cmp = load_compare_config(TINY, ["compare.variants=[peer_unet_frozen, gated_task]"])
    assert [(v.name, v.kind) for v in comparison.expand_variants(cmp, cfg.model)] == [("peer_unet_frozen", "peer"),
                                                                                  ("gated_task", "routed")]


def test_channels_last_computes_the_contiguous_layouts_function(stand_in):
    """The peers run in channels_last for speed: the same U-Net as in the contiguous layout up to float rounding.
    Against the U-Net in float64 (one training step's forward and backward, batch 4, seeded), both float32 layouts'
    logits are within 1e-3 of the logits' range and their whole gradients within 10 % (BatchNorm in training mode on
    random weights amplifies rounding: both layouts measured up to 3 % over 12 seeds; channels_last's BatchNorm rounds
    a few times coarser, its logits' error 1-3x the contiguous one's). A layout mistake would be off by O(1)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    images, target = torch.rand(4, 3, 64, 96, generator=g), torch.randint(0, 2, (4, 64, 96), generator=g)
    state = peers.encoder_state(stand_in)
    for name in peers.PEER_VARIANTS:
        peer = peers.build_peer(name, {"seg": 2}, None, state)
        unet = peer.unets["seg"]
        assert unet.decoder.blocks[0].conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
        plain = copy.deepcopy(unet).to(memory_format=torch.contiguous_format)
        exact = copy.deepcopy(plain).double()
        x = (images - peer.mean) / peer.std
        got = {}
        for key, model, inputs in (("channels_last", unet, x.contiguous(memory_format=torch.channels_last)),
                                   ("contiguous", plain, x), ("float64", exact, x.double())):
            logits = model(inputs)
            torch.nn.functional.cross_entropy(logits, target).backward()
            grads = [p.grad.double().flatten() for p in model.parameters() if p.grad is not None]
            got[key] = (logits.double(), torch.cat(grads), len(grads))
        ref_logits, ref_grad, n = got.pop("float64")
        scale = ref_logits.abs().max().item()
        for key, (logits, grad, count) in got.items():
            assert count == n
            assert (logits - ref_logits).abs().max().item() <= 1e-3 * scale, (name, key)
            assert ((grad - ref_grad).norm() / ref_grad.norm()).item() <= 0.1, (name, key)
        assert peer(images, task="seg")["seg"].is_contiguous()
