"""docs/config.md is generated from the config dataclasses: every key is in it, with a description, and the file is
what the code says now (regenerated here, so a changed field fails until `python train/config_reference.py` runs)."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from backbone_router.train.config_reference import (
    REFERENCE,
    config_keys,
    field_comments,
    reference_markdown,
)

STALE = "docs/config.md is stale: run `python train/config_reference.py` and commit it"


def test_every_config_key_is_in_docs_config_md():
    text = REFERENCE.read_text(encoding="utf-8")
    keys = config_keys()
    assert {"model.gate.granularity", "model.extractors[].spec", "data.tasks[].dataset", "train.max_steps",
            "compare.variants", "method", "dino.momentum"} <= set(keys)
    missing = [k for k in keys if f"| `{k}` |" not in text]
    assert not missing, f"keys missing from docs/config.md: {missing}; {STALE}"


def test_docs_config_md_is_what_the_dataclasses_say_now():
    assert REFERENCE.read_text(encoding="utf-8") == reference_markdown(), STALE


def test_every_field_has_a_description():
    rows = [line for line in reference_markdown().splitlines() if line.startswith("| `")]
    empty = [row.split(" | ")[0].strip("| `") for row in rows if row.rstrip().endswith("|  |")]
    assert not empty, f"fields without a comment in their dataclass (one line per field): {empty}"


def test_field_comments_join_continuation_lines_and_skip_hashes_in_strings(tmp_path, monkeypatch):
    source = textwrap.dedent('''
        from dataclasses import dataclass, field

        @dataclass
        class Demo:
            url: str = "http://x/#anchor"  # where it lives
            mode: str = "a"  # "a" does this, "b" does that
            #                  and goes on here
            #                  and here
            plain: int = field(  # a field written
                default=3)  # over two lines
            # a comment about `after`, not `plain`
            after: bool = False
    ''')
    path = tmp_path / "demo_config.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    import demo_config

    assert dataclasses.is_dataclass(demo_config.Demo)
    assert field_comments(demo_config.Demo) == {
        "url": "where it lives",
        "mode": '"a" does this, "b" does that and goes on here and here',
        "plain": "a field written over two lines",
        "after": "",
    }


@pytest.mark.parametrize("key,values", [("model.fusion", "`single`, `mean`, `concat`, `gated`"),
                                        ("model.tasks[].type", "`seg`, `cls`"),
                                        ("train.on_nonfinite", "`stop`, `skip`")])
def test_allowed_values_come_from_the_checks(key, values):
    row = next(line for line in reference_markdown().splitlines() if line.startswith(f"| `{key}` |"))
    assert row.split(" | ")[3] == values


def test_the_check_mode_reports_a_stale_file(tmp_path, capsys):
    from backbone_router.train.config_reference import main

    stale = tmp_path / "config.md"
    stale.write_text(re.sub(r"\| `train.max_steps` \|.*\n", "", reference_markdown()))
    assert main(["--check", "--output", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err
    assert main(["--output", str(stale)]) == 0 and main(["--check", "--output", str(stale)]) == 0
    assert Path(stale).read_text() == reference_markdown()
