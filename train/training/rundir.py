"""The output dir of a run: one run at a time, never two runs mixed, and the state a resumed run starts from.

- **Lock.** ``<output_dir>/.lock`` holds the pid, host, script and command of the run using the dir. A second run
  into that dir is refused with the holder named. A lock whose process is gone (same host: the pid no longer runs,
  or runs a newer process) is stale: it is replaced and named. A lock from another host cannot be checked and is
  never taken over, nor is a ``.lock`` that is not one this package writes (garbage, binary, a folder): the error
  names it and says to delete it.
- **No overwrite.** A fresh run (no ``--resume``) into a dir holding a previous run's outputs (``config.yaml``,
  ``metrics.jsonl``, ``final/``, checkpoints, results) is refused unless ``--overwrite``, which removes exactly those
  outputs first (nothing else in the dir).
- **Resume state.** :func:`read_trainer_state` checks a checkpoint's ``trainer_state.json`` (an integer step >= 0,
  the process count); :func:`check_global_batch` refuses a resume whose global batch would change unless asked.

Under ``accelerate launch`` the main process decides and every process raises the same :class:`RunError`.

>>> import tempfile
>>> out = Path(tempfile.mkdtemp())
>>> with claim_output_dir(out, "finetune", outputs=("final",)) as lock:
...     (out / ".lock").is_file()
True
>>> (out / ".lock").exists()
False
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from backbone_router.train.training.errors import RunError

LOCK_NAME = ".lock"
FINETUNE_OUTPUTS = ("config.yaml", "metrics.jsonl", "final", "checkpoints", "tensorboard")
PRETRAIN_OUTPUTS = ("config.yaml", "metrics.jsonl", "final", "tb")
COMPARE_OUTPUTS = ("config.yaml", "results", "results.csv", "results.json", "results.md", "summary.json", "gates.json",
                   "sweeps.json", "ablation.json", "gate_heatmaps.json", "bars.png", "gate_heatmap_*.png", "sweep_*.png",
                   "gate_proof.png")


def add_run_dir_args(parser: argparse.ArgumentParser) -> None:
    """--overwrite and --debug, shared by the scripts that write an output dir."""
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output dir that holds a previous run (its outputs are removed first)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a config or data error")


def with_run_dir(run: Callable[[argparse.Namespace, contextlib.ExitStack], Any], args: argparse.Namespace) -> Any:
    """``run(args, run_dir)`` where `run_dir` (an ExitStack) releases the output dir's lock however the run ends."""
    with contextlib.ExitStack() as run_dir:
        return run(args, run_dir)


# ---- the lock ---------------------------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """When a process started (clock ticks since boot, /proc/<pid>/stat field 22), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


def describe_holder(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid')} on host {holder.get('host')!r} ({holder.get('script')}, started "
            f"{holder.get('started')}: {holder.get('command')})")


def lock_holder(text: str) -> dict[str, Any]:
    """The holder a lock file names; a ValueError saying what is wrong when the text is not a lock this package wrote."""
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"not JSON: {text[:40]!r}") from None
    if not isinstance(holder, dict):
        raise ValueError(f"a JSON {type(holder).__name__}, not an object")
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 2**31:
        raise ValueError(f"'pid' {pid!r} is not a process id")
    if not isinstance(holder.get("host"), str):
        raise ValueError(f"'host' {holder.get('host')!r} is not a host name")
    return holder


def holder_is_stale(holder: dict[str, Any]) -> bool | None:
    """True when the lock's process is gone, False when it runs, None when it cannot be told (another host)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _running(pid):
        return True
    started = _process_start(pid)
    return started is not None and holder.get("pid_start") is not None and started != holder.get("pid_start")


class RunLock:
    """The lock file of an output dir, held by this process until :meth:`release` (or the end of a ``with``)."""

    def __init__(self, path: Path | None, text: str = "", notes: Sequence[str] = ()):
        self.path, self.text, self.notes = path, text, list(notes)
        self.token = ""  # the same random string in every process of this run (names this run's own files)

    def release(self) -> None:
        """Remove the lock file if it is still ours."""
        if self.path is None:
            return
        try:
            if self.path.read_text() == self.text:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self.path = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire_lock(output_dir: Path, script: str) -> RunLock:
    """Create ``<output_dir>/.lock`` atomically (complete content, create-if-absent), replacing a stale one."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    holder = {"pid": os.getpid(), "pid_start": _process_start(os.getpid()), "host": socket.gethostname(),
              "script": script, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    text = json.dumps(holder)
    tmp = output_dir / f".lock.{os.getpid()}.tmp"
    tmp.write_text(text)
    notes = []
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # fails if a lock exists; never a half-written lock
                return RunLock(path, text, notes)
            except FileExistsError:
                pass
            try:
                seen = path.read_text()
                other = lock_holder(seen)
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (OSError, ValueError) as e:  # garbage, binary (UnicodeDecodeError), a folder: not ours to remove
                raise RunError(f"{path}: not a lock file of this package ({e}); if no run is writing to {output_dir}, "
                               f"delete {path} and start again") from None
            stale = holder_is_stale(other)
            if not stale:
                where = ("on another host, so it cannot be checked from here; if that run is over, delete "
                         f"{path}" if stale is None else "and that process is still running")
                raise RunError(f"--output-dir {output_dir} is in use by {describe_holder(other)} {where}; wait for it "
                               "to finish or pick another --output-dir")
            _remove_if_unchanged(path, seen)
            notes.append(f"removed a stale lock of {output_dir}: {describe_holder(other)}, no longer running")
        raise RunError(f"--output-dir {output_dir}: could not take {path} (other runs keep claiming it)")
    finally:
        tmp.unlink(missing_ok=True)


