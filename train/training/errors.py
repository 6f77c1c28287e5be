"""One clear error line for the command-line scripts; the full traceback only with ``--debug``.

A config, data or output-dir error (what the user asked for was wrong) is printed as one line, once, from the
main process, and the script exits with code 2. Under ``accelerate launch`` every process usually raises the same
error at the same point; the other processes wait a few seconds for the main one to report it (torchrun then stops
them) and only speak up when the main process did not fail. Any other exception keeps its traceback.

    if __name__ == "__main__":
        sys.exit(run_cli(main))

>>> run_cli(lambda: 0, argv=[])
0
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

EXIT_USAGE = 2  # the exit code of a config, data or output-dir error
GRACE_S = 10.0  # how long a non-main process waits for the main process to report the same error


class RunError(Exception):
    """What the user asked for cannot run (config, data, output dir, checkpoint); the message says why and what to do."""


# Errors whose message already names the file, key or shape and what was expected (config decoding, data checks).
CLEAR_ERRORS = (RunError, ValueError, TypeError, FileNotFoundError, NotADirectoryError)


def error_line(message: str, rank: int = 0) -> str:
    """The one line printed for an error: its message with line breaks folded, and how to see the traceback."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    who = "error" if rank == 0 else f"error (process {rank})"
    return f"{who}: {text}  [--debug for the traceback]"


def run_cli(main: Callable[[], object], argv: list[str] | None = None) -> int:
    """Run a script's main(); a clear error becomes one line on stderr and exit code 2 (re-raised with --debug)."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        code = main()
    except SystemExit as e:
        if debug or not isinstance(e.code, str):
            raise
        return _report(e.code)
    except CLEAR_ERRORS as e:
        if debug:
            raise
        return _report(str(e) if isinstance(e, RunError) else f"{type(e).__name__}: {e}")
    return code if isinstance(code, int) else 0


def _report(message: str) -> int:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        time.sleep(GRACE_S)  # the main process reports the same error and torchrun stops this one meanwhile
    print(error_line(message, rank), file=sys.stderr, flush=True)
    return EXIT_USAGE
