"""Errors that the command line turns into a one-line message and exit code 2."""

from __future__ import annotations


class InpoError(Exception):
    """Base class for errors reported to the user without a traceback."""


class ConfigError(InpoError, ValueError):
    """A bad configuration value or key; the message names the key."""


class DataError(InpoError, ValueError):
    """A malformed input file or row; the message names the file, the row and the field."""


class OracleError(InpoError, RuntimeError):
    """A preference oracle failed (timeouts, nonsense answers) after its retries."""


class TrainingDivergedError(InpoError, RuntimeError):
    """A NaN or Inf loss or gradient; the message names the step and the batch's rows."""


def did_you_mean(name: str, choices) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices`` to ``name``, or ``""``."""
    import difflib

    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f"; did you mean '{close[0]}'?" if close else ""
