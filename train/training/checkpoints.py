"""Checkpoints of a fine-tuning run: written atomically, found, checked before loading, and the dir they go to.

``<output_dir>/checkpoints/step_<n>/`` holds what ``accelerator.save_state`` writes plus ``trainer_state.json``
(the step and the process count). It is written to ``.tmp_step_<n>`` and renamed, so a killed run leaves
only complete checkpoints; :func:`latest_checkpoint` takes the newest complete one. Every pickle-format file
in a checkpoint is read with ``torch.load(weights_only=True)`` before ``load_state`` sees it
(:func:`check_checkpoint`).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate.utils import load

from backbone_router.extractors.io.atomic import atomic_write_bytes, current_umask
from backbone_router.router.config import FORMAT_VERSION, RouterConfig
from backbone_router.train.training.config import RESUMABLE_CHANGES, config_differences, load_config_file
from backbone_router.train.training.errors import RunError
from backbone_router.train.training.rundir import check_global_batch, read_trainer_state

CHECKPOINT_FILES = ("model.safetensors", "trainer_state.json")


def latest_checkpoint(output_dir: Path) -> Path | None:
    """checkpoints/step_<n> with the largest n that was completely written (it holds trainer_state.json)."""
    root = output_dir / "checkpoints"
    done = [d for d in root.glob("step_*") if d.name[5:].isdigit() and (d / "trainer_state.json").is_file()]
    return max(done, key=lambda d: int(d.name[5:]), default=None)


def check_output_dir(output_dir: Path) -> None:
    """Create the output dir and write a probe file in it: an unusable dir fails here, before any work."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write_probe_")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SystemExit(f"--output-dir {output_dir}: cannot write there ({type(e).__name__}: {e}); "
                         "pick another --output-dir") from e


def check_free_space(output_dir: Path, model: torch.nn.Module, trainable: int, keep_last: int) -> None:
    """Fail at start when the disk cannot hold keep_last + 1 checkpoints and the final model."""
    state = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    need = (keep_last + 1) * (state + 2 * 4 * trainable) + state  # model + AdamW moments per checkpoint, + final/
    free = shutil.disk_usage(output_dir).free
    if free < need:
        raise SystemExit(f"--output-dir {output_dir}: {free / 2**20:.1f} MiB free, but {keep_last + 1} checkpoints "
                         f"and the final model need about {need / 2**20:.1f} MiB (train.keep_last={keep_last}); free "
                         "space or pick another --output-dir")


def finished_run(output_dir: Path, max_steps: int) -> str | None:
    """With ``--resume``: a one-line note when the run is finished (final/ holds its model: the resume is a no-op, so a
    finished run's final/, card and config stay as they are); None when there is training or final/ left to do. A
    latest checkpoint past ``train.max_steps`` without final/ is an error."""
    ckpt = latest_checkpoint(output_dir)
    step = int(read_trainer_state(ckpt)["step"]) if ckpt is not None else None
    final = output_dir / "final"
    if all((final / name).is_file() for name in ("config.json", "model.safetensors", "README.md")):
        more = (f"; train.max_steps={max_steps} does not extend a finished run: start a new --output-dir"
                if step is not None and max_steps > step else "")
        return (f"--resume: {output_dir} is a finished run (final/ holds the model of step {step}); nothing to do, "
                f"nothing written{more}")
    if step is not None and step > max_steps:
        raise SystemExit(f"--resume: the latest checkpoint {ckpt} is at step {step}, past train.max_steps={max_steps}; "
                         f"resume with train.max_steps>={step}")
    return None


def check_checkpoint(ckpt: Path) -> int:
    """The step of a checkpoint dir, after reading every pickle-format file in it with weights_only=True.

    accelerate's load_state reads optimizer.bin with weights_only=True but skips random_states_<rank>.pkl
    silently when it cannot be read, and would read a pytorch_model.bin when model.safetensors is missing: a
    file we did not write is refused here, naming it.
    """
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file():
            raise SystemExit(f"--resume: {ckpt / name} is missing; {ckpt} was not written by train/finetune.py")
    step = read_trainer_state(ckpt)["step"]
    for f in sorted(ckpt.iterdir()):
        if f.suffix in (".bin", ".pkl", ".pt", ".pth"):
            try:
                load(f, map_location="cpu", weights_only=True)  # accelerate's torch.load, with numpy RNG globals
            except Exception as e:
                first = str(e).splitlines()[0] if str(e) else ""
                raise SystemExit(f"--resume: {f} refused or unreadable with torch.load(weights_only=True) "
                                 f"({type(e).__name__}: {first}); delete {ckpt} to resume from an earlier "
                                 "checkpoint") from e
    return int(step)


