"""Speed and memory benchmark: each single extractor vs the routed model vs routed top-1, side by side.

    python train/benchmark.py --config configs/tiny.yaml --json out.json
    python train/benchmark.py --config configs/bench_cnn.yaml --batch-sizes 8 --resolutions 224 --ablate bf16 channels_last sdpa
    python train/benchmark.py --config configs/bench_cnn.yaml head.seg_trunk=separable gate.stem_scale=4   # overrides
    OMP_NUM_THREADS=1 python train/benchmark.py --train-step --threads 1 --task cfd_seg --out step.json --ablate bf16 channels_last

``--train-step``: the training step of a comparison variant (``--variant``, default gated_image of
configs/compare_gate.yaml) from cached frozen features next to the smp U-Net peers at the same batch and crop
(default 8 x 256 px), with a per-part profile and FLOPs; features from the configured weights when they are
there (``--features auto``), else random tensors of the right shapes.

Inference and a training step per batch size and resolution, images/s, peak memory, FLOPs (MFU with
``--peak-tflops``), the feature-cache speedup, a host-sync audit and speed-option ablations: what each measures
and how is in :mod:`train.experiments.benchmarking`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from backbone_router.train.experiments.benchmarking import OPTIONS, run_benchmark, run_step_benchmark


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="Router config (a model section or an experiment file; default "
                   "configs/tiny.yaml, with --train-step a comparison file: configs/compare_gate.yaml)")
    p.add_argument("--json", "--out", dest="json", default=None, help="write every figure to this JSON file")
    p.add_argument("--train-step", action="store_true", help="measure the training step of a comparison variant from "
                   "cached features next to the U-Net peers, with a per-part profile (see above)")
    p.add_argument("--variant", default="gated_image", help="--train-step: the routed variant of the comparison file")
    p.add_argument("--peers", nargs="*", default=["peer_unet_frozen", "peer_unet_finetuned"],
                   choices=["peer_unet_frozen", "peer_unet_finetuned"], help="--train-step: the U-Net peers measured")
    p.add_argument("--features", choices=("auto", "real", "random"), default="auto", help="--train-step: the cached "
                   "features from the configured weights (real), random tensors of their shapes, or real when the "
                   "weight files are there (auto)")
    p.add_argument("--profile-steps", type=int, default=2, help="--train-step: steps under torch.profiler")
    p.add_argument("--task", default=None, help="task to route (default: the first segmentation task, else the first)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="square image sides (default 224; with --train-step 256)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="model and images in channels_last")
    p.add_argument("--sdpa", choices=("on", "off"), default="on", help="timm fused (SDPA) attention")
    p.add_argument("--compile", action="store_true", help="torch.compile the router and the extractors")
    p.add_argument("--ablate", nargs="*", default=[], choices=OPTIONS,
                   help="measure routed inference and training at the first size with each option flipped (--train-step: "
                   "bf16 / channels_last on the routed step, with their agreement with fp32)")
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurements")
    p.add_argument("--no-cache", action="store_true", help="skip the frozen-feature cache measurement")
    p.add_argument("--cache-batches", type=int, default=4, help="batches in one head-training epoch")
    p.add_argument("--cache-dir", default=None, help="where the disk feature cache is written (default: a temp dir)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak TFLOP/s for MFU (e.g. 989 for H100 bf16 dense)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="model config overrides, e.g. head.seg_trunk=separable gate.stem_scale=4 "
                   "(before --ablate or --batch-sizes, which would take them as their own values)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    args.config = args.config or ("configs/compare_gate.yaml" if args.train_step else "configs/tiny.yaml")
    args.resolutions = args.resolutions or [256 if args.train_step else 224]
    return (run_step_benchmark if args.train_step else run_benchmark)(args, command)


if __name__ == "__main__":
    main()
