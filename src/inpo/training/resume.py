"""Whether and from where a training resumes: one policy for ``inpo train`` and ``inpo
train-oracle``.

A checkpoint resumes only the training its command describes. It is refused, before any model
loads, when it was trained from other inputs (the rows or the starting weights differ), when it
holds DeepSpeed partitions of another number of processes, and when a setting that changes
training differs from the one it recorded on a *finished* training (its model and recorded
config are left as they are). On an unfinished one, ``inpo train-oracle`` refuses such a change
too, naming the key and both values; ``inpo train`` resumes with a warning naming the keys (its
LoRA and shape errors then come from loading the weights).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from inpo.config import config_to_dict
from inpo.errors import ConfigError
from inpo.training.checkpoint import find_latest_checkpoint, verify_checkpoint

__all__ = ["RESUME_IRRELEVANT", "check_resume", "config_changes", "resume_point"]

log = logging.getLogger(__name__)

#: Settings that do not change what a resumed training computes (its weights and metrics):
#: top-level sections and keys, and dotted keys.
RESUME_IRRELEVANT = frozenset(
    {
        "resume",
        "save_steps",
        "keep_checkpoints",
        "final_checkpoint",
        "logging",
        "output_dir",
        "push_to_hub",
        "hub_model_id",
        "hub_private_repo",
        "data.eval_file",
    }
)

#: What each recorded input fingerprint is, for messages.
_INPUTS = {"data": "data.train_file's rows", "model": "model.path's weights"}


def config_changes(
    old: dict[str, Any], new: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, old value, new value)`` of every setting that differs, nested sections
    flattened, in key order."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append((f"{prefix}{key}", a, b))
    return out


def resume_point(cfg: Any, checkpoint_root: Path) -> Path | None:
    """The checkpoint ``cfg.resume`` names: ``auto`` the newest usable one under
    ``checkpoint_root`` (or none), ``never`` none, else that folder (checked)."""
    if cfg.resume == "never":
        return None
    if cfg.resume == "auto":
        return find_latest_checkpoint(checkpoint_root)
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise ConfigError(f"resume: '{path}' is not a checkpoint folder (no trainer_state.json)")
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ConfigError(f"resume: checkpoint '{path}' is not usable: {reason}")
    return path


def _relevant_changes(recorded: dict[str, Any], cfg: Any) -> list[tuple[str, Any, Any]]:
    return [
        (key, old, new)
        for key, old, new in config_changes(recorded, config_to_dict(cfg))
        if key.split(".")[0] not in RESUME_IRRELEVANT and key not in RESUME_IRRELEVANT
    ]


def check_resume(
    cfg: Any,
    path: Path,
    inputs: dict[str, str],
    total_steps: int,
    *,
    refuse_unfinished_changes: bool,
    config_file: str,
) -> None:
    """Refuse (or, for an unfinished ``inpo train``, warn about) resuming checkpoint ``path``
    under ``cfg`` (see the module's docstring). ``inputs``: the fingerprints of this command's
    data and starting weights; ``config_file``: the recorded config's name, for messages."""
    try:
        trainer = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"checkpoint {path}: unreadable trainer_state.json ({err})") from err
    recorded = trainer.get("inputs")  # absent or a string: written before they were recorded
    if isinstance(recorded, dict):
        changed = [k for k in inputs if k in recorded and recorded[k] != inputs[k]]
        if changed:
            raise ConfigError(
                f"checkpoint {path} was trained from other inputs "
                f"({', '.join(_INPUTS.get(k, k) + ' differ' for k in changed)}); resuming it would "
                "mix two trainings. Use another output_dir, or resume=never to start over."
            )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.get("optimizer_format") == "deepspeed" and trainer.get("num_processes") != world:
        raise ConfigError(
            f"checkpoint {path} holds DeepSpeed's optimizer partitions of "
            f"{trainer.get('num_processes')} processes; resume it on as many (this launch has "
            f"{world}), or resume=never to start over"
        )
    if "config" not in trainer:
        return  # written before checkpoints recorded their settings
    changed = _relevant_changes(trainer["config"], cfg)
    if not changed:
        return
    shown = "; ".join(f"{k}: {old!r} then, {new!r} now" for k, old, new in changed[:4])
    if int(trainer.get("step", -1)) >= total_steps:
        raise ConfigError(
            f"{cfg.output_dir} holds a finished training with other settings (changed: {shown}); "
            f"its model and {config_file} are left as they are. Choose another output_dir, or "
            "resume=never to train again from model.path"
        )
    if refuse_unfinished_changes:
        raise ConfigError(
            f"{cfg.output_dir} holds a training (checkpoint {path.name}) with other settings "
            f"({shown}); resuming would train or record something else. Use the same settings, "
            "another output_dir, or resume=never to start over"
        )
    log.warning(
        "resuming from %s with a changed config (%s): the run will differ from an "
        "uninterrupted one",
        path,
        ", ".join(k for k, _, _ in changed),
    )
