"""Every command the pages under ``docs/`` show runs, at CPU size.

Each page's commands run in order in one folder, as a newcomer would type them (a page whose
commands form independent chains runs as parts, :data:`PARTS`, each in its own folder). The
scale page shows commands for 8 GPUs and several nodes; they run here with only these
substitutions (:func:`cpu_size`): 8 processes become 2, a free port is named (never torchrun's
default 29500), SLURM's variables get one node's values, ``/shared/`` is the test's folder, and
the files that page names (``config.yaml``; ``train.yaml``, ``sft/``, ``pairs.jsonl`` from a
one-iteration ``inpo run``, for the part that uses them) are made first. Lines of a script that
are SLURM's own (``#SBATCH``, ``scontrol``, ``srun``) are not run. A server started with ``&``
is waited for and stopped at ``kill %1``; port 8000 becomes a free one.
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
#: Pages whose commands form independent chains (no command reads what another chain wrote)
#: run as parts, each in a folder of its own, so that ``make test``'s workers share them: a
#: command belongs to the first part naming any of its strings, else to the page's first part.
#: A command placed in the wrong part fails (its inputs are not in its folder).
PARTS = {
    "quickstart.md": {
        "default": (),
        "compare": ("runs/compare", "runs/egpo"),
        "dno": ("default_teacher", "runs/dno"),
        "all": ("algorithms=all",),
    },
    "train.md": {"policy": (), "oracle": ("runs/toy", "runs/gpm", "train-oracle")},
    "your-model.md": {"reward-model": (), "chat": ("toy-chat", "runs/chat")},
    "scale.md": {
        "pipeline": (),
        "train": ("-m inpo precompute", "-m inpo train"),
        "slurm": ("scontrol", "SLURM"),
    },
    "pipeline.md": {"default": (), "chat": ("toy-chat", "runs/chat"), "two": ("runs/two",)},
}
CASES = [
    (page, part) for page in DOCS for part in PARTS.get(page.name, {"all": ()})
]  # fmt: skip


def page_part(page: Path, part: str) -> list[str]:
    """The commands of ``part`` of ``page`` (all of them for a page not in :data:`PARTS`)."""
    parts = PARTS.get(page.name)
    if parts is None:
        return doc_commands(page)
    first = next(iter(parts))

    def owner(cmd: str) -> str:
        return next((p for p, keys in parts.items() if any(k in cmd for k in keys)), first)

    return [c for c in doc_commands(page) if owner(c) == part]


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


def _prepare(work: Path, env: dict, cmds: list[str]) -> None:
    """The files the commands name: ``config.yaml``, and from a one-iteration run of the
    default task ``sft/``, ``pairs.jsonl`` and ``train.yaml``."""
    (work / "config.yaml").write_text("iterations: 1\nmax_prompts: 4\nprompt_repeats: 2\n")
    if not any(x in c for c in cmds for x in ("train.yaml", "sft/", "pairs.jsonl")):
        return
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


def test_the_parts_cover_every_command_once():
    for page in DOCS:
        parts = PARTS.get(page.name, {"all": ()})
        ran = [c for part in parts for c in page_part(page, part)]
        assert sorted(ran) == sorted(doc_commands(page)), page.name
        assert all(page_part(page, part) for part in parts), page.name


@pytest.mark.parametrize("page, part", CASES, ids=[f"{p.name}:{part}" for p, part in CASES])
def test_every_command_of_the_page_runs(page, part, tmp_path):
    """Each command as a user types it, in order, in one folder (``examples/`` copied in).
    ``cmd &`` starts in the background (a server: the test waits for its /health), ``kill %1``
    stops it; port 8000 becomes a free port; shell syntax runs through bash."""
    cmds = page_part(page, part)
    assert cmds, f"{page.name} has a bash block with no command"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    if page.name == "scale.md":
        _prepare(tmp_path, env, cmds)
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
