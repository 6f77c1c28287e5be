"""Self-supervised pretraining of an in-domain ViT extractor: MAE, SMIR (selective masking) or DINO.

    accelerate launch train/pretrain.py --config configs/pretrain_mae.yaml --output-dir runs/mae [train.max_steps=20 ...]

Writes to the output dir: config.yaml (the resolved config), metrics.jsonl (one line per `train.log_every`
optimizer steps), tb/ (with train.tensorboard: accelerate's TensorBoard tracker) and final/ — the encoder in
timm's own format (config.json + model.safetensors, a plain timm ViT) that
``timm.create_model("local-dir:<output-dir>/final")`` opens and ``create_extractor("timm:local-dir:<output-dir>/final")``
(or ``"local-dir:..."``) loads like any other extractor. A run into a dir holding a previous run is refused unless
--overwrite, and a dir in use by another run is refused naming it (train/training/rundir.py).
The methods, the pool and the loop are train/selfsup/.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed

from backbone_router.extractors.io.atomic import atomic_write_bytes
from backbone_router.train.selfsup.pretrain_config import load_pretrain_config
from backbone_router.train.selfsup.pretraining import (
    build_pool,
    build_pretrainer,
    make_optimizer,
    pretrain,
    save_encoder,
)
from backbone_router.train.selfsup.unlabeled import partition_indices
from backbone_router.train.training.errors import run_cli
from backbone_router.train.training.rundir import (
    PRETRAIN_OUTPUTS,
    add_run_dir_args,
    claim_output_dir,
    with_run_dir,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML/JSON pretraining config (configs/pretrain_*.yaml)")
    parser.add_argument("--output-dir", required=True, help="run folder: config.yaml, metrics.jsonl, final/")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.max_steps=20")
    add_run_dir_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    return with_run_dir(run, parse_args(argv))


def run(args: argparse.Namespace, run_dir: contextlib.ExitStack) -> Path:
    cfg = load_pretrain_config(args.config, args.overrides)
    t = cfg.train
    out = Path(args.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=t.grad_accum_steps, mixed_precision=t.mixed_precision,
                              log_with="tensorboard" if t.tensorboard else None,
                              project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out)))
    run_dir.enter_context(claim_output_dir(out, "pretrain", PRETRAIN_OUTPUTS, overwrite=args.overwrite,
                                           accelerator=accelerator))
    set_seed(t.seed)
    if t.cpu_threads is not None and accelerator.device.type == "cpu":
        torch.set_num_threads(t.cpu_threads)

    # ---- data: the pool, split into partitions for SMIR
    pool = build_pool(cfg)
    phases = partition_indices(len(pool), cfg.smir.partitions, t.seed) if cfg.method == "smir" else [list(range(len(pool)))]
    if min(len(p) for p in phases) < t.batch_size:
        accelerator.print(f"note: a pool part has {min(len(p) for p in phases)} images < batch {t.batch_size}; "
                          "batches are smaller there")

    # ---- model and optimizer
    model = build_pretrainer(cfg)
    optimizer = make_optimizer(model, cfg)
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
        (out / "metrics.jsonl").write_text("")
        accelerator.print(f"{cfg.method}: {len(pool)} images from {cfg.data.datasets} ({cfg.data.splits}) under "
                          f"{cfg.data.resolved_root()}; {t.max_steps} steps in {len(phases)} phase(s)")
    if t.tensorboard:
        accelerator.init_trackers("tb")

    # ---- train, then save the encoder as an extractor
    step, last_loss = pretrain(cfg, accelerator, model, optimizer, pool, phases, out)
    accelerator.wait_for_everyone()
    final = out / "final"
    if accelerator.is_main_process:
        save_encoder(cfg, accelerator.unwrap_model(model), final, step, len(pool), last_loss, accelerator.num_processes)
        accelerator.print(f"saved {final} (load with create_extractor('local-dir:{final}'))")
    accelerator.end_training()
    return final


if __name__ == "__main__":
    sys.exit(run_cli(main))
