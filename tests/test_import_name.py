"""One import name (issue 27): the installed package is backbone_router, so a user's own router.py or train.py in the
working folder cannot shadow it; the old names (router, extractors, heads, train) stay for one release, with a
DeprecationWarning, as the very same module objects. Each case runs in a fresh interpreter (nothing imported yet)."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
OLD = ("extractors", "heads", "router", "train")


def python(code: str, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture
def users_folder(tmp_path):
    """A working folder with the user's own router.py and train.py (and nothing of this repository on sys.path)."""
    (tmp_path / "router.py").write_text('WHO = "the user\'s router.py"\n')
    (tmp_path / "train.py").write_text('WHO = "the user\'s train.py"\n')
    return tmp_path


def test_backbone_router_imports_from_a_folder_with_its_own_router_and_train(users_folder):
    out = python("import backbone_router; print(backbone_router.__version__, backbone_router.Router)", users_folder,
                 "-W", "error::DeprecationWarning").stdout.split()
    assert out == [importlib.metadata.version("backbone-router"), "<class", "'backbone_router.router.model.Router'>"]
    code = ("import backbone_router, backbone_router.train.training.config, router, train\n"
            "print(router.WHO); print(train.WHO); print(backbone_router.create_extractor.__module__)")
    assert python(code, users_folder).stdout.splitlines() == [
        "the user's router.py", "the user's train.py", "backbone_router.extractors.factory"]  # theirs stay theirs


# Installed (a folder of its own) and in the repository root (where the folders themselves are on sys.path).
WHERE = pytest.mark.parametrize("where", ["elsewhere", "repo_root"])
CHECK_SAME = """
import sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import router, router.model, heads.losses, train.selfsup.dino, extractors
    create_extractor = extractors.create_extractor  # not `from <old> import` here: issue 27's rewrite script edits that
import backbone_router
assert router is backbone_router.router and router.model is backbone_router.router.model
assert router.Router is backbone_router.Router and create_extractor is backbone_router.create_extractor
assert isinstance(backbone_router.RouterConfig.__new__(router.RouterConfig), backbone_router.router.config.RouterConfig)
old = sorted(k for k in sys.modules if k.split(".")[0] in {old!r})
assert all(sys.modules[k] is sys.modules["backbone_router." + k] for k in old), old
files = {{}}
for k, m in list(sys.modules.items()):
    if k.split(".")[0] in {old!r} + ("backbone_router",):
        files.setdefault(m.__file__, set()).add(id(m))
assert len(files) > 10 and not [f for f, ids in files.items() if len(ids) > 1]  # no module file executed twice
for w in caught:
    print(w.category.__name__, w.filename, str(w.message))
"""


@WHERE
def test_old_names_warn_and_are_the_same_modules(where, tmp_path):
    lines = python(CHECK_SAME.format(old=OLD), REPO if where == "repo_root" else tmp_path).stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["DeprecationWarning", "<string>"]] * 4  # at the user's line
    assert sorted(line.split(" ", 2)[2].split(" is deprecated")[0] for line in lines) == [f"'import {n}'" for n in OLD]


def test_every_package_folder_is_in_pyprojects_package_list():
    """setuptools' find cannot rename folders, so pyproject lists each package: a new subfolder must be added there,
    or the wheel leaves it out (an editable install would not show it)."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {new: old for new, old in tool["package-dir"].items() if new.startswith("backbone_router")}
    folders = {"backbone_router"} | {
        "backbone_router." + ".".join(p.parent.relative_to(REPO).parts)
        for name in OLD for p in (REPO / name).rglob("__init__.py") if "_package" not in p.parts}
    assert {p for p in tool["packages"] if p.startswith("backbone_router")} == folders
    assert all((REPO / mapped[p] / "__init__.py").exists() for p in mapped)
