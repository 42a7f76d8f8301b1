"""An ``argparse`` parser whose errors are one line (an :class:`InpoError`, exit code 2)."""

from __future__ import annotations

import argparse

from inpo.errors import InpoError


class ArgumentParser(argparse.ArgumentParser):
    """Like ``argparse.ArgumentParser``, but a usage error raises ``InpoError`` (one line)."""

    def error(self, message: str):  # type: ignore[override]
        raise InpoError(message)
