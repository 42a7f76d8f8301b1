"""What the console shows: our progress and results, not the libraries' internals.

:func:`quiet_libraries` turns off the progress bars and info chatter of transformers, datasets
and huggingface_hub ("Loading weights", "Saving the dataset", "Writing model shards"), which
say nothing to a user of ``inpo`` and drown its own lines; ``inpo``'s own bars (tqdm) stay.
It only sets the libraries' own environment switches (before they are imported; a value the
user set wins), so it costs nothing and imports nothing. ``INPO_LIBRARY_PROGRESS=1`` keeps
the libraries' bars (for debugging a slow load).
"""

from __future__ import annotations

import os

__all__ = ["quiet_libraries", "set_verbosity", "verbosity"]

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
