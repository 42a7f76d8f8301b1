"""One training loop for every preference loss in :data:`inpo.losses.LOSSES`.

The loss is data: :func:`inpo.losses.get_loss` gives a :class:`~inpo.losses.LossSpec` whose
``inputs`` say which batch columns it reads. The loop computes only the policy's summed
completion log-probs (``sequence_logps`` on ``[2B, L]``: chosen rows then rejected rows; with
``data.share_prompt``, ``shared_prompt_logps`` on ``B`` rows ``prompt + chosen + rejected``); every
other input (reference / previous-iterate log-probs, win-rates, ties) is a precomputed dataset
column, so only the policy is in memory (INPO §4: ``log π_ref`` and ``log π_t`` are computed once
per iteration, before training).

One optimizer step consumes ``global_batch_size`` pairs of a per-epoch permutation (seeded by
``seed`` and the epoch, so the data position is two integers). Each micro-batch's summed loss
is divided by the number of pairs in the *whole* step, so the accumulated gradient is exactly
the gradient of the mean per-pair loss over the step, however it is split into micro-batches
and processes (and for a short last step).

Distribution is the engine's: the model and optimizer go through ``accelerator.prepare`` — DDP
(bucketed all-reduce overlapped with the backward), or FSDP2 with ``fsdp=full_shard`` — and
every micro-batch but a step's last runs under ``accelerator.no_sync``. Every rank runs the
same number of micro-batches a step (a rank with no pairs left runs one weighted by zero), as
the collectives require. Checkpoints hold the full (gathered) state, so they resume on any
number of processes; the final model is gathered and written as safetensors.

The story of :func:`train`, top to bottom: set up (data and settings checked before the model
loads, the engine, model/optimizer/schedule, resume), the loop (:func:`_step`: the algorithm's
lines), checkpoints (:func:`_save`, :func:`_restore`), the end (the model written).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inpo.config import config_to_dict, flat_config, save_config, with_absolute_paths
from inpo.data import PreferenceCollator
from inpo.distributed import check_shared_folder, get_dist
from inpo.hub import push_model  # huggingface_hub: only when pushing
from inpo.layout import Layout
from inpo.training import zero
from inpo.training.batches import StepPlan, micro_batches
from inpo.training.checkpoint import Checkpointer, load_checkpoint, restore_state
from inpo.training.config import TrainConfig, require_tracker_packages
from inpo.training.engine import Engine, load_model_state, resolve_bf16
from inpo.training.metrics import MetricsLogger
from inpo.training.modelcard import write_model_card
from inpo.training.modeling import (
    check_model_dir,
    load_policy,
    load_tokenizer,
    save_policy,
    write_prompt_format,
)
from inpo.training.optim import check_low_precision_updates, make_optimizer, make_scheduler
from inpo.training.pairs import (
    BATCH_COLUMNS,
    PolicyData,
    check_loss_columns,
    check_precompute_lengths,
    inputs_identity,
    load_pairs,
)
from inpo.training.resume import check_resume, resume_point
from inpo.training.skeleton import StepOut, run_steps

__all__ = ["BATCH_COLUMNS", "TrainResult", "check_loss_columns", "train"]

log = logging.getLogger(__name__)

LogpsFn = Callable[..., torch.Tensor]


@dataclass
class TrainResult:
    """What :func:`train` did: the final model folder, steps done, where it resumed from."""

    output_dir: Path
    steps: int
    total_steps: int
    resumed_from: Path | None
    last_metrics: dict[str, Any] | None
    finished: bool


def _pair_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of the batch's pairs counted as ``(prompt + chosen) + (prompt + rejected)``, also
    when the prompt is shared (so ``tokens`` and ``tokens_per_s`` mean the same either way)."""
    tokens = batch["attention_mask"].sum()
    if "prompt_lengths" in batch:
        tokens = tokens + batch["prompt_lengths"].sum()
    return tokens


