"""Data layout parsing, aligned augmentation, bad-data errors, the task schedule, and experiment configs."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from router.config import TaskConfig
from train.config import DataConfig, DataTaskConfig, ExperimentConfig, apply_override
from train.data import (
    RankBatchSampler,
    TaskDataset,
    TaskSchedule,
    foreground_prior,
    load_experiment_data,
    load_task_data,
    read_mask,
    train_transform,
)
from train.synthetic import IGNORE_INDEX, write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BACKBONE_ROUTER_DATA", REPO.parent / "shared" / "data"))


def _data_cfg(**kw) -> DataConfig:
    tasks = kw.pop("tasks", [DataTaskConfig("seg", "shapes"), DataTaskConfig("cls", "shapes")])
    return DataConfig(tasks=tasks, image_size=32, eval_size=[24, 40], color_jitter=0.0, **kw)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(root, "shapes", n_train=24, n_val=8, size=48, ignore_border=1, seed=1)
    return root


def _copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- layout ------------------------------------------------------------------------------------------
def test_layout_seg_and_cls_from_one_folder(shapes_root):
    data = _data_cfg()
    seg = load_task_data(TaskConfig("seg", "seg"), data.task("seg"), shapes_root, data)
    cls = load_task_data(TaskConfig("cls", "cls"), data.task("cls"), shapes_root, data)
    assert seg.task.classes == ["background", "shape"] and seg.task.ignore_index == IGNORE_INDEX
    assert cls.task.classes == ["circle", "square", "triangle"] and cls.task.ignore_index is None
    assert (len(seg.train), len(seg.val), len(cls.train), len(cls.val)) == (24, 8, 24, 8)
    assert seg.channels == 3 and not seg.val_carved
    labels = {r.split(",")[0]: int(r.split(",")[2]) for r in (shapes_root / "shapes/labels.csv").read_text().split()[1:]}
    assert all(it.label == labels[it.stem] for it in cls.train)

    sample = TaskDataset(seg, "val", data)[0]
    assert sample["image"].shape == (3, 24, 40) and sample["target"].shape == (24, 40)
    assert set(sample["target"].unique().tolist()) <= {0, 1, IGNORE_INDEX}
    train_sample = TaskDataset(cls, "train", data)[(0, 123)]
    assert train_sample["image"].shape == (3, 32, 32) and train_sample["target"].ndim == 0


def test_config_classes_must_match_meta(shapes_root):
    data = _data_cfg()
    with pytest.raises(ValueError, match="meta.json"):
        load_task_data(TaskConfig("seg", "seg", classes=["bg", "fg"]), data.task("seg"), shapes_root, data)


def test_greyscale_dataset_stays_one_channel(shapes_root, tmp_path):
    folder = _copy_dataset(shapes_root / "shapes", tmp_path / "grey")
    for p in (folder / "images").iterdir():
        Image.open(p).convert("L").save(p)
    data = _data_cfg(tasks=[DataTaskConfig("seg", "grey")])
    td = load_task_data(TaskConfig("seg", "seg"), data.task("seg"), tmp_path, data)
    assert td.channels == 1
    sample = TaskDataset(td, "train", data)[(3, 7)]
    assert sample["image"].shape == (1, 32, 32)


def test_val_carved_from_train_by_fixed_seed(shapes_root, tmp_path):
    folder = _copy_dataset(shapes_root / "shapes", tmp_path / "noval")
    rows = (folder / "splits.csv").read_text().split()
    (folder / "splits.csv").write_text("\n".join([rows[0]] + [r.replace(",val", ",train") for r in rows[1:]]) + "\n")
    data = _data_cfg(tasks=[DataTaskConfig("cls", "noval")], val_fraction=0.25, val_seed=3)
    a = load_task_data(TaskConfig("cls", "cls"), data.task("cls"), tmp_path, data)
    b = load_task_data(TaskConfig("cls", "cls"), data.task("cls"), tmp_path, data)
    assert a.val_carved and len(a.train) + len(a.val) == 32
    assert [i.stem for i in a.val] == [i.stem for i in b.val]  # the same val set every time
    assert not {i.stem for i in a.val} & {i.stem for i in a.train}
    per_class = Counter(i.label for i in a.train + a.val)
    val_class = Counter(i.label for i in a.val)
    assert all(val_class[c] == max(1, round(n * 0.25)) for c, n in per_class.items())  # stratified


# ---- augmentation ------------------------------------------------------------------------------------
def test_augmentation_keeps_mask_aligned():
    # An asymmetric mask (an L shape off-centre) written into the image's red channel: after any crop /
    # flip the thresholded image must still equal the mask, apart from resampling at the edges.
    mask = torch.zeros(60, 90, dtype=torch.long)
    mask[10:50, 15:25] = 1
    mask[40:50, 15:70] = 1
    image = torch.stack([mask.float(), torch.zeros_like(mask, dtype=torch.float), 1 - mask.float()])
    data = DataConfig(tasks=[DataTaskConfig("t", "d")], crop_scale=[0.3, 1.0], hflip=True, vflip=True, color_jitter=0.0)
    changed = 0
    for seed in range(20):
        img, m = train_transform(image, mask, 48, data, torch.Generator().manual_seed(seed))
        assert img.shape == (3, 48, 48) and m.shape == (48, 48) and m.dtype == torch.long
        agree = ((img[0] > 0.5).long() == m).float().mean()
        assert agree > 0.995, f"seed {seed}: image and mask agree on {agree:.3f} of pixels only"
        # a misaligned pair (mask flipped alone) must not pass the same check where the mask is not symmetric
        if m.float().mean() > 0.05 and not torch.equal(m, m.flip(-1)):
            changed += int(((img[0] > 0.5).long() == m.flip(-1)).float().mean() < 0.995)
    assert changed > 0


def test_augmentation_is_a_function_of_the_seed(shapes_root):
    data = DataConfig(tasks=[DataTaskConfig("seg", "shapes")], image_size=32, color_jitter=0.2)
    td = load_task_data(TaskConfig("seg", "seg"), data.task("seg"), shapes_root, data)
    ds = TaskDataset(td, "train", data)
    a, b, c = ds[(5, 42)], ds[(5, 42)], ds[(5, 43)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    assert not torch.equal(a["image"], c["image"])


# ---- bad data: each error names the file -----------------------------------------------------------------
@pytest.fixture
def broken(shapes_root, tmp_path):
    return _copy_dataset(shapes_root / "shapes", tmp_path / "broken")


def _load(root: Path, task_type: str = "seg", **kw):
    data = _data_cfg(tasks=[DataTaskConfig("t", "broken", **kw)])
    return load_task_data(TaskConfig("t", task_type), data.task("t"), root, data), data


def test_unreadable_image_names_the_file(broken):
    bad = broken / "images" / "shape_00003.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="shape_00003.png: unreadable image"):
        _load(broken.parent)


def test_mask_size_differs_names_the_file(broken):
    bad = broken / "masks" / "shape_00004.png"
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad)
    with pytest.raises(ValueError, match="shape_00004.png: mask is 12x10"):
        _load(broken.parent)


def test_mask_values_outside_classes_name_the_file(broken):
    bad = broken / "masks" / "shape_00005.png"
    arr = np.array(Image.open(bad))
    arr[0, 0] = 7
    Image.fromarray(arr).save(bad)
    td, data = _load(broken.parent)  # headers are fine; the values are checked when read
    with pytest.raises(ValueError, match=r"shape_00005.png: mask values \[7\] outside the classes"):
        TaskDataset(td, "train", data)[(5, 0)]
    with pytest.raises(ValueError, match="shape_00005.png"):
        foreground_prior(td)
    assert read_mask(broken / "masks" / "shape_00006.png", 2, IGNORE_INDEX).max() == IGNORE_INDEX  # ignore is fine
    with pytest.raises(ValueError, match=r"shape_00006.png: mask values \[255\]"):
        read_mask(broken / "masks" / "shape_00006.png", 2, None)  # without ignore_index, 255 is out of range


def test_split_with_no_items_names_splits_csv(broken):
    with pytest.raises(ValueError, match=r"splits.csv: split 'test' has no items"):
        _load(broken.parent, train_split="test")


def test_missing_labels_csv_names_it(broken):
    (broken / "labels.csv").unlink()
    with pytest.raises(FileNotFoundError, match="labels.csv: missing"):
        _load(broken.parent, task_type="cls")


def test_missing_mask_and_label_name_the_file(broken):
    (broken / "masks" / "shape_00002.png").unlink()
    with pytest.raises(FileNotFoundError, match="shape_00002.png: missing mask"):
        _load(broken.parent)
    rows = (broken / "labels.csv").read_text().splitlines()
    (broken / "labels.csv").write_text("\n".join(r for r in rows if not r.startswith("shape_00001")) + "\n")
    with pytest.raises(ValueError, match="labels.csv: no label for stem 'shape_00001'"):
        _load(broken.parent, task_type="cls")


# ---- the task schedule ------------------------------------------------------------------------------------
def test_schedule_same_task_on_every_rank_and_global_batch_split():
    sizes, weights = [50, 7, 20], [2.0, 1.0, 1.0]
    one = list(RankBatchSampler(TaskSchedule(sizes, weights, 8, seed=5), 0, 1, 0, 40))
    r0 = list(RankBatchSampler(TaskSchedule(sizes, weights, 8, seed=5), 0, 2, 0, 40))
    r1 = list(RankBatchSampler(TaskSchedule(sizes, weights, 8, seed=5), 1, 2, 0, 40))
    for full, a, b in zip(one, r0, r1):
        assert len(a) == len(b) == 4
        assert {k[0] for k in a} == {k[0] for k in b} == {full[0][0]}  # one task per step, the same on all ranks
        assert a + b == full  # the two ranks hold the halves of the one-process batch, augmentation seeds too
    # task frequencies follow the weights; every item of a small task is visited once per epoch
    schedule = TaskSchedule(sizes, weights, 8, seed=5)
    tasks = Counter(schedule.task_of(i) for i in range(4000))
    assert abs(tasks[0] / 4000 - 0.5) < 0.04 and abs(tasks[1] / 4000 - 0.25) < 0.04
    small = [item for i in range(4000) if schedule.task_of(i) == 1 for item, _ in schedule.batch(i)[1]][:7 * 8]
    assert all(sorted(small[e * 7:(e + 1) * 7]) == list(range(7)) for e in range(8))


def test_schedule_resumes_mid_run_and_depends_on_seed():
    full = list(RankBatchSampler(TaskSchedule([30, 30], [1, 1], 4, seed=0), 0, 1, 0, 30))
    tail = list(RankBatchSampler(TaskSchedule([30, 30], [1, 1], 4, seed=0), 0, 1, 17, 30))
    assert tail == full[17:]
    other = list(RankBatchSampler(TaskSchedule([30, 30], [1, 1], 4, seed=1), 0, 1, 0, 30))
    assert other != full


# ---- experiment config --------------------------------------------------------------------------------------
def test_overrides_type_checked_and_unknown_keys_named():
    cfg = ExperimentConfig.from_file(REPO / "configs/quickstart.yaml",
                                     ["train.max_steps=20", "train.seed=3", "model.fusion=concat", "train.lr=1e-3",
                                      "model.extractors.0.unfreeze_last=2", "data.eval_size=[32, 48]"])
    assert (cfg.train.max_steps, cfg.train.seed, cfg.model.fusion, cfg.train.lr) == (20, 3, "concat", 1e-3)
    assert cfg.model.extractors[0].unfreeze_last == 2 and cfg.data.eval_size == [32, 48]
    assert cfg.train.loss["shape_seg"][1]["name"] == "dice"  # per-type default losses are written out
    with pytest.raises(ValueError, match="unknown key 'train.max_step'"):
        ExperimentConfig.from_file(REPO / "configs/quickstart.yaml", ["train.max_step=20"])
    with pytest.raises(TypeError, match="train.max_steps: expected int"):
        ExperimentConfig.from_file(REPO / "configs/quickstart.yaml", ["train.max_steps=abc"])
    with pytest.raises(ValueError, match="fusion"):
        ExperimentConfig.from_file(REPO / "configs/quickstart.yaml", ["model.fusion=sum"])
    tree = {"a": {"b": [1, 2]}}
    with pytest.raises(ValueError, match="list index"):
        apply_override(tree, "a.b.5=3")


def test_unknown_key_in_file_is_named(tmp_path):
    raw = {"model": {"extractors": [{"spec": "timm:resnet18"}], "tasks": [{"name": "a", "type": "cls"}]},
           "data": {"tasks": [{"name": "a", "dataset": "x", "wieght": 2}]}}
    (tmp_path / "c.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"data.tasks\[0\]: unknown key\(s\) \['wieght'\]"):
        ExperimentConfig.from_file(tmp_path / "c.json")
    raw["data"]["tasks"][0] = {"name": "b", "dataset": "x"}
    (tmp_path / "c.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="must name exactly the model tasks"):
        ExperimentConfig.from_file(tmp_path / "c.json")


# ---- the real datasets in ../shared/data -------------------------------------------------------------------
@pytest.mark.real_data
@pytest.mark.skipif(not (SHARED_DATA / "mtd").is_dir(), reason=f"real datasets not found at {SHARED_DATA}")
def test_real_layout_mtd_camvid_flowers():
    cfg = ExperimentConfig.from_file(REPO / "configs/mtd_camvid_flowers.yaml")
    tasks = load_experiment_data(cfg, SHARED_DATA)
    mtd_seg, mtd_cls = tasks["mtd_defect_seg"], tasks["mtd_defect_type"]
    assert (len(mtd_seg.train), len(mtd_seg.val)) == (933, 208) and mtd_seg.channels == 1
    assert mtd_cls.task.classes == ["Free", "Blowhole", "Break", "Crack", "Fray", "Uneven"]
    camvid = tasks["camvid_seg"]
    assert camvid.task.num_classes == 11 and camvid.task.ignore_index == 11 and camvid.channels == 3
    flowers = tasks["flowers_cls"]
    assert flowers.val_carved and len(flowers.train) + len(flowers.val) == 720 and len(flowers.task.classes) == 12
    sample = TaskDataset(camvid, "train", cfg.data)[(0, 1)]
    assert set(sample["target"].unique().tolist()) <= set(range(11)) | {11}
