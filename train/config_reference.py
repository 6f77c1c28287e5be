"""docs/config.md, generated from the config dataclasses: every key with its type, default, allowed values and the
comment written beside its field in the source (router/config.py, train/training/config.py,
train/experiments/compare_config.py, train/selfsup/pretrain_config.py).

    python train/config_reference.py            # rewrite docs/config.md
    python train/config_reference.py --check    # exit 1 when docs/config.md differs from what the code says

A field's text is its trailing comment plus the comment-only lines right below it that are indented past the
field (read with :mod:`tokenize`, so a ``#`` inside a string is not a comment); allowed values are the tuples a
class's ``__post_init__`` checks a field against (``if self.x not in (...)`` or a module constant such as
``FUSIONS``). A test (tests/test_config_reference.py) regenerates the text and fails when the file is stale.

>>> "`train.max_steps`" in reference_markdown()
True
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import sys
import tokenize
import typing
from functools import cache
from pathlib import Path

from backbone_router.router.config import RouterConfig
from backbone_router.train.experiments.compare_config import CompareConfig
from backbone_router.train.selfsup.pretrain_config import PretrainConfig
from backbone_router.train.training.config import DataConfig, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = REPO_ROOT / "docs" / "config.md"

# (heading, dotted prefix, root dataclass, what reads it)
CONFIG_FAMILIES = (
    ("Experiment config: `model`", "model", RouterConfig,
     "The Router: extractors, tasks, fusion, levels, gate and heads. A saved model's `config.json` is this section. "
     "The defaults are the recommended model (levels 4-32, classification on every tap at stride 16, an auxiliary "
     "seg head of weight 0.4), so a model section needs only `extractors` and `tasks`; `levels: [16]` is the one-grid "
     "model. A `config.json` of an older format (`format_version` 4 or less) is read with that format's defaults "
     "(no `levels`: one grid at `stride`, `head.cls_taps: level`, `head.aux_weight: 0`). Removed in format 5: `stride` "
     "(write `levels: [16]`), `head.coarse_logits` and `head.cls_taps: shared` (they lost their measurements: "
     "[CHANGELOG.md](../CHANGELOG.md)). Removed in format 6 (no shipped config or recipe set them): "
     "`head.decoder_output`, `head.refine_width`, `head.cls_stride`, `gate.top_k_levels`, `gate.entropy_weight`; an "
     "older `config.json` naming them loads where their value changes nothing in its model ([model.md](model.md))."),
    ("Experiment config: `data`", "data", DataConfig,
     "Which dataset folder (layout: [data.md](data.md)) serves each task, augmentation and evaluation size."),
    ("Experiment config: `train`", "train", TrainConfig,
     "The optimisation schedule, losses, evaluation and checkpoints of `train/finetune.py` (and the budget of "
     "`train/compare.py`)."),
    ("Comparison: `compare`", "compare", CompareConfig,
     "The `compare:` section of a `train/compare.py` config (besides `model`, `data`, `train`)."),
    ("Pretraining config", "", PretrainConfig,
     "A `train/pretrain.py` config file (configs/pretrain_*.yaml); its `data`, `model` and `train` sections are "
     "its own, not the experiment config's."),
)


# ---- reading the source --------------------------------------------------------------------------------
@cache
def _module_source(path: str) -> tuple[ast.Module, dict[int, tuple[int, str]], set[int]]:
    """A source file's AST, its comments by line (column, text with its '#') and the lines that hold code."""
    text = Path(path).read_text(encoding="utf-8")
    comments: dict[int, tuple[int, str]] = {}
    code_lines: set[int] = set()
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string)
        elif tok.type not in skip:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return ast.parse(text), comments, code_lines


