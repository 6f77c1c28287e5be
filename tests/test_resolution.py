"""The stride-s ceiling of a task's masks (train/experiments/resolution.py) and the script that reports it (train/ceiling.py)."""

from __future__ import annotations

import doctest
import json
import math

import pytest
import torch
import yaml
from conftest import script_main

import backbone_router.train.experiments.resolution
from backbone_router.router import Router, RouterConfig
from backbone_router.train.experiments.resolution import GridCeiling, GroupIoU, block_prediction
from backbone_router.train.training.errors import RunError
from backbone_router.train.training.metrics import SegMetrics
from backbone_router.train.training.synthetic import write_synthetic_dataset


def test_module_examples_hold():
    result = doctest.testmod(backbone_router.train.experiments.resolution)
    assert result.attempted > 0 and result.failed == 0


def test_block_aligned_stripe_is_carried_exactly_and_a_thin_line_is_not():
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[0, :, :16] = 1  # a column of stride-16 blocks: bilinear upsampling puts the 0.5 level on their edge
    masks[1, :, 8] = 1  # a one-pixel line through the middle of the stride-4 block of columns 8-11
    ceiling = GridCeiling(2, [1, 4, 16], thresholds=(0.5,))
    ceiling.update(masks[:1])
    assert ceiling.compute()["overall"] == {1: 1.0, 4: 1.0, 16: 1.0}
    line = GridCeiling(2, [1, 4, 16])
    line.update(masks[1:])
    got = line.compute()
    # stride 4: the block of columns 8-11 holds the line at fraction 1/4; the best threshold keeps those 4 columns
    assert got["overall"][1] == 1.0 and got["overall"][4] == pytest.approx(0.25)
    assert got["overall"][16] < 0.1 and got["threshold"][4] == 0.1


def test_block_prediction_averages_blocks_and_ignores_ignored_pixels():
    masks = torch.tensor([[[1, 1], [0, 255]]])  # one 2 x 2 block, 255 = ignore (counts for no class)
    frac = block_prediction(masks, 2, 2, ignore_index=255)
    assert frac.shape == (1, 2, 2, 2)
    assert (frac[0, 0] == 0.25).all() and (frac[0, 1] == 0.5).all()
    assert block_prediction(masks, 2, 1, ignore_index=255)[0].tolist() == [[[0, 0], [1, 0]], [[1, 1], [0, 0]]]


def test_group_iou_multiclass_mean_iou_leaves_out_ignored_pixels():
    target = torch.tensor([[[0, 1], [2, 255]]])
    pred = torch.tensor([[[0, 1], [1, 2]]])  # the last pixel is ignored, so its wrong class does not count
    meter = GroupIoU(3, ignore_index=255)
    meter.update(pred, target)
    assert meter.score() == pytest.approx((1 + 1 / 2 + 0) / 3)  # class 0: 1/1, class 1: 1/2, class 2: 0/1
    assert meter.images == {} and meter.score("absent") != meter.score("absent")  # nan for a group never seen


def test_groups_share_found_images_and_thresholds():
    masks = torch.zeros(3, 16, 16, dtype=torch.long)
    masks[0, 2:10, 2:10] = 1  # 64 pixels, group "big"
    masks[1, 4:6, 4:6] = 1  # 4 pixels, group "small"
    pred = torch.zeros_like(masks)
    pred[0] = masks[0]  # found; the small defect is missed; the empty image gets a false positive
    pred[2, 0, 0] = 1
    groups = ["big", "small", "free"]
    meter = GroupIoU(2)
    meter.update(pred, masks, groups)
    assert meter.groups() == ["all", "big", "free", "small"]
    assert meter.score("big") == 1.0 and meter.score("small") == 0.0 and meter.score("free") == 0.0
    assert meter.score() == pytest.approx(64 / (64 + 4 + 1))
    assert (meter.images["all"], meter.found["all"]) == (2, 1) and meter.images["free"] == 0
    ceiling = GridCeiling(2, [1, 8])
    ceiling.update(masks, groups)
    got = ceiling.compute()
    assert got["share"] == pytest.approx({"big": 64 / 68, "small": 4 / 68, "free": 0.0})
    assert got["groups"]["big"][1] == 1.0 and math.isnan(got["groups"]["free"][1])


