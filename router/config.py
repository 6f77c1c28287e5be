"""RouterConfig: nested dataclasses, JSON/YAML round-trip, strict keys.

The model section of an experiment config *is* a RouterConfig, and a saved model's config.json is one
too, so ``Router.from_config("configs/tiny.yaml")`` and ``Router.from_pretrained(dir)`` share this file.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backbone_router.extractors.base import FAMILIES
from backbone_router.extractors.untrusted import check_extractor_kwargs
from backbone_router.heads.decoder import DECODER_BLOCKS
from backbone_router.heads.seg import SEG_TRUNKS

FORMAT_VERSION = 6  # 6: head.decoder_output, head.refine_width, head.cls_stride, gate.top_k_levels and
#                     gate.entropy_weight removed (no shipped config or documented recipe set them; see REMOVED);
#                     5: the defaults are the recommended model: levels [4, 8, 16, 32], head.cls_taps "all",
#                     head.aux_weight 0.4 (4 and older read a missing key with their defaults: no `levels` as
#                     [stride], cls_taps "level", aux_weight 0); `stride`, head.coarse_logits and cls_taps "shared" removed;
#                     4: classification reads the level nearest stride 16 (3 read the coarsest);
#                     3: the decoder's output is the fuse of all levels (2 had only the finest map);
#                     2: `levels` (a pyramid) and `detail`; 1: one grid (`stride`), read as levels: [stride]
FUSIONS = ("single", "mean", "concat", "gated")
GRANULARITIES = ("task", "image", "token")
TASK_TYPES = ("seg", "cls")
CLS_TAPS = ("level", "all")
DEFAULT_LEVELS = (4, 8, 16, 32)
# Options taken out of the config: dotted key -> (the last format that read it, what the model does now). A file of
# that format or older that names the key loads if its value changes nothing in the model it describes (the value
# the model has now, or e.g. the decoder output of a one-level model, which has no decoder), the key dropped; any
# other value is refused naming the key, since the weights would not fit or the outputs would change
# (:func:`_changes_nothing`). A newer file may not name the key at all.
REMOVED = {
    "head.coarse_logits": (4, "no stride-16 head plus pyramid correction (it lost its measurements, CHANGELOG.md)"),
    "head.decoder_output": (5, "the head reads the decoder's fuse of all levels (`finest` lost on CamVid)"),
    "head.refine_width": (5, "the refiner is 8 channels wide"),
    "head.cls_stride": (5, "classification reads the level nearest stride 16"),
    "gate.top_k_levels": (5, "top-k keeps the same k extractors at every level"),
    "gate.entropy_weight": (5, "no gate-entropy loss (gate.load_balance_weight remains)"),
}
# Values taken out of a key that remains: dotted key -> (the last format that read it, the value, what instead).
REMOVED_VALUES = {
    "head.cls_taps": (4, "shared", "it lost its measurements (CHANGELOG.md); use \"all\" (the default) or \"level\""),
}


@dataclass
class ExtractorConfig:
    spec: str  # "timm:<name>", "open_clip:<arch>/<tag>", "hf:<repo or dir>", "local-dir:<dir>", or a registered name
    name: str = ""  # short name used in gates, logs and state-dict keys; default: derived from spec
    layers: int | list[int] | None = None  # dense layers (int: last n blocks; list: indices); None: backend default
    family: str | None = None  # characteristic family: geometric / morphological / semantic
    pretrained: bool = True  # load weights; False gives random weights (tests, from-scratch baselines)
    checkpoint: str | None = None  # local weight file or dir overriding where the weights come from
    frozen: bool = True  # frozen extractors are not saved by save_pretrained (their spec rebuilds them)
    unfreeze_last: int = 0  # blocks trained in phase 2 of fine-tuning (0: stays frozen)
    kwargs: dict[str, Any] = field(default_factory=dict)  # architecture arguments for the library's model
    #                                                       constructor (no paths: see extractors/untrusted.py)
    sha256: str | None = None  # of the local weight file(s) of a frozen extractor a saved model does not hold;
    #                            written by save_pretrained, checked by from_pretrained

    def __post_init__(self):
        if not self.name:
            self.name = re.sub(r"[^0-9a-zA-Z_]+", "_", self.spec.split("/")[-1].split(":")[-1]).strip("_")
        if not re.fullmatch(r"[0-9a-zA-Z_]+", self.name):
            raise ValueError(f"extractors[].name {self.name!r}: use letters, digits and '_' only")
        check_extractor_kwargs(self.kwargs, f"extractors[{self.name}].kwargs")
        if not (isinstance(self.unfreeze_last, int) and self.unfreeze_last >= 0):
            raise ValueError(f"extractors[{self.name}].unfreeze_last: expected an integer >= 0 (0: stays frozen), "
                             f"got {self.unfreeze_last!r}")
        if self.family is not None and self.family not in FAMILIES:
            raise ValueError(f"extractors[{self.name}].family: expected one of {FAMILIES}, got {self.family!r}")


@dataclass
class TaskConfig:
    name: str  # task name used in `model(images, task=name)`
    type: str  # "seg" (per-pixel classes) or "cls" (one class per image)
    classes: list[str] = field(default_factory=list)  # class names; their count sets the head's outputs
    description: str = ""  # free text; with gate.task_embedding = "text" it places the task for the gate
    ignore_index: int | None = None  # mask value excluded from losses and metrics (seg only)

    def __post_init__(self):
        if self.type not in TASK_TYPES:
            raise ValueError(f"tasks[{self.name}].type: expected one of {TASK_TYPES}, got {self.type!r}")
        if not re.fullmatch(r"[0-9a-zA-Z_]+", self.name):
            raise ValueError(f"tasks[].name {self.name!r}: use letters, digits and '_' only")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass
class GateConfig:
    granularity: str = "image"  # task: one weight vector per task; image: task + content; token: per location
    content: str = "pixels"  # what the gate looks at: "pixels" (a small conv stem, so top-k can skip
    #                          extractors before running them) or "features" (the aligned extractor maps)
    temperature: float = 1.0  # softmax temperature of the gate logits
    top_k: int | None = None  # keep the k largest weights and renormalize, the same k extractors at every level
    #                           (those with the largest weight averaged over levels: k run); None keeps all
    hidden: int = 64  # width of the gate MLP and of the task embedding
    stem_scale: int = 8  # content "pixels": image pixels per grid cell the stem sees (8: its stride-8 output
    #                      is the grid; 4 or 2: a quarter / a sixteenth of the work, output resampled to the grid)
    task_embedding: str = "learned"  # "learned" (one vector per task) or "text" (from description / class names)
    text_encoder: str | None = None  # for "text": "hf:<sentence-transformers dir or repo>" or "open_clip:<arch>/<tag>"
    combine: str = "sum"  # "sum": weighted sum of the aligned maps; "concat": the weighted maps (x E, so equal
    #                       weights give plain concat) concatenated and projected by a learned 1x1 conv
    load_balance_weight: float = 0.0  # weight of the load-balance auxiliary loss (Switch-style)

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"gate.granularity: expected one of {GRANULARITIES}, got {self.granularity!r}")
        if self.content not in ("pixels", "features"):
            raise ValueError(f"gate.content: expected 'pixels' or 'features', got {self.content!r}")
        if self.task_embedding not in ("learned", "text"):
            raise ValueError(f"gate.task_embedding: expected 'learned' or 'text', got {self.task_embedding!r}")
        if self.task_embedding == "text" and not self.text_encoder:
            raise ValueError("gate.text_encoder: required when gate.task_embedding is 'text'")
        for key in ("temperature", "load_balance_weight"):
            value, positive = getattr(self, key), key == "temperature"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0 or (positive and value == 0):
                raise ValueError(f"gate.{key}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
        if self.combine not in ("sum", "concat"):
            raise ValueError(f"gate.combine: expected 'sum' or 'concat', got {self.combine!r}")
        if self.stem_scale not in (2, 4, 8):
            raise ValueError(f"gate.stem_scale: expected 2, 4 or 8 pixels per grid cell, got {self.stem_scale!r}")


@dataclass
class HeadConfig:
    seg_hidden: int = 128  # channels of the shared segmentation trunk
    seg_trunk: str = "conv"  # "conv": 3x3 convolution; "separable": depthwise 3x3 + pointwise 1x1 (~1/9 the work)
    decoder_block: str = "separable"  # merge block of the top-down decoder (levels > 1): "separable" or "conv"
    refine: list[int] = field(default_factory=list)  # seg: go on below the finest level with the detail stem's
    #                                                  maps at these strides, e.g. [2, 1] (U-Net's last stages)
    cls_taps: str = "all"  # what classification reads on the level nearest stride 16, levels > 1: "all" (its own map: every tap
    #                        of each extractor resampled onto that grid, as at one level) or "level" (the level's own map)
    cls_pooling: str = "mean"  # "mean" or "attention" pooling of the fused map
    cls_hidden: int = 256  # hidden width of the shared classification MLP
    dropout: float = 0.0  # dropout before the per-task outputs
    aux_weight: float = 0.4  # seg, levels > 1: loss weight of an auxiliary seg head on the level nearest stride 16,
    #                          trained beside the main head, not run at inference (UPerNet / PSPNet; mmseg uses 0.4);
    #                          with cls_taps "all" it reads classification's map, which segmentation then trains too;
    #                          0: no auxiliary head (at one level there is none: the main head reads that level)

    def __post_init__(self):
        if not (isinstance(self.aux_weight, (int, float)) and math.isfinite(self.aux_weight) and self.aux_weight >= 0):
            raise ValueError(f"head.aux_weight: expected a finite loss weight >= 0 (0: no auxiliary head), "
                             f"got {self.aux_weight!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):  # NaN fails too
            raise ValueError(f"head.dropout: expected a probability in [0, 1), got {self.dropout!r}")
        if self.cls_taps not in CLS_TAPS:
            raise ValueError(f"head.cls_taps: expected one of {CLS_TAPS}, got {self.cls_taps!r}")
        if self.seg_trunk not in SEG_TRUNKS:
            raise ValueError(f"head.seg_trunk: expected one of {SEG_TRUNKS}, got {self.seg_trunk!r}")
        if self.decoder_block not in DECODER_BLOCKS:
            raise ValueError(f"head.decoder_block: expected one of {DECODER_BLOCKS}, got {self.decoder_block!r}")


@dataclass
class RouterConfig:
    extractors: list[ExtractorConfig]  # the specialist extractors, in gate order
    tasks: list[TaskConfig]  # the tasks the shared heads serve
    fusion: str = "gated"  # single / mean / concat / gated
    single: str | None = None  # with fusion = "single": the extractor name to use
    width: int = 128  # channels every extractor is projected to at levels of stride >= 16
    levels: list[int] = field(default_factory=lambda: list(DEFAULT_LEVELS))  # strides of the pyramid levels, finest
    #                                                                         first; [16]: the one-grid model
    level_widths: list[int] | None = None  # channels per level; None: `width`, halved per octave below 16 (>= 32)
    detail: bool | None = None  # raw-image conv stem into the finest level; None: on for seg with levels < 16
    gate: GateConfig = field(default_factory=GateConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    format_version: int = FORMAT_VERSION  # of this config layout; newer than the package reads is an error

    def __post_init__(self):
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is newer than this package reads ({FORMAT_VERSION}); "
                "upgrade backbone-router"
            )
        if not self.extractors:
            raise ValueError("extractors: at least one extractor is needed")
        if not self.tasks:
            raise ValueError("tasks: at least one task is needed")
        for kind, items in (("extractors", self.extractors), ("tasks", self.tasks)):
            names = [i.name for i in items]
            if len(set(names)) != len(names):
                raise ValueError(f"{kind}: names must be unique, got {names}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion: expected one of {FUSIONS}, got {self.fusion!r}")
        names = [e.name for e in self.extractors]
        if self.fusion == "single":
            if self.single is None and len(names) == 1:
                self.single = names[0]
            if self.single not in names:
                raise ValueError(f"single: with fusion 'single' name one of the extractors {names}, got {self.single!r}")
        self._resolve_levels()
        if self.gate.top_k is not None and not 1 <= self.gate.top_k <= len(names):
            raise ValueError(f"gate.top_k: expected 1..{len(names)} (the number of extractors), got {self.gate.top_k}")

    def _resolve_levels(self) -> None:
        """Check `width`, `levels`, `level_widths` (errors name the key); :attr:`strides`, :attr:`widths` and
        :attr:`has_detail` resolve them. The fields keep what the user wrote, so an override of `levels` alone
        (a comparison variant, a command line) gets widths and detail anew."""
        if self.width < 1:
            raise ValueError(f"width: expected a positive number of channels, got {self.width!r}")
        levels = self.strides
        if (not levels or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in levels)
                or sorted(set(levels)) != list(levels)):
            raise ValueError(f"levels: expected distinct positive strides in ascending order, e.g. [4, 8, 16, 32], "
                             f"got {self.levels}")
        if self.level_widths is not None and (len(self.level_widths) != len(levels) or min(self.level_widths) < 1):
            raise ValueError(f"level_widths: expected {len(levels)} positive channel counts (one per level "
                             f"{levels}), got {self.level_widths}")
        refine = self.head.refine
        if refine and (not set(refine) <= {1, 2} or list(refine) != sorted(set(refine), reverse=True)
                       or refine[0] >= levels[0]):
            raise ValueError(f"head.refine: expected distinct strides from [2, 1], descending and finer than the finest "
                             f"level {levels[0]}, e.g. [2, 1] or [2], got {refine}")
        if refine and not self.has_detail:
            raise ValueError(f"head.refine: {refine} reads the detail stem's maps; it needs `detail: true` (or null with "
                             "a segmentation task and a pyramid reaching below stride 16)")

    @property
    def strides(self) -> list[int]:
        """The strides of the levels, finest first."""
        return list(self.levels)

    @property
    def widths(self) -> list[int]:
        """Channels of each level: `level_widths`, or `width` at stride >= 16, halved per octave below (>= 32)."""
        if self.level_widths is not None:
            return list(self.level_widths)
        return [default_level_width(self.width, s) for s in self.strides]

    @property
    def cls_level(self) -> int:
        """Index of the level classification reads: the one nearest stride 16."""
        return nearest_level(self.strides, 16)

    @property
    def cls_reads_all_taps(self) -> bool:
        """Whether classification has its own aligners (`head.cls_taps: all` on a pyramid; at one level the
        level's map already holds every tap)."""
        return self.head.cls_taps == "all" and len(self.strides) > 1

    @property
    def has_aux_head(self) -> bool:
        """Whether segmentation trains an auxiliary head (`head.aux_weight` > 0 on a pyramid; at one level the main
        head reads the level it would read)."""
        return self.head.aux_weight > 0 and len(self.strides) > 1

    @property
    def has_detail(self) -> bool:
        """Whether the detail stem runs: `detail`, or (None) with a seg task and a pyramid reaching below 16
        (so any one-level config is the format-1 model exactly)."""
        if self.detail is not None:
            return self.detail
        return any(t.type == "seg" for t in self.tasks) and len(self.strides) > 1 and self.strides[0] < 16

    # ---- dict / file round trip ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "model") -> RouterConfig:
        """Build from a plain dict; an unknown key or a wrong type is an error naming its path.

        Older formats are upgraded here, each to the same model, parameter for parameter: a format-1 dict (one grid,
        written before levels existed) reads as ``levels: [stride]`` with no detail stem, and a format-4 dict reads a
        missing key with format 4's defaults (no `levels`: ``[stride]``, ``head.cls_taps: level``,
        ``head.aux_weight: 0``). A removed option (:data:`REMOVED`) is dropped where its value changes nothing in the
        model the dict describes (:func:`_changes_nothing`, on the decoded config), and otherwise an error naming it
        and the last format that read it: so a format-2 pyramid (its head read the finest level) or a format-3 one
        that classifies (at its coarsest level) is refused.
        """
        version = data.get("format_version", FORMAT_VERSION) if isinstance(data, dict) else FORMAT_VERSION
        if (not isinstance(data, dict) or not isinstance(version, int) or isinstance(version, bool)
                or version > FORMAT_VERSION):
            return decode_dataclass(cls, data, where)  # the decoder (or the format check) names what is wrong
        data = dict(data)
        # The sections as copies; one that is not a mapping stays for the decoder to name.
        head = dict(data["head"]) if isinstance(data.get("head"), dict) else {}
        gate = dict(data["gate"]) if isinstance(data.get("gate"), dict) else {}
        if version >= 5 and "stride" in data:
            one = data["stride"] if isinstance(data["stride"], int) else 16
            raise ValueError(f"{where}: stride: removed in format 5 (format 4 was the last to read it): one grid is "
                             f"`levels: [{one}]`; the default is {list(DEFAULT_LEVELS)}")
        if version < 5:
            stride = data.pop("stride", 16)
            if version < 2 or data.get("levels") is None:  # no `levels` (or null) was the one grid `stride`
                if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
                    raise ValueError(f"{where}: stride: expected a positive number of pixels per grid cell, got {stride!r}")
                data["levels"] = [stride]
            if version < 2:
                data["detail"] = False
            if version < 3:
                head.setdefault("decoder_output", "finest")
            if version < 4:
                strides = data["levels"]
                if isinstance(strides, list) and strides and all(isinstance(v, int) for v in strides):
                    head.setdefault("cls_stride", max(strides))
            head = {"cls_taps": "level", "aux_weight": 0.0, **head}  # format 4's defaults
        removed = _pop_removed({"head": head, "gate": gate}, where, version)
        for name, section in (("head", head), ("gate", gate)):
            if name in data and not isinstance(data[name], dict):
                continue
            if section or name in data:
                data[name] = section
        config = decode_dataclass(cls, {**data, "format_version": FORMAT_VERSION}, where)
        for key, value in removed.items():
            if not _changes_nothing(config, key, value):
                last, now = REMOVED[key]
                raise ValueError(f"{where}: {key}: {value!r} is no longer supported ({now}); a model that used it loads "
                                 f"in backbone-router before format {last + 1} only")
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_file(cls, path: str | Path) -> RouterConfig:
        """Read a YAML/JSON file: either a RouterConfig or an experiment config with a `model:` section."""
        path = Path(path)
        data = load_yaml_or_json(path)
        if "model" in data and "extractors" not in data:
            return cls.from_dict(data["model"], where=f"{path}: model")
        return cls.from_dict(data, where=str(path))

    def save_json(self, path: str | Path) -> None:
        from backbone_router.extractors.io.atomic import atomic_write_bytes

        atomic_write_bytes(Path(path), (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    def extractor(self, name: str) -> ExtractorConfig:
        for e in self.extractors:
            if e.name == name:
                return e
        raise KeyError(f"no extractor named {name!r}; extractors are {[e.name for e in self.extractors]}")

    def task(self, name: str) -> TaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task named {name!r}; tasks are {[t.name for t in self.tasks]}")


def _pop_removed(sections: dict[str, dict[str, Any]], where: str, version: int) -> dict[str, Any]:
    """Take the keys of :data:`REMOVED` out of `sections` (a model dict's head and gate, in place) and return them;
    such a key in a dict newer than the last format that read it, or a value of :data:`REMOVED_VALUES`, is an error
    naming the key."""
    found = {}
    for key, (last, _) in REMOVED.items():
        section, name = key.split(".", 1)
        if name in sections[section]:
            found[key] = sections[section].pop(name)
            if version > last:
                raise ValueError(f"{where}: {key}: removed in format {last + 1} (format {last} was the last to read it); "
                                 "delete the key")
    for key, (last, value, instead) in REMOVED_VALUES.items():
        section, name = key.split(".", 1)
        if sections[section].get(name) == value:
            raise ValueError(f"{where}: {key}: {value!r} was removed in format {last + 1} (format {last} was the last "
                             f"to read it): {instead}")
    return found


def _changes_nothing(c: RouterConfig, key: str, value: Any) -> bool:
    """Whether an older file's value of a removed option builds the same model (same parameters, same outputs) as
    today's code does for the config `c` it describes."""
    integer = isinstance(value, int) and not isinstance(value, bool)
    gated = c.fusion == "gated"
    if key == "head.coarse_logits":
        return value is False
    if key == "head.decoder_output":  # one level: no decoder
        return value == "fuse" or (value == "finest" and len(c.strides) == 1)
    if key == "head.refine_width":
        return integer and (value == 8 or (value >= 1 and not c.head.refine))
    if key == "head.cls_stride":  # without a classification task or its own aligners, only the unused cls head reads it
        if value is None:
            return True
        if not integer or value not in c.strides:
            return False
        i = c.strides.index(value)
        classifies = any(t.type == "cls" for t in c.tasks)
        return i == c.cls_level or (not classifies and not c.cls_reads_all_taps and c.widths[i] == c.widths[c.cls_level])
    if key == "gate.top_k_levels":
        return value == "shared" or (value == "each" and (not gated or c.gate.top_k is None or len(c.strides) == 1
                                                           or c.gate.top_k >= len(c.extractors)))
    if key == "gate.entropy_weight":
        return (integer or isinstance(value, float)) and math.isfinite(value) and value >= 0 and (value == 0 or not gated)
    raise KeyError(key)


def nearest_level(strides: list[int], stride: int) -> int:
    """Index of the level nearest `stride` (in octaves; the coarser one on a tie)."""
    return min(range(len(strides)), key=lambda i: (abs(math.log2(strides[i] / stride)), -i))


def default_level_width(width: int, stride: int) -> int:
    """Channels of a level: `width` at stride >= 16, halved per octave below (never under min(width, 32))."""
    return width if stride >= 16 else max(min(width, 32), width * stride // 16)


class DuplicateKeyError(yaml.YAMLError):
    """A key given twice in one mapping (YAML) or object (JSON); the message names the key."""


class ConfigLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key twice in one mapping (PyYAML keeps the last) and reads ``1e-3`` /
    ``5E+2`` as floats (YAML 1.1 needs ``1.0e-3``)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            lines: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges; its keys may be overridden
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    if key in lines:
                        at = f"lines {lines[key]} and {line}" if lines[key] != line else f"twice on line {line}"
                        raise DuplicateKeyError(f"duplicate key {key!r} ({at})")
                    lines[key] = line
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    pass
        return super().construct_mapping(node, deep)


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                   list("-+0123456789."))


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _non_finite(data: Any, where: str = "") -> tuple[str, float] | None:
    """(dotted key, value) of the first NaN / Infinity in a decoded JSON document, else None."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "(the document)", data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for k, v in items:
        if found := _non_finite(v, f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k)):
            return found
    return None


def read_text_file(path: Path) -> str:
    """A config file's text: UTF-8 (a BOM allowed); UTF-16 / UTF-32 or binary content is an error naming the file."""
    raw = path.read_bytes()
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
                      (codecs.BOM_UTF16_BE, "UTF-16")):
        if raw.startswith(bom):
            raise ValueError(f"{path}: {name} text (byte-order mark {bom.hex()}); config files are UTF-8: save it as "
                             f"UTF-8 (e.g. iconv -f {name} -t UTF-8)")
    if b"\x00" in raw:
        at = raw.index(b"\x00")
        raise ValueError(f"{path}: holds a NUL byte at offset {at} (binary data or UTF-16 without a byte-order mark), "
                         "not UTF-8 text; config files are UTF-8 YAML or JSON")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); config files are "
                         "UTF-8: save it as UTF-8") from None


