"""Child processes under a time limit, each in its own process group, with their output kept: the job runner of
train/gpu_check.py (its parts run as children, so that a hung or crashed part costs only its own time).

>>> done = run_jobs({"hello": {"cmd": ["echo", "hi"], "env": None}}, timeout=10, parallel=1, logs=Path("/tmp/logs"))
>>> done["hello"]["stdout"], job_failed(done["hello"])
('hi\n', None)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def tail(text: str, n: int = 3000) -> str:
    return text[-n:] if text else ""


def run_jobs(jobs: dict[str, dict], timeout: float, parallel: int, logs: Path,
             cwd: Path | None = None) -> dict[str, dict]:
    """Run {name: {"cmd", "env"}} with at most `parallel` at once; each gets its own process group, which is
    stopped (SIGTERM, then SIGKILL) `timeout` seconds after the first start, or when this process is interrupted.
    Each runs in `cwd` (None: this process's folder), its stdout and stderr in `logs`/<name>.out and .err."""
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    pending, running, done = list(jobs), {}, {}

    def finish(name, timed_out):
        proc, t0 = running.pop(name)
        out = (logs / f"{name}.out").read_text(errors="replace")
        err = (logs / f"{name}.err").read_text(errors="replace")
        done[name] = {"cmd": " ".join(map(str, jobs[name]["cmd"])), "rc": proc.returncode, "timed_out": timed_out,
                      "seconds": round(time.monotonic() - t0, 1), "stdout_tail": tail(out, 1500),
                      "stderr_tail": tail(err, 3000), "stdout": out}

    try:
        while pending or running:
            while pending and len(running) < parallel and time.monotonic() < deadline:
                name = pending.pop(0)
                with open(logs / f"{name}.out", "w") as fo, open(logs / f"{name}.err", "w") as fe:
                    proc = subprocess.Popen([str(c) for c in jobs[name]["cmd"]], cwd=cwd, env=jobs[name]["env"],
                                            stdout=fo, stderr=fe, start_new_session=True)
                running[name] = (proc, time.monotonic())
            for name in [n for n, (proc, _) in running.items() if proc.poll() is not None]:
                finish(name, False)
            if time.monotonic() > deadline:
                for name in list(running):
                    stop_group(running[name][0])
                    finish(name, True)
                for name in pending:
                    done[name] = {"cmd": " ".join(map(str, jobs[name]["cmd"])), "rc": None, "timed_out": True,
                                  "seconds": 0.0, "skipped": "time limit reached before it started", "stdout": ""}
                break
            time.sleep(0.2)
    finally:  # an interruption (SIGTERM from an outer `timeout`) stops what is still running
        for proc, _ in running.values():
            stop_group(proc)
    return done


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the child's process group, SIGKILL after 5 s."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def job_failed(job: dict) -> str | None:
    """Why a job failed (time-out, exit code with its last error line), or None."""
    if job.get("skipped"):
        return job["skipped"]
    if job["timed_out"]:
        return f"timed out after {job['seconds']} s"
    if job["rc"] != 0:
        lines = [ln for ln in (job.get("stderr_tail") or "").splitlines() if ln.strip()]
        return f"exit code {job['rc']}: {lines[-1] if lines else '(no stderr)'}"
    return None


def slim(jobs: dict[str, dict]) -> dict[str, dict]:
    """Job records for the JSON: the full stdout only where it failed."""
    return {n: {k: v for k, v in j.items() if k != "stdout" and (k != "stdout_tail" or job_failed(j))}
            for n, j in jobs.items()}
