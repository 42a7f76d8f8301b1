"""The ``inpo`` command line: a lazy map from sub-command names to ``"module:function"``.

Nothing heavy is imported until a sub-command is chosen, so ``inpo --help`` is instant. Each
sub-command is a function ``main(argv: list[str]) -> int`` in its own module under
``inpo.commands``. Errors derived from :class:`inpo.errors.InpoError` become a one-line message
on stderr and exit code 2.
"""

from __future__ import annotations

import difflib
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "game": ("inpo.commands.game:main", "run algorithms on an exact tabular preference game"),
    "run": ("inpo.commands.run:main", "the INPO iteration pipeline (default: embedded task)"),
    "compare": ("inpo.commands.compare:main", "run several algorithms on one task and budget"),
    "train": ("inpo.commands.train:main", "train a causal LM on a preference dataset"),
    "precompute": ("inpo.commands.precompute:main", "write reference/previous log-probs"),
    "serve-oracle": ("inpo.commands.serve_oracle:main", "serve a local oracle over HTTP"),
    "export": ("inpo.commands.export:main", "write a model's answers for AlpacaEval etc."),
}


def _usage() -> str:
    lines = ["usage: inpo <command> [args...]", "", "commands:"]
    width = max(len(name) for name in COMMANDS)
    for name, (_, help_text) in COMMANDS.items():
        lines.append(f"  {name.ljust(width)}  {help_text}")
    lines.append("")
    lines.append("Run `inpo <command> --help` for a command's options.")
    return "\n".join(lines)


def resolve(name: str):
    """Return the ``main`` function of sub-command ``name`` (imported now, not before)."""
    target, _ = COMMANDS[name]
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)


def main(argv: list[str] | None = None) -> int:
    from inpo.errors import InpoError

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from inpo import __version__

        print(f"inpo {__version__}")
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
    try:
        code = resolve(name)(rest)
    except InpoError as err:
        print(f"inpo {name}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `inpo game | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"inpo {name}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
