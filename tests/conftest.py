"""Shared test setup: offline hub, a private Hugging Face home, seeded randomness, real-weight locations.

Environment variables are set at import, before any test imports huggingface_hub / transformers / timm,
because those libraries read them once at import time.
"""

from __future__ import annotations

import atexit
import functools
import os
import runpy
import shutil
import tempfile
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a model hub from the tests
# A fresh, empty HF_HOME (hub cache, accelerate config): a populated cache on the developer's machine must not turn
# the "fails fast offline" tests into failures, nor an accelerate config file change how tests launch.
HF_HOME = tempfile.mkdtemp(prefix="backbone_router_test_hf_home_")
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = HF_HOME
for _var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE"):
    os.environ.pop(_var, None)  # these would point the hub cache elsewhere again
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_weights() -> Path:
    """The real weight files: $BACKBONE_ROUTER_WEIGHTS, else <repo root>/../shared/weights (may not exist)."""
    return Path(os.environ.get("BACKBONE_ROUTER_WEIGHTS", REPO_ROOT.parent / "shared" / "weights"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@functools.cache
def script_main(name: str):
    """The ``main(argv)`` of the command-line script ``train/<name>.py``, run in this process as its command line is.

    Scripts are not modules: nothing imports them. The file is executed (``runpy.run_path``, under a name that is
    not ``__main__``) and its entry point returned, so a test calls the script the way ``python train/<name>.py``
    would, without a subprocess.
    """
    return runpy.run_path(str(REPO_ROOT / "train" / f"{name}.py"), run_name=f"script_{name}")["main"]
