"""`inpo run` on two processes (torchrun, gloo on CPU) leaves the files one process leaves.

The default workload, one iteration of 16 prompts × 4 draws, K = 8. Invariants: ``samples.jsonl``
and ``pairs.jsonl`` byte-identical; the log-prob columns equal to 1e-6; the evaluation metrics
equal; the final weights equal to fp32 tolerance. Then a ``kill -9`` of one rank in the middle
of a stage, and the same command again: the same final weights, and no oracle query asked twice.
FSDP2 (accelerate's plugin, ``train.fsdp=full_shard``; torch's FSDP2 runs on CPU with gloo) is
held to the same invariant. Each test picks a free port (never torchrun's default 29500).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import torchrun

pytestmark = pytest.mark.slow

ARGS = ["iterations=1", "max_prompts=16", "prompt_repeats=4"]


def inpo_run(cwd: Path, run_dir: str, nproc: int, *extra: str, env: dict | None = None):
    launch = [sys.executable, "-m", "inpo"]
    if nproc > 1:
        launch = [*torchrun(nproc), "-m", "inpo"]
    return subprocess.run(
        [*launch, "run", f"run_dir={run_dir}", *ARGS, *extra],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **(env or {})},
        timeout=900,
    )


def _weights(run: Path):
    from safetensors.torch import load_file

    return load_file(run / "iter_000" / "train" / "model" / "model.safetensors")


def _assert_same_run(a: Path, b: Path, weight_atol: float = 1e-5, logps_atol: float = 1e-6) -> None:
    import torch
    from datasets import load_from_disk

    for rel in ("iter_000/generate/samples.jsonl", "iter_000/annotate/pairs.jsonl"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    da = load_from_disk(str(a / "iter_000" / "logps" / "data"))
    db = load_from_disk(str(b / "iter_000" / "logps" / "data"))
    for col in ("ref_chosen_logps", "ref_rejected_logps", "prev_chosen_logps"):
        torch.testing.assert_close(
            torch.tensor(db[col]), torch.tensor(da[col]), rtol=0, atol=logps_atol, msg=col
        )
    fa, fb = (json.loads((r / "iter_000/logps/data/manifest.json").read_text()) for r in (a, b))
    for key in ("rows", "truncated_prompts", "truncated_completions", "longest_prompt_tokens"):
        assert fb[key] == fa[key], key  # counted over every rank's shard
    assert fb["longest_completion_tokens"] == fa["longest_completion_tokens"] > 0
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("duality_gap", "exploitability", "win_rate_vs_ref", "kl_to_ref"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), key
        assert ra["oracle_queries"] == rb["oracle_queries"]
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=weight_atol, msg=k)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("one")
    proc = inpo_run(cwd, "run", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


def test_two_processes_leave_the_files_of_one(one_process, tmp_path):
    proc = inpo_run(tmp_path, "run", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # rank 0 reports, once
    _assert_same_run(one_process, tmp_path / "run")
    assert not list((tmp_path / "run").glob("oracle_cache.rank*"))  # folded into the cache


def _backend_queries(run: Path) -> int:
    manifest = json.loads((run / "iter_000" / "annotate" / "manifest.json").read_text())
    return manifest["summary"]["backend_queries"]


@pytest.mark.parametrize(
    "stage, engine",
    [
        # CI keeps annotate and train-fsdp; the rest is `make faults` (the whole matrix)
        pytest.param("generate:1", (), id="generate", marks=pytest.mark.faults),
        pytest.param("annotate:1", (), id="annotate"),
        pytest.param("train:2", (), id="train", marks=pytest.mark.faults),
        # a sharded checkpoint, gathered to rank 0 and re-sharded on resume
        pytest.param("train:2", ("train.fsdp=full_shard",), id="train-fsdp"),
        pytest.param("evaluate:1", (), id="evaluate", marks=pytest.mark.faults),
    ],
)
def test_kill_one_rank_then_rerun(one_process, tmp_path, stage, engine):
    """SIGKILL of rank 1 inside a stage kills the job (torchrun); the same command resumes."""
    batch = ["generate.batch_size=8", "annotate.batch_size=16", "train.save_steps=1", *engine]
    killed = inpo_run(
        tmp_path, "run", 2, *batch, env={"INPO_FAULT_KILL": stage, "INPO_FAULT_RANK": "1"}
    )
    assert killed.returncode != 0
    name = stage.split(":")[0]
    assert not (tmp_path / "run" / "iter_000" / name / "manifest.json").exists()
    again = inpo_run(tmp_path, "run", 2, *batch)
    assert again.returncode == 0, again.stderr[-3000:]
    cache = tmp_path / "run" / "oracle_cache.sqlite"
    import sqlite3

    (stored,) = sqlite3.connect(cache).execute("SELECT COUNT(*) FROM answers").fetchone()
    if name == "annotate":
        # the queries answered before the kill were not asked again: the two runs together
        # asked the backend exactly the distinct queries the cache holds
        assert _backend_queries(tmp_path / "run") < stored
    _assert_same_run(one_process, tmp_path / "run")


def test_fsdp_two_processes_train_the_weights_of_one(one_process, tmp_path):
    proc = inpo_run(tmp_path, "run", 2, "train.fsdp=full_shard")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(one_process, tmp_path / "run")


def _assert_same_files(a: Path, b: Path, weight_atol: float = 1e-5) -> None:
    """Every stage folder of run ``a`` has its twin in ``b``: the same samples and pairs byte
    for byte, the same metrics and weights to fp32 tolerance (half steps included)."""
    import torch
    from safetensors.torch import load_file

    names = ("samples.jsonl", "pairs.jsonl")
    files = sorted(p.relative_to(a) for n in names for p in a.rglob(n))
    assert files, a
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    models = sorted(p.relative_to(a) for p in a.rglob("train/model/model.safetensors"))
    assert models == sorted(p.relative_to(b) for p in b.rglob("train/model/model.safetensors"))
    for rel in models:
        wa, wb = load_file(a / rel), load_file(b / rel)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=weight_atol, msg=f"{rel}: {k}")
    fa, fb = (json.loads((r / "iter_000/logps/data/manifest.json").read_text()) for r in (a, b))
    for key in ("rows", "truncated_prompts", "truncated_completions", "longest_prompt_tokens"):
        assert fb[key] == fa[key], key  # counted over every rank's shard
    assert fb["longest_completion_tokens"] == fa["longest_completion_tokens"] > 0
    ma = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(ma, mb, strict=True):
        for key in ("duality_gap", "kl_to_ref", "oracle_queries", "pairs"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-6), key


@pytest.mark.parametrize(
    "algorithm",
    [
        # the mixture sampler (π_t and π_ref in one generate loop)
        pytest.param(["algorithm=nash_md"], id="nash_md"),
        # two policy steps an iteration, the second sampling the half step's policy
        pytest.param(["algorithm=egpo"], id="egpo"),
        # all-pairs win rates, a margin, DPO against the previous iterate
        pytest.param(["algorithm=dno"], id="dno"),
        # the anchor moved to π_1 for the second iteration's log-probs
        pytest.param(
            ["algorithm=comal", "ref_update_every=1", "iterations=2", "max_prompts=8"],
            id="comal",
        ),
        # tied finals kept as ties
        pytest.param(["algorithm=todo", "annotate.tie_policy=tie"], id="todo"),
    ],
)
def test_nash_family_on_two_processes(tmp_path, algorithm):
    """Every algorithm of the Nash family leaves on 2 processes the files of 1 process."""
    one = inpo_run(tmp_path, "one", 1, *algorithm)
    assert one.returncode == 0, one.stderr[-3000:]
    two = inpo_run(tmp_path, "two", 2, *algorithm)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_same_files(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize(
    "extra",
    [["train.data.share_prompt=true"], ["train.data.share_prompt=true", "train.data.packing=true"]],
    ids=["shared", "shared-packed"],
)
def test_shared_prompt_run_leaves_the_files_of_the_unshared_run(one_process, tmp_path, extra):
    """``train.data.share_prompt=true``: the logps stage and the train stage compute each pair's
    prompt once (one row ``prompt + chosen + rejected``), packed or not: the same pairs,
    log-probs, weights and metrics as the default."""
    proc = inpo_run(tmp_path, "run", 1, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run/iter_000/logps/data/manifest.json").read_text())
    assert manifest["share_prompt"] is True
    # another attention kernel (a 4D mask) and summation order: float rounding (sums near 7
    # moved 3 ulps), held to the 1e-5
    _assert_same_run(one_process, tmp_path / "run", logps_atol=1e-5)


def test_packed_training_leaves_the_files_of_padded_training(one_process, tmp_path):
    """``train.data.packing=true`` (padding-free rows in the logps and train stages): the same
    pairs, log-probs, weights and metrics as the padded default."""
    proc = inpo_run(tmp_path, "run", 1, "train.data.packing=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_run(one_process, tmp_path / "run")
