"""``inpo train``'s pairs: the rows, the columns the loss reads, the step arithmetic and the
fingerprint a checkpoint records, all known before any model loads."""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inpo.data import load_preference_dataset
from inpo.errors import DataError
from inpo.hashing import model_fingerprint
from inpo.losses import LossSpec, get_loss
from inpo.training.config import TrainConfig
from inpo.training.modeling import check_model_dir

__all__ = [
    "BATCH_COLUMNS",
    "PolicyData",
    "check_loss_columns",
    "check_precompute_lengths",
    "inputs_identity",
    "load_pairs",
]

log = logging.getLogger(__name__)

#: Loss-input name → column name in the dataset/collated batch, where they differ. Every other
#: input (``ref_chosen_logps``, ``chosen_lengths``, ...) has the same name in both.
BATCH_COLUMNS = {
    "ties": "tie",
    "chosen_winrates": "chosen_winrate",
    "rejected_winrates": "rejected_winrate",
}

_COLLATOR_MADE = ("chosen_lengths", "rejected_lengths")  # computed by the collator, not stored

_WARNED_IGNORED: set[tuple[str, tuple[str, ...]]] = set()  # (loss, columns) warned about


def check_loss_columns(spec: LossSpec, columns: list[str], source: str) -> None:
    """Fail before training when the dataset lacks a column the loss reads (naming it)."""
    needed = [
        BATCH_COLUMNS.get(name, name)
        for name in spec.precomputed_inputs
        if name not in _COLLATOR_MADE
    ]
    missing = [c for c in needed if c not in columns]
    if not missing:
        return
    hints = []
    if any(c.startswith(("ref_", "prev_")) for c in missing):
        hints.append("run `inpo precompute` first (it writes ref_*/prev_* log-prob columns)")
    if any(c.endswith("_winrate") for c in missing):
        hints.append(
            "SPPO needs win-rate estimates per response (chosen_winrate, rejected_winrate)"
        )
    if "tie" in missing:
        hints.append("a boolean `tie` column marks pairs labelled as ties")
    raise DataError(
        f"loss '{spec.name}' needs column(s) {', '.join(missing)} that {source} lacks: "
        + "; ".join(hints)
    )


def check_precompute_lengths(cfg: TrainConfig) -> None:
    """Warn when ``inpo precompute`` scored the pairs under other truncation limits than ours
    and they cut some pair differently (a pair truncated differently has reference log-probs
    of another completion). Limits that both exceed the data's longest prompt (completion),
    which the manifest records, cut nothing and are equal in effect."""
    if not cfg.data.train_file:
        return
    manifest = Path(cfg.data.train_file) / "manifest.json"
    if not manifest.is_file():
        return
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return
    for key, longest_key in (
        ("max_prompt_length", "longest_prompt_tokens"),
        ("max_completion_length", "longest_completion_tokens"),
    ):
        if key not in info or info[key] == getattr(cfg.data, key):
            continue
        ours, theirs, longest = getattr(cfg.data, key), info[key], info.get(longest_key)
        if isinstance(longest, int):  # manifests from before 2026-12 lack it: always warn
            cut = [
                min(limit, longest) if limit is not None else longest for limit in (ours, theirs)
            ]
            if cut[0] == cut[1]:
                continue
        longest_note = f" (its longest has {longest} tokens)" if isinstance(longest, int) else ""
        log.warning(
            "data.%s=%s but %s was precomputed with %s=%s%s: pairs longer than either limit "
            "get log-probs of differently truncated text; use the same limits",
            key,
            ours,
            cfg.data.train_file,
            key,
            theirs,
            longest_note,
        )


def _text_len(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    return sum(len(m.get("content", "")) for m in value)


@dataclass
class PolicyData:
    """The preference rows and the step arithmetic, known before the model loads."""

    spec: LossSpec
    hparams: dict[str, float]
    rows: list[dict[str, Any]]
    lengths: list[int]
    steps_per_epoch: int
    total_steps: int
    warmup: int
    fingerprint: str  # of the rows' content, whatever the file format


def load_pairs(cfg: TrainConfig) -> PolicyData:
    spec = get_loss(cfg.loss.name)
    dataset = load_preference_dataset(
        cfg.data.source,
        split=cfg.data.split,
        skip_bad_rows=cfg.data.skip_bad_rows,
        config=cfg.data.dataset_config,
    )
    key = "data.train_file" if cfg.data.train_file else "data.dataset_name"
    check_loss_columns(spec, dataset.column_names, f"{key} '{cfg.data.source}'")
    rows = dataset.to_list()
    reads = {BATCH_COLUMNS.get(n, n) for n in (*spec.inputs, *spec.optional_inputs)}
    ignored = [c for c in dataset.column_names if c in BATCH_COLUMNS.values() and c not in reads]
    if ignored and (spec.name, tuple(ignored)) not in _WARNED_IGNORED:
        # once a process: `inpo run` trains every iteration on the same kind of pairs (DNO's
        # carry win rates that its DPO loss does not read)
        _WARNED_IGNORED.add((spec.name, tuple(ignored)))
        log.warning("loss '%s' ignores the dataset's column(s) %s", spec.name, ", ".join(ignored))
    g = cfg.optim.global_batch_size
    steps_per_epoch = math.ceil(len(rows) / g)
    total_steps = cfg.optim.max_steps or cfg.optim.epochs * steps_per_epoch
    if cfg.data.share_prompt:  # one row per pair: its length is the whole pair's
        lengths = [
            _text_len(r["prompt"]) + _text_len(r["chosen"]) + _text_len(r["rejected"]) for r in rows
        ]
    else:
        lengths = [
            _text_len(r["prompt"]) + max(_text_len(r["chosen"]), _text_len(r["rejected"]))
            for r in rows
        ]
    return PolicyData(
        spec=spec,
        hparams=cfg.loss.hparams(),
        rows=rows,
        lengths=lengths,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=math.ceil(cfg.optim.warmup_ratio * total_steps),
        fingerprint=hashlib.sha256(
            json.dumps(rows, sort_keys=True, default=str).encode()
        ).hexdigest()[:16],
    )


def inputs_identity(cfg: TrainConfig, data: PolicyData) -> dict[str, str]:
    """What a checkpoint was trained from: the data's and the starting weights' fingerprints."""
    return {"data": data.fingerprint, "model": model_fingerprint(check_model_dir(cfg.model.path))}
