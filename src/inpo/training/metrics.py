"""Per-optimizer-step metrics: ``metrics.jsonl`` and ``metrics.csv`` always, and any of
accelerate's experiment trackers on request (``logging.report_to``), under TRL's names.

On resume, rows logged after the checkpoint's step (by the interrupted run) are dropped first, so
the files hold each step once.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["METRIC_FIELDS", "TRACKER_NAMES", "MetricsLogger", "tracker_row"]

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
    "logps_chosen",
    "logps_rejected",
)


#: TRL's names for the metrics trackers receive (so TRL dashboards carry over); ours that TRL
#: does not log go under ``inpo/``.
TRACKER_NAMES = {
    "loss": "loss",
    "chosen_rewards": "rewards/chosen",
    "rejected_rewards": "rewards/rejected",
    "accuracy": "rewards/accuracies",
    # the quantity the loss acts on (INPO's h_t; DPO's β-scaled log-ratio difference)
    "margins_mean": "inpo/h_margin",
    "grad_norm": "grad_norm",
    "lr": "learning_rate",
    "epoch": "epoch",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}


def tracker_row(row: dict[str, Any]) -> dict[str, float]:
    """One step's metrics under the trackers' names (finite numbers only)."""
    out = {}
    for key, value in row.items():
        if key == "step" or not isinstance(value, int | float) or value != value:
            continue
        out[TRACKER_NAMES.get(key, f"inpo/{key}")] = float(value)
    if "rewards/chosen" in out and "rewards/rejected" in out:  # TRL's: chosen − rejected
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


class MetricsLogger:
    """Append one row per optimizer step to ``metrics.jsonl``/``metrics.csv``, and send it to
    the experiment trackers of ``accelerator`` (accelerate's ``log``) under TRL's names.

    Args:
        output_dir: where the files go.
        accelerator: trackers already started with ``init_trackers`` (``None``: files only).
        resume_step: keep only rows with ``step <= resume_step`` already in the files
            (``None``: start the files afresh).
        enabled: ``False`` on non-main processes (writes nothing).
        on_row: called with each row after it is written (e.g. ``inpo run``'s trackers).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        accelerator: Any = None,
        resume_step: int | None = None,
        enabled: bool = True,
        on_row: Any = None,
    ):
        self.enabled = enabled
        self.on_row = on_row
        self.jsonl = Path(output_dir) / "metrics.jsonl"
        self.csv = Path(output_dir) / "metrics.csv"
        self.accelerator = accelerator
        if not enabled:
            return
        rows = self._old_rows(resume_step)
        self.jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with self.csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

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
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log(tracker_row(row), step=int(row["step"]))
        if self.on_row is not None:
            self.on_row(row)

    def close(self) -> None:
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.end_training()
