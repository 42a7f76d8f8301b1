"""Reliability of `inpo run`: SIGKILL during each stage, re-run, same final weights, no oracle
query repeated (the pipeline's INPO_FAULT_KILL hook kills the process at a fixed point)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ARGS = [
    "iterations=1",
    "max_prompts=4",
    "prompt_repeats=2",
    "generate.batch_size=2",
    "annotate.batch_size=2",
    # a tied final is dropped (the paper's rule): 8 tournaments leave ~3 pairs, so batches of
    # 2 give the steps after the second that the train:2 kill needs
    "train.optim.global_batch_size=2",
    "train.optim.per_device_batch_size=1",
    "train.optim.epochs=2",
    "train.save_steps=1",
]


def _run(
    run_dir: Path, cache: Path, fault: str | None = None, *extra: str
) -> subprocess.CompletedProcess:
    env = {**os.environ, "INPO_CACHE_DIR": str(cache), "TQDM_DISABLE": "1"}
    env.pop("INPO_FAULT_KILL", None)
    if fault:
        env["INPO_FAULT_KILL"] = fault
    return subprocess.run(
        [sys.executable, "-m", "inpo", "run", f"run_dir={run_dir}", *ARGS, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "iter_000" / "train" / "model" / "model.safetensors")


def _cache_rows(run_dir: Path) -> int:
    path = run_dir / "oracle_cache.sqlite"
    if not path.exists():
        return 0
    with sqlite3.connect(path) as con:
        return con.execute("SELECT COUNT(*) FROM answers").fetchone()[0]


def _annotate_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "iter_000" / "annotate" / "manifest.json").read_text())["summary"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    cache = root / "cache"
    proc = _run(root / "base", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, cache, _weights(root / "base"), _cache_rows(root / "base")


#: CI runs one case of each matrix; `make faults` (-m faults) runs every stage.
_ALL = pytest.mark.faults


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param("generate:2", marks=_ALL),
        pytest.param("annotate:2", marks=_ALL),
        pytest.param("logps:1", marks=_ALL),
        "train:2",
        pytest.param("evaluate:1", marks=_ALL),
    ],
)
def test_kill_during_stage_then_resume_gives_same_result(baseline, fault):
    import torch

    root, cache, weights, rows = baseline
    run_dir = root / fault.replace(":", "_")
    killed = _run(run_dir, cache, fault)
    assert killed.returncode == -9, (fault, killed.returncode, killed.stderr[-2000:])
    stage = fault.split(":")[0]
    if stage != "evaluate":  # the first evaluate is π_ref's, before any iteration folder
        assert (run_dir / "iter_000" / f"{stage}.partial").exists()
    rows_before = _cache_rows(run_dir)
    resumed = _run(run_dir, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if stage in ("generate", "train"):
        assert "resuming partial work" in resumed.stderr
    got = _weights(run_dir)
    assert got.keys() == weights.keys()
    for name in weights:
        torch.testing.assert_close(got[name], weights[name], rtol=0, atol=1e-6)
    # Every oracle query was asked once over both processes.
    assert _cache_rows(run_dir) == rows
    summary = _annotate_summary(run_dir)
    if stage in ("generate", "annotate"):
        assert summary["backend_queries"] == rows - rows_before
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [0, 1]


def _default_sigint() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    "fault,signal",
    [("generate:2", "TERM"), ("generate:1", "INT"), pytest.param("annotate:2", "TERM", marks=_ALL)],
)
def test_sigterm_stops_cleanly_and_resumes(baseline, fault, signal):
    """SIGTERM or Ctrl-C (sent by the fault hook at a fixed point) stops the run with a one-line
    message naming it and exit code 2; re-running the command finishes with the same weights."""
    import torch

    root, cache, weights, _rows = baseline
    run_dir = root / (f"sig{signal}_" + fault.replace(":", "_"))
    env = {**os.environ, "INPO_CACHE_DIR": str(cache), "TQDM_DISABLE": "1"}
    env.update({"INPO_FAULT_KILL": fault, "INPO_FAULT_SIGNAL": signal})
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", "run", f"run_dir={run_dir}", *ARGS],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        # as at a terminal: a test runner started in the background (`nohup ... &`) passes
        # SIGINT on ignored, and a process that inherits it ignored rightly keeps ignoring it
        preexec_fn=_default_sigint,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "re-run the same command to continue" in proc.stderr.splitlines()[-1]
    shown = {"TERM": "stopped (SIGTERM)", "INT": "stopped (Ctrl-C)"}[signal]
    assert shown in proc.stderr.splitlines()[-1]
    assert (run_dir / "iter_000" / f"{fault.split(':')[0]}.partial").exists()
    resumed = _run(run_dir, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _weights(run_dir)
    for name in weights:
        torch.testing.assert_close(got[name], weights[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("fault", ["train:2", pytest.param("logps:1", marks=_ALL)])
def test_partial_work_on_old_inputs_is_discarded(baseline, fault):
    """Kill inside a stage, change an *upstream* setting, re-run: the stage's partial work was
    built on the old inputs, so it is discarded (and says why), and the final weights are those
    of a clean run of the final config."""
    import torch

    root, cache, _weights0, _rows = baseline
    changed = "generate.temperature=0.9"  # new samples, so new pairs, log-probs, training data
    clean = root / f"clean_{fault.replace(':', '_')}"
    assert _run(clean, cache, None, changed).returncode == 0
    run_dir = root / f"upstream_{fault.replace(':', '_')}"
    killed = _run(run_dir, cache, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]
    stage = fault.split(":")[0]
    assert (run_dir / "iter_000" / f"{stage}.partial").exists()
    again = _run(run_dir, cache, None, changed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"[iter_000/{stage}] discarding partial work: its inputs changed" in again.stderr
    got, want = _weights(run_dir), _weights(clean)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("limit", [pytest.param(20_000, marks=_ALL), 300_000])
def test_a_full_disk_is_one_line_and_loses_nothing(baseline, limit):
    """Every write past ``limit`` bytes fails (RLIMIT_FSIZE: the kernel answers EFBIG, as a
    full disk answers ENOSPC) — in the cache, a stage file or a checkpoint, by the limit. The
    run stops with one line and exit 2, no traceback; re-run with room, it finishes with the
    weights of a clean run."""
    import resource
    import signal

    import torch

    root, cache, weights, _rows = baseline
    run_dir = root / f"full_{limit}"

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "INPO_CACHE_DIR": str(cache), "TQDM_DISABLE": "1"}
    env.pop("INPO_FAULT_KILL", None)
    full = subprocess.run(
        [sys.executable, "-m", "inpo", "run", f"run_dir={run_dir}", *ARGS],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        preexec_fn=small_disk,
    )
    assert full.returncode == 2, full.stderr[-2000:]
    assert "Traceback" not in full.stderr
    last = full.stderr.strip().splitlines()[-1]
    assert last.startswith("inpo run: error:") and "re-run the same command" in last
    again = _run(run_dir, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    got = _weights(run_dir)
    for name in weights:
        torch.testing.assert_close(got[name], weights[name], rtol=0, atol=1e-6)