def check_resume_config(saved_config: Path, resolved: dict, resume_from: Path | None, world: int, batch: int,
                        change_global_batch: bool) -> str | None:
    """Refuse a resume whose config differs from the run's in keys other than RESUMABLE_CHANGES; a note or None.

    train.batch_size may change when the global batch stays (another process count), or with
    ``change_global_batch``. A model section saved in an older format is compared as it loads (upgraded).
    """
    saved = load_config_file(saved_config)
    model = saved.get("model")
    if isinstance(model, dict) and isinstance(model.get("format_version"), int) and model["format_version"] < FORMAT_VERSION:
        saved["model"] = RouterConfig.from_dict(model, where=f"{saved_config}: model").to_dict()
    changed = [k for k in config_differences(saved, resolved) if k not in RESUMABLE_CHANGES]
    note = None
    if resume_from is not None:
        note = check_global_batch(read_trainer_state(resume_from), saved["train"]["batch_size"], world, batch,
                                  change_global_batch, resume_from)
        if note is None or change_global_batch:
            changed = [k for k in changed if k != "train.batch_size"]
    if changed:
        raise SystemExit(f"--resume: the config differs from {saved_config} in {changed}; only "
                         f"{list(RESUMABLE_CHANGES)} may change when resuming")
    return note


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder into place (the old one, if any, is removed first)."""
    if final.exists():
        trash = final.with_name(f".old_{final.name}_{os.getpid()}")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def disk_full_error(e: OSError, what: str, output_dir: Path) -> RunError | None:
    """One line for a disk that filled (ENOSPC / EDQUOT) while `what` was written, naming what is kept; else None."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    try:
        free = f"{shutil.disk_usage(output_dir).free / 2**20:.1f} MiB free now"
    except OSError:
        free = "free space unknown"
    kept = latest_checkpoint(output_dir)
    then = f"{kept} is intact: free space, then --resume --output-dir {output_dir}" if kept else "free space and start again"
    return RunError(f"{output_dir}: the disk filled while writing {what} ({e.strerror or e}; {free}); {then}")


def save_checkpoint(accelerator, output_dir: Path, step: int, keep_last: int) -> Path:
    """``accelerator.save_state`` into checkpoints/step_<step> atomically (every process); keep the last `keep_last`.

    A full disk is a :class:`RunError` (one line) naming the checkpoint kept; the partial one is removed.
    """
    main_process = accelerator.is_main_process
    ckpt_root = output_dir / "checkpoints"
    tmp, final = ckpt_root / f".tmp_step_{step}", ckpt_root / f"step_{step}"
    if main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # every process: model/optimizer (main) and its own RNG states
        accelerator.wait_for_everyone()
        if main_process:
            mode = 0o666 & ~current_umask()  # safetensors' save_file (model.safetensors) creates files 0600
            for f in tmp.rglob("*"):
                if f.is_file():
                    f.chmod(mode)
            state = {"step": step, "world": accelerator.num_processes}
            atomic_write_bytes(tmp / "trainer_state.json", json.dumps(state).encode())
            replace_dir(tmp, final)
    except OSError as e:
        if (error := disk_full_error(e, f"checkpoint {final.name}", output_dir)) is None:
            raise
        if main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # the partial checkpoint: its space back
        raise error from e
    if main_process:
        done = sorted((d for d in ckpt_root.glob("step_*") if d.name[5:].isdigit()), key=lambda d: int(d.name[5:]))
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume_state(accelerator, ckpt: Path) -> None:
    """``accelerator.load_state`` of a checked checkpoint (weights_only), an error naming it if it does not fit."""
    try:
        accelerator.load_state(str(ckpt), load_kwargs={"weights_only": True})
    except Exception as e:
        raise SystemExit(f"--resume: {ckpt} does not load into this run ({type(e).__name__}: {e})") from e


def resume_run(accelerator, model, ckpt: Path | None, output_dir: Path, phase2, say=print) -> int:
    """The step a ``--resume`` run starts from: 0 without a checkpoint, else the checked checkpoint's step, with the
    phase-2 blocks unfrozen first when it is in phase 2 (so the optimizer state fits) and its state loaded."""
    if ckpt is None:
        say(f"--resume: no checkpoint in {output_dir / 'checkpoints'}; starting from step 0")
        return 0
    step = check_checkpoint(ckpt)
    if phase2.active(step):
        phase2.enter(accelerator.unwrap_model(model))
    resume_state(accelerator, ckpt)
    say(f"resumed from {ckpt} (step {step})")
    return step
