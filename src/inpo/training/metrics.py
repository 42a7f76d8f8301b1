"""Per-optimizer-step metrics: ``metrics.jsonl`` and ``metrics.csv`` always, TensorBoard or W&B
on request (imported lazily, only when asked for).

On resume, rows logged after the checkpoint's step (by the interrupted run) are dropped first, so
the files hold each step once.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from inpo.errors import ConfigError

__all__ = ["METRIC_FIELDS", "MetricsLogger"]

#: Columns of ``metrics.csv``, in order.
METRIC_FIELDS = (
    "step",
    "epoch",
    "loss",
    "margins_mean",
    "margins_abs_max",
    "chosen_rewards",
    "rejected_rewards",
    "accuracy",
    "grad_norm",
    "lr",
    "pairs",
    "tokens",
    "tokens_per_s",
    "truncated_prompts",
    "truncated_completions",
)


class MetricsLogger:
    """Append one row per optimizer step to ``metrics.jsonl``/``metrics.csv`` (+ a tracker).

    Args:
        output_dir: where the files go.
        report_to: ``none``, ``tensorboard`` (``output_dir/tensorboard``) or ``wandb``.
        resume_step: keep only rows with ``step <= resume_step`` already in the files
            (``None``: start the files afresh).
        run_config: logged to W&B as the run's config.
        enabled: ``False`` on non-main processes (writes nothing).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        report_to: str = "none",
        resume_step: int | None = None,
        run_config: dict[str, Any] | None = None,
        wandb_project: str | None = None,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.jsonl = Path(output_dir) / "metrics.jsonl"
        self.csv = Path(output_dir) / "metrics.csv"
        self._tracker: Any = None
        self._kind = report_to
        if not enabled:
            return
        rows = self._old_rows(resume_step)
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with self.csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # pragma: no cover - tensorboard is in the dev extra
                raise ConfigError(
                    "logging.report_to=tensorboard needs the tensorboard package: "
                    "pip install 'inpo[tensorboard]'"
                ) from err
            self._tracker = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError as err:
                raise ConfigError(
                    "logging.report_to=wandb needs the wandb package: pip install wandb "
                    "(or set logging.report_to=none)"
                ) from err
            self._tracker = wandb.init(
                project=wandb_project or "inpo", config=run_config or {}, dir=str(output_dir)
            )

    def _old_rows(self, resume_step: int | None) -> list[dict[str, Any]]:
        if resume_step is None or not self.jsonl.exists():
            return []
        rows = []
        for line in self.jsonl.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if row.get("step", math.inf) <= resume_step:
                rows.append(row)
        return rows

    def log(self, row: dict[str, Any]) -> None:
        """Write one step's metrics (``row["step"]`` is the optimizer step, counted from 1)."""
        if not self.enabled:
            return
        with self.jsonl.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        with self.csv.open("a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=METRIC_FIELDS, extrasaction="ignore").writerow(row)
        step = int(row["step"])
        scalars = {
            k: v for k, v in row.items() if k != "step" and isinstance(v, int | float) and v == v
        }
        if self._kind == "tensorboard":
            for key, value in scalars.items():
                self._tracker.add_scalar(f"train/{key}", value, step)
        elif self._kind == "wandb":
            self._tracker.log({f"train/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._tracker is not None:
            if self._kind == "tensorboard":
                self._tracker.close()
            else:
                self._tracker.finish()
            self._tracker = None
