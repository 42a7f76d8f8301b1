"""An ``argparse`` parser whose errors are one line (an :class:`InpoError`, exit code 2)."""

from __future__ import annotations

import argparse

from inpo.errors import InpoError


class ArgumentParser(argparse.ArgumentParser):
    """Like ``argparse.ArgumentParser``, but a usage error raises ``InpoError`` (one line)."""

    def error(self, message: str):  # type: ignore[override]
        raise InpoError(message)


# ---- argument types: a bad number is one line naming the flag (argparse adds "argument --x") --


def _bounded(kind: type, low: float, high: float | None = None, what: str = ""):
    """An argparse type: ``kind`` parsed from the text, finite, in ``[low, high]``."""
    import math

    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got '{text}'") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got '{text}'")
        if high is not None and not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} in {low}..{high}, got {value}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {noun} >= {low}, got {value}")
        return value

    return parse


#: An integer >= 1 (a batch size, a token budget, a count).
positive_int = _bounded(int, 1)
#: An integer >= 0.
non_negative_int = _bounded(int, 0)
#: A finite number >= 0 (a temperature, a delay).
non_negative_float = _bounded(float, 0)
#: A TCP port, 0 (a free one) to 65535.
port_number = _bounded(int, 0, 65535, "a port")
