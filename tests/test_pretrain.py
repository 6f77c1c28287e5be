"""Self-supervised pretraining (MAE, SMIR, DINO) on tiny synthetic data: losses fall, masks and EMA are
exact, checkpoints load as extractors, and `accelerate launch train/pretrain.py` runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from backbone_router.extractors import create_extractor
from backbone_router.extractors.timm_backend import save_timm_extractor
from backbone_router.train.selfsup.dino import DINOPretrainer
from backbone_router.train.selfsup.encoder import build_encoder, encode_visible, saved_model_kwargs
from backbone_router.train.selfsup.mae import MAEPretrainer, random_mask
from backbone_router.train.selfsup.pretrain_config import (
    DecoderConfig,
    DINOConfig,
    PretrainModelConfig,
    load_pretrain_config,
)
from backbone_router.train.selfsup.smir import (
    SMIRPretrainer,
    aggregate_patch_losses,
    highest_loss_mask,
    ms_ssim,
    ms_ssim_betas,
    ms_ssim_scales,
    ssim_maps,
)
from backbone_router.train.selfsup.unlabeled import (
    MultiCropTransform,
    UnlabeledImages,
    crop_transform,
    partition_indices,
)

REPO = Path(__file__).resolve().parents[1]
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}  # 4 x 4 patches
TINY_MODEL = PretrainModelConfig(kwargs=dict(TINY_KWARGS))
TINY_DECODER = DecoderConfig(dim=32, depth=1, num_heads=2)


def _synthetic_image(rng: np.random.Generator, size: int = 48, grey: bool = False) -> Image.Image:
    """Smooth background + a few bright rectangles: structure a reconstruction model can learn."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.3 + 0.3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * xx + rng.uniform(0, 1)))
    img = np.stack([base * rng.uniform(0.5, 1.0) for _ in range(3)], -1)
    for _ in range(3):
        x0, y0 = rng.integers(0, size - 12, 2)
        img[y0 : y0 + 10, x0 : x0 + 10] = rng.uniform(0.6, 1.0, 3)
    img = (np.clip(img, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(img[..., 0]) if grey else Image.fromarray(img)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster on one thread, above all on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """A dataset folder in the shared layout: 12 train images (some greyscale), 2 val images."""
    root = tmp_path_factory.mktemp("data")
    folder = root / "syn"
    (folder / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["stem,split"]
    for i in range(14):
        stem = f"img{i:02d}"
        _synthetic_image(rng, grey=i % 3 == 0).save(folder / "images" / f"{stem}.png")
        rows.append(f"{stem},{'train' if i < 12 else 'val'}")
    (folder / "splits.csv").write_text("\n".join(rows) + "\n")
    return root


def _batches(root: Path, transform, n: int, batch: int, seed: int):
    pool = UnlabeledImages.from_folders(root, ["syn"], transform=transform, preload_short_side=48)
    loader = torch.utils.data.DataLoader(pool, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    out = []
    while len(out) < n:
        out += list(loader)
    return out[:n]


def _train(module, batches, lr=2e-3, step_fn=None):
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    module.train()
    for batch in batches:
        loss = module(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step_fn is not None:
            step_fn()


# ---- the pool ----------------------------------------------------------------------------------------------
def test_pool_reads_train_split_and_makes_rgb_crops(data_root):
    pool = UnlabeledImages.from_folders(data_root, ["syn"], transform=crop_transform(32, (0.5, 1.0)))
    assert len(pool) == 12  # val images are left out
    x = pool[0]  # img00 is greyscale on disk
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    views = UnlabeledImages.from_folders(data_root, ["syn"], transform=MultiCropTransform(32, 16, 3, (0.4, 1), (0.1, 0.4)))[1]
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    with pytest.raises(FileNotFoundError, match="nope/splits.csv"):
        UnlabeledImages.from_folders(data_root, ["nope"])
    parts = partition_indices(12, 5, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(12)) and [len(p) for p in parts] == [2, 3, 2, 3, 2]


def test_config_overrides_and_unknown_keys(tmp_path):
    cfg = load_pretrain_config(REPO / "configs/pretrain_smir.yaml", ["train.max_steps=7", "smir.partitions=3"])
    assert (cfg.method, cfg.train.max_steps, cfg.smir.partitions, cfg.smir.num_masks, cfg.smir.mask_ratio) == ("smir", 7, 3, 5, 0.5)
    with pytest.raises(ValueError, match=r"train.*unknown key\(s\) \['max_step'\]"):
        load_pretrain_config(REPO / "configs/pretrain_mae.yaml", ["train.max_step=7"])
    for name in ("mae", "smir", "dino"):
        for suffix in ("", "_gpu"):
            assert load_pretrain_config(REPO / f"configs/pretrain_{name}{suffix}.yaml").method == name


# ---- the masked encoder is timm's ViT -----------------------------------------------------------------------
def test_encode_visible_matches_timm_and_drops_masked_tokens():
    torch.manual_seed(0)
    enc = build_encoder(TINY_MODEL).eval()
    x = torch.rand(2, 3, 32, 32)
    tokens, grid, _ = encode_visible(enc, x)
    assert grid == (4, 4)
    torch.testing.assert_close(tokens, enc.model.forward_features(enc.preprocess(x)))
    mask = random_mask(2, 16, 0.75, generator=torch.Generator().manual_seed(0))
    tokens, _, keep = encode_visible(enc, x, mask)
    assert tokens.shape == (2, 1 + 4, 32) and not mask.gather(1, keep).any()


# ---- each method lowers its loss on a fixed batch ------------------------------------------------------------
def test_mae_lowers_loss(data_root):
    torch.manual_seed(0)
    mae = MAEPretrainer(build_encoder(TINY_MODEL), TINY_DECODER, mask_ratio=0.75)
    fixed = _batches(data_root, crop_transform(32, (0.5, 1.0)), 1, 8, seed=1)[0]
    mask = random_mask(8, 16, 0.75, generator=torch.Generator().manual_seed(0))
    mae.eval()
    with torch.no_grad():
        before = mae(fixed, mask=mask)["loss"].item()
    _train(mae, _batches(data_root, crop_transform(32, (0.5, 1.0)), 40, 6, seed=2))
    mae.eval()
    with torch.no_grad():
        after = mae(fixed, mask=mask)["loss"].item()
    assert after < 0.8 * before, (before, after)


def test_smir_lowers_loss_with_selective_masks(data_root):
    torch.manual_seed(0)
    smir = SMIRPretrainer(build_encoder(TINY_MODEL), TINY_DECODER, mask_ratio=0.5, ssim_sigma=1.0)
    fixed = _batches(data_root, crop_transform(32, (0.5, 1.0)), 1, 8, seed=1)[0]
    mask = random_mask(8, 16, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = smir.eval()(fixed, mask=mask)["loss"].item()
    batches = _batches(data_root, crop_transform(32, (0.5, 1.0)), 40, 6, seed=2)
    _train(smir, batches[:20])  # partition 0: random masks
    scorer = SMIRPretrainer(build_encoder(TINY_MODEL), TINY_DECODER, mask_ratio=0.5, ssim_sigma=1.0)
    scorer.load_state_dict(smir.state_dict())
    opt = torch.optim.AdamW(smir.parameters(), lr=2e-3, weight_decay=0.0)
    for batch in batches[20:]:  # partition 1: the snapshot picks the masks
        sel = scorer.selective_mask(batch, num_masks=3)
        assert (sel.sum(1) == 8).all()
        loss = smir.train()(batch, mask=sel)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = smir.eval()(fixed, mask=mask)["loss"].item()
    assert after < 0.8 * before, (before, after)


def test_dino_lowers_loss(data_root):
    torch.manual_seed(0)
    cfg = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_size=16,
                     teacher_temp_warmup_steps=0, teacher_temp=0.04, momentum=0.9)
    dino = DINOPretrainer(build_encoder(TINY_MODEL), cfg, max_steps=40)
    transform = MultiCropTransform(32, 16, 2, (0.4, 1.0), (0.1, 0.4))
    fixed = _batches(data_root, transform, 1, 8, seed=1)[0]
    with torch.no_grad():
        # Center the teacher on the fixed batch first: with a zero center, a random network's near-constant
        # outputs give a deceptively low cross-entropy that training (and centering) then raises.
        dino.center.copy_(dino._embed(dino.teacher, fixed[:2]).mean(0, keepdim=True))
        before = dino.eval()(fixed)["loss"].item()
    _train(dino, _batches(data_root, transform, 40, 6, seed=2), lr=1e-3, step_fn=dino.update_teacher)
    with torch.no_grad():
        after = dino.eval()(fixed)["loss"].item()
    assert after < 0.85 * before, (before, after)


# ---- SMIR: the selective mask takes exactly the highest-loss patches -------------------------------------------
def test_highest_loss_mask_on_planted_scores_with_ties():
    scores = torch.tensor([
        [0.1, 0.9, 0.3, 0.8, 0.2, 0.7],  # distinct: the top 3 are patches 1, 3, 5
        [0.5, 0.5, 0.5, 0.5, 0.1, 0.9],  # ties: 5 first, then the lower indices 0 and 1 among the 0.5s
    ])
    mask = highest_loss_mask(scores, 0.5)
    expected = torch.tensor([[0, 1, 0, 1, 0, 1], [1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert torch.equal(highest_loss_mask(scores, 0.34).sum(1), torch.tensor([2, 2]))  # round(6 * 0.34) = 2


def test_patch_losses_are_averaged_over_the_masks_that_hid_them():
    losses = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[5.0, 6.0, 7.0, 8.0]]])  # K=2, B=1, N=4
    masks = torch.tensor([[[1, 1, 0, 0]], [[1, 0, 1, 0]]], dtype=torch.bool)
    agg = aggregate_patch_losses(losses, masks)
    # patch 0: (1 + 5) / 2; patch 1: 2; patch 2: 7; patch 3 never hidden: mean of the scored (3 + 2 + 7) / 3
    torch.testing.assert_close(agg, torch.tensor([[3.0, 2.0, 7.0, 4.0]]))


def test_selective_mask_is_the_top_half_of_the_models_patch_scores():
    torch.manual_seed(0)
    smir = SMIRPretrainer(build_encoder(TINY_MODEL), TINY_DECODER, mask_ratio=0.5, ssim_sigma=1.0)
    x = torch.rand(3, 3, 32, 32)
    scores = smir.eval().patch_scores(x, 4, generator=torch.Generator().manual_seed(5))
    mask = smir.selective_mask(x, 4, generator=torch.Generator().manual_seed(5))
    assert (mask.sum(1) == 8).all()
    for row_scores, row_mask in zip(scores, mask):
        assert row_scores[row_mask].min() >= row_scores[~row_mask].max()
    assert ms_ssim_scales(96, 11) == 3 and ms_ssim_scales(32, 7) == 3


def test_ssim_and_ms_ssim_match_torchmetrics():
    from torchmetrics.functional.image import (
        multiscale_structural_similarity_index_measure,
        structural_similarity_index_measure,
    )

    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 96, 96, generator=g)
    y = (x + 0.2 * torch.randn(2, 3, 96, 96, generator=g)).clamp(0, 1)
    _, expected = structural_similarity_index_measure(y, x, data_range=1.0, reduction="none", return_full_image=True)
    torch.testing.assert_close(ssim_maps(y, x)[0], expected, atol=1e-5, rtol=1e-4)
    scales = ms_ssim_scales(96, 11)
    expected = multiscale_structural_similarity_index_measure(
        y, x, data_range=1.0, betas=ms_ssim_betas(scales), normalize="relu", reduction="none"
    )
    torch.testing.assert_close(ms_ssim(y, x, scales), expected, atol=1e-5, rtol=1e-4)


# ---- DINO: the teacher is exactly the EMA of the student -------------------------------------------------------
def test_dino_teacher_update_is_ema_of_student():
    torch.manual_seed(0)
    cfg = DINOConfig(out_dim=16, hidden_dim=16, bottleneck_dim=8, momentum=0.9, momentum_end=1.0)
    dino = DINOPretrainer(build_encoder(TINY_MODEL), cfg, max_steps=10)
    with torch.no_grad():
        for p in dino.student.parameters():
            p.add_(torch.randn_like(p))
    teacher = [p.clone() for p in dino.teacher.parameters()]
    student = [p.clone() for p in dino.student.parameters()]
    assert dino.momentum(0) == pytest.approx(0.9) and dino.momentum(10) == pytest.approx(1.0)
    assert dino.momentum(5) == pytest.approx(0.95)
    m = dino.update_teacher()  # step 0: momentum 0.9
    assert m == pytest.approx(0.9) and int(dino.step) == 1
    for t0, s0, t1 in zip(teacher, student, dino.teacher.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * s0, rtol=0, atol=1e-6)
    assert dino.teacher_temp(0) == cfg.warmup_teacher_temp and dino.teacher_temp(10_000) == cfg.teacher_temp


# ---- checkpoints are extractors --------------------------------------------------------------------------------
def test_saved_encoder_is_in_timms_format_and_loads_as_the_same_extractor(tmp_path):
    torch.manual_seed(0)
    mae = MAEPretrainer(build_encoder(PretrainModelConfig(kwargs=dict(TINY_KWARGS), layers=[0, 1])), TINY_DECODER)
    _train(mae, [torch.rand(4, 3, 32, 32) for _ in range(2)])
    enc = mae.encoder.eval()
    save_timm_extractor(enc, tmp_path / "final", saved_model_kwargs(TINY_MODEL), {"method": "mae", "steps": 2})
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["config.json", "model.safetensors"]
    plain = timm.create_model(TINY_MODEL.name, pretrained=False, num_classes=0, **TINY_KWARGS)
    assert set(enc.model.state_dict()) == set(plain.state_dict())  # a plain timm ViT state dict
    # timm opens the folder by itself: the same architecture, weights and preprocessing
    opened = timm.create_model(f"local-dir:{tmp_path / 'final'}", pretrained=True)
    assert type(opened) is type(enc.model) and opened.patch_embed.patch_size == (8, 8)
    assert all(torch.equal(v, enc.model.state_dict()[k]) for k, v in opened.state_dict().items())
    assert tuple(opened.pretrained_cfg["mean"]) == tuple(TINY_MODEL.mean)
    assert "tag" not in opened.pretrained_cfg  # the architecture's published weights are not these
    x = torch.rand(2, 3, 40, 56)  # not the training size: position embeddings are interpolated
    with torch.no_grad():
        a = enc(x)
        for spec in (f"timm:local-dir:{tmp_path / 'final'}", f"local-dir:{tmp_path / 'final'}"):
            loaded = create_extractor(spec).eval()
            b = loaded(x)
            assert {k: v for k, v in loaded.info.__dict__.items() if k != "name"} == \
                {k: v for k, v in enc.info.__dict__.items() if k != "name"}, spec  # mean, std, layers, strides, family
            assert torch.equal(a["pooled"], b["pooled"]) and all(torch.equal(u, v) for u, v in zip(a["dense"], b["dense"]))
    assert b["dense"][0].shape == (2, 32, 5, 7) and loaded.info.layers == (0, 1)


# ---- the script, end to end -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_accelerate_launch_pretrain_end_to_end(data_root, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}  # no accelerate config file
    model_kwargs = json.dumps(TINY_KWARGS).replace('"', "")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           "train/pretrain.py", "--config", "configs/pretrain_smir.yaml", "--output-dir", str(out),
           f"data.root={data_root}", "data.datasets=[syn]", "data.image_size=32", "data.preload_short_side=48",
           f"model.kwargs={model_kwargs}", "decoder.dim=32", "decoder.depth=1", "decoder.num_heads=2",
           "smir.partitions=2", "smir.num_masks=2", "smir.ssim_sigma=1.0", "train.max_steps=2",
           "train.batch_size=4", "train.log_every=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and [r["phase"] for r in lines] == [0, 1]
    assert all(np.isfinite(r["loss"]) for r in lines)
    config = json.loads((out / "final" / "config.json").read_text())
    source = config["backbone_router"]["source"]
    assert config["architecture"] == "vit_small_patch16_224" and config["model_args"]["embed_dim"] == 32
    assert source["method"] == "smir" and source["steps"] == 2 and source["images"] == 12
    assert (out / "config.yaml").is_file()
    ext = create_extractor(f"local-dir:{out / 'final'}")
    assert ext(torch.rand(1, 1, 32, 32))["pooled"].shape == (1, 32)
    assert timm.create_model(f"local-dir:{out / 'final'}", pretrained=True).num_features == 32


def test_probe_features_concatenate_the_last_n_blocks():
    from backbone_router.train.experiments.probing import extract

    ext = create_extractor("timm:vit_small_patch16_224", layers=2, pretrained=False, **TINY_KWARGS).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    seg = extract(ext, images, "seg")
    with torch.no_grad():
        out = ext(images.float() / 255)
    assert seg.shape == (3, 2 * 32, 4, 4)
    torch.testing.assert_close(seg, torch.cat(out["dense"], 1))
    assert extract(ext, images, "cls").shape == (3, 32 + 2 * 32)


def test_probe_scores_any_dataset_folder_through_the_fine_tuning_reader(tmp_path):
    """A folder that is none of the shared datasets: seg from its masks, cls from its labels (FOLDER:cls)."""
    from conftest import script_main

    from backbone_router.train.training.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", "shapes", n_train=16, n_val=4, size=32, ignore_border=1, seed=0)
    out = tmp_path / "probe.json"
    report = script_main("probe")(["--random", "r=timm:vit_small_patch16_224", "--data-root", str(tmp_path / "data"),
                                   "--tasks", "shapes,shapes:cls", "--size", "32", "--seg-epochs", "1",
                                   "--cls-epochs", "1", "--output", str(out)])
    row = report["results"]["r"]
    assert 0 <= row["shapes_fg_iou"] <= 1 and 0 <= row["shapes_cls_accuracy"] <= 1
    assert len(row["shapes_per_class_iou"]) == 2 and json.loads(out.read_text())["results"]["r"] == row
