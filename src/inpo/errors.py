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