def test_bad_inputs_name_the_shapes():
    with pytest.raises(ValueError, match=r"strides must be positive ints, got \[0\]"):
        GridCeiling(2, [0])
    with pytest.raises(ValueError, match=r"pred \(1, 4, 4\) and target \(1, 4, 5\)"):
        GroupIoU(2).update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="2 group names for a batch of 1"):
        GroupIoU(2).update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long), ["a", "b"])


# ---- the script -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A synthetic shapes dataset, a config over it, and a tiny saved Router with its two tasks."""
    tmp = tmp_path_factory.mktemp("ceiling")
    write_synthetic_dataset(tmp / "data", "shapes", n_train=8, n_val=12, size=40, ignore_border=1, seed=0)
    model = {
        "extractors": [{"spec": "timm:resnet18", "name": "cnn", "pretrained": False, "layers": [1, 2, 3, 4]}],
        "tasks": [{"name": "shape_seg", "type": "seg"}, {"name": "shape_cls", "type": "cls"}],
        "fusion": "single", "width": 16, "levels": [4, 8, 16, 32], "head": {"seg_hidden": 16, "cls_hidden": 16},
    }
    data = {"root": str(tmp / "data"), "eval_size": 40, "image_size": 40,
            "tasks": [{"name": "shape_seg", "dataset": "shapes"}, {"name": "shape_cls", "dataset": "shapes"}]}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump({"model": model, "data": data}))
    router = Router(RouterConfig.from_dict({**model, "tasks": [{"name": "shape_seg", "type": "seg",
                                                                "classes": ["background", "shape"]},
                                                               {"name": "shape_cls", "type": "cls",
                                                                "classes": ["a", "b", "c"]}]}))
    router.save_pretrained(tmp / "model")
    return tmp


@pytest.mark.slow
def test_script_reports_the_ceiling_and_scores_a_model_as_evaluation_does(shapes, capsys):
    out = shapes / "ceiling.json"
    code = script_main("ceiling")(["--config", str(shapes / "cfg.yaml"), "--strides", "1", "4", "16", "--by-label",
                                   "--model", str(shapes / "model"), "--json", str(out)])
    assert code == 0
    record = json.loads(out.read_text())
    (task,) = record["tasks"]
    assert task["task"] == "shape_seg" and task["images"] == 12 and task["metric"] == "fg_iou"
    overall = {int(s): v for s, v in task["overall"].items()}
    assert overall[1] == 1.0 and overall[1] >= overall[4] >= overall[16] and overall[16] < 1.0
    assert set(task["groups"]) and sum(task["share"].values()) == pytest.approx(1.0)
    # the model's score is the training metric on the same val images
    from backbone_router.train.training.config import ExperimentConfig
    from backbone_router.train.training.data import TaskDataset, load_experiment_data

    cfg = ExperimentConfig.from_file(shapes / "cfg.yaml")
    ds = TaskDataset(load_experiment_data(cfg, shapes / "data")["shape_seg"], "val", cfg.data)
    router = Router.from_pretrained(shapes / "model").eval()
    ref = SegMetrics(["background", "shape"], 255)
    with torch.no_grad():
        for i in range(len(ds)):
            s = ds[i]
            ref.update(router(s["image"][None], task="shape_seg")["seg"].argmax(1), s["target"][None])
    scored = task["models"][str(shapes / "model")]
    assert scored["score"]["all"] == pytest.approx(ref.compute()["fg_iou"], abs=1e-6)
    assert scored["found"]["all"][1] == sum(int((ds[i]["target"] == 1).any()) for i in range(len(ds)))
    printed = capsys.readouterr().out
    assert "shape_seg (shapes, 12 val images" in printed and f"m1 = {shapes / 'model'}" in printed


def test_script_names_a_task_that_is_not_segmentation(shapes):
    with pytest.raises(RunError, match=r"--tasks \['shape_cls'\]: expected segmentation tasks .*\['shape_seg'\]"):
        script_main("ceiling")(["--config", str(shapes / "cfg.yaml"), "--tasks", "shape_cls"])
