"""The test suite's ``inpo`` commands start warm (see ``inpo_forkserver.py`` beside this file).

Python imports this file at start-up in every process the test session starts (``tests/
conftest.py`` puts this folder on ``PYTHONPATH``). In an ``inpo`` command — ``python [-u] -m
inpo ARGS`` or the ``inpo`` console script — that is not a rank of a multi-process launch, it
hands the command to the session's fork server for this environment and becomes its stand-in:
it passes its stdin/stdout/stderr, working folder and environment, forwards the signals it gets,
and exits as the command did. Anything else, or where no server answers, runs as usual.
"""

from __future__ import annotations

import os
import sys


def _command() -> tuple[str, str, list[str], bool] | None:
    """``(mode, target, args, unbuffered)`` of an ``inpo`` command, else ``None``."""
    argv = list(getattr(sys, "orig_argv", ()))
    if len(argv) < 2 or os.environ.get("INPO_FORKSERVER_DIR") is None:
        return None
    if any(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return None  # a rank of torchrun/accelerate: its own fresh process, as a user's
    rest, unbuffered = argv[1:], False
    if rest[0] == "-u":
        rest, unbuffered = rest[1:], True
    if len(rest) >= 2 and rest[0] == "-m" and rest[1] == "inpo":
        return "module", "inpo", rest[2:], unbuffered
    if rest and os.path.basename(rest[0]) == "inpo" and not rest[0].startswith("-"):
        return "script", os.path.abspath(rest[0]), rest[1:], unbuffered
    return None


def _main() -> None:
    cmd = _command()
    if cmd is None:
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import inpo_forkclient as client
    finally:
        sys.path.pop(0)
    client.run(*cmd)  # exits when the server took the command; returns when none answered


_main()
