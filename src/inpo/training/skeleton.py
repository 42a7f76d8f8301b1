"""The training skeleton every trainer runs: steps over a :class:`~inpo.training.batches.
StepPlan`, each a step function's forward/backward, then clip, step, log, checkpoint.

What a trainer brings is its step function (``inpo train``: the declared loss on policy
log-probs; ``inpo train-oracle``: binary cross-entropy of a preference model's logit) and its
metrics row. The skeleton owns the rest, identically for both: the RNG state each step starts
from (a diverged step is saved so that a resume replays it), refusing a non-finite loss or
gradient norm after saving the last good state, the schedule, ``metrics.jsonl``, the progress
bar, ``save_steps`` checkpoints and a test's ``stop_after``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inpo.console import progress
from inpo.errors import TrainingDivergedError
from inpo.training.batches import StepPlan
from inpo.training.checkpoint import capture_rng_state
from inpo.training.engine import Engine
from inpo.training.metrics import MetricsLogger

__all__ = ["LoopEnd", "StepOut", "run_steps"]


@dataclass
class StepOut:
    """What a step function reports once its micro-batches' gradients are accumulated.

    Attributes:
        loss_sum: the step's loss summed over all processes (checked for finiteness).
        row: ``(grad_norm, lr, seconds) -> metrics row`` for ``metrics.jsonl``, in column order.
        fault_rows: the row ids to name when the loss is not finite (every process calls it:
            it may gather); ``None``: none named.
    """

    loss_sum: float
    row: Callable[[float, float, float], dict[str, Any]]
    fault_rows: Callable[[], list[int]] | None = None


@dataclass
class LoopEnd:
    steps: int
    last: dict[str, Any] | None
    finished: bool


def run_steps(
    engine: Engine,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    plan: StepPlan,
    step_fn: Callable[[int, list[int]], StepOut],
    *,
    start: int,
    checkpoint: Callable[[int, dict[str, Any] | None], Path | None],
    metrics: MetricsLogger,
    label: str,
    show_progress: bool,
    postfix: Callable[[dict[str, Any]], dict[str, str]],
    max_grad_norm: float | None,
    save_steps: int | None,
    stop_after: int | None = None,
    row_ids: Callable[[list[int]], list[int]] | None = None,
) -> LoopEnd:
    """Run optimizer steps ``start .. plan.total_steps - 1`` (see the module's docstring).

    ``checkpoint(step, rng_state)`` saves the state after ``step`` steps (``rng_state``: the
    generators to store, ``None`` for now's); ``row_ids`` names a step's rows in a message
    about a non-finite gradient norm. Returns where it stopped; a non-finite loss or gradient
    norm raises :class:`~inpo.errors.TrainingDivergedError` after saving the last good state.
    """
    total = plan.total_steps
    bar = progress(
        total, label, enabled=engine.is_main and show_progress, initial=start, unit=" steps"
    )
    row = None
    if engine.device.type == "cuda":  # max_memory_gib: training's peak, not generation's
        torch.cuda.reset_peak_memory_stats()
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            rng_before = capture_rng_state()  # the state a replay of this step needs
            step_rows = plan.rows(step)
            out = step_fn(step, step_rows)
            if not math.isfinite(out.loss_sum):
                path = checkpoint(step, rng_before)
                named = f" (rows {out.fault_rows()})" if out.fault_rows is not None else ""
                raise TrainingDivergedError(
                    f"non-finite loss at optimizer step {step + 1}{named}; the last good state "
                    f"(after step {step}) is saved in {path}"
                )
            grad_norm = engine.clip_and_norm(model, max_grad_norm)
            if not math.isfinite(grad_norm):
                path = checkpoint(step, rng_before)
                named = f" (rows {row_ids(step_rows)})" if row_ids is not None else ""
                raise TrainingDivergedError(
                    f"non-finite gradient norm at optimizer step {step + 1}{named}; the last good "
                    f"state (after step {step}) is saved in {path}"
                )
            lr = scheduler.get_last_lr()[0]
            # under ZeRO the engine stepped above and accelerate's optimizer wrapper's step is a
            # no-op; calling it tells the scheduler the step came first (torch warns otherwise)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            row = out.row(grad_norm, lr, time.perf_counter() - t0)
            if engine.device.type == "cuda":  # this process's peak in training
                row["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            metrics.log(row)
            bar.update(1)
            bar.set_postfix(**postfix(row))
            done = step + 1
            if save_steps and done % save_steps == 0 and done < total:
                checkpoint(done, None)
            if stop_after is not None and done >= stop_after and done < total:
                return LoopEnd(done, row, finished=False)
    finally:
        bar.close()
        metrics.close()
    return LoopEnd(total, row, finished=True)
