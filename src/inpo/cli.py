"""The ``inpo`` command line: a lazy map from sub-command names to ``"module:function"``.

Nothing heavy is imported until a sub-command is chosen, so ``inpo --help`` is instant. Each
sub-command is a function ``main(argv: list[str]) -> int`` in its own module under
``inpo.commands``. Errors derived from :class:`inpo.errors.InpoError` become a one-line message
on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys

from inpo import __version__
from inpo.console import quiet_libraries, set_verbosity
from inpo.distributed import exit_launched, release
from inpo.errors import InpoError

COMMANDS: dict[str, tuple[str, str]] = {
    "game": ("inpo.commands.game:main", "run algorithms on an exact tabular preference game"),
    "run": ("inpo.commands.run:main", "the INPO iteration pipeline (default: embedded task)"),
    "compare": ("inpo.commands.compare:main", "run several algorithms on one task and budget"),
    "train": ("inpo.commands.train:main", "train a causal LM on a preference dataset"),
    "train-oracle": (
        "inpo.commands.train_oracle:main",
        "train a preference oracle (Bradley–Terry, pairwise or GPM)",
    ),
    "eval": (
        "inpo.commands.eval:main",
        "judge answer files against a baseline (win rate, LC win rate, BT scores)",
    ),
    "precompute": ("inpo.commands.precompute:main", "write reference/previous log-probs"),
    "serve-oracle": ("inpo.commands.serve_oracle:main", "serve a local oracle over HTTP"),
    "export": ("inpo.commands.export:main", "write a model's answers for AlpacaEval etc."),
    "config": ("inpo.commands.config:main", "list the keys of run/train, show a resolved config"),
    "convert": ("inpo.commands.convert:main", "turn a GGUF file into a Hugging Face model folder"),
    "toy": ("inpo.commands.toy:main", "write a tiny policy, reward model and prompts to try"),
}


def _usage() -> str:
    lines = ["usage: inpo <command> [args...]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("Run `inpo <command> --help` for a command's options. Anywhere on the line:")
    lines.append("  -q / --quiet   only results and errors    -v / -vv   info / debug logs too")
    return "\n".join(lines)


def resolve(name: str):
    """Return the ``main`` function of sub-command ``name`` (imported now, not before)."""
    target, _ = COMMANDS[name]
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


#: How writers that raise their own exception types report a failed write.
_IO_FAILURES = ("I/O error", "file write failed", "failed writing file", "No space left")


def _os_error(err: OSError) -> str:
    """One line for a failed file-system call: what, where, and that finished work is kept."""
    import errno

    code = errno.errorcode.get(err.errno or 0, "")
    what = err.strerror or str(err)
    where = f" '{err.filename}'" if err.filename else ""
    return (
        f"{what}{f' ({code})' if code else ''}{where}: work already finished is kept on disk; "
        "fix the cause (free space, permissions) and re-run the same command"
    )


def _run(name: str, rest: list[str]) -> int | None:
    """The command, then out of the process group (if a launcher put this process in one)."""
    try:
        return resolve(name)(rest)
    finally:
        try:
            release()
        except Exception as err:  # never hide the command's own result or error
            logging.getLogger("inpo").debug("leaving the process group failed: %s", err)


def split_verbosity(argv: list[str]) -> tuple[int, list[str]]:
    """``(level, rest)``: the console level ``-q``/``-v``/``-vv`` ask for, before or after the
    command (:data:`inpo.console.LEVELS`), and the other arguments in order."""
    level = 0
    kept = []
    for arg in argv:
        if arg in ("-q", "--quiet"):
            level = -1
        elif arg in ("-v", "--verbose"):
            level = max(level, 0) + 1
        elif arg == "-vv":
            level = 2
        else:
            kept.append(arg)
    return level, kept


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"inpo {__version__}")
        return 0
    level, argv = split_verbosity(argv)
    if not argv:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        print(
            f"inpo: unknown command '{name}'{hint} (commands: {', '.join(COMMANDS)})",
            file=sys.stderr,
        )
        return 2

    set_verbosity(level)
    quiet_libraries()
    try:
        code = _run(name, rest)
    except InpoError as err:
        print(f"inpo {name}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `inpo game | head`
        sys.stderr.close()
        return 0
    except OSError as err:  # a full disk, a read-only folder, a file too large, …
        print(f"inpo {name}: error: {_os_error(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        # the same failures raised by writers that do not use OSError (safetensors, torch.save)
        text = str(err)
        if not any(m in text for m in _IO_FAILURES):
            raise
        first = text.strip().splitlines()[-1][:300]
        print(
            f"inpo {name}: error: writing a file failed ({type(err).__name__}: {first}); work "
            "already finished is kept on disk; fix the cause (free space, permissions) and "
            "re-run the same command",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"inpo {name}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


def entry() -> None:
    """``inpo`` and ``python -m inpo``: :func:`main`, then the process's exit.

    Under a launcher (torchrun, ``accelerate launch``: ``WORLD_SIZE`` > 1) the exit goes
    through :func:`inpo.distributed.exit_launched`, which a gloo teardown race needs.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_launched(code)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    entry()
