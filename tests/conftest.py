"""Shared fixtures. Tests build their own tiny models; nothing is downloaded."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The default task's reference model is cached here once per test session, not in ~/.cache.
os.environ.setdefault("INPO_CACHE_DIR", tempfile.mkdtemp(prefix="inpo-test-cache-"))


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)
    yield
