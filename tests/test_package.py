"""The package's promises: light imports, and every command the README shows runs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HEAVY = ("transformers", "datasets", "accelerate", "matplotlib", "httpx", "peft", "tensorboard")


@pytest.mark.parametrize(
    "module", ["inpo", "inpo.losses", "inpo.game", "inpo.oracles", "inpo.selection", "inpo.cli"]
)
def test_import_is_light(module):
    code = (
        f"import sys, json; import {module}; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [], f"`import {module}` loaded {out.stdout.strip()}"


def test_import_inpo_loads_only_stdlib():
    code = "import sys; import inpo; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cli_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "inpo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "game" in out.stdout
    out = subprocess.run([sys.executable, "-m", "inpo", "gam"], capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'game'" in out.stderr


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    cmds = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


def test_readme_has_the_two_quick_start_commands():
    cmds = _commands()
    assert cmds[:2] == ["make run", "make test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def _make_dry_run(target: str) -> list[str]:
    out = subprocess.run(
        ["make", "-n", "-o", ".venv-installed.stamp", target],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return [line for line in out.stdout.splitlines() if line.strip()]


@pytest.mark.parametrize("command", _commands())
def test_readme_command_runs(command, tmp_path):
    """Every shell command in the README runs (``make test`` as a dry run: no recursion)."""
    env = {**os.environ, "MPLBACKEND": "Agg"}
    if command == "make test":
        lines = _make_dry_run("test")
        assert any("pytest" in line for line in lines), lines
        return
    if command.startswith("make "):
        lines = [ln for ln in _make_dry_run(command.split()[1]) if ln.startswith("inpo ")]
        assert lines, f"`{command}` runs no inpo command"
        to_run = lines
    else:
        to_run = [command]
    for line in to_run:
        proc = subprocess.run(
            shlex.split(line), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
        )
        assert proc.returncode == 0, (
            f"`{line}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {})
