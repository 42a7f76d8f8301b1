"""Several machines, simulated on one: two ``torchrun --nnodes 2`` launches meeting over
loopback (``--rdzv-endpoint 127.0.0.1:PORT``, a free port), one process each. Each with its own
local folder (no shared file system) they refuse at once, naming the folder; sharing one folder
they train the weights one process trains."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port, tiny_pairs

pytestmark = pytest.mark.slow


def _two_nodes(cwds: list[Path], args: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    procs = []
    for i, cwd in enumerate(cwds):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                  "--nproc_per_node", "1", "--node_rank", str(i), "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "inpo", *args]  # fmt: skip
        procs.append(subprocess.Popen(launch, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


@pytest.mark.parametrize(
    ("command", "key", "folder"),
    [
        (["train", "cfg.yaml", "output_dir=out"], "output_dir", "out"),
        (["run", "run_dir=run"], "run_dir", "run"),
        # each rank decides from the output's folder whether there is work: one folder, or none
        (["precompute", "pairs.jsonl", "--model", "model", "--output", "pre"], "--output", "."),
    ],
    ids=["train", "run", "precompute"],
)
def test_two_machines_without_a_shared_folder_refuse_at_once(tmp_path, command, key, folder):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
        tiny_pairs(node)
    for proc in _two_nodes(nodes, command):
        assert proc.returncode != 0
        line = next(x for x in proc.stderr.splitlines() if x.startswith("inpo "))
        assert f"error: {key} '{folder}' is not one folder for all 2 " in line
        assert "a file system every machine mounts" in line and "docs/scale.md" in line
    written = command[-1].split("=")[-1]
    for node in nodes:  # nothing left behind: no half-written run, model or dataset
        assert not (node / written).exists()
        assert not list(node.glob(".inpo-shared-*"))


def test_two_machines_sharing_the_folder_train_what_one_process_trains(tmp_path):
    import torch
    from safetensors.torch import load_file

    tiny_pairs(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "inpo", "train", "cfg.yaml", "output_dir=one"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    shared = tmp_path / "two"  # one path, the same on both "machines"
    for proc in _two_nodes([tmp_path, tmp_path], ["train", "cfg.yaml", f"output_dir={shared}"]):
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_file(tmp_path / "one" / "model.safetensors")
    b = load_file(shared / "model.safetensors")
    for k in a:  # as tests/test_training_distributed.py: Adam and another summation order
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5)
