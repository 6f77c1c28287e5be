"""The complete config of docs/data.md (and the README's "Use your own data") loads, trains and predicts: on a
dataset folder in its layout, with random weights in place of the real ones (no network in the tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import script_main

from backbone_router.train.training.config import ExperimentConfig
from backbone_router.train.training.synthetic import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]


def yaml_block(path: Path, heading: str) -> str:
    """The first ```yaml block after `heading` in a markdown file."""
    text = path.read_text(encoding="utf-8")
    start = text.index(heading)
    match = re.search(r"```yaml\n(.*?)```", text[start:], re.S)
    assert match, f"{path}: no yaml block after {heading!r}"
    return match.group(1)


def test_the_data_md_config_loads_with_real_extractors_and_every_section():
    cfg = ExperimentConfig.from_dict(yaml.safe_load(yaml_block(REPO / "docs" / "data.md", "## A complete config")))
    assert [e.spec for e in cfg.model.extractors] == ["timm:mobilenetv2_100", "timm:tf_efficientnet_lite0.in1k"]
    assert all(e.pretrained for e in cfg.model.extractors) and cfg.model.extractors[0].checkpoint
    assert [t.dataset for t in cfg.data.tasks] == ["parts", "parts"] and cfg.train.max_steps == 2000


def test_the_readme_shows_the_same_config_as_data_md():
    readme = yaml_block(REPO / "README.md", "## Use your own data")
    assert readme == yaml_block(REPO / "docs" / "data.md", "## A complete config")


@pytest.mark.slow
def test_the_data_md_config_trains_and_predicts_on_a_folder_in_its_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data.root: data is taken from the folder the run starts in
    write_synthetic_dataset(tmp_path / "data", "parts", n_train=8, n_val=4, size=32, ignore_border=1, seed=0)
    (tmp_path / "my_data.yaml").write_text(yaml_block(REPO / "docs" / "data.md", "## A complete config"))
    no_weights = [f"model.extractors.{i}.{k}" for i in (0, 1) for k in ("pretrained=false", "checkpoint=null")]
    small = ["data.image_size=32", "data.eval_size=32", "train.max_steps=2", "train.batch_size=2",
             "train.eval_every=2", "train.save_every=2", "train.phase2_step=1", "train.warmup_steps=1"]
    assert script_main("finetune")(["--config", "my_data.yaml", "--output-dir", "runs/parts", *no_weights, *small]) == 0
    assert script_main("predict")(["runs/parts/final", "data/parts/images", "--output-dir", "runs/parts/pred"]) == 0
    assert len(list((tmp_path / "runs/parts/pred/part_defects").glob("*.png"))) == 12
    assert (tmp_path / "runs/parts/pred/part_type.csv").read_text().count("\n") == 13