def train(
    cfg: TrainConfig,
    *,
    logps_fn: LogpsFn | None = None,
    stop_after: int | None = None,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train the policy of ``cfg.model`` on ``cfg.data`` with loss ``cfg.loss``.

    Run it in every process of a launch (``torchrun``/``accelerate launch``): each takes its
    share of every step's pairs.

    Args:
        cfg: a validated :class:`TrainConfig` (see :func:`inpo.config.load_config`).
        logps_fn: ``(model, input_ids, attention_mask, completion_mask) -> [2B]`` summed
            completion log-probs (default :func:`inpo.logprobs.sequence_logps`).
        stop_after: stop, as if killed, once this many optimizer steps are done (for tests of
            resumption); the final model is not written.
        on_metrics: called on the main process with each optimizer step's metrics row (as
            written to ``metrics.jsonl``); ``inpo run`` sends them to its run's trackers.

    Returns:
        A :class:`TrainResult`. The output folder holds the model (safetensors), tokenizer,
        ``train_config.yaml``, ``metrics.jsonl``/``metrics.csv`` and ``checkpoints/``.

    Raises:
        ConfigError / DataError: before any model loads, for bad settings or missing columns.
        TrainingDivergedError: a non-finite loss or gradient norm (after saving the last good
            state as a checkpoint).
    """

    # ---- set-up: everything that can fail cheaply, before the model loads --------------------
    layout = Layout(
        share_prompt=cfg.data.share_prompt,
        packing=cfg.data.packing,
        length_buckets=cfg.data.length_buckets,
        logps_fn=logps_fn,
    )
    data = load_pairs(cfg)
    plan = StepPlan(
        len(data.rows),
        cfg.optim.global_batch_size,
        cfg.seed,
        cfg.data.shuffle,
        cfg.optim.epochs,
        cfg.optim.max_steps,
    )
    out_dir = Path(cfg.output_dir)
    ckpt_root = out_dir / "checkpoints"
    check_precompute_lengths(cfg)
    check_model_dir(cfg.model.path)
    require_tracker_packages(cfg.logging.trackers, "logging.report_to")
    resume_from = resume_point(cfg, ckpt_root)
    inputs = inputs_identity(cfg, data)
    if resume_from is not None:
        check_resume(
            cfg, resume_from, inputs, plan.total_steps,
            refuse_unfinished_changes=False, config_file="train_config.yaml",
        )  # fmt: skip
    engine = Engine.create(
        bf16=resolve_bf16(cfg.bf16),
        fsdp=cfg.fsdp,
        fsdp_cpu_offload=cfg.fsdp_cpu_offload,
        fsdp_activation_checkpointing=cfg.fsdp_activation_checkpointing,
        trackers=cfg.logging.trackers,
        tracker_dir=out_dir / "trackers",
        zero_config=cfg,
    )
    check_shared_folder(out_dir, "output_dir")  # several machines: one folder, or refused
    if cfg.resume == "never" and ckpt_root.exists() and engine.is_main:
        log.warning("resume=never: removing old checkpoints in %s", ckpt_root)
        shutil.rmtree(ckpt_root)
    if engine.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        # local paths absolute: the model card's command reproduces from any folder
        paths = ("model.path", "data.train_file", "data.dataset_name")
        save_config(with_absolute_paths(cfg, paths), out_dir / "train_config.yaml")
    engine.wait()

    # ---- set-up: model (resumed weights first), layout, engine, optimizer, schedule ----------
    tokenizer, model, optimizer, scheduler, start = _load(
        cfg, engine, layout, resume_from, data.warmup, plan.total_steps
    )
    collator = PreferenceCollator(
        tokenizer,
        max_prompt_length=cfg.data.max_prompt_length,
        max_completion_length=cfg.data.max_completion_length,
        share_prompt=cfg.data.share_prompt,
    )
    if cfg.logging.trackers:  # named by logging.project (else $WANDB_PROJECT, else inpo)
        engine.accelerator.init_trackers(
            cfg.logging.project_name, config=flat_config(config_to_dict(cfg))
        )
    metrics = MetricsLogger(
        out_dir,
        accelerator=engine.accelerator,
        resume_step=start if resume_from is not None else None,
        enabled=engine.is_main,
        on_row=on_metrics,
    )

    checkpoints = Checkpointer(
        engine, cfg, model, optimizer, scheduler, ckpt_root,
        steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps, inputs=inputs,
    )  # fmt: skip

    def step_fn(step: int, step_rows: list[int]) -> StepOut:
        return _step(cfg, engine, model, collator, data, layout, plan, step, step_rows)

    # ---- the loop, then the end: a last checkpoint (a re-run is a no-op) and the model -------
    try:
        end = run_steps(
            engine, model, optimizer, scheduler, plan, step_fn,
            start=start, checkpoint=checkpoints.save, metrics=metrics,
            label=f"train {data.spec.name}", show_progress=cfg.logging.progress_bar,
            postfix=lambda r: {"loss": f"{r['loss']:.4g}", "tok_s": f"{r['tokens_per_s']:.0f}"},
            max_grad_norm=cfg.optim.max_grad_norm, save_steps=cfg.save_steps,
            stop_after=stop_after,
            row_ids=lambda step_rows: [int(data.rows[i]["row_id"]) for i in step_rows],
        )  # fmt: skip
        if not end.finished:
            return TrainResult(out_dir, end.steps, plan.total_steps, resume_from, end.last, False)
        if cfg.final_checkpoint:
            checkpoints.finish(start)
        _finish(cfg, engine, model, tokenizer, data, end.last)
    finally:
        engine.release(model)
    return TrainResult(out_dir, plan.total_steps, plan.total_steps, resume_from, end.last, True)


def _load(
    cfg: TrainConfig,
    engine: Engine,
    layout: Layout,
    resume_from: Path | None,
    warmup: int,
    total_steps: int,
) -> tuple[Any, Any, Any, Any, int]:
    """The tokenizer and the policy (a checkpoint's weights first), checked against the layout,
    prepared by the engine with its optimizer and schedule (a checkpoint's state applied).
    Returns ``(tokenizer, model, optimizer, scheduler, start step)``."""
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_policy(cfg.model)
    layout.check(model, device_type=engine.device.type, sharded=engine.shards)
    if engine.is_main:
        check_low_precision_updates(model, cfg)
    state = load_checkpoint(resume_from) if resume_from is not None else None
    if state is not None and not zero.requested():  # DeepSpeed restores its own partitions
        load_model_state(model, state["model"], resume_from)
    model = engine.place(model)
    layout.probe(model)  # data.packing null: decided here, before the engine wraps the model
    optimizer = make_optimizer(cfg, model, sharded=engine.fsdp)
    model, optimizer = engine.prepare(model, optimizer)
    scheduler = make_scheduler(optimizer, cfg.optim.lr_scheduler, warmup, total_steps)
    start = 0
    if state is not None:
        start = restore_state(engine, model, optimizer, scheduler, state, resume_from)
        if engine.is_main:
            print(f"inpo train: resuming from {resume_from} (step {start}/{total_steps})")
    return tokenizer, model, optimizer, scheduler, start


def _metrics_row(
    sums: torch.Tensor,
    abs_max: torch.Tensor,
    step: int,
    plan: StepPlan,
    n_pairs: int,
    elapsed: float,
    grad_norm: float,
    lr: float,
) -> dict[str, Any]:
    """One optimizer step's row of ``metrics.jsonl`` (and of its CSV, in this column order)
    from :func:`_step`'s sums over all processes."""
    s = sums.tolist()
    return {
        "step": step + 1,
        "epoch": plan.epoch(step),
        "loss": s[0] / n_pairs,
        "margins_mean": s[1] / n_pairs,
        "margins_abs_max": float(abs_max.item()),
        "chosen_rewards": s[2] / n_pairs,
        "rejected_rewards": s[3] / n_pairs,
        "accuracy": s[4] / n_pairs,
        "grad_norm": grad_norm,
        "lr": lr,
        "pairs": n_pairs,
        "tokens": int(s[5]),
        "tokens_per_s": s[5] / elapsed,
        "truncated_prompts": int(s[6]),
        "truncated_completions": int(s[7]),
        "logps_chosen": s[8] / n_pairs,
        "logps_rejected": s[9] / n_pairs,
    }


def _finish(
    cfg: TrainConfig,
    engine: Engine,
    model: Any,
    tokenizer: Any,
    data: PolicyData,
    last: dict[str, Any] | None,
) -> None:
    """The trained model as plain safetensors, the prompt format it learnt, its model card
    (rewritten when this launch trained), and the upload ``push_to_hub`` asks for."""
    out_dir = Path(cfg.output_dir)
    _write_model(cfg, engine, model, tokenizer, out_dir)
    if not engine.is_main:
        return
    # how prompts were given to it, for whoever prompts it next (inpo export)
    conversational = bool(data.rows) and isinstance(data.rows[0]["prompt"], list)
    write_prompt_format(out_dir, "chat" if conversational else "text")
    if last is not None or not (out_dir / "README.md").exists():
        write_model_card(
            out_dir,
            cfg,
            hparams=data.hparams,
            pairs=len(data.rows),
            steps=data.total_steps,
            last=last,
        )
    if cfg.push_to_hub:
        push_model(
            out_dir,
            str(cfg.hub_model_id),
            private=cfg.hub_private_repo,
            message=f"inpo train ({data.spec.name})",
        )


def _step(
    cfg: TrainConfig,
    engine: Engine,
    model: Any,
    collator: Any,
    data: PolicyData,
    layout: Layout,
    plan: StepPlan,
    step: int,
    step_rows: list[int],
) -> StepOut:
    """One optimizer step's forward/backward over this process's share of ``step_rows``; the
    step's diagnostics summed over *all* processes make its metrics row."""
    spec, hparams, rows = data.spec, data.hparams, data.rows
    n_pairs, world = len(step_rows), engine.world
    key = (lambda i: -data.lengths[i]) if cfg.data.group_by_length else None
    micro = micro_batches(step_rows, engine.rank, world, cfg.optim.per_device_batch_size, key)
    sums = torch.zeros(10, dtype=torch.float64)
    abs_max = torch.zeros(1, dtype=torch.float64)
    bad: list[int] = []
    for m, ids in enumerate(micro):
        weight = 1.0 if ids else 0.0  # a rank out of pairs runs one pair weighted by zero
        batch_rows = [rows[i] for i in ids] if ids else [rows[step_rows[0]]]
        batch = {k: v.to(engine.device) for k, v in collator(batch_rows).items()}
        b = len(batch_rows)
        last = m == len(micro) - 1
        with engine.no_sync(model, last):
            # ---- the algorithm: policy log-probs, the declared loss, mean over the step ------
            with engine.autocast():
                logps = layout.logps(model, batch)
            inputs = {"policy_chosen_logps": logps[:b], "policy_rejected_logps": logps[b:]}
            for name in (*spec.precomputed_inputs, *spec.optional_inputs):
                column = BATCH_COLUMNS.get(name, name)
                if column in batch:
                    inputs[name] = batch[column]
            out = spec(inputs, **hparams)
            loss_sum = out.losses.sum() * weight
            if not torch.isfinite(loss_sum):  # the step is refused after the collectives
                nonfinite = out.losses.detach().isfinite().logical_not()
                bad += batch["row_id"][nonfinite].tolist() if "row_id" in batch else []
            # DDP/FSDP/ZeRO average gradients over ranks: scale by world for the step's mean
            engine.backward(model, loss_sum * (world / n_pairs), last)
        # ---- plumbing: diagnostics -----------------------------------------------------------
        if weight:
            mg = out.margins.double()
            sums += torch.stack(
                [
                    loss_sum.detach().double().cpu(),
                    mg.sum().cpu(),
                    out.chosen_rewards.double().sum().cpu(),
                    out.rejected_rewards.double().sum().cpu(),
                    (mg > 0).double().sum().cpu(),
                    _pair_tokens(batch).double().cpu(),
                    batch["num_truncated_prompts"].double().cpu(),
                    batch["num_truncated_completions"].double().cpu(),
                    logps[:b].detach().double().sum().cpu(),
                    logps[b:].detach().double().sum().cpu(),
                ]
            )
            abs_max = torch.maximum(abs_max, mg.abs().max().cpu().reshape(1))
    sums, abs_max = engine.reduce_sum(sums), engine.reduce_max(abs_max)

    def row(grad_norm: float, lr: float, seconds: float) -> dict[str, Any]:
        return _metrics_row(sums, abs_max, step, plan, n_pairs, seconds, grad_norm, lr)

    def fault_rows() -> list[int]:
        return sorted(i for part in get_dist().gather(bad) for i in part)

    return StepOut(float(sums[0]), row, fault_rows)


def _write_model(
    cfg: TrainConfig, engine: Engine, model: Any, tokenizer: Any, out_dir: Path
) -> None:
    """The final model as safetensors that plain ``from_pretrained`` loads (rank 0 writes).

    A sharded model is gathered into a fresh unsharded copy first (LoRA adapters included, then
    merged by :func:`inpo.training.modeling.save_policy`).
    """
    if engine.sharded(model):
        state = engine.full_model_state(model)
        if engine.is_main:
            with zero.unpartitioned(engine.accelerator):
                fresh = load_policy(cfg.model)
                load_model_state(fresh, state, Path("(gathered sharded state)"))
                save_policy(fresh, tokenizer, out_dir)
    elif engine.is_main:
        save_policy(engine.unwrap(model), tokenizer, out_dir)
    engine.wait()
