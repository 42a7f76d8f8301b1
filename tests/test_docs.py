"""Every command the pages under ``docs/`` show runs, at CPU size.

Each page's commands run in order in one folder, as a newcomer would type them. The scale page
shows commands for 8 GPUs and several nodes; they run here with only these substitutions
(:func:`cpu_size`): 8 processes become 2, a free port is named (never torchrun's default
29500), SLURM's variables get one node's values, ``/shared/`` is the test's folder, and the
files that page names (``config.yaml``, ``train.yaml``, ``sft/``, ``pairs.jsonl``) are made
first from a one-iteration ``inpo run``. Lines of a script that are SLURM's own (``#SBATCH``,
``scontrol``, ``srun``) are not run. A server started with ``&`` is waited for and stopped at
``kill %1``; port 8000 becomes a free one.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
#: The real-model page's commands run in the real-model tier (tests/test_real_model.py).
REAL_MODEL_PAGE = "real-model.md"
DOCS = [
    p
    for p in sorted((ROOT / "docs").glob("*.md"))
    if "```bash" in p.read_text() and p.name != REAL_MODEL_PAGE
]


def doc_commands(page: Path) -> list[str]:
    """The commands of a page's fenced ``bash`` blocks (continuation lines joined)."""
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                cmds.append(" ".join(line.split()))
    return cmds


def cpu_size(cmd: str, work: Path) -> list[str] | None:
    """The CPU-sized argv of a page's command, or ``None`` for a line that is SLURM's own."""
    if cmd.startswith(("head=", "scontrol")):
        return None
    port = str(free_port())
    cmd = cmd.removeprefix("srun ")
    cmd = cmd.replace('"$SLURM_NNODES"', "1").replace('"$SLURM_JOB_ID"', "1")
    cmd = cmd.replace('"$head:29613"', f"127.0.0.1:{port}").replace("/shared/", f"{work}/")
    cmd = cmd.replace("--nproc_per_node 8", "--nproc_per_node 2")
    argv = shlex.split(cmd)
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
        if "--rdzv_endpoint" not in argv and "--standalone" not in argv:
            argv[3:3] = ["--master_port", port]
    elif argv[:2] == ["accelerate", "launch"]:
        argv = [sys.executable, "-m", "accelerate.commands.launch", *argv[2:]]
        i = argv.index("--num_processes")
        argv[i : i + 2] = ["--cpu", "--num_processes", "2", "--main_process_port", port]
    return argv


def _prepare(work: Path, env: dict) -> None:
    """The files the pages name, from a one-iteration run of the default task."""
    args = ["run_dir=seed", "iterations=1", "max_prompts=4", "prompt_repeats=2"]
    run = subprocess.run(
        [sys.executable, "-m", "inpo", "run", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    shutil.copytree(work / "seed" / "iter_000" / "train" / "model", work / "sft")
    shutil.copy(work / "seed" / "iter_000" / "annotate" / "pairs.jsonl", work / "pairs.jsonl")
    small = "iterations: 1\nmax_prompts: 4\nprompt_repeats: 2\n"
    (work / "config.yaml").write_text(small)
    # the example's keys, pointed at the files above and cut to CPU size
    import yaml

    cfg = yaml.safe_load((ROOT / "examples" / "train_inpo.yaml").read_text())
    cfg["output_dir"] = "trained"
    cfg["model"]["path"] = "sft/"
    cfg["data"].update(train_file="data/", max_prompt_length=16, max_completion_length=8)
    cfg["loss"]["eta"] = 0.15
    cfg["optim"].update(global_batch_size=8, per_device_batch_size=2, max_steps=2)
    (work / "train.yaml").write_text(yaml.safe_dump(cfg))


#: CPU-size variants of the pipeline commands (appended: later keys win), as the README test
#: does: the commands and their flow run, at a size that keeps the suite short.
FAST = {
    "run": "iterations=1 max_prompts=4 prompt_repeats=1 generate.batch_size=8",
    "compare": "iterations=1 max_prompts=4 prompt_repeats=2",
}
_PIPELINE = re.compile(r"\binpo (?:-q )?(run|compare)\b")


def fast(cmd: str) -> str:
    found = _PIPELINE.search(cmd)
    if found is None or ">" in cmd or " --help" in cmd or "task=prompts" in cmd:
        return cmd
    return f"{cmd} {FAST[found.group(1)]}"


#: Shell syntax a command may use (redirection, pipes, an inline environment variable).
_SHELL = re.compile(r"[<>|;]|^[A-Z_][A-Z0-9_]*=")


def _wait_healthy(port: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"background command exited ({proc.returncode})"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the background server did not answer /health")


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_every_command_of_the_page_runs(page, tmp_path):
    """Each command as a user types it, in order, in one folder (``examples/`` copied in).
    ``cmd &`` starts in the background (a server: the test waits for its /health), ``kill %1``
    stops it; port 8000 becomes a free port; shell syntax runs through bash."""
    cmds = doc_commands(page)
    assert cmds, f"{page.name} has a bash block with no command"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    text = page.read_text()
    if "train.yaml" in text or "sft/" in text:
        _prepare(tmp_path, env)
    port = str(free_port())
    background: list[subprocess.Popen] = []
    try:
        for cmd in cmds:
            cmd = cmd.replace(":8000", f":{port}").replace("--port 8000", f"--port {port}")
            if page.name != "scale.md":  # its commands are sized by cpu_size
                cmd = fast(cmd)
            if "--config_file ds.yaml" in cmd:  # DeepSpeed's: tests/test_training_deepspeed.py
                continue
            if cmd.startswith("kill %"):
                for proc in background:
                    proc.terminate()
                    proc.wait(timeout=30)
                background.clear()
                continue
            if cmd.endswith("&"):
                proc = subprocess.Popen(
                    ["bash", "-c", cmd.removesuffix("&").strip()],
                    cwd=tmp_path,
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
                background.append(proc)
                _wait_healthy(port, proc)
                continue
            if _SHELL.search(cmd):
                argv = ["bash", "-c", cmd]
            else:
                argv = cpu_size(cmd, tmp_path)
                if argv is None:
                    continue
                if argv[0] == "python" or argv[0].endswith("python"):
                    argv[0] = sys.executable
            proc = subprocess.run(
                argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
            )
            assert proc.returncode == 0, f"`{cmd}` failed:\n{proc.stderr[-3000:]}"
            assert "Traceback" not in proc.stderr, f"`{cmd}`:\n{proc.stderr[-3000:]}"
    finally:
        for proc in background:
            proc.kill()
