"""Who am I among the processes of a run: rank, world size, barriers, shards.

Every command runs SPMD, as TRL's trainers do: ``torchrun --nproc_per_node N -m inpo run ...``
or ``accelerate launch -m inpo run ...`` start ``N`` copies of the same program; each splits the
work by rank, and rank 0 alone finishes shared files. One process (``python -m inpo run``) is
the world of size 1, where every helper here is a no-op.

Processes on several machines must share the folders they hand work through (a run folder,
a training's output folder): :func:`check_shared_folder` refuses a launch at once when they do
not, instead of letting each machine write half a run.

The process group comes from accelerate's :class:`~accelerate.PartialState` (gloo on CPU,
NCCL on CUDA): nothing here talks to ``torch.distributed`` except through it. On a machine
without CUDA it is created with ``cpu=True``: without that, accelerate started each torchrun
process as an independent single-process run that raced the others on one output folder.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from inpo.errors import ConfigError

__all__ = ["Dist", "check_shared_folder", "exit_launched", "get_dist", "release", "shard"]

T = TypeVar("T")


def _launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Dist:
    """The run's processes. ``Dist()`` outside a launcher is the single process."""

    def __init__(self) -> None:
        self._state = None
        if _launched():
            import torch
            from accelerate import PartialState

            self._state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def rank(self) -> int:
        return self._state.process_index if self._state is not None else 0

    @property
    def local_rank(self) -> int:
        return self._state.local_process_index if self._state is not None else 0

    @property
    def world(self) -> int:
        return self._state.num_processes if self._state is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> Any:
        """This process's device (``cuda:<local_rank>`` under a launcher with GPUs)."""
        import torch

        if self._state is not None:
            return self._state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def barrier(self) -> None:
        if self._state is not None:
            self._state.wait_for_everyone()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (any picklable object)."""
        if self._state is None:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self._state is None:
            return [obj]
        from accelerate.utils import gather_object

        return list(gather_object([obj]))


_DIST: Dist | None = None


def check_shared_folder(folder: Path | str, key: str) -> None:
    """Refuse (``ConfigError``, on every rank) a multi-process launch whose processes do not
    all see ``folder`` as one folder: rank 0 writes a random token there and every rank reads
    it back. Each machine of a multi-node run holding its own local copy of ``key`` would
    otherwise sample, label and train on half the work each; one process: nothing to check."""
    import secrets
    import socket

    dist = get_dist()
    if dist.world == 1:
        return
    folder = Path(folder)
    token = dist.broadcast(secrets.token_hex(8) if dist.is_main else "")
    probe = folder / f".inpo-shared-{token}"
    created = False
    if dist.is_main:
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    dist.barrier()
    try:
        sees = probe.read_text() == token
    except OSError:
        sees = False
    seen = dist.gather((dist.rank, socket.gethostname(), sees))
    if dist.is_main:
        probe.unlink(missing_ok=True)
    blind = [(rank, host) for rank, host, ok in seen if not ok]
    if blind:
        if created and not any(folder.iterdir()):
            folder.rmdir()  # refused: leave no trace of this launch
        hosts = sorted({host for _, host in blind})
        raise ConfigError(
            f"{key} '{folder}' is not one folder for all {dist.world} processes: rank(s) "
            f"{', '.join(str(r) for r, _ in blind)} (on {', '.join(hosts)}) do not see the file "
            f"rank 0 wrote there. Processes on several machines hand their work over through "
            f"{key}: put it on a file system every machine mounts (NFS, Lustre, a cloud file "
            "store) and give every machine the same path (docs/scale.md)"
        )


def get_dist() -> Dist:
    """The process's :class:`Dist` (created once)."""
    global _DIST
    if _DIST is None:
        _DIST = Dist()
    return _DIST


def release() -> None:
    """Leave the process group, if this process joined one: call once, when its work is done.

    A process that never imported torch, or never joined a group, has nothing to release.
    Objects a run keeps (a DDP model's reducer) can keep gloo's worker threads alive past
    this; :func:`exit_launched` is what makes a launched process's exit safe.
    """
    global _DIST
    _DIST = None
    tdist = sys.modules.get("torch.distributed")
    if tdist is None or not tdist.is_available() or not tdist.is_initialized():
        return
    from accelerate import PartialState

    PartialState().destroy_process_group()


def exit_launched(code: int) -> NoReturn:
    """End a process started by a launcher: exit handlers, then exit without finalization.

    gloo's worker threads drop a finished collective's tensors a moment after the caller sees
    it done; that drop needs the GIL. If the interpreter is finalizing by then, the thread is
    unwound through a ``noexcept`` frame and the process aborts (SIGABRT, "terminate called
    without an active exception") after finishing its work, and torchrun reports the job
    failed. A core dump of one such rank showed exactly that (``ProcessGroupGloo::runLoop`` →
    ``~AsyncBarrierWork`` → ``take_gil`` → ``std::terminate``), in 3 of 130 two-process
    ``inpo run`` launches and once in CI, even with the group destroyed first: the threads
    outlive ``destroy_process_group`` while anything still holds the group. torch has no fix
    (pytorch/pytorch#179291 was abandoned). So the exit handlers run while the interpreter is
    whole (trackers, log handlers, temporary folders, what a normal exit runs), the streams
    are flushed, and ``os._exit`` ends the process without the finalization that races.
    """
    import atexit

    try:
        release()
    finally:
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed (e.g. a broken pipe)
                pass
        os._exit(code)


def shard(items: Sequence[T], rank: int, world: int) -> list[int]:
    """The indices of ``items`` that ``rank`` of ``world`` handles: ``rank, rank + world, …``.

    Round-robin, so ranks get about equal work whatever the order of the items; results are
    merged back by index, so what a stage writes does not depend on ``world``.
    """
    return list(range(rank, len(items), world))
