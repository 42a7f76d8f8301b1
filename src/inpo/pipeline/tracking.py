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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from inpo.config import config_to_dict, flat_config
from inpo.pipeline.report import INTERVALS

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
        if key in INTERVALS.values() and isinstance(value, list | tuple) and len(value) == 2:
            out[f"eval/{key}_low"], out[f"eval/{key}_high"] = map(float, value)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            continue
        out[_ITERATION_NAMES.get(key, f"eval/{key}")] = float(value)
    return out


class RunTrackers:
    """accelerate's trackers for one run, on the global training step (no-ops when ``names``
    is empty, as on ranks other than 0 or with ``report_to=none``).

    Args:
        names: tracker names (``tensorboard``, ``wandb``, ``mlflow``, ``trackio`` …).
        project: the project/run name the trackers use.
        logging_dir: where file-based trackers write (``RUN/trackers``).
        config: flat hyper-parameters stored with the run.
    """

    def __init__(
        self,
        names: Sequence[str] = (),
        project: str = "inpo",
        logging_dir: Path | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.trackers: list[Any] = []
        self.global_step = 0  # optimizer steps of the iterations before the current one
        if not names:
            return
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        assert logging_dir is not None
        logging_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            if cls.requires_logging_directory:
                tracker = cls(project, str(logging_dir))
            else:
                tracker = cls(project)
            tracker.start()
            tracker.store_init_configuration(config or {})
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def training_hook(self) -> Any:
        """A callback for :func:`inpo.training.train`'s ``on_metrics`` (``None`` when off):
        each optimizer step's row under TRL's names, after the earlier iterations' steps."""
        if not self.trackers:
            return None
        from inpo.training.metrics import tracker_row  # deferred: loads numpy, torch, yaml

        offset = self.global_step
        return lambda row: self.log(tracker_row(row), step=offset + int(row["step"]))

    def replay(self, metrics_file: Path) -> None:
        """A finished training's rows (its ``metrics.jsonl``), as the loop logged them."""
        hook = self.training_hook()
        if hook is None or not metrics_file.is_file():
            return
        import json

        for line in metrics_file.read_text().splitlines():
            try:
                hook(json.loads(line))
            except (ValueError, KeyError, TypeError):  # a damaged line: skip it
                continue

    def steps_done(self, steps: int) -> None:
        """A training inside an iteration (extragradient's half step) took ``steps``: the
        iteration's next training logs after them."""
        self.global_step += steps

    def iteration_done(self, row: dict[str, Any], *, train_steps: int) -> None:
        """An iteration's row, at the global step its training ended."""
        self.global_step += train_steps
        if self.trackers:
            self.log(iteration_values(row), step=self.global_step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

    def __enter__(self) -> RunTrackers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def start_run_trackers(cfg: Any, run_dir: Path, *, is_main: bool) -> RunTrackers:
    """The trackers ``cfg.report_to`` names for ``cfg``'s run, on the main process (elsewhere
    a :class:`RunTrackers` that does nothing)."""
    from inpo.training.config import LoggingConfig  # deferred: loads numpy, torch, yaml

    logging = LoggingConfig(report_to=cfg.report_to, project=cfg.project)
    if not is_main or not logging.trackers:
        return RunTrackers()

    folder = Path(cfg.tracker_dir) if cfg.tracker_dir else run_dir / "trackers"
    config = flat_config(config_to_dict(cfg))
    return RunTrackers(logging.trackers, logging.project_name, folder, config)
