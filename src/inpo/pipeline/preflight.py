"""Loading ``inpo run``'s config, then the checks that read the disk or the hub cache: run once
a config is valid and before any work (:func:`inpo.pipeline.run.run_pipeline` runs them again,
for callers that built a config themselves).

:meth:`RunConfig.validate <inpo.pipeline.config.RunConfig.validate>` checks the settings alone;
this module sits above the workloads (which read the prompts) so that the config module never
imports them.
"""

from __future__ import annotations

from pathlib import Path

from inpo.config import load_config, parse_overrides, read_yaml
from inpo.errors import ConfigError
from inpo.hub import looks_like_hub_id, resolve_dataset, resolve_model
from inpo.pipeline.config import RunConfig
from inpo.pipeline.teacher import check_teacher
from inpo.pipeline.workloads import prompt_sources, workload_defaults

__all__ = ["load_run_config", "preflight"]


def preflight(cfg: RunConfig) -> None:
    """Prompt sources exist (a path, or a hub dataset in the local cache), ``policy`` and
    ``reference`` resolve (a folder, or a hub id in the local cache), and DNO's teacher file
    has a response for every training prompt; a :class:`ConfigError` naming the key otherwise."""
    for key in ("prompts", "eval_prompts"):
        for value in prompt_sources(getattr(cfg, key)):
            if looks_like_hub_id(value):
                resolve_dataset(value, key)  # in the local cache, or one line saying how
            elif not Path(value).exists():
                raise ConfigError(f"{key}: path '{value}' does not exist")
    for key in ("policy", "reference"):  # a folder, or a hub id in the local HF cache
        if getattr(cfg, key):
            resolve_model(getattr(cfg, key), key)
    if cfg.spec.pair_filter and cfg.teacher:
        check_teacher(cfg)


def load_run_config(path: Path | None, overrides: list[str]) -> RunConfig:
    """The run config: the task's defaults first, then the YAML, then the overrides; validated
    and preflighted."""
    task = "default"
    if path is not None:
        loaded = read_yaml(path)
        if isinstance(loaded.get("task"), str):
            task = loaded["task"]
    task = parse_overrides(overrides).get("task", task)
    cfg = load_config(RunConfig, path, overrides, base=workload_defaults(str(task)))
    preflight(cfg)
    return cfg
