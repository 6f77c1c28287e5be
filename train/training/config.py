"""The fine-tune config family, strict and overridable, and the config machinery every family shares.

- :class:`ExperimentConfig` (finetune, compare, benchmark's model section): ``model`` (a
  :class:`router.config.RouterConfig`), ``data``, ``train``. The other families live with their roles and are
  built on the machinery here: :class:`train.experiments.compare_config.CompareConfig` (a comparison's
  ``compare:`` section) and :class:`train.selfsup.pretrain_config.PretrainConfig` (a pretraining file).
- One strict decoder, :func:`decode` (unknown keys and wrong types are errors naming the dotted key), one override
  parser, :func:`apply_override`, and one data-root rule, :func:`data_root`.

The `model:` section is a :class:`router.config.RouterConfig`; `data:` says where the datasets are and how
batches are drawn; `train:` holds the optimisation schedule. Dotted ``key=value`` overrides from the command
line are applied to the fully resolved dict (every default filled in), so an unknown key is an error that
names it, and every value is decoded again with the strict type checks of the config file. Sizes, steps and
rates are checked when the config is read, with the dotted key in the message. ``lr: 1e-3`` in a YAML file is a
float, as in an override (plain YAML 1.1 would read it as a string).

>>> cfg = ExperimentConfig.from_file("configs/quickstart.yaml", ["train.max_steps=20", "model.fusion=concat"])
>>> cfg.train.max_steps, cfg.model.fusion
(20, 'concat')
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from backbone_router.router.config import (
    ConfigLoader,
    RouterConfig,
    decode_dataclass,
    did_you_mean,
    load_yaml_or_json,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_ENV = "BACKBONE_ROUTER_DATA"


def data_root(root: str | None = None) -> Path:
    """The folder of dataset folders: `root`, else $BACKBONE_ROUTER_DATA, else ../shared/data next to the repository.

    >>> data_root("/data") == Path("/data")
    True
    """
    if root:
        return Path(root).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return REPO_ROOT.parent / "shared" / "data"


def decode(cls: type, data: Any, where: str = "config") -> Any:
    """Strict decoding of a dict into the dataclass `cls` (nested dataclasses, lists, optionals): an unknown key or a
    wrong type is an error naming its dotted path. The one decoder of every config here.

    >>> decode(TrainConfig, {"max_steps": 5}).max_steps
    5
    """
    return decode_dataclass(cls, data, where)


DEFAULT_SEG_LOSS: list[dict[str, Any]] = [{"name": "ce", "weight": 1.0}, {"name": "dice", "weight": 1.0, "per_image": True}]
DEFAULT_CLS_LOSS: list[dict[str, Any]] = [{"name": "ce", "weight": 1.0}]
def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON config file as a dict: :func:`router.config.load_yaml_or_json`, the one config reader (UTF-8,
    duplicate keys and JSON NaN refused, ``1e-3`` a float); errors name the file."""
    return load_yaml_or_json(Path(path))


def check_size(where: str, value: Any, low: int = 1) -> None:
    """An int (or [h, w] / list of ints) >= low, else an error naming the key."""
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError(f"{where}: expected at least one value, got []")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < low for v in values):
        raise ValueError(f"{where}: must be {'an int' if not isinstance(value, list) else 'ints'} >= {low}, got {value}")


def check_eval_size(where: str, value: Any) -> None:
    """A side (int >= 1) or [h, w] of two ints >= 1, within the pixel budget."""
    if isinstance(value, list) and len(value) != 2:
        raise ValueError(f"{where}: expected a side or [h, w], got {value}")
    check_size(where, value)
    check_pixels(where, value)


MAX_IMAGE_PIXELS = 4096 * 4096  # a crop or eval size above this would take gigabytes per image before the model


def check_pixels(where: str, value: int | list[int]) -> None:
    """A side or [h, w] (already checked to be ints >= 1) of at most MAX_IMAGE_PIXELS pixels, else an error naming the key."""
    h, w = (value, value) if isinstance(value, int) else value
    if h * w > MAX_IMAGE_PIXELS:
        raise ValueError(f"{where}: {value} is {h * w:,} pixels per image, above the budget of {MAX_IMAGE_PIXELS:,} "
                         "(4096 x 4096); use a smaller size")


# Model sizes an experiment checks at load that RouterConfig does not (it checks width and levels itself).
MODEL_SIZES = ("gate.hidden", "head.seg_hidden", "head.cls_hidden")


