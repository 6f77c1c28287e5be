"""How fine a grid each segmentation task needs: the stride-s ceiling of its masks, and a saved model against it.

    python train/ceiling.py --config configs/compare_levels.yaml                  # every seg task, strides 1-32
    python train/ceiling.py --config configs/mtd_camvid_flowers.yaml --by-label \\
        --model runs/x/final --json runs/x/ceiling.json data.eval_size=128 data.tasks.2.eval_size=[120,160]

For every segmentation task of the config (experiment or comparison config; `key=value` overrides as in
finetune), the val masks at the task's eval size are averaged over stride x stride blocks and upsampled
bilinearly, and that prediction is scored as the task is scored (foreground IoU for two classes, at the best
of a few thresholds; else mIoU): what a head that sees only that stride could reach at best (train/experiments/resolution.py).
`--by-label` splits the images by their dataset's labels.csv class where it has one (MTD's defect type); `--model` (repeatable)
scores saved Routers on the same images, with, for two classes, how many foreground images it finds at all.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.heads.losses import class_argmax
from backbone_router.router import Router
from backbone_router.train.experiments.compare_config import load_compare_config
from backbone_router.train.experiments.resolution import ALL, GridCeiling, GroupIoU
from backbone_router.train.training.config import ExperimentConfig, load_config_file
from backbone_router.train.training.data import TaskDataset, prepare_experiment_data, read_image_labels
from backbone_router.train.training.errors import RunError, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment or comparison YAML (its data and model.tasks)")
    p.add_argument("--strides", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--tasks", nargs="+", default=None, help="segmentation task names (default: every seg task)")
    p.add_argument("--by-label", action="store_true",
                   help="split images by their dataset's labels.csv class (datasets without one: not split)")
    p.add_argument("--model", action="append", default=[],
                   help="a saved Router (save_pretrained dir or hub id) to score too (repeatable)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write every figure here (temp file, then rename)")
    p.add_argument("--debug", action="store_true", help="full tracebacks instead of one error line")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    return p.parse_args(argv)


def load_any_config(path: str, overrides: list[str]) -> ExperimentConfig:
    """An experiment config, or the experiment part of a comparison config (it has a `compare` section)."""
    if "compare" in load_config_file(path):
        return load_compare_config(path, overrides)[0]
    return ExperimentConfig.from_file(path, overrides)


def task_figures(ds: TaskDataset, strides: list[int], labels: dict[str, str] | None, models: dict,
                 batch_size: int, device: str) -> dict:
    """The ceiling per stride (and group) of one task's val masks, and each model's score on them."""
    task = ds.td.task
    ceiling = GridCeiling(task.num_classes, strides, task.ignore_index)
    scored = {name: GroupIoU(task.num_classes, task.ignore_index) for name in models}
    for start in range(0, len(ds), batch_size):
        idx = range(start, min(start + batch_size, len(ds)))
        samples = [ds[i] for i in idx]
        masks = torch.stack([s["target"] for s in samples])
        groups = None
        if labels is not None:
            missing = [ds.items[i].stem for i in idx if ds.items[i].stem not in labels]
            if missing:
                raise RunError(f"{ds.td.folder / 'labels.csv'}: no label for stem {missing[0]!r} (val of {task.name})")
            groups = [labels[ds.items[i].stem] for i in idx]
        ceiling.update(masks, groups)
        if models:
            images = torch.stack([s["image"] for s in samples]).to(device)
        for name, model in models.items():
            with torch.no_grad():
                pred = class_argmax(model(images, task=task.name)["seg"]).cpu()
            scored[name].update(pred, masks, groups)
    out = {"task": task.name, "dataset": ds.td.source.dataset, "images": len(ds), "eval_size": ds.eval_size,
           "metric": "fg_iou" if task.num_classes == 2 else "mIoU", **ceiling.compute(), "models": {}}
    for name, meter in scored.items():
        out["models"][name] = {"score": {g: meter.score(g) for g in meter.groups()}}
        if task.num_classes == 2:  # images with foreground, and those where the model hits any of it
            out["models"][name]["found"] = {g: [meter.found[g], meter.images[g]] for g in meter.groups()}
    return out


def format_table(fig: dict, strides: list[int]) -> str:
    """One task's figures as plain text: a row per group; a column per stride, then per model its score and
    (two classes) the foreground images it finds; models are named m1, m2, ... in a legend below."""
    def num(v: float | None) -> str:
        return "  n/a" if v is None or math.isnan(v) else f"{v:5.3f}"

    models = list(fig["models"])
    head = f"{'group':<12} {'share':>5} " + " ".join(f"{'s' + str(s):>5}" for s in strides)
    head += "".join(f" {'m' + str(i + 1):>5} {'found':>7}" for i in range(len(models)))
    lines = [f"{fig['task']} ({fig['dataset']}, {fig['images']} val images, eval size {fig['eval_size']}, "
             f"{fig['metric']}" + (f", thresholds {fig['threshold']})" if fig["threshold"] else ")"), head]
    for g in [ALL, *fig["groups"]]:
        values = fig["overall"] if g == ALL else fig["groups"][g]
        row = f"{g:<12} {num(1.0 if g == ALL else fig['share'][g])} " + " ".join(num(values[s]) for s in strides)
        for name in models:
            m = fig["models"][name]
            found = m.get("found", {}).get(g)
            row += f" {num(m['score'].get(g))} " + (f"{found[0]:>3}/{found[1]:<3}" if found else f"{'':>7}")
        lines.append(row)
    lines += [f"m{i + 1} = {name}" for i, name in enumerate(models)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_any_config(args.config, args.overrides)
    seg = [t.name for t in cfg.model.tasks if t.type == "seg"]
    names = args.tasks or seg
    unknown = [n for n in names if n not in seg]
    if unknown or not names:
        raise RunError(f"--tasks {unknown or names}: expected segmentation tasks of {args.config}: {seg}")
    cfg.model.tasks = [t for t in cfg.model.tasks if t.name in names]
    with tempfile.TemporaryDirectory() as tmp:  # where a config's synthetic dataset is written
        results = run_tasks(args, cfg, names, tmp)
    if args.json:
        record = {"config": args.config, "overrides": args.overrides, "models": args.model, "tasks": results}
        atomic_write_bytes(Path(args.json), (json.dumps(record, indent=1) + "\n").encode())
    return 0


def run_tasks(args: argparse.Namespace, cfg: ExperimentConfig, names: list[str], tmp: str) -> list[dict]:
    """Load the data (a synthetic dataset is written under `tmp`) and the model; print and return each task's figures."""
    _, tasks = prepare_experiment_data(cfg, Path(tmp), True, lambda: None)
    models = {}
    for path in args.model:
        model = Router.from_pretrained(path).to(args.device).eval()
        known = [t.name for t in model.config.tasks]
        missing = [n for n in names if n not in known]
        if missing:
            raise RunError(f"--model {path}: has no task(s) {missing}; its tasks are {known}")
        models[path] = model
    results = []
    for name in names:
        td = tasks[name]
        labels = read_image_labels(td.folder) if args.by_label and (td.folder / "labels.csv").is_file() else None
        fig = task_figures(TaskDataset(td, "val", cfg.data), args.strides, labels, models, args.batch_size,
                           args.device)
        print(format_table(fig, args.strides) + "\n", flush=True)
        results.append(fig)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