def load_yaml_or_json(path: Path) -> dict[str, Any]:
    """The one reader of config files (YAML, or JSON by suffix) as a dict; every error names the file.

    UTF-8 only (UTF-16 / binary content is refused), a key twice in one mapping is refused (YAML and JSON), JSON's
    non-standard NaN / Infinity are refused naming the key, and YAML reads ``1e-3`` as a float (:class:`ConfigLoader`).

    >>> load_yaml_or_json(Path("configs/quickstart.yaml"))["train"]["max_steps"]
    1000
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = read_text_file(path)
    is_json = path.suffix == ".json"
    try:
        data = json.loads(text, object_pairs_hook=_json_object) if is_json else yaml.load(text, Loader=ConfigLoader)
    except DuplicateKeyError as e:
        raise ValueError(f"{path}: {e}; a key may appear once in a mapping: merge or delete one") from e
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: not valid {'JSON' if is_json else 'YAML'} ({e})") from e
    if is_json and (bad := _non_finite(data)):
        raise ValueError(f"{path}: {bad[0]} is {json.dumps(bad[1])}; a config value must be a finite number (NaN and "
                         "Infinity are not JSON)")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def did_you_mean(unknown: list[str], known, prefix: str = "") -> str:
    """`` (did you mean 'max_steps'?)`` for the unknown keys with a close known key (difflib), else ``""``.

    >>> did_you_mean(["max_step"], ["max_steps", "seed"], prefix="train.")
    " (did you mean 'train.max_steps'?)"
    """
    near = [f"{prefix}{m[0]}" for k in unknown
            if isinstance(k, str) and (m := difflib.get_close_matches(k, [str(x) for x in known], n=1, cutoff=0.6))]
    return f" (did you mean {', '.join(repr(n) for n in near)}?)" if near else ""


def decode_dataclass(cls, data: Any, where: str):
    """Strict dataclass decoding, any depth: unknown keys and wrong types are errors naming the path."""
    if not isinstance(data, dict):
        raise TypeError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}{did_you_mean(unknown, fields)}; expected some of "
                         f"{sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _decode(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{where}: {e}") from e


def _decode(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # `X | None`: X's own error names the key inside it (data.synthetic.n_trian)
            return _decode(options[0], value, where)
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _decode(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise TypeError(f"{where}: {value!r} does not match {tp}")
    if dataclasses.is_dataclass(tp):
        return decode_dataclass(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise TypeError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{where}: unsupported field type {tp}")