# Keys that may change between an interrupted run and its resumption (they do not change the trajectory).
# train.on_nonfinite too: a run stopped by a NaN may go on with "skip" (and configs saved before it existed resume).
RESUMABLE_CHANGES = ("train.max_steps", "train.eval_every", "train.save_every", "train.keep_last", "train.log_every",
                     "train.on_nonfinite")


@dataclass
class DataTaskConfig:
    name: str  # a task of model.tasks that this dataset trains and evaluates
    dataset: str  # dataset folder relative to data.root, in the layout of docs/data.md
    weight: float = 1.0  # sampling weight: the share of training batches drawn from this task
    train_split: str = "train"  # split of splits.csv used for training
    val_split: str = "val"  # split evaluated; when splits.csv has none, carved from train (data.val_fraction)
    image_size: int | None = None  # side of the square training crop; None: data.image_size
    eval_size: int | list[int] | None = None  # eval resize, side or [h, w]; None: data.eval_size
    max_val_items: int | None = None  # evaluate on the first n items of the val split only; None: all

    def __post_init__(self):
        where = f"data.tasks[{self.name}]"
        if not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"{where}.weight: must be a finite number >= 0, got {self.weight}")
        if self.image_size is not None:
            check_size(f"{where}.image_size", self.image_size)
            check_pixels(f"{where}.image_size", self.image_size)
        if self.eval_size is not None:
            check_eval_size(f"{where}.eval_size", self.eval_size)
        if self.max_val_items is not None:
            check_size(f"{where}.max_val_items", self.max_val_items)


@dataclass
class SyntheticConfig:
    name: str = "shapes"  # folder written under <output_dir>/data; tasks refer to it as their dataset
    n_train: int = 256  # training images
    n_val: int = 64  # validation images
    size: int = 64  # image side in pixels
    ignore_border: int = 1  # width of the ignore_index ring around each shape (0: none)
    seed: int = 0  # generator seed: the same seed writes the same files

    def __post_init__(self):
        for key, low in (("n_train", 2), ("n_val", 1), ("size", 8), ("ignore_border", 0), ("seed", 0)):
            check_size(f"data.synthetic.{key}", getattr(self, key), low)
        check_pixels("data.synthetic.size", self.size)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name) or ".." in self.name:
            raise ValueError(f"data.synthetic.name: {self.name!r} must be a folder name (letters, digits, '_', '-', '.'; "
                             "no '/' or '..'): the dataset is written to <output_dir>/data/<name>")


