"""The fault-injection hook of the kill-and-resume tests, in one place.

``INPO_FAULT_KILL=<stage>:<n>`` kills the process (SIGKILL, as ``kill -9`` would) right after
unit ``n`` of ``stage`` is safely written: a generation chunk, an annotation batch, a log-prob
column, a training checkpoint (``train:<optimizer steps>``), an evaluation.
``INPO_FAULT_SIGNAL=TERM`` sends SIGTERM instead (a clean stop), ``INT`` SIGINT (Ctrl-C). ``INPO_FAULT_RANK=<r>`` limits
the fault to rank ``r`` of a multi-process run (default: every rank). Unset in normal use.
"""

from __future__ import annotations

import os
import signal

__all__ = ["fault", "train_stop_after"]


def _armed(stage: str) -> str | None:
    spec = os.environ.get("INPO_FAULT_KILL", "")
    if not spec.startswith(f"{stage}:"):
        return None
    rank = os.environ.get("INPO_FAULT_RANK")
    if rank is not None and rank != os.environ.get("RANK", "0"):
        return None
    return spec.split(":", 1)[1]


def fault(stage: str, unit: int) -> None:
    """Die here if the hook names ``stage`` and ``unit`` (see the module docstring)."""
    if _armed(stage) == str(unit):
        die()


def die() -> None:
    named = {"TERM": signal.SIGTERM, "INT": signal.SIGINT}
    sig = named.get(os.environ.get("INPO_FAULT_SIGNAL", ""), signal.SIGKILL)
    os.kill(os.getpid(), sig)


def train_stop_after() -> int | None:
    """Optimizer steps after which the training loop stops as if killed (``train:<n>``)."""
    value = _armed("train")
    return int(value) if value else None
