"""train/predict.py end to end on a tiny saved model: palette PNG masks (the dataset's colours when known) and a CSV
of top-k labels, the same predictions as Router.predict."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from conftest import script_main
from PIL import Image

from backbone_router.router import Router, RouterConfig
from backbone_router.train.training.errors import RunError
from backbone_router.train.training.predicting import default_palette, find_images

TINY = {
    "extractors": [{"spec": "timm:vit_small_patch16_224", "name": "vit", "pretrained": False,
                    "kwargs": {"embed_dim": 16, "depth": 1, "num_heads": 2, "img_size": 32}}],
    "tasks": [{"name": "seg_a", "type": "seg", "classes": ["bg", "crack", "hole"]},
              {"name": "cls_b", "type": "cls", "classes": ["x", "y", "z"]}],
    "width": 16, "gate": {"hidden": 8}, "head": {"seg_hidden": 8, "cls_hidden": 8},
}
COLOURS = [[10, 20, 30], [200, 0, 0], [0, 0, 250]]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as train/finetune.py leaves it: final/ (the saved model), config.yaml naming the dataset, whose
    meta.json has class colours; and a folder of images of two sizes."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    model = Router(RouterConfig.from_dict(TINY)).eval()
    model.save_pretrained(root / "run" / "final")
    (root / "data" / "cracks").mkdir(parents=True)
    (root / "data" / "cracks" / "meta.json").write_text(json.dumps({"classes": ["bg", "crack", "hole"],
                                                                      "colors": COLOURS}))
    config = {"model": TINY, "data": {"root": str(root / "data"), "tasks": [{"name": "seg_a", "dataset": "cracks"},
                                                                             {"name": "cls_b", "dataset": "cracks"}]}}
    (root / "run" / "config.yaml").write_text(yaml.safe_dump(config))
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for i, (h, w) in enumerate([(40, 52), (33, 45), (40, 52)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "photos" / f"p{i}.png")
    Image.fromarray(rng.integers(0, 255, (30, 31), dtype=np.uint8)).save(root / "grey.jpg")
    return root, model


def test_predict_writes_palette_masks_and_a_csv_that_match_router_predict(run):
    root, model = run
    out = root / "out"
    inputs = [str(root / "photos"), str(root / "grey.jpg")]
    assert script_main("predict")([str(root / "run" / "final"), *inputs, "--output-dir", str(out), "--top-k", "2",
                                   "--batch-size", "2"]) == 0
    images = find_images(inputs)
    assert [p.name for p in images] == ["p0.png", "p1.png", "p2.png", "grey.jpg"]
    expected = model.predict(images, task="seg_a")
    for path, pred in zip(images, expected):
        png = Image.open(out / "seg_a" / f"{path.stem}.png")
        assert png.mode == "P" and png.size == Image.open(path).size
        assert np.array_equal(np.asarray(png), pred["mask"].numpy())
        palette = png.getpalette()[:9]
        assert [palette[i: i + 3] for i in (0, 3, 6)] == COLOURS  # the dataset's colours, found beside final/
    with open(out / "cls_b.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["image", "label", "score", "label_2", "score_2"]
    top = model.predict(images, task="cls_b", top_k=2)
    assert [r[0] for r in rows[1:]] == [str(p) for p in images]
    for row, t in zip(rows[1:], top):
        assert [row[1], row[3]] == [t[0]["label"], t[1]["label"]]
        assert float(row[2]) == pytest.approx(t[0]["score"], abs=1e-6) and float(row[2]) >= float(row[4])


def test_predict_without_known_colours_uses_the_default_palette_and_names_bad_inputs(run, tmp_path):
    root, model = run
    plain = model.save_pretrained(tmp_path / "plain")  # not a run's final/: no dataset to take colours from
    main = script_main("predict")
    assert main([str(plain), str(root / "grey.jpg"), "--output-dir", str(tmp_path / "o"), "--task", "seg_a"]) == 0
    png = Image.open(tmp_path / "o" / "seg_a" / "grey.png")
    assert png.getpalette()[:9] == [v for c in default_palette()[:3] for v in c]
    assert not (tmp_path / "o" / "cls_b.csv").exists()  # only the task asked for
    with pytest.raises(RunError, match=r"--task \['nope'\]: not a task of .*its tasks are \['seg_a', 'cls_b'\]"):
        main([str(plain), str(root / "grey.jpg"), "--task", "nope", "--output-dir", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match=r"missing.png: no such image file or folder"):
        main([str(plain), str(tmp_path / "missing.png"), "--output-dir", str(tmp_path / "o")])
    (tmp_path / "twice").mkdir()
    Image.open(root / "grey.jpg").save(tmp_path / "twice" / "grey.png")
    with pytest.raises(ValueError, match=r"the same name stem 'grey'"):
        find_images([root / "grey.jpg", tmp_path / "twice"])