@dataclass
class DataConfig:
    tasks: list[DataTaskConfig]  # one entry per model task: its dataset and sampling weight
    root: str | None = None  # folder holding the datasets; None: data_root()'s rule ($BACKBONE_ROUTER_DATA, ../shared/data)
    synthetic: SyntheticConfig | None = None  # when set: generate the procedural dataset and use it as root
    image_size: int = 224  # side of the square random-resized training crop
    eval_size: int | list[int] = 224  # deterministic eval resize: side or [h, w]; seg is scored at this size
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])  # area range of the random crop
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 1.3333])  # aspect range of the random crop
    hflip: bool = True  # random horizontal flip (image and mask together)
    vflip: bool = False  # random vertical flip (for textures and top-down views)
    color_jitter: float = 0.1  # brightness / contrast (/ saturation for RGB) jitter strength; 0 disables
    val_fraction: float = 0.15  # share of train carved off as val for datasets without a val split
    val_seed: int = 0  # seed of that carve-off (fixed: the same val set in every run)
    num_workers: int = 0  # DataLoader worker processes per training process

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("data.tasks: at least one task is needed")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"data.tasks: names must be unique, got {names}")
        if sum(t.weight for t in self.tasks) <= 0:
            raise ValueError("data.tasks[].weight: at least one task needs a weight > 0")
        for key in ("crop_scale", "crop_ratio"):
            lo_hi = getattr(self, key)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"data.{key}: expected [low, high] with 0 < low <= high, got {lo_hi}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.val_fraction: expected a value in (0, 1), got {self.val_fraction}")
        check_size("data.image_size", self.image_size)
        check_pixels("data.image_size", self.image_size)
        if not math.isfinite(self.color_jitter) or self.color_jitter < 0:
            raise ValueError(f"data.color_jitter: expected a finite strength >= 0 (0 disables), got {self.color_jitter}")
        check_eval_size("data.eval_size", self.eval_size)
        check_size("data.num_workers", self.num_workers, 0)

    def task(self, name: str) -> DataTaskConfig:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"data.tasks: no task named {name!r}; tasks are {[t.name for t in self.tasks]}")


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps (each of grad_accum_steps micro-batches)
    seed: int = 0  # seeds the model init, the task/batch schedule and the augmentation
    batch_size: int = 8  # images per micro-batch per process (global batch = batch_size x processes)
    eval_batch_size: int = 16  # images per eval batch per process
    grad_accum_steps: int = 1  # micro-batches per optimizer step (each may be a different task)
    lr: float = 1e-3  # peak learning rate of the router and heads
    weight_decay: float = 0.05  # AdamW decay of 2-D+ weights (norms, biases and other 1-D params: none)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    warmup_steps: int = 50  # linear warmup steps, then cosine decay to min_lr_ratio x lr at max_steps
    min_lr_ratio: float = 0.05  # final learning rate as a fraction of the peak
    grad_clip: float = 1.0  # max global grad norm on sync steps; 0 disables
    phase2_step: int | None = None  # from this step the extractors' last ExtractorConfig.unfreeze_last blocks train
    phase2_lr_scale: float = 0.1  # learning rate of the unfrozen extractor blocks relative to lr
    phase2_warmup_steps: int = 20  # linear warmup of the extractor learning rate from phase2_step
    freeze_bn_stats: bool = True  # extractor BatchNorm layers keep their running statistics in phase 2
    loss: dict[str, Any] = field(default_factory=dict)  # task -> loss spec for heads.losses.build_loss; default per type
    loss_weights: dict[str, float] = field(default_factory=dict)  # task -> multiplier of its loss; default 1
    aux_loss_weight: float = 1.0  # multiplier of the model's gate auxiliary loss (already weighted in the gate)
    prior_init: bool = True  # init binary seg biases from the measured foreground fraction of the training masks
    eval_every: int = 200  # evaluate every n steps (and at the end)
    save_every: int = 200  # checkpoint every n steps (and at the end)
    keep_last: int = 2  # checkpoints kept in <output_dir>/checkpoints
    log_every: int = 10  # steps between progress/TensorBoard updates (the only host syncs of the loss)
    on_nonfinite: str = "stop"  # NaN/inf loss: "stop" (exit, last checkpoint kept) or "skip" (drop that optimizer step)

    def __post_init__(self):
        for key in ("max_steps", "batch_size", "eval_batch_size", "grad_accum_steps", "eval_every", "save_every",
                    "keep_last", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.phase2_step is not None and self.phase2_step < 0:
            raise ValueError(f"train.phase2_step: must be >= 0 or null, got {self.phase2_step}")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas: expected two values, got {self.betas}")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite: expected 'stop' or 'skip', got {self.on_nonfinite!r}")
        for key in ("lr", "weight_decay", "grad_clip", "phase2_lr_scale", "aux_loss_weight", "min_lr_ratio"):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"train.{key}: expected a finite number, got {getattr(self, key)}")
        if not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas: expected two values in [0, 1), got {self.betas}")
        if self.seed < 0:
            raise ValueError(f"train.seed: must be an int >= 0, got {self.seed}")
        for task, w in self.loss_weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"train.loss_weights.{task}: expected a finite number >= 0, got {w!r}")
        for key in ("lr", "weight_decay", "grad_clip", "phase2_lr_scale", "warmup_steps", "phase2_warmup_steps",
                    "aux_loss_weight"):
            if getattr(self, key) < 0 or (key == "lr" and self.lr == 0):
                raise ValueError(f"train.{key}: must be {'> 0' if key == 'lr' else '>= 0'}, got {getattr(self, key)}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")


