"""Frozen-feature linear probes: score extractors on any dataset folders (default: MTD, CamVid, flowers12).

    python train/probe.py --random random=local-dir:runs/mae/final \\
        --extractor mae=local-dir:runs/mae/final --extractor smir=local-dir:runs/smir/final \\
        --extractor dino=local-dir:runs/dino/final --output runs/probe.json

What the probes are and how they are scored: train/experiments/probing.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from backbone_router.extractors import create_extractor
from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.train.experiments.probing import (
    extract,
    load_probe_data,
    load_split,
    probe_cls,
    probe_metric,
    probe_seg,
)
from backbone_router.train.training.config import data_root


def parse_named(items: list[str], flag: str) -> list[tuple[str, str]]:
    named = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag} {item!r}: expected NAME=SPEC, e.g. mae=local-dir:runs/mae/final")
        named.append(tuple(item.split("=", 1)))
    return named


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extractor", action="append", default=[], help="NAME=SPEC with its weights (repeatable)")
    parser.add_argument("--random", action="append", default=[], help="NAME=SPEC built with random weights (repeatable)")
    parser.add_argument("--tasks", default="mtd,camvid,flowers12",
                        help="comma-separated dataset folders under the data root (docs/data.md layout); FOLDER:cls "
                             "probes the labels of a folder that also has masks")
    parser.add_argument("--data-root", default=None, help="dataset folders; default: $BACKBONE_ROUTER_DATA or ../shared/data")
    parser.add_argument("--size", type=int, default=160, help="images and masks are resized to size x size")
    parser.add_argument("--seg-epochs", type=int, default=20)
    parser.add_argument("--cls-epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--layers", type=int, default=1,
                        help="probe the concatenated dense maps of the last n blocks (1: the last block; "
                        "4: the usual multi-layer protocol for MAE-style encoders)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", default="runs/probe.json", help="JSON with every metric and the settings")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    entries = [(n, s, True) for n, s in parse_named(args.extractor, "--extractor")]
    entries += [(n, s, False) for n, s in parse_named(args.random, "--random")]
    if not entries:
        parser.error("name at least one --extractor or --random NAME=SPEC")
    root = Path(args.data_root) if args.data_root else data_root()
    tasks, data_cfg = load_probe_data(root, [t.strip() for t in args.tasks.split(",") if t.strip()], args.size)
    data = {}
    for name, td in tasks.items():
        data[name] = {split: load_split(td, split, data_cfg) for split in ("train", "val")}
        print(f"{name}: {len(td.train)} train / {len(td.val)} test images", flush=True)

    results = {}
    for name, spec, pretrained in entries:
        torch.manual_seed(args.seed)
        extractor = create_extractor(spec, pretrained=pretrained, layers=args.layers).eval()
        row = {"spec": spec, "pretrained": pretrained}
        for task, td in tasks.items():
            kind, metric, classes, ignore = td.task.type, probe_metric(td), td.task.num_classes, td.task.ignore_index
            tic = time.time()
            train_x = extract(extractor, data[task]["train"]["images"], kind)
            test_x = extract(extractor, data[task]["val"]["images"], kind)
            train_y, test_y = data[task]["train"]["targets"], data[task]["val"]["targets"]
            if kind == "seg":
                r = probe_seg(train_x, train_y, test_x, test_y, classes, ignore, args.seg_epochs, args.lr, args.seed)
                row[f"{task}_{metric}"] = r[metric]
                row[f"{task}_per_class_iou"] = [None if v != v else round(v, 4) for v in r["iou"].values()]
            else:
                row[f"{task}_{metric}"] = probe_cls(train_x, train_y, test_x, test_y, classes, args.cls_epochs, args.lr, args.seed)
            print(f"  {name:>12} {task:>10} {metric}: {row[f'{task}_{metric}']:.4f} ({time.time() - tic:.0f}s)", flush=True)
        results[name] = row

    columns = [f"{t}_{probe_metric(td)}" for t, td in tasks.items()]
    lines = ["| extractor | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{100 * r[c]:.1f}" for c in columns) + " |" for n, r in results.items()]
    print("\n".join(lines))
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("extractor", "random")} | {"data_root": str(root)},
              "results": results, "table": lines}
    atomic_write_bytes(Path(args.output), (json.dumps(report, indent=2) + "\n").encode())
    print(f"wrote {args.output}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
