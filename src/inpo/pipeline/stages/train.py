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
from pathlib import Path
from typing import Any

from inpo.pipeline.faults import train_stop_after
from inpo.pipeline.runtime import Ctx

__all__ = ["merge", "train_config", "work"]


def train_config(ctx: Ctx, data: Path, policy: Path, seed: int, output_dir: Path):
    """The :class:`inpo.training.TrainConfig` of this iteration (validated)."""
    from inpo.config import validate_config
    from inpo.training import (
        DataConfig,
        LoggingConfig,
        LossConfig,
        ModelConfig,
        OptimConfig,
        TrainConfig,
    )

    loss, hparams = ctx.cfg.loss_hparams()
    t = ctx.cfg.train
    tc = TrainConfig(
        output_dir=str(output_dir),
        model=ModelConfig(
            path=str(policy),
            dtype=t.dtype,
            gradient_checkpointing=t.gradient_checkpointing,
            attn_implementation=t.attn_implementation,
            lora=t.lora,
        ),
        data=DataConfig(
            train_file=str(data),
            max_prompt_length=t.max_prompt_length,
            max_completion_length=t.max_completion_length,
            share_prompt=t.share_prompt,
            packing=t.packing,
        ),
        loss=LossConfig(name=loss, **hparams),
        optim=OptimConfig(
            learning_rate=t.learning_rate,
            lr_scheduler=t.lr_scheduler,
            warmup_ratio=t.warmup_ratio,
            global_batch_size=t.global_batch_size,
            per_device_batch_size=t.per_device_batch_size,
            max_grad_norm=t.max_grad_norm,
            optimizer=t.optimizer,
            epochs=t.epochs,
        ),
        logging=LoggingConfig(progress_bar=True),
        seed=seed,
        bf16=t.bf16,
        fsdp=t.fsdp,
        fsdp_cpu_offload=t.fsdp_cpu_offload,
        fsdp_activation_checkpointing=t.fsdp_activation_checkpointing,
        save_steps=t.save_steps,
        keep_checkpoints=1,
        final_checkpoint=False,  # the merge deletes checkpoints; the manifest marks the end
        resume="auto",
    )
    validate_config(tc)
    return tc


def work(
    ctx: Ctx, data: Path, policy: Path, seed: int, folder: Path, on_metrics: Any = None
) -> dict[str, Any]:
    """Train this rank's share; ``on_metrics`` (rank 0) receives each step's metrics row."""
    from inpo.training import train

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
