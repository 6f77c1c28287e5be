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

from backbone_router.router.config import TaskConfig
from backbone_router.train.training.config import DataConfig, DataTaskConfig, ExperimentConfig, apply_override
from backbone_router.train.training.data import (
    RankBatchSampler,
    TaskDataset,
    TaskSchedule,
    foreground_prior,
    load_experiment_data,
    load_task_data,
    read_mask,
    train_transform,
)
from backbone_router.train.training.synthetic import IGNORE_INDEX, write_synthetic_dataset

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
    with pytest.raises(ValueError, match=r"shape_00005.png: mask values \[7\] outside the classes"):
        _load(broken.parent)  # every mask is decoded when the task is loaded
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
    with pytest.raises(FileNotFoundError, match=r"masks/shape_00002\.\(png\): no mask \(task 't'\) for stem 'shape_00002'"):
        _load(broken.parent)
    rows = (broken / "labels.csv").read_text().splitlines()
    (broken / "labels.csv").write_text("\n".join(r for r in rows if not r.startswith("shape_00001")) + "\n")
    with pytest.raises(ValueError, match="labels.csv: no label for stem 'shape_00001'"):
        _load(broken.parent, task_type="cls")


# ---- start-up checks that decode every file (issue 12) ------------------------------------------------------
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("split_index", [3, 30])  # a training image, a validation image
def test_truncated_image_fails_when_the_task_is_loaded(broken, split_index):
    png = broken / "images" / f"shape_{split_index:05d}.png"
    bad = png.with_suffix(".jpg")  # a JPEG: its header says all a header-only check reads (a PNG's EXIF read decodes it)
    Image.open(png).save(bad, quality=95)
    png.unlink()
    _truncate(bad)
    with pytest.raises(ValueError, match=rf"shape_{split_index:05d}\.jpg: unreadable image \(OSError: image file is truncated"):
        _load(broken.parent)


def test_csv_with_a_utf8_bom_and_upper_case_suffixes_load(broken):
    for name in ("splits.csv", "labels.csv"):
        (broken / name).write_bytes(b"\xef\xbb\xbf" + (broken / name).read_bytes())  # Excel's "CSV UTF-8"
    (broken / "images" / "shape_00001.png").rename(broken / "images" / "shape_00001.PNG")
    (broken / "masks" / "shape_00001.png").rename(broken / "masks" / "shape_00001.Png")
    seg, _ = _load(broken.parent)
    cls, _ = _load(broken.parent, task_type="cls")
    assert len(seg.train) == 24 and seg.train[1].image.name == "shape_00001.PNG" and seg.train[1].mask.name == "shape_00001.Png"
    first = (broken / "labels.csv").read_text(encoding="utf-8-sig").splitlines()[1].split(",")
    assert cls.train[0].stem == first[0] and cls.train[0].label == int(first[2])


def test_file_names_are_compared_after_nfc_and_a_missing_stem_names_the_near_miss(broken):
    import unicodedata

    nfc_stem, nfd_stem = unicodedata.normalize("NFC", "café_1"), unicodedata.normalize("NFD", "café_1")
    assert nfc_stem != nfd_stem
    for folder in ("images", "masks"):  # the files in NFD (as macOS writes them), the CSVs in NFC
        (broken / folder / "shape_00002.png").rename(broken / folder / f"{nfd_stem}.png")
    for name in ("splits.csv", "labels.csv"):
        (broken / name).write_text((broken / name).read_text().replace("shape_00002", nfc_stem), encoding="utf-8")
    seg, _ = _load(broken.parent)
    cls, _ = _load(broken.parent, task_type="cls")
    assert seg.train[2].stem == nfc_stem and seg.train[2].image.name == f"{nfd_stem}.png"
    assert cls.train[2].stem == nfc_stem
    # a stem that differs from its file in case only: an error naming the file
    (broken / "images" / "shape_00004.png").rename(broken / "images" / "Shape_00004.png")
    with pytest.raises(FileNotFoundError, match=r"no image listed in splits.csv for stem 'shape_00004'; near miss: 'Shape_00004\.png'"):
        _load(broken.parent)
    (broken / "images" / "Shape_00004.png").rename(broken / "images" / "shape_0004.png")  # a typo
    with pytest.raises(FileNotFoundError, match=r"for stem 'shape_00004'; near miss: 'shape_0004\.png'"):
        _load(broken.parent)


def test_a_stem_in_two_splits_is_an_error_naming_both(broken):
    (broken / "splits.csv").write_text((broken / "splits.csv").read_text() + "shape_00003,val\n")
    with pytest.raises(ValueError, match=r"splits.csv: stem 'shape_00003' is in split 'train' \(line 5\) and in split "
                                         r"'val' \(line 34\); a stem belongs to one split"):
        _load(broken.parent)


def test_mask_size_after_exif_rotation_says_so(broken):
    image = broken / "images" / "shape_00004.png"
    arr = np.array(Image.open(image))
    h, w = arr.shape[:2]
    wide = np.zeros((h, w + 8, 3), np.uint8)  # a non-square image whose mask fits the stored, not the displayed size
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(wide).save(image, exif=exif)
    Image.fromarray(np.zeros((h, w + 8), np.uint8)).save(broken / "masks" / "shape_00004.png")
    with pytest.raises(ValueError, match=rf"shape_00004\.png: mask is {w + 8}x{h} \(w x h\) but its image shape_00004\.png "
                                         rf"is {h}x{w + 8} as displayed \(its EXIF orientation 6 turns the stored {w + 8}x{h}"):
        _load(broken.parent)


def test_masks_are_decoded_once_when_loaded_and_the_prior_uses_those_counts(broken, monkeypatch):
    import backbone_router.train.training.data as data_module

    calls = []
    real = data_module.read_mask
    monkeypatch.setattr(data_module, "read_mask", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    td, _ = _load(broken.parent)
    assert len(calls) == len(td.train) + len(td.val) == len(set(calls))
    prior = foreground_prior(td)
    assert len(calls) == len(td.train) + len(td.val)  # no second read
    fg = sum(int((real(it.mask, 2, IGNORE_INDEX) == 1).sum()) for it in td.train)
    valid = sum(int((real(it.mask, 2, IGNORE_INDEX) != IGNORE_INDEX).sum()) for it in td.train)
    assert prior == pytest.approx(fg / valid)


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


def test_overriding_the_tasks_drops_the_default_losses_of_the_dropped_ones():
    """The file's tasks get per-task default losses written out; a `model.tasks` override that keeps one task
    must not then fail on the defaults of the others. A loss the user set for a dropped task is still an error."""
    only_seg = ['model.tasks=[{"name":"shape_seg","type":"seg"}]', 'data.tasks=[{"name":"shape_seg","dataset":"shapes"}]']
    cfg = ExperimentConfig.from_file(REPO / "configs/quickstart.yaml", only_seg)
    assert list(cfg.train.loss) == ["shape_seg"] and cfg.train.loss_weights == {"shape_seg": 1.0}
    assert cfg.train.loss["shape_seg"][1]["name"] == "dice"
    with pytest.raises(ValueError, match=r"train.loss_weights: unknown task\(s\) \['shape_cls'\]"):
        ExperimentConfig.from_file(REPO / "configs/quickstart.yaml", [*only_seg, "train.loss_weights.shape_cls=2.0"])
    with pytest.raises(ValueError, match=r"train.loss: unknown task\(s\) \['shape_cls'\]"):  # a deeper key too
        ExperimentConfig.from_file(REPO / "configs/quickstart.yaml", [*only_seg, "train.loss.shape_cls.0.weight=2.0"])


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
