"""The GPU benchmark scripts run on CPU at tiny sizes, so a GPU session does not find them broken.

A GPU is lent for minutes; a script that fails there wastes them. ``benchmarks/gpu_iteration.py
--size tiny`` runs the same two ``inpo run`` commands it runs on a GPU (one process, then FSDP2
through ``torchrun --standalone``, which picks its own free port) and must: reuse the first run's
samples and pairs through the pipeline's resume logic, write its table, and train the same
weights with FSDP as without (fp32 on CPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_iteration_tiny_reuses_upstream_and_fsdp_trains_the_same_weights(tmp_path):
    out = tmp_path / "gpu_iteration.md"
    cmd = [
        sys.executable, str(ROOT / "benchmarks/gpu_iteration.py"), "--size", "tiny",
        "--prompts", "8", "--max-new-tokens", "8", "--eval-prompts", "4",
        "--out", str(out), "--work", str(tmp_path / "work"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=500, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["runs"]["plain"]["reused"] == []
    assert record["runs"]["fsdp"]["reused"] == ["generate", "annotate"]
    assert record["weights_diff"] < 1e-5
    table = out.read_text()
    assert "| fsdp | reused | reused |" in table
    work = tmp_path / "work"
    for name in ("generate/samples.jsonl", "annotate/pairs.jsonl"):
        a, b = (work / k / "iter_000" / name for k in ("plain", "fsdp"))
        assert a.read_bytes() == b.read_bytes()
