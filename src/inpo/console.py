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

__all__ = ["quiet_libraries"]

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
