"""Speed and memory benchmark: each single extractor vs the routed model vs routed top-1, side by side.

    python train/benchmark.py --config configs/tiny.yaml --json out.json
    python train/benchmark.py --config configs/bench_cnn.yaml --batch-sizes 8 --resolutions 224 --ablate bf16 channels_last sdpa
    python train/benchmark.py --config configs/bench_cnn.yaml head.seg_trunk=separable gate.stem_scale=4   # overrides

Inference and a training step per batch size and resolution, images/s, peak memory, FLOPs (MFU with
``--peak-tflops``), the feature-cache speedup, a host-sync audit and speed-option ablations: what each measures
and how is in :mod:`train.benchmarking`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from train.benchmarking import OPTIONS, run_benchmark


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.yaml", help="Router config (a model section or an experiment file)")
    p.add_argument("--json", default=None, help="write every figure to this JSON file")
    p.add_argument("--task", default=None, help="task to route (default: the first segmentation task, else the first)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[8])
    p.add_argument("--resolutions", type=int, nargs="+", default=[224], help="square image sides")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    p.add_argument("--reps", type=int, default=5, help="timed calls per measurement; the median is reported")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="model and images in channels_last")
    p.add_argument("--sdpa", choices=("on", "off"), default="on", help="timm fused (SDPA) attention")
    p.add_argument("--compile", action="store_true", help="torch.compile the router and the extractors")
    p.add_argument("--ablate", nargs="*", default=[], choices=OPTIONS,
                   help="measure routed inference and training at the first size with each option flipped")
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
    return run_benchmark(args, "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
