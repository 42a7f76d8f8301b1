"""What every stage of a run shares: the config, the processes, the log, and model loading."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inpo.distributed import Dist
from inpo.pipeline.config import RunConfig

__all__ = ["Ctx", "load_model", "stage_seed"]


@dataclass
class Ctx:
    """One process's view of a run: its config, folder, processes and log (rank 0 prints)."""

    cfg: RunConfig
    run_dir: Path
    dist: Dist
    print_fn: Callable[[str], None] = print

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self.print_fn(msg)


def load_model(path: Path, device: Any) -> tuple[Any, Any]:
    """A policy in eval mode on ``device`` and its tokenizer (``trust_remote_code=False``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
    model.to(device)
    model.eval()
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model, tok


def stage_seed(cfg: RunConfig, iteration: int, what: str) -> int:
    """The seed of one stage of one iteration (``what``: ``gen``, ``train``)."""
    digest = hashlib.sha256(f"{cfg.seed}:{iteration}:{what}".encode()).digest()
    return int.from_bytes(digest[:4], "big")
