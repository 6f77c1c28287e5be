"""Errors a person reads once: a misspelled key names the nearest known one; masks saved as 0/255 are caught by the
data check, with what to do, before any model is built."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from backbone_router.router.config import RouterConfig, TaskConfig
from backbone_router.train.selfsup.pretrain_config import load_pretrain_config
from backbone_router.train.training.config import DataConfig, DataTaskConfig, ExperimentConfig
from backbone_router.train.training.data import load_task_data
from backbone_router.train.training.synthetic import IGNORE_INDEX, write_synthetic_dataset


def test_a_misspelled_key_suggests_the_nearest_known_one():
    with pytest.raises(ValueError, match=r"unknown key 'train.max_step' \(did you mean 'train.max_steps'\?\)"):
        ExperimentConfig.from_file("configs/quickstart.yaml", ["train.max_step=3"])
    with pytest.raises(ValueError, match=r"'model.gate.granularty' \(did you mean 'model.gate.granularity'\?\)"):
        ExperimentConfig.from_file("configs/quickstart.yaml", ["model.gate.granularty=task"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['fusoin'\] \(did you mean 'fusion'\?\)"):
        RouterConfig.from_dict({"extractors": [{"spec": "x"}], "tasks": [{"name": "t", "type": "cls"}], "fusoin": "x"})
    with pytest.raises(ValueError, match=r"model.tasks\[0\]: unknown key\(s\) \['clases'\] \(did you mean 'classes'"):
        RouterConfig.from_dict({"extractors": [{"spec": "x"}], "tasks": [{"name": "t", "type": "cls", "clases": []}]})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_stesp'\] \(did you mean 'max_steps'\?\)"):
        load_pretrain_config("configs/pretrain_mae.yaml", ["train.max_stesp=2"])
    with pytest.raises(ValueError) as err:  # nothing close: no guess
        ExperimentConfig.from_file("configs/quickstart.yaml", ["train.zzz=1"])
    assert "did you mean" not in str(err.value)


@pytest.fixture
def binary_dataset(tmp_path):
    write_synthetic_dataset(tmp_path, "shapes", n_train=6, n_val=2, size=32, ignore_border=0, seed=0)
    return tmp_path / "shapes"


def _load_seg(folder, **task):
    data = DataConfig(tasks=[DataTaskConfig("seg", folder.name)], image_size=32, eval_size=32)
    return load_task_data(TaskConfig("seg", "seg", **task), data.task("seg"), folder.parent, data)


def _save_masks_as_0_255(folder):
    for p in (folder / "masks").iterdir():
        m = np.asarray(Image.open(p))
        Image.fromarray(np.where(m == 1, 255, 0).astype(np.uint8)).save(p)


def test_0_255_masks_with_ignore_index_255_are_caught_by_the_data_check_with_what_to_do(binary_dataset):
    meta = json.loads((binary_dataset / "meta.json").read_text())
    (binary_dataset / "meta.json").write_text(json.dumps({**meta, "ignore_index": IGNORE_INDEX}))  # 255: many datasets'
    _save_masks_as_0_255(binary_dataset)
    with pytest.raises(ValueError, match=r"hold only class 0 and ignore_index 255 \(\d+\.\d % of pixels\).*"
                                         r"Masks saved as 0/255\? Save class indices \(0 = 'background', 1 = 'shape'\)"):
        _load_seg(binary_dataset)


def test_0_255_masks_without_ignore_index_say_to_save_class_indices(binary_dataset):
    assert "ignore_index" not in json.loads((binary_dataset / "meta.json").read_text())
    _save_masks_as_0_255(binary_dataset)
    with pytest.raises(ValueError, match=r"mask values \[255\] outside the classes \(0..1\); masks saved as 0/255\?"):
        _load_seg(binary_dataset)


def test_masks_with_only_the_background_class_are_an_error(binary_dataset, tmp_path):
    empty = shutil.copytree(binary_dataset, tmp_path / "empty")
    for p in (empty / "masks").iterdir():
        Image.fromarray(np.zeros_like(np.asarray(Image.open(p)))).save(p)
    with pytest.raises(ValueError, match=r"hold only class 0 \('background'\); a segmentation task needs pixels"):
        _load_seg(empty)
    assert _load_seg(binary_dataset).task.classes == ["background", "shape"]  # the untouched masks load
