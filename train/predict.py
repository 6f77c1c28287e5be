"""Run a saved model (a folder or a hub repo id) on images: masks as palette PNGs, classifications as CSV.

    python train/predict.py runs/x/final photos/ --output-dir runs/x/predictions
    python train/predict.py org/my-router a.jpg b.png --task flowers_cls --top-k 3 --output-dir out

Inputs are image files and folders of images (.png, .jpg, .jpeg; not recursive). For every segmentation task the
output dir gets <task>/<image stem>.png: the class index of each pixel at the image's size, with a palette (the
dataset's class colours from its meta.json ``colors``: --meta, or found beside a run's final/; else a fixed
palette). For every classification task it gets <task>.csv: image, label, score (and label_2, score_2, ... with
--top-k). A missing input or an unknown task is one error line (--debug: traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.extractors.io.images import DEFAULT_MAX_PIXELS
from backbone_router.router import Router
from backbone_router.train.training.errors import RunError, run_cli
from backbone_router.train.training.predicting import (
    class_colours,
    find_images,
    labels_csv,
    mask_png,
    run_meta,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a save_pretrained folder (e.g. runs/x/final) or a hub repo id org/name")
    p.add_argument("inputs", nargs="+", help="image files and folders of images")
    p.add_argument("--output-dir", default="predictions", help="where masks and CSVs go (default: predictions)")
    p.add_argument("--task", action="append", default=None, help="a task to predict (repeatable; default: every task)")
    p.add_argument("--top-k", type=int, default=1, help="classification: labels per image in the CSV (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="images of the same size per forward pass")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="larger images are predicted shrunk and resized back (0: always at full size)")
    p.add_argument("--meta", default=None, help="a dataset's meta.json whose 'colors' colour the masks")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a repo id")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    p.add_argument("--debug", action="store_true", help="full tracebacks")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise RunError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    images = find_images(args.inputs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = Router.from_pretrained(args.model, revision=args.revision).to(device).eval()
    names = [t.name for t in model.config.tasks]
    tasks = args.task or names
    if unknown := [t for t in tasks if t not in names]:
        raise RunError(f"--task {unknown}: not a task of {args.model}; its tasks are {names}")
    out = Path(args.output_dir)
    for name in tasks:
        tcfg = model.config.task(name)
        meta = Path(args.meta) if args.meta else run_meta(Path(args.model), name)
        palette, source = class_colours(meta, tcfg.num_classes) if tcfg.type == "seg" else (None, "")
        rows = []
        bar = tqdm(total=len(images), desc=name, unit="image", dynamic_ncols=True)
        for start in range(0, len(images), args.batch_size):
            chunk = images[start: start + args.batch_size]
            preds = model.predict(chunk, task=name, top_k=args.top_k, batch_size=args.batch_size,
                                  max_pixels=args.max_pixels or None)
            for path, pred in zip(chunk, preds):
                if tcfg.type == "seg":
                    atomic_write_bytes(out / name / f"{path.stem}.png", mask_png(pred["mask"], palette))
                else:
                    rows.append((path, pred))
            bar.update(len(chunk))
        bar.close()
        if tcfg.type == "seg":
            print(f"{name}: {len(images)} masks in {out / name} ({source})")
        else:
            atomic_write_bytes(out / f"{name}.csv", labels_csv(rows, args.top_k))
            print(f"{name}: {len(images)} rows in {out / f'{name}.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
