"""The stand-in process of an ``inpo`` command run by the test session's fork server.

A server serves one *environment signature*: the variables third-party packages read when they
are imported (OMP_NUM_THREADS, HF_*, TQDM_*, PYTHON*, ...), which a forked process cannot change
after the fact. A command whose signature has no server yet starts one (detached, owned by the
test session) and runs as usual this once; the next ones are forked from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys

#: Environment variables read at import time by torch, transformers, tqdm, accelerate, ...:
#: a forked command must have the values its server imported with.
IMPORT_TIME = (
    "OMP_", "MKL_", "KMP_", "OPENBLAS_", "GOMP_", "PYTORCH_", "TORCH_", "CUDA_", "HF_",
    "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TQDM_", "ACCELERATE_", "SAFETENSORS_",
    "PYTHON", "LD_", "XDG_", "HOME", "TMPDIR", "LANG", "LC_",
)  # fmt: skip
#: Signals passed on to the command.
FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2)  # fmt: skip


def effective_env(env: dict[str, str] | os._Environ, args: list[str]) -> dict[str, str]:
    """``env`` as the command has it when it imports torch and transformers: ``inpo``'s
    start-up sets the libraries' quiet switches first (``inpo.console.quiet_libraries``,
    ``TQDM_DISABLE`` for ``-q`` and for ``inpo convert``), which those packages read at import."""
    from inpo.cli import split_verbosity
    from inpo.console import _SWITCHES

    out = dict(env)
    level, rest = split_verbosity(args)
    command = rest[0] if rest else None
    if level >= 1:
        out["INPO_LIBRARY_PROGRESS"] = "1"
    elif out.get("INPO_LIBRARY_PROGRESS") != "1":
        for key, value in _SWITCHES.items():
            out.setdefault(key, value)
    if level < 0 or command == "convert":
        out.setdefault("TQDM_DISABLE", "1")
    return out


def signature(env: dict[str, str] | os._Environ) -> str:
    keys = sorted(k for k in env if k.startswith(IMPORT_TIME) and not k.startswith("TORCHELASTIC"))
    text = json.dumps([sys.executable, [(k, env[k]) for k in keys]])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def send_msg(sock: socket.socket, obj: object) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_msg(sock: socket.socket) -> object | None:
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    body = _recv_exact(sock, struct.unpack("!I", head)[0])
    return None if body is None else json.loads(body)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            part = sock.recv(n - len(buf))
        except InterruptedError:
            continue
        if not part:
            return None
        buf += part
    return buf


def _start_server(folder: str, sig: str, env: dict[str, str]) -> None:
    """Start this signature's server, once (a lock file says one is starting)."""
    try:
        fd = os.open(os.path.join(folder, sig + ".lock"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.Popen(
        [sys.executable, os.path.join(here, "inpo_forkserver.py"), folder, sig],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(folder, sig + ".log"), "ab"),
        start_new_session=True,
        close_fds=True,
        env=env,
    )


def run(mode: str, target: str, args: list[str], unbuffered: bool) -> None:
    """Hand the command to the server and exit as it exits; return if no server answers."""
    folder = os.environ["INPO_FORKSERVER_DIR"]
    env = effective_env(os.environ, args)
    sig = signature(env)
    path = os.path.join(folder, sig + ".sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        _start_server(folder, sig, env)
        return
    ignored = [int(s) for s in signal.valid_signals() if _ignored(s)]
    child: list[int] = []
    pending: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if child:
            os.kill(child[0], signum)
        else:
            pending.append(signum)

    for s in FORWARD:
        if int(s) not in ignored:
            signal.signal(s, forward)
    socket.send_fds(sock, [b"F"], [0, 1, 2])
    send_msg(sock, {
        "mode": mode, "target": target, "args": args, "unbuffered": unbuffered,
        "cwd": os.getcwd(), "env": dict(os.environ), "umask": _umask(), "ignored": ignored,
        "rlimits": _rlimits(),
    })  # fmt: skip
    started = recv_msg(sock)
    if not isinstance(started, dict):  # the server went away before forking: run as usual
        for s in FORWARD:
            if int(s) not in ignored:
                signal.signal(
                    s, signal.SIG_DFL if s != signal.SIGINT else signal.default_int_handler
                )
        sock.close()
        return
    child.append(int(started["pid"]))
    for s in pending:
        os.kill(child[0], s)
    done = recv_msg(sock)
    if not isinstance(done, dict):
        os._exit(1)
    if "signal" in done:  # die as the command died
        num = int(done["signal"])
        signal.signal(num, signal.SIG_DFL)
        os.kill(os.getpid(), num)
    os._exit(int(done.get("exit", 1)))


def _ignored(sig: int) -> bool:
    try:
        return signal.getsignal(sig) == signal.SIG_IGN
    except (ValueError, OSError):
        return False


def _rlimits() -> dict[str, list[int]]:
    """This process's resource limits (a test's ``preexec_fn`` may have set one: a small
    RLIMIT_FSIZE stands for a full disk)."""
    import resource

    return {
        name: list(resource.getrlimit(getattr(resource, name)))
        for name in dir(resource)
        if name.startswith("RLIMIT_")
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
