"""The fault-injection seam of the training loop, for tests only (tests/test_reliability.py).

``$BACKBONE_ROUTER_INJECT_FAULT`` is unset in real runs. Its value ``<kind>@<step>[@<rank>]`` makes the
fine-tuning loop fail on purpose: kind ``raise`` raises in that process at that step; ``nan`` makes that
step's loss NaN (in every process, or only in process ``<rank>``). Tests set it in the environment of a
run; no script defines it and no test reaches into a script for it.

>>> import os
>>> os.environ[FAULT_ENV] = "nan@3"
>>> injected_fault(2, 0), injected_fault(3, 0)
(None, 'nan')
>>> del os.environ[FAULT_ENV]
"""

from __future__ import annotations

import os

FAULT_ENV = "BACKBONE_ROUTER_INJECT_FAULT"


def injected_fault(step: int, rank: int) -> str | None:
    """The fault $BACKBONE_ROUTER_INJECT_FAULT asks for at this step and process ("nan"), or None; raises for "raise"."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    kind, at, *who = spec.split("@")
    if int(at) != step or (who and int(who[0]) != rank):
        return None
    if kind == "raise":
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec}) in process {rank} at step {step}")
    return kind
