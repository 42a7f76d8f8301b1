"""The test suite's fork server (tests/forkserver/) runs an ``inpo`` command as a fresh process
would: the same output and exit status, the signals a test sends reach it, and a command whose
stand-in is killed dies with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from inpo.pipeline.lock import acquire

pytestmark = pytest.mark.skipif(
    "INPO_FORKSERVER_DIR" not in os.environ, reason="INPO_TEST_FORKSERVER=0"
)


def _default_sigint() -> None:
    """As at a terminal: a test runner started in the background passes SIGINT on ignored (and
    a command that inherits it ignored keeps ignoring it, served or fresh)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _fresh_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "INPO_FORKSERVER_DIR"}


def _served(argv: list[str], **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` until the fork server serves it (its first command of an environment starts
    the server and runs fresh)."""
    for _ in range(120):
        proc = subprocess.run(argv, capture_output=True, text=True, **kw)
        if any(p.name.endswith(".sock") for p in _folder().iterdir()):
            return subprocess.run(argv, capture_output=True, text=True, **kw)
        time.sleep(0.5)
    raise AssertionError(f"no fork server started: {proc.stderr[-2000:]}")


def _folder():
    from pathlib import Path

    return Path(os.environ["INPO_FORKSERVER_DIR"])


def test_a_served_command_prints_and_exits_as_a_fresh_one(tmp_path):
    for args in (["game", "--iterations", "3", "--plot", "none"], ["run", "no_such_key=1"]):
        argv = [sys.executable, "-m", "inpo", *args]
        served = _served(argv, cwd=tmp_path)
        fresh = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path,
                               env=_fresh_env())  # fmt: skip
        assert (served.returncode, served.stdout, served.stderr) == (
            fresh.returncode, fresh.stdout, fresh.stderr,
        )  # fmt: skip
    assert fresh.returncode == 2 and "no_such_key" in fresh.stderr


def test_signals_reach_the_command_and_it_dies_with_its_stand_in(tmp_path):
    _served([sys.executable, "-m", "inpo", "--version"])
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "inpo", "run", f"run_dir={run_dir}", "iterations=2"]
    for sig, code in ((signal.SIGINT, 2), (signal.SIGKILL, -9)):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)  # fmt: skip
        deadline = time.time() + 120
        while not (run_dir / "config.yaml").exists():  # the run holds its folder
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == code, err[-2000:]
        if sig == signal.SIGINT:
            assert "stopped (Ctrl-C)" in err
        deadline = time.time() + 10
        while True:  # the command, not only its stand-in, is gone: the folder is free
            try:
                os.close(acquire(run_dir))
                break
            except Exception:
                assert time.time() < deadline, "the command outlived its stand-in"
                time.sleep(0.1)