def _class_node(cls: type) -> tuple[ast.ClassDef, dict[int, tuple[int, str]], set[int]]:
    tree, comments, code_lines = _module_source(inspect.getsourcefile(cls))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return node, comments, code_lines
    raise LookupError(f"class {cls.__name__} not found in {inspect.getsourcefile(cls)}")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment beside it in the class body, with its indented continuation lines joined."""
    node, comments, code_lines = _class_node(cls)
    out = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        parts = [comments[n][1] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
        line = stmt.end_lineno + 1
        while line in comments and line not in code_lines and _continues(comments[line], stmt.col_offset):
            parts.append(comments[line][1])
            line += 1
        out[stmt.target.id] = " ".join(t for p in parts if (t := p.lstrip("#").strip()))
    return out


def _continues(comment: tuple[int, str], indent: int) -> bool:
    """Whether a comment-only line goes on with the field above: indented past the field, or its text aligned
    under the comment above (``#`` then two or more spaces)."""
    column, text = comment
    return column > indent or text.startswith("#  ")


def allowed_values(cls: type) -> dict[str, list]:
    """Field name -> the values ``__post_init__`` allows, where it checks ``self.<field> (not) in <tuple>``."""
    node, _, _ = _class_node(cls)
    module = sys.modules[cls.__module__]
    out: dict[str, list] = {}
    for fn in node.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "__post_init__"):
            continue
        for cmp in ast.walk(fn):
            if not (isinstance(cmp, ast.Compare) and len(cmp.ops) == 1 and isinstance(cmp.ops[0], (ast.In, ast.NotIn))):
                continue
            left, right = cmp.left, cmp.comparators[0]
            if not (isinstance(left, ast.Attribute) and isinstance(left.value, ast.Name) and left.value.id == "self"):
                continue
            try:
                values = ast.literal_eval(right) if not isinstance(right, ast.Name) else getattr(module, right.id)
            except (ValueError, AttributeError):
                continue
            if isinstance(values, (tuple, list, set, frozenset)) and all(isinstance(v, (str, int)) for v in values):
                out.setdefault(left.attr, list(values))
    return out


# ---- the reference ---------------------------------------------------------------------------------------
def _nested(tp: typing.Any) -> tuple[type | None, bool]:
    """The dataclass a field holds (directly, optionally or as a list) and whether it is a list; else (None, False)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return tp, False
    if origin is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    for arg in args:
        if dataclasses.is_dataclass(arg):
            return arg, False
    return None, False


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{json.dumps(value)}`"


def sections(prefix: str, cls: type) -> list[tuple[str, type]]:
    """(dotted prefix, dataclass) of a config family, parents before children: ``model``, ``model.extractors[]``..."""
    out = [(prefix, cls)]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        sub, is_list = _nested(hints[f.name])
        if sub is not None:
            out += sections(f"{prefix}.{f.name}{'[]' if is_list else ''}".lstrip("."), sub)
    return out


def config_keys() -> list[str]:
    """Every dotted key of every config family (``model.gate.granularity``, ``data.tasks[].weight``, ...)."""
    return [f"{p}.{f.name}".lstrip(".") for _, prefix, root, _ in CONFIG_FAMILIES for p, cls in sections(prefix, root)
            for f in dataclasses.fields(cls)]


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def section_table(prefix: str, cls: type) -> list[str]:
    hints, comments, allowed = typing.get_type_hints(cls), field_comments(cls), allowed_values(cls)
    rows = ["| key | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        sub, is_list = _nested(hints[f.name])
        key = f"{prefix}.{f.name}".lstrip(".")
        text = comments.get(f.name, "")
        if sub is not None:
            text = (text + "; " if text else "") + f"see `{key}{'[]' if is_list else ''}`"
        values = ", ".join(f"`{v}`" for v in allowed.get(f.name, []))
        rows.append(f"| `{key}` | `{_cell(str(f.type))}` | {_cell(_default(f))} | {values} | {_cell(text)} |")
    return rows


def reference_markdown() -> str:
    """The text of docs/config.md."""
    lines = [
        "# Config reference",
        "",
        "<!-- Generated by `python train/config_reference.py` from the field comments of router/config.py, "
        "train/training/config.py, train/experiments/compare_config.py and train/selfsup/pretrain_config.py: edit those, then regenerate. tests/test_config_reference.py fails when this file is stale. -->",
        "",
        "Every key a config file may hold, with its type, default, the values it allows (where the code checks a "
        "list) and what it does. An unknown key is an error that names the nearest known one. On the command line, "
        "`key=value` overrides use the same dotted names (`train.max_steps=20`, `model.gate.granularity=token`); "
        "list items go by index (`model.extractors.0.layers=[1,2]`, `data.tasks.1.weight=2`). `[]` below marks a "
        "list of sections. `null` is YAML's None.",
        "",
    ]
    for heading, prefix, root, what in CONFIG_FAMILIES:
        lines += [f"## {heading}", "", what, ""]
        for p, cls in sections(prefix, root):
            where = Path(inspect.getsourcefile(cls)).relative_to(REPO_ROOT)
            title = f"`{p}`" if p else "top level"
            lines += [f"### {title} ({cls.__name__}, {where})", "", *section_table(p, cls), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="exit 1 when docs/config.md is stale; write nothing")
    p.add_argument("--output", default=str(REFERENCE), help=f"where to write (default: {REFERENCE.relative_to(REPO_ROOT)})")
    args = p.parse_args(argv)
    text, path = reference_markdown(), Path(args.output)
    if args.check:
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            print(f"{path} is stale: run `python train/config_reference.py` and commit it", file=sys.stderr)
            return 1
        print(f"{path} is up to date ({len(config_keys())} keys)")
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(config_keys())} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