def _remove_if_unchanged(path: Path, seen: str) -> None:
    """Remove a stale lock, unless another run replaced it since it was read (then put that one back)."""
    grave = path.with_name(f"{path.name}.stale.{os.getpid()}")
    try:
        os.rename(path, grave)
    except FileNotFoundError:
        return
    try:
        if grave.read_text() != seen:
            try:
                os.link(grave, path)
            except FileExistsError:
                pass
    finally:
        grave.unlink(missing_ok=True)


# ---- previous outputs -------------------------------------------------------------------------------------------
def previous_outputs(output_dir: Path, outputs: Sequence[str]) -> list[Path]:
    """The outputs of an earlier run present in the dir (names may be glob patterns)."""
    found: list[Path] = []
    for name in outputs:
        found += sorted(output_dir.glob(name)) if any(c in name for c in "*?[") else [output_dir / name]
    return [p for p in found if p.exists()]


def remove_outputs(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def _claim_main(output_dir: Path, script: str, outputs: Sequence[str], resume: bool, overwrite: bool) -> RunLock:
    lock = acquire_lock(output_dir, script)
    try:
        found = previous_outputs(output_dir, outputs)
        if found and not resume and not overwrite:
            names = [p.name + ("/" if p.is_dir() else "") for p in found]
            raise RunError(f"--output-dir {output_dir} holds a previous run ({', '.join(names)}); pass --resume to "
                           "continue it, --overwrite to replace it, or pick another --output-dir")
        if found and overwrite and not resume:
            remove_outputs(found)
            lock.notes.append(f"--overwrite: removed the previous run's {[p.name for p in found]} from {output_dir}")
    except BaseException:
        lock.release()
        raise
    return lock


def claim_output_dir(output_dir: Path, script: str, outputs: Sequence[str], *, resume: bool = False,
                     overwrite: bool = False, accelerator=None) -> RunLock:
    """Lock the output dir for this run and apply the overwrite rule; every process raises the same RunError.

    With an accelerator of several processes, the main process decides (and removes old outputs on --overwrite)
    and sends the outcome to the others; only it holds the lock file. Use the result as a context manager; its
    ``token`` is the same in every process.
    """
    if resume and overwrite:
        raise RunError("--resume continues the run in --output-dir and --overwrite replaces it; pass one of them")
    main = accelerator is None or accelerator.is_main_process
    lock, outcome = RunLock(None), [None, uuid.uuid4().hex[:12]]
    if main:
        try:
            lock = _claim_main(Path(output_dir), script, outputs, resume, overwrite)
        except RunError as e:
            outcome[0] = str(e)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        outcome = broadcast_object_list(outcome)
    if outcome[0] is not None:
        raise RunError(outcome[0])
    lock.token = outcome[1]
    for note in lock.notes:
        print(f"note: {note}", flush=True)
    return lock


# ---- resume state -----------------------------------------------------------------------------------------------
def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.json`` of a checkpoint: ``step`` an integer >= 0, ``world`` (when present) an integer >= 1."""
    path = ckpt / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunError(f"--resume: {path} is not a readable trainer state ({type(e).__name__}: {e}); delete {ckpt} "
                       "to resume from an earlier checkpoint") from e
    if not isinstance(state, dict):
        raise RunError(f"--resume: {path}: expected a JSON object with 'step', got {type(state).__name__}")
    for key, low in (("step", 0), ("world", 1)):
        value = state.get(key)
        if key == "world" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise RunError(f"--resume: {path}: '{key}' must be an integer >= {low}, got {value!r}; delete {ckpt} to "
                           "resume from an earlier checkpoint")
    return state


def check_global_batch(state: dict[str, Any], saved_batch: int, world: int, batch: int, allow_change: bool,
                       ckpt: Path) -> str | None:
    """None when the resumed run keeps the checkpoint's global batch (processes x train.batch_size).

    Otherwise an error, or with ``allow_change`` a note saying what changes.
    """
    then_world = state.get("world")
    if then_world is None:
        return None
    before, now = then_world * saved_batch, world * batch
    if before == now:
        return None
    said = (f"{ckpt} was written by {then_world} process(es) x train.batch_size {saved_batch} = global batch "
            f"{before}; this run has {world} x {batch} = {now}")
    if allow_change:
        return f"--resume: {said}; going on with global batch {now} (--change-global-batch): the batches differ from " \
               "those of an uninterrupted run from here on"
    keep = (f"pass train.batch_size={before // world} to keep the global batch (the run goes on as it would have), "
            if before % world == 0 else "")
    raise RunError(f"--resume: {said}. {keep}or pass --change-global-batch to go on with global batch {now}")