@dataclass
class ExperimentConfig:
    model: RouterConfig  # the Router: extractors, tasks, fusion, gate, heads (a saved config.json is one)
    data: DataConfig  # datasets per task, augmentation, evaluation size
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation schedule, losses, checkpoints

    def __post_init__(self):
        for key in MODEL_SIZES:  # those the model section has (RouterConfig may not check them itself)
            node: Any = self.model
            for part in key.split("."):
                node = getattr(node, part, None)
            if node is not None:
                check_size(f"model.{key}", node)
        model_tasks = [t.name for t in self.model.tasks]
        data_tasks = [t.name for t in self.data.tasks]
        if sorted(model_tasks) != sorted(data_tasks):
            raise ValueError(
                f"data.tasks {data_tasks} must name exactly the model tasks {model_tasks} (one dataset per task)"
            )
        for key in ("loss", "loss_weights"):
            unknown = sorted(set(getattr(self.train, key)) - set(model_tasks))
            if unknown:
                raise ValueError(f"train.{key}: unknown task(s) {unknown}; tasks are {model_tasks}")
        for t in self.model.tasks:  # defaults per task type, written out so the resolved config shows them
            default = DEFAULT_SEG_LOSS if t.type == "seg" else DEFAULT_CLS_LOSS
            self.train.loss.setdefault(t.name, copy.deepcopy(default))
            self.train.loss_weights.setdefault(t.name, 1.0)
            self.train.loss_weights[t.name] = float(self.train.loss_weights[t.name])

    # ---- dict / file round trip ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any], overrides: list[str] | None = None, where: str = "config") -> ExperimentConfig:
        """Strict decode, then apply dotted overrides to the fully resolved dict and decode again."""
        cfg = decode(cls, data, where)
        if not overrides:
            return cfg
        full = cfg.to_dict()
        for item in overrides:
            apply_override(full, item)
        # Per-task losses the file did not write were filled in as defaults; an override of `model.tasks` that
        # drops a task drops those too (what the file or an override wrote for it is still checked).
        written = {key: set((data.get("train") or {}).get(key) or {}) for key in ("loss", "loss_weights")}
        named = {o.split("=", 1)[0].strip() for o in overrides}
        tasks = {t.get("name") for t in (full.get("model") or {}).get("tasks") or [] if isinstance(t, dict)}
        for key, in_file in written.items():
            per_task = full.get("train", {}).get(key)
            for name in list(per_task or {}):
                entry = f"train.{key}.{name}"
                overridden = f"train.{key}" in named or any(k == entry or k.startswith(entry + ".") for k in named)
                if name not in tasks and name not in in_file and not overridden:
                    del per_task[name]
        return decode(cls, full, f"{where} (with overrides)")

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
        path = Path(path)
        return cls.from_dict(load_config_file(path), overrides, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- overrides -------------------------------------------------------------------------------------------
def apply_override(tree: dict[str, Any], item: str, strict: bool = True) -> None:
    """Apply one ``a.b.c=value`` to a nested dict in place (list items by index). The one override parser.

    ``strict`` (on a fully resolved config dict): the path must exist, else an error naming the key. Otherwise (on a
    config file's own dict) missing sections are created and the strict decoder names an unknown key afterwards.
    The value is read as YAML (``20``, ``1e-3``, ``null``, ``[1, 2]``, ``concat``); a value for a field that
    holds a string stays a string, and a float field accepts ``1e-3``.

    >>> tree = {"train": {"max_steps": 10}}
    >>> apply_override(tree, "train.max_steps=2"); tree
    {'train': {'max_steps': 2}}
    """
    if "=" not in item:
        raise ValueError(f"override {item!r}: expected key=value, e.g. train.max_steps=20")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        here = ".".join(parts[: depth + 1])
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if part not in node and not strict:
                node[part] = None if last else {}
            if part not in node:
                near = did_you_mean([part], node, prefix=here[: -len(part)])
                raise ValueError(f"override {key!r}: unknown key {here!r}{near}; expected one of {sorted(node)}")
            if last:
                node[part] = _parse_value(raw, node[part], key)
            else:
                node = node[part]
        elif isinstance(node, list):
            if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                raise ValueError(f"override {key!r}: {here!r} needs a list index in 0..{len(node) - 1}")
            if last:
                node[int(part)] = _parse_value(raw, node[int(part)], key)
            else:
                node = node[int(part)]
        else:
            raise ValueError(f"override {key!r}: {'.'.join(parts[:depth])!r} is a value, not a section")


def _parse_value(raw: str, current: Any, key: str) -> Any:
    try:
        value = yaml.load(raw, Loader=ConfigLoader) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {key}={raw!r}: not a valid value ({e})") from e
    if isinstance(current, str) and not isinstance(value, str) and value is not None:
        return raw  # e.g. model.single=1 names an extractor "1"
    if isinstance(current, float) and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise TypeError(f"override {key}={raw!r}: expected a number") from None
    return value


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved config dicts."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]
