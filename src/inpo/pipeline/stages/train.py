"""Stage 4: the configured loss from ``π_t``'s weights → ``π_{t+1}`` (``model/``).

Every rank runs :func:`inpo.training.train`: the model goes through ``accelerator.prepare``
(DDP, or FSDP2 with ``train.fsdp``), each rank takes its share of every optimizer step's pairs,
and rank 0 writes checkpoints (full state, so they resume on any number of processes) and the
final safetensors model. A killed run resumes from the newest checkpoint in ``.partial``.
"""

from __future__ import annotations

import os
import shutil
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inpo.config import validate_config
from inpo.pipeline.faults import train_stop_after
from inpo.pipeline.runtime import Ctx
from inpo.training import train

__all__ = ["merge", "settings", "train_config", "work"]


def settings(cfg: Any) -> dict[str, Any]:
    """What changes this stage's model (its hash): the loss and its hyper-parameters, the
    train section and the run's seed."""
    return {"loss": cfg.loss_hparams(), "train": asdict(cfg.train), "seed": cfg.seed}


def train_config(ctx: Ctx, data: Path, policy: Path, seed: int, output_dir: Path):
    """The :class:`inpo.training.TrainConfig` of this iteration (validated)."""

    loss, hparams = ctx.cfg.loss_hparams()
    tc = ctx.cfg.train.as_train_config(
        policy=str(policy),
        pairs=str(data),
        loss=loss,
        hparams=hparams,
        seed=seed,
        output_dir=str(output_dir),
    )
    validate_config(tc)
    return tc


def work(
    ctx: Ctx, data: Path, policy: Path, seed: int, folder: Path, on_metrics: Any = None
) -> dict[str, Any]:
    """Train this rank's share; ``on_metrics`` (rank 0) receives each step's metrics row."""

    tc = train_config(ctx, data, policy, seed, folder / "model")
    stop = train_stop_after()
    result = train(tc, stop_after=stop, on_metrics=on_metrics)
    if not result.finished:  # the test hook: die as a SIGKILL would, checkpoint written
        os.kill(os.getpid(), signal.SIGKILL)
    last = result.last_metrics or {}
    summary = {
        "steps": result.steps,
        "resumed_from": str(result.resumed_from) if result.resumed_from else None,
        "loss": last.get("loss"),
    }
    if ctx.dist.is_main:
        import json

        (folder / "train_summary.json").write_text(json.dumps(summary))
    return summary


def merge(ctx: Ctx, folder: Path) -> dict[str, Any]:
    import json

    import yaml

    shutil.rmtree(folder / "model" / "checkpoints", ignore_errors=True)
    # the saved config names the folder the model will be in, not the .partial it was built in
    saved = folder / "model" / "train_config.yaml"
    final = folder.with_name(folder.name.removesuffix(".partial")) / "model"
    cfg = yaml.safe_load(saved.read_text())
    cfg["output_dir"] = str(final)
    saved.write_text(yaml.safe_dump(cfg, sort_keys=False))
    summary_file = folder / "train_summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.unlink()
    loss, hparams = ctx.cfg.loss_hparams()
    return {**summary, "loss_name": loss, "hparams": hparams}
