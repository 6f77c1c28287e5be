"""Shared test setup: offline hub, seeded randomness, and the locations of real weights.

Environment variables are set at import, before any test imports huggingface_hub / transformers / timm,
because those libraries read them once at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach a model hub from the tests
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
