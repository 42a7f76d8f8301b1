"""One experiment-tracker run for a whole ``inpo run``: accelerate's trackers, on rank 0.

``report_to=tensorboard,wandb,…`` starts the named trackers once (accelerate's own classes,
``accelerate.tracking.LOGGER_TYPE_TO_CLASS``), with the resolved config as hyper-parameters and,
for the trackers that write files, their files under ``RUN/trackers/`` unless ``tracker_dir``
says otherwise. Every value goes in at one step axis, the **global training step** (the
optimizer steps of all iterations so far), which trackers such as W&B require to increase:

- each optimizer step's training metrics, under TRL's names (``loss``, ``rewards/chosen``,
  ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``learning_rate`` …; ours
  under ``inpo/``), as they are computed;
- after each iteration, its row: ``iteration``, ``eval/*`` (``eval/duality_gap``,
  ``eval/win_rate_vs_ref``, ``eval/kl_to_ref`` …), ``oracle/queries``,
  ``oracle/queries_total``, ``data/pairs`` and ``time/<stage>_s``. Plot them against
  ``iteration`` for the per-iteration view.

Every invocation logs the whole run so far: a re-run (to continue an interrupted run, or to add
a tracker to a finished one) logs the finished iterations again from their files
(``metrics.jsonl`` of each trained model, each iteration's row), so a new tracker run (W&B) is
complete; file-based trackers (TensorBoard) get a second event file with the same points.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["RunTrackers", "iteration_values"]

#: Iteration-row keys and the tracker names they go under.
_ITERATION_NAMES = {
    "oracle_queries": "oracle/queries",
    "oracle_queries_total": "oracle/queries_total",
    "pairs": "data/pairs",
    "truncated_samples": "data/truncated_samples",
    "train_loss": "train/loss",
    "train_steps": "train/steps",
}
_NOT_METRICS = {"iteration", "seed", "algorithm"}


def iteration_values(row: dict[str, Any]) -> dict[str, float]:
    """An iteration's row of ``metrics.jsonl`` under the trackers' names (numbers only)."""
    out: dict[str, float] = {"iteration": float(row["iteration"])}
    for key, value in row.items():
        if key in _NOT_METRICS:
            continue
        if key == "seconds" and isinstance(value, dict):
            for stage, s in value.items():
                if isinstance(s, int | float):
                    out[f"time/{stage}_s"] = float(s)
            continue
        if key == "win_rate_ci" and isinstance(value, list | tuple) and len(value) == 2:
            out["eval/win_rate_ci_low"], out["eval/win_rate_ci_high"] = map(float, value)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            continue
        out[_ITERATION_NAMES.get(key, f"eval/{key}")] = float(value)
    return out


class RunTrackers:
    """accelerate's trackers for one run (no-ops when ``names`` is empty).

    Args:
        names: tracker names (``tensorboard``, ``wandb``, ``mlflow``, ``trackio`` …).
        project: the project/run name the trackers use.
        logging_dir: where file-based trackers write (``RUN/trackers``).
        config: flat hyper-parameters stored with the run.
    """

    def __init__(self, names: list[str], project: str, logging_dir: Path, config: dict[str, Any]):
        self.trackers: list[Any] = []
        if not names:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        logging_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if cls.requires_logging_directory:
                tracker = cls(project, str(logging_dir))
            else:
                tracker = cls(project)
            tracker.start()
            tracker.store_init_configuration(config)
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def start_run_trackers(cfg: Any, run_dir: Path) -> RunTrackers:
    """The trackers ``cfg.report_to`` names, for ``cfg``'s run (rank 0 only)."""
    from inpo.config import config_to_dict
    from inpo.training.config import LoggingConfig
    from inpo.training.loop import _flat

    names = LoggingConfig(report_to=cfg.report_to).trackers
    project = cfg.project or os.environ.get("WANDB_PROJECT") or "inpo"
    folder = Path(cfg.tracker_dir) if cfg.tracker_dir else run_dir / "trackers"
    return RunTrackers(names, project, folder, _flat(config_to_dict(cfg)))
