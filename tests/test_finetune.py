"""End-to-end fine-tuning through `accelerate launch` subprocesses on a tiny synthetic config (CPU).

One process with batch 2b and two processes with batch b must end with the same weights and metrics; a
run stopped at a checkpoint and resumed must end with the weights of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from backbone_router.train.training.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BACKBONE_ROUTER_DATA", REPO.parent / "shared" / "data"))
SHARED_WEIGHTS = REPO.parent / "shared" / "weights"
pytestmark = pytest.mark.slow

TINY = {
    "model": {
        "extractors": [
            {"spec": "timm:vit_small_patch14_dinov2", "name": "vit14", "pretrained": False, "layers": 2,
             "unfreeze_last": 1, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28}},
            {"spec": "open_clip:tiny-vit-p16", "name": "clip16", "pretrained": False},
        ],
        "tasks": [{"name": "shape_seg", "type": "seg"}, {"name": "shape_cls", "type": "cls"}],
        "fusion": "gated", "width": 16, "levels": [8],
        "gate": {"granularity": "image", "hidden": 16}, "head": {"seg_hidden": 16, "cls_hidden": 32},
    },
    "data": {
        "tasks": [{"name": "shape_seg", "dataset": "shapes", "weight": 1.0},
                  {"name": "shape_cls", "dataset": "shapes", "weight": 1.0}],
        "image_size": 32, "eval_size": 32, "color_jitter": 0.1, "vflip": True,
    },
    "train": {"max_steps": 8, "seed": 1, "batch_size": 4, "eval_batch_size": 6, "lr": 3e-3, "warmup_steps": 2,
              "phase2_step": 4, "phase2_lr_scale": 0.5, "eval_every": 4, "save_every": 4, "log_every": 2,
              "keep_last": 2},
}


def launch(args: list[str], processes: int = 1, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no"]
    cmd += ["--multi_gpu", "--num_processes", str(processes)] if processes > 1 else ["--num_processes", "1"]
    cmd += [str(REPO / "train" / "finetune.py"), *args]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=run_env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune")
    write_synthetic_dataset(tmp / "data", "shapes", n_train=40, n_val=10, size=40, ignore_border=1, seed=0)
    cfg = dict(TINY, data={**TINY["data"], "root": str(tmp / "data")})
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return tmp


@pytest.fixture(scope="module")
def one_process(setup):
    """One process, batch 4: the reference run."""
    out = setup / "one"
    proc = launch(["--config", str(setup / "tiny.yaml"), "--output-dir", str(out)])
    return out, proc


@pytest.fixture(scope="module")
def two_processes(setup):
    """Two processes (CPU, gloo), batch 2 each: the same global batch as the reference run."""
    out = setup / "two"
    proc = launch(["--config", str(setup / "tiny.yaml"), "--output-dir", str(out), "train.batch_size=2"], processes=2)
    return out, proc


def test_one_process_run_writes_everything(one_process):
    run, proc = one_process
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["tasks"][0]["classes"] == ["background", "shape"]  # resolved from meta.json
    assert config["model"]["tasks"][0]["ignore_index"] == 255
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_4", "step_8"]
    assert (run / "checkpoints/step_8/trainer_state.json").is_file()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    lines = metrics(run)
    assert [r["step"] for r in lines] == [4, 8]
    seg, cls = lines[-1]["tasks"]["shape_seg"], lines[-1]["tasks"]["shape_cls"]
    for key in ("mIoU", "mDice", "mPrecision", "mRecall", "fg_iou", "fg_dice", "fg_fraction_pred", "fg_fraction_true"):
        assert key in seg
    assert seg["sweep"]["thresholds"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert all(len(seg["sweep"][k]) == 9 for k in ("precision", "recall", "iou", "fpr"))
    assert 0 < seg["fg_fraction_true"] < 0.5
    assert {"accuracy", "balanced_accuracy", "macro_f1"} <= set(cls)
    for task in (seg, cls):
        assert set(task["gate"]) == {"vit14", "clip16"} and abs(sum(task["gate"].values()) - 1) < 1e-5
    assert "phase 2" in proc.stdout + proc.stderr
    assert "quickstart" not in proc.stdout  # real-looking data dir, so no quickstart banner
    assert "run finished" in proc.stdout and "shape_seg" in proc.stdout


def test_two_processes_equal_one_process_with_double_batch(one_process, two_processes):
    (one, _), (two, proc) = one_process, two_processes
    assert "2 process(es) x 2" in proc.stdout
    assert max_diff(final_weights(one), final_weights(two)) < 1e-4
    m1, m2 = metrics(one)[-1]["tasks"], metrics(two)[-1]["tasks"]
    for task in m1:
        for key in ("mIoU", "fg_iou", "accuracy", "balanced_accuracy"):
            if key in m1[task]:
                assert m1[task][key] == pytest.approx(m2[task][key], abs=1e-3), (task, key)
        for e in m1[task]["gate"]:
            assert m1[task]["gate"][e] == pytest.approx(m2[task]["gate"][e], abs=1e-4)


def test_resume_after_interruption_ends_with_the_same_weights(setup, one_process):
    one, _ = one_process
    out = setup / "resumed"
    stopped = launch(["--config", str(setup / "tiny.yaml"), "--output-dir", str(out), "--stop-at", "4"])
    assert "stopped after step 4" in stopped.stdout and not (out / "final").exists()
    assert [r["step"] for r in metrics(out)] == [4]
    from conftest import script_main

    from backbone_router.train.training.errors import RunError

    with pytest.raises(RunError, match=r"holds a previous run \(config\.yaml, metrics\.jsonl, checkpoints/.*\); pass --resume"):
        script_main("finetune")(["--config", str(setup / "tiny.yaml"), "--output-dir", str(out)])
    resumed = launch(["--output-dir", str(out), "--resume"])  # config read back from the output dir
    assert "resumed from" in resumed.stdout and "(step 4)" in resumed.stdout
    assert max_diff(final_weights(one), final_weights(out)) < 1e-6
    assert [r["step"] for r in metrics(out)] == [4, 8]
    assert metrics(out)[-1]["tasks"] == metrics(one)[-1]["tasks"]


def test_from_pretrained_on_the_output_predicts(one_process):
    from backbone_router.router import Router

    run, _ = one_process
    model = Router.from_pretrained(run / "final")
    images = [torch.rand(3, 37, 45), torch.rand(1, 30, 30)]
    masks = model.predict(images, task="shape_seg")
    assert [tuple(m["mask"].shape) for m in masks] == [(37, 45), (30, 30)]
    assert masks[0]["classes"] == ["background", "shape"]  # the class names the run read from meta.json
    labels = model.predict(images, task="shape_cls", top_k=1)
    assert [len(top) for top in labels] == [1, 1]
    assert all(top[0]["label"] in ("circle", "square", "triangle") for top in labels)
    # the saved model is the trained one: its eval logits equal those of the last checkpoint's weights
    ckpt = load_file(str(run / "checkpoints/step_8/model.safetensors"))
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in ckpt.items() if k.startswith(("seg_head", "gate", "extractors.vit14")))
    # the model card carries the run's final metrics and the gate per task and level
    card = (run / "final" / "README.md").read_text()
    final = metrics(run)[-1]["tasks"]
    assert f"{final['shape_cls']['accuracy']:.4f}"[:5] in card and "shape_seg" in card
    assert "library_name: backbone-router" in card and "## Gate" in card and "## Metrics" in card
    assert "](gate_heatmap.png)" in card and (run / "final" / "gate_heatmap.png").stat().st_size > 1000  # drawn


def test_auxiliary_head_is_trained_by_finetune(setup):
    """A pyramid with head.aux_weight > 0: fine-tuning trains the auxiliary stride-16 head (it gets
    gradients only from its own loss term), and the saved model keeps it and its weight."""
    from accelerate.utils import set_seed

    from backbone_router.router import Router, RouterConfig

    out = setup / "aux"
    launch(["--config", str(setup / "tiny.yaml"), "--output-dir", str(out), "model.levels=[4,8,16]",
            "model.head.aux_weight=0.4", "train.max_steps=4", "train.phase2_step=4"])
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["levels"] == [4, 8, 16] and config["head"]["aux_weight"] == 0.4
    trained = final_weights(out)
    set_seed(TINY["train"]["seed"])  # finetune.py's initial weights
    init = Router(RouterConfig.from_dict(config)).state_dict()
    trunk = [k for k in init if k.startswith("aux_seg_head.trunk.")]
    frozen = [k for k in init if k.startswith("extractors.clip16.")]  # the same initial weights: frozen ones equal
    assert frozen and all(torch.equal(trained[k], init[k]) for k in frozen)
    assert trunk and all(not torch.equal(trained[k], init[k]) for k in trunk)


def test_non_finite_loss_stops_naming_step_and_task(setup):
    out = setup / "nan"
    proc = launch(["--config", str(setup / "tiny.yaml"), "--output-dir", str(out), "train.loss_weights.shape_cls=1e39",  # inf in float32
                   "train.save_every=2"], check=False)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "non-finite loss at step" in text and "task 'shape_cls'" in text
    assert not (out / "final").exists()


@pytest.mark.real_data
@pytest.mark.skipif(not (SHARED_DATA / "mtd").is_dir(), reason=f"real datasets not found at {SHARED_DATA}")
@pytest.mark.skipif(not (SHARED_WEIGHTS / "mobilenet_v2-b0353104.pth").is_file(), reason=f"real weights not found at {SHARED_WEIGHTS}")
def test_real_data_two_steps(tmp_path):
    out = tmp_path / "real"
    proc = launch([
        "--config", "configs/mtd_camvid_flowers.yaml", "--output-dir", str(out), f"data.root={SHARED_DATA}",
        "train.max_steps=2", "train.batch_size=2", "train.eval_every=2", "train.save_every=2", "train.warmup_steps=1",
        "data.image_size=64", "data.eval_size=64", "data.tasks.2.image_size=64", "data.tasks.2.eval_size=64",
        "data.num_workers=0", "train.prior_init=false",
        *[f"data.tasks.{i}.max_val_items=4" for i in range(4)],
    ])
    assert "mtd_defect_seg: mtd (seg, 2 classes, greyscale) train 933 / val 4" in proc.stdout
    last = metrics(out)[-1]["tasks"]
    assert set(last) == {"mtd_defect_seg", "mtd_defect_type", "camvid_seg", "flowers_cls"}
    assert len(last["camvid_seg"]["iou"]) == 11


def test_extractor_batchnorm_statistics_stay_fixed_in_phase2():
    from backbone_router.router import Router, RouterConfig
    from backbone_router.train.training.phase2 import set_train_mode

    cfg = RouterConfig.from_dict({
        "extractors": [{"spec": "timm:mobilenetv2_100", "name": "mnv2", "pretrained": False, "unfreeze_last": 1}],
        "tasks": [{"name": "a", "type": "cls", "classes": ["x", "y"]}], "fusion": "single", "width": 16,
        "head": {"cls_hidden": 16},
    })
    model = Router(cfg)
    model.extractors["mnv2"].unfreeze_last(1)
    bns = [m for m in model.extractors.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    set_train_mode(model, freeze_bn_stats=True)
    assert bns and not any(m.training for m in bns) and model.cls_head.training
    before = [m.running_mean.clone() for m in bns]
    model(torch.rand(2, 3, 64, 64), task="a")["cls"].sum().backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert any(p.grad is not None for m in bns for p in m.parameters())  # their affine weights still train
    set_train_mode(model, freeze_bn_stats=False)
    assert any(m.training for m in bns)
