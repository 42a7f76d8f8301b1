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


def _import_graph() -> dict[str, set[str]]:
    """inpo's modules and the inpo modules each imports, anywhere in it (a function-local or
    ``TYPE_CHECKING`` import counts: it is still a dependency)."""
    import ast

    src = ROOT / "src"
    files = {}
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]  # fmt: skip
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycles():
    """The modules form layers: no module reaches itself through its imports (the graph's
    strongly connected components are single modules)."""
    graph = _import_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert len(graph) > 50 and not cycles, cycles


def test_function_local_imports_of_inpo_say_why():
    """inpo's own modules are imported at the top of a file; an import inside a function keeps
    a heavy package out of its module's import and says which (``# deferred: loads torch``)."""
    import ast

    bare = []
    for path in (ROOT / "src" / "inpo").rglob("*.py"):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("inpo"):
                    said = lines[node.lineno - 1] + lines[node.lineno - 2]
                    if "# deferred: loads" not in said:
                        bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not bare, bare


def test_cli_help_and_unknown_command():
    out = subprocess.run([sys.executable, "-m", "inpo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "game" in out.stdout
    out = subprocess.run([sys.executable, "-m", "inpo", "gam"], capture_output=True, text=True)
    assert out.returncode == 2 and "did you mean 'game'" in out.stderr


def _blocks() -> list[tuple[str, str]]:
    """The README's fenced ``bash`` and ``python`` blocks, in document order."""
    return re.findall(r"```(bash|python)\n(.*?)```", README.read_text(), flags=re.S)


def _commands() -> list[str]:
    cmds = []
    for lang, block in _blocks():
        if lang == "bash":
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
        ["make", "-n", "-o", ".venv/.installed", target],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


#: Fast variants: extra overrides appended to a README command (later keys win).
FAST = {
    "inpo run": ["iterations=1", "max_prompts=4", "prompt_repeats=1", "generate.batch_size=8"],
    "inpo compare": ["iterations=1", "max_prompts=4", "prompt_repeats=2"],
}


def _fast(argv: list[str]) -> list[str]:
    if "task=prompts" in argv:  # toy-sized already, and its export names the last iteration
        return argv
    for prefix, extra in FAST.items():
        if " ".join(argv[:2]) == prefix:
            return argv + extra
    return argv


def _serve(argv: list[str], cwd: Path, env: dict) -> None:
    """Start a server command, wait until it answers /health, stop it."""
    import time
    import urllib.request

    port = int(argv[argv.index("--port") + 1])
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    assert r.status == 200
                    return
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                time.sleep(0.1)
        raise AssertionError(f"`{' '.join(argv)}` never answered /health")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.slow
def test_readme_session(tmp_path):
    """Every command and Python block of the README, in order, in one folder (fast variants:
    ``make test`` as a dry run, pipeline commands with fewer iterations and prompts)."""
    env = {**os.environ, "MPLBACKEND": "Agg", "TQDM_DISABLE": "1"}
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    for lang, block in _blocks():
        if lang == "python":
            code = compile(block, "README.md python block", "exec")
            cwd = os.getcwd()
            os.chdir(tmp_path)
            try:
                exec(code, {})
            finally:
                os.chdir(cwd)
            continue
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            if line == "make test":
                assert any("pytest" in x for x in _make_dry_run("test"))
                continue
            if line.startswith("make "):
                lines = [x for x in _make_dry_run(line.split()[1]) if x.startswith("inpo ")]
                assert lines, f"`{line}` runs no inpo command"
            else:
                lines = [line]
            for cmd in lines:
                argv = _fast(shlex.split(cmd))
                if argv[:2] == ["inpo", "serve-oracle"]:
                    _serve(argv, tmp_path, env)
                    continue
                proc = subprocess.run(
                    argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
                )
                # a launcher's own traceback can push a rank's one-line error out of the tail
                errors = [x for x in proc.stderr.splitlines() if ": error:" in x][:5]
                assert proc.returncode == 0, (
                    f"`{' '.join(argv)}` failed:\n{proc.stdout[-2000:]}\n{errors}\n"
                    f"{proc.stderr[-3000:]}"
                )


def test_the_quick_start_installs_into_the_projects_own_venv():
    """``make run`` creates ``.venv`` (once) and installs torch, then inpo, into it — never into
    whatever ``python3`` is first on the PATH — and runs that environment's ``inpo``."""
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", "-B", "run"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout.splitlines()
    venv_python = str(ROOT / ".venv" / "bin" / "python")
    assert out[0] == f"test -x {venv_python} || python3 -m venv .venv"
    assert out[1].startswith(f"{venv_python} -m pip install -q torch==2.13.0")
    assert out[2] == f'{venv_python} -m pip install -q -e ".[dev]"'
    assert out[-1] == "inpo run"
    path = subprocess.run(
        ["make", "--no-print-directory", "-s", "--eval", "show-path:\n\t@echo $$PATH", "show-path"],
        capture_output=True, text=True, cwd=ROOT, check=True,
    ).stdout  # fmt: skip
    assert path.split(":")[0] == str(ROOT / ".venv" / "bin")  # its `inpo`, its `pytest`
