"""Shared fixtures. Tests build their own tiny models; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The real-model tier's SmolLM2 lives in the user's inpo cache (`make real-model`), not the tests'.
os.environ.setdefault(
    "INPO_REAL_MODEL_CACHE",
    os.environ.get("INPO_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "inpo"),
)
# The default task's reference model is cached here once per test session, not in ~/.cache.
os.environ.setdefault("INPO_CACHE_DIR", tempfile.mkdtemp(prefix="inpo-test-cache-"))


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
