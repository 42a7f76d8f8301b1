"""An ``argparse`` parser whose errors are one line (an :class:`InpoError`, exit code 2)."""

from __future__ import annotations

import argparse

from inpo.errors import InpoError


class ArgumentParser(argparse.ArgumentParser):
    """Like ``argparse.ArgumentParser``, but a usage error raises ``InpoError`` (one line)."""

    def error(self, message: str):  # type: ignore[override]
        raise InpoError(message)


# ---- argument types: a bad number is one line naming the flag (argparse adds "argument --x") --


def _number(text: str, kind: type) -> int | float:
    import math

    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got '{text}'") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (a batch size, a token budget, a count)."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a temperature, a delay)."""
    value = float(_number(text, float))
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def port_number(text: str) -> int:
    """A TCP port, 0 (a free one) to 65535."""
    value = int(_number(text, int))
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port in 0..65535, got {value}")
    return value
