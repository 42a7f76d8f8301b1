"""What the console shows: our progress and results, not the libraries' internals.

:func:`quiet_libraries` turns off the progress bars and info chatter of transformers, datasets
and huggingface_hub ("Loading weights", "Saving the dataset", "Writing model shards"), which
say nothing to a user of ``inpo`` and drown its own lines. It only sets the libraries' own
environment switches (before they are imported; a value the user set wins), so it costs
nothing and imports nothing. ``INPO_LIBRARY_PROGRESS=1`` keeps the libraries' bars (for
debugging a slow load).

:func:`progress` is ``inpo``'s one progress display for a unit of work (a stage, the training
loop, the reference's fine-tune): on a terminal a ``rich`` bar with counts, elapsed time, ETA
and live figures (loss, tokens/s), cleared when the work ends (the stage's one-line result
stays); in a log file or a CI console (not a terminal) no bar — a plain line every
``INPO_PROGRESS_SECONDS`` seconds (default 30) with the count, the rate and the ETA, so a long
stage still shows it is moving. Off on ranks other than 0, with ``-q`` and with
``TQDM_DISABLE=1``.

:func:`pulse` reports progress *within* one unit of work (tokens generated in a batch, pairs a
judge scored, sequences scored) on the innermost open display, so a stage whose one batch takes
minutes is never silent: the live figures on a terminal, a plain line every
``INPO_PROGRESS_SECONDS`` in a log. Inner loops call it without knowing who is listening (none:
it does nothing).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

__all__ = ["progress", "pulse", "quiet_libraries", "set_verbosity", "verbosity"]

#: ``-q``: only results and errors; ``-v``: also ``inpo``'s info logs and the libraries' bars;
#: ``-vv``: debug logs too.
LEVELS = {"quiet": -1, "normal": 0, "verbose": 1, "debug": 2}


def set_verbosity(level: int) -> None:
    """Apply a console level (see :data:`LEVELS`) to this process and the ones it starts."""
    import logging

    os.environ["INPO_VERBOSITY"] = str(level)
    if level < 0:
        os.environ.setdefault("TQDM_DISABLE", "1")
    if level >= 1:
        os.environ["INPO_LIBRARY_PROGRESS"] = "1"
        logging.basicConfig(
            level=logging.DEBUG if level >= 2 else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )


def verbosity() -> int:
    """The console level in force (``0`` unless ``-q``/``-v`` was given)."""
    try:
        return int(os.environ.get("INPO_VERBOSITY", "0"))
    except ValueError:
        return 0


_SWITCHES = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' bars follow it
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
}


def quiet_libraries() -> None:
    """Set the libraries' quiet switches unless the user set them (or INPO_LIBRARY_PROGRESS=1)."""
    if os.environ.get("INPO_LIBRARY_PROGRESS") == "1":
        return
    for key, value in _SWITCHES.items():
        os.environ.setdefault(key, value)


def _progress_off() -> bool:
    return verbosity() < 0 or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def progress(total: int, desc: str, *, enabled: bool = True, initial: int = 0, unit: str = ""):
    """A progress display for ``total`` units of work (see the module docstring).

    Returns an object with ``update(n=1)``, ``set_postfix(**figures)`` and ``close()`` (also a
    context manager). ``enabled=False`` (e.g. on ranks other than 0) gives one that does
    nothing.
    """
    if not enabled or total <= 0 or _progress_off():
        return _Silent()
    stream = sys.stderr
    if getattr(stream, "isatty", lambda: False)() and os.environ.get("TERM") != "dumb":
        shown: _Silent = _RichBar(total, desc, initial, unit)
    else:
        shown = _PlainLines(total, desc, initial, unit, stream)
    _OPEN.append(shown)
    return shown


#: The open progress displays, innermost last (:func:`pulse` speaks to the last one).
_OPEN: list[Any] = []


def pulse(**figures: Any) -> None:
    """Progress within the current unit of work, e.g. ``pulse(tokens=1280)``: shown on the
    innermost open :func:`progress` display (see the module docstring); nothing without one."""
    if _OPEN:
        _OPEN[-1].pulse(figures)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def pulse(self, figures: dict[str, Any]) -> None:
        pass

    def set_postfix(self, **figures: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class _PlainLines(_Silent):
    """Not a terminal: a line now and then, never a carriage return."""

    def __init__(self, total: int, desc: str, initial: int, unit: str, stream: Any):
        self.total, self.desc, self.n, self.unit, self.stream = total, desc, initial, unit, stream
        self.start_n = initial
        self.t0 = self.last = time.monotonic()
        try:
            self.every = float(os.environ.get("INPO_PROGRESS_SECONDS", "30"))
        except ValueError:
            self.every = 30.0
        self.figures: dict[str, Any] = {}
        self.inside: dict[str, Any] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        self.inside = {}  # a unit done: its inner figures are over
        if self.n < self.total:
            self._line()

    def pulse(self, figures: dict[str, Any]) -> None:
        self.inside = figures
        self._line()

    def _line(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.n) / rate) if rate > 0 else "?"
        figures = "".join(f", {k} {v}" for k, v in self.figures.items())
        inside = ", ".join(f"{v} {k}" for k, v in self.inside.items())
        within = f"; in this batch: {inside}" if inside else ""
        pct = 100 * self.n / self.total
        print(
            f"  {self.desc}: {self.n}/{self.total}{self.unit} ({pct:.0f}%), "
            f"{_clock(elapsed)} elapsed, eta {eta}{figures}{within}",
            file=self.stream,
            flush=True,
        )

    def set_postfix(self, **figures: Any) -> None:
        self.figures = figures

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.remove(self)


class _RichBar(_Silent):
    """A terminal: a rich bar, removed when the work ends."""

    def __init__(self, total: int, desc: str, initial: int, unit: str):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("  [bold]{task.description}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TextColumn(unit.strip()),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[figures]}"),
            console=Console(file=sys.stderr),
            transient=True,
        )
        self.task = self.progress.add_task(desc, total=total, completed=initial, figures="")
        self.figures: dict[str, Any] = {}
        self.inside: dict[str, Any] = {}
        self.progress.start()

    def update(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)
        self._show(inside={})

    def pulse(self, figures: dict[str, Any]) -> None:
        self._show(inside=figures)

    def set_postfix(self, **figures: Any) -> None:
        self._show(figures=figures)

    def _show(self, *, figures: dict | None = None, inside: dict | None = None) -> None:
        self.figures = figures if figures is not None else self.figures
        self.inside = inside if inside is not None else self.inside
        text = "  ".join(f"{k} {v}" for k, v in self.figures.items())
        if self.inside:
            text += "  (this batch: " + ", ".join(f"{v} {k}" for k, v in self.inside.items()) + ")"
        self.progress.update(self.task, figures=text)

    def close(self) -> None:
        self.progress.stop()
        if self in _OPEN:
            _OPEN.remove(self)
