"""Shared by the multi-process tests: a free port, a torchrun launch, and a tiny model with
preference pairs; where the real-model tier finds SmolLM2."""

from __future__ import annotations

import json
import os
import random
import socket
import sys
from pathlib import Path

#: ``make real-model``'s output: SmolLM2-135M-Instruct converted from the GGUF it keeps beside.
_REAL_CACHE = (
    Path(os.environ.get("INPO_REAL_MODEL_CACHE") or Path.home() / ".cache" / "inpo") / "models"
)
REAL_MODEL_DIR = _REAL_CACHE / "SmolLM2-135M-Instruct"
REAL_MODEL_GGUF = _REAL_CACHE / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"

WORDS = "red blue green circle square say describe a the".split()


def free_port() -> int:
    """A port no one listens on (never torchrun's default 29500: suites must not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    """``python -m torch.distributed.run`` for ``nproc`` processes on a free port: append
    ``-m inpo ...`` or a script."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
        "--master_port", str(free_port()),
    ]  # fmt: skip


def tiny_pairs(folder: Path, *, optimizer: str = "adamw", save_steps: int | None = None) -> None:
    """``folder/model`` (a tiny Llama), ``folder/data`` (32 pairs with reference log-probs)
    and ``folder/cfg.yaml`` (DPO, 3 steps of 8 pairs, 2 a micro-batch)."""
    from inpo.precompute import precompute_logps
    from inpo.tiny import save_tiny_lm, word_tokenizer

    save_tiny_lm(folder / "model", "llama", tokenizer=word_tokenizer(WORDS), hidden_size=32)
    rng = random.Random(0)
    with open(folder / "pairs.jsonl", "w") as fh:
        for _ in range(32):
            row = {
                "prompt": " ".join(rng.choice(WORDS) for _ in range(3)),
                "chosen": rng.choice(WORDS),
                "rejected": " ".join(rng.choice(WORDS) for _ in range(2)),
            }
            fh.write(json.dumps(row) + "\n")
    precompute_logps(
        folder / "pairs.jsonl",
        folder / "model",
        folder / "data",
        columns="ref",
        max_prompt_length=16,
        max_completion_length=8,
    )
    (folder / "cfg.yaml").write_text(
        "model: {path: model}\n"
        "data: {train_file: data, max_prompt_length: 16, max_completion_length: 8}\n"
        "loss: {name: dpo, beta: 0.5}\n"
        "optim: {learning_rate: 1.0e-2, global_batch_size: 8, per_device_batch_size: 2, "
        f"warmup_ratio: 0.0, optimizer: {optimizer}, max_steps: 3}}\n"
        f"logging: {{progress_bar: false}}\nsave_steps: {save_steps or 'null'}\n"
    )
