"""A fork server for the test suite's ``inpo`` commands: ``python inpo_forkserver.py DIR SIG``.

Each ``inpo`` command a test starts spends ~6 s of CPU importing torch and transformers before
it does anything (the suite starts ~150 of them: a third of its CPU time on two cores). This
process imports those third-party packages once — not inpo itself, so inpo's own import-time
reads happen in the command — and forks a warm copy of itself per command: the copy takes the
command's stdin/stdout/stderr, working folder, environment, umask and ignored signals, becomes
the leader of a new process group, runs the command as ``python -m inpo``/the console script
would, and exits the way it would (a status, or the signal that killed it). If the stand-in
process dies (a test's timeout, SIGKILL), the command's process group is killed.

It serves the environment signature ``SIG`` (:func:`inpo_forkclient.signature`) on
``DIR/SIG.sock``, and exits when the test session that owns it (``INPO_FORKSERVER_OWNER``)
is gone or after 15 idle minutes. Multi-process ranks never come here (each is its own fresh
process), nor does anything a test starts with ``python -c``.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
IDLE_SECONDS = 900


def _preload() -> None:
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import yaml  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        PreTrainedModel,
    )
    from transformers.models.llama import modeling_llama  # noqa: F401

    for name in ("accelerate", "safetensors.torch", "jinja2", "peft"):
        try:
            __import__(name)
        except ImportError:
            pass


def _child(conn: socket.socket, fds: list[int], req: dict) -> int:
    """In the forked copy: become the command and run it; its exit status."""
    os.setpgid(0, 0)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for s in req["ignored"]:
        try:
            signal.signal(s, signal.SIG_IGN)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP
            pass
    import resource

    for name, limits in req["rlimits"].items():
        try:
            resource.setrlimit(getattr(resource, name), tuple(limits))
        except (ValueError, OSError):  # above this process's hard limit: keep its own
            pass
    for i, fd in enumerate(fds):
        os.dup2(fd, i)
        os.close(fd)
    conn.close()
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    os.umask(req["umask"])
    import io

    unbuffered = req["unbuffered"] or bool(os.environ.get("PYTHONUNBUFFERED"))

    def stream(fd: int, mode: str) -> io.TextIOWrapper:
        raw = open(fd, mode + "b", buffering=0 if unbuffered and mode == "w" else -1, closefd=False)
        tty = os.isatty(fd)
        return io.TextIOWrapper(
            raw, encoding="utf-8", errors="strict" if mode == "r" else "backslashreplace"
            if fd == 2 else "strict", line_buffering=mode == "w" and (tty or fd == 2),
            write_through=unbuffered and mode == "w",
        )  # fmt: skip

    sys.stdin, sys.stdout, sys.stderr = stream(0, "r"), stream(1, "w"), stream(2, "w")
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    import random

    import numpy

    random.seed()
    numpy.random.seed()  # noqa: NPY002  (a fresh process seeds the legacy global state)
    import runpy

    try:
        if req["mode"] == "module":
            sys.argv = ["-m", *req["args"]]
            sys.path[0] = os.getcwd()
            runpy.run_module(req["target"], run_name="__main__", alter_sys=True)
        else:
            sys.argv = [req["target"], *req["args"]]
            sys.path[0] = os.path.dirname(req["target"])
            runpy.run_path(req["target"], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def serve(folder: str, sig: str) -> int | None:
    """Serve until idle or orphaned; in a forked command, return its exit status."""
    sys.path.insert(0, HERE)
    from inpo_forkclient import recv_msg, send_msg, signature

    if signature(os.environ) != sig:
        return None
    _preload()
    owner = int(os.environ.get("INPO_FORKSERVER_OWNER", "0"))
    path = os.path.join(folder, sig + ".sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".tmp")
    os.rename(path + ".tmp", path)  # clients connect only once it listens
    listener.listen(64)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # pid -> its stand-in's connection
    last = time.monotonic()
    try:
        while True:
            for key, _ in sel.select(timeout=0.05):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    _, fds, _, _ = socket.recv_fds(conn, 1, 3)
                    req = recv_msg(conn)
                    if not isinstance(req, dict) or len(fds) != 3:
                        for fd in fds:
                            os.close(fd)
                        conn.close()
                        continue
                    pid = os.fork()
                    if pid == 0:
                        sel.close()
                        listener.close()
                        for other in children.values():
                            other.close()
                        return _child(conn, fds, req)
                    for fd in fds:
                        os.close(fd)
                    children[pid] = conn
                    send_msg(conn, {"pid": pid})
                    sel.register(conn, selectors.EVENT_READ, pid)
                else:  # the stand-in went away (killed): so does the command
                    pid = key.data
                    sel.unregister(key.fileobj)
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            while children:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                conn = children.pop(pid, None)
                if conn is None:
                    continue
                try:
                    sel.unregister(conn)
                except (KeyError, ValueError):
                    pass
                try:
                    if os.WIFSIGNALED(status):
                        send_msg(conn, {"signal": os.WTERMSIG(status)})
                    else:
                        send_msg(conn, {"exit": os.waitstatus_to_exitcode(status)})
                except OSError:
                    pass
                conn.close()
            if children:
                last = time.monotonic()
            if (owner and not _alive(owner)) or time.monotonic() - last > IDLE_SECONDS:
                return None
    finally:
        if os.getpid() == _SERVER_PID:
            try:
                os.unlink(path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SERVER_PID = os.getpid()


def _exit(status: int) -> None:
    """A command's end as the interpreter's: its threads joined, its exit functions run, its
    output flushed; then exit without tearing down the preloaded modules (~1 s for torch and
    transformers, which a fresh command that never needed them would not spend)."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)


if __name__ == "__main__":
    status = serve(sys.argv[1], sys.argv[2])
    if os.getpid() != _SERVER_PID:
        _exit(status if isinstance(status, int) else 0)
