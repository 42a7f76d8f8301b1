"""One ``inpo run`` per run folder at a time.

Rank 0 holds an exclusive ``flock`` on ``RUN/.lock`` for the whole run; the file holds the
holder's pid, host and start time, so a second run on the folder refuses naming them. The
kernel releases a ``flock`` when its process dies, even by ``kill -9``, so a killed run never
leaves a stale lock behind. (``filelock`` would give the lock but not the holder's identity in
the refusal; this is the same system call with the pid written next to it.)
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from inpo.errors import InpoError

__all__ = ["RunFolderBusy", "acquire"]

LOCK = ".lock"


class RunFolderBusy(InpoError):
    """Another process is running ``inpo run`` on this folder."""


def acquire(run_dir: Path) -> int:
    """Take the folder's lock (non-blocking) and return its file descriptor; raise
    :class:`RunFolderBusy` naming the holder if another process has it."""
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            holder = json.loads(path.read_text())
            who = f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
        except (OSError, ValueError):
            who = "another process"
        raise RunFolderBusy(
            f"run folder {run_dir} is in use by {who}: wait for that run to finish (or stop it), "
            "or choose another run_dir"
        ) from None
    os.ftruncate(fd, 0)
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.write(fd, json.dumps(record).encode())
    return fd
