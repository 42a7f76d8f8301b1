"""The model card (``README.md``) written next to every model ``inpo train`` and
``inpo train-oracle`` save.

Hugging Face's format: YAML front matter (``library_name``, ``tags``, ``base_model``) that the
Hub reads, then what was trained from what, with which loss and hyper-parameters, the last
step's metrics and the command that reproduces it. No secret, no absolute home path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inpo import __version__
from inpo.hub import looks_like_hub_id

__all__ = ["write_model_card", "write_oracle_card"]


def _hub_id(path: str) -> str | None:
    """The hub id a model came from: ``owner/name`` given as such (resolved from the local
    cache), or a folder inside the Hugging Face cache (``models--owner--name/snapshots/…``);
    ``None`` for any other local folder."""

    if looks_like_hub_id(path):
        return str(path)
    for part in Path(path).expanduser().resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def _name(path: str) -> str:
    """How the card names a model: its hub id when it came from the hub, else its folder as
    given, the home directory written ``~`` (no home path in a card)."""
    hub = _hub_id(path)
    if hub is not None:
        return hub
    text = str(path)
    home = str(Path.home())
    return "~" + text[len(home) :] if text == home or text.startswith(home + "/") else text


def _base_model(path: str) -> list[str]:
    """The front matter's ``base_model`` (a hub id, which the Hub links): only for a model
    that came from the hub; a local folder is named in the card's table instead."""
    hub = _hub_id(path)
    return [f"base_model: {hub}"] if hub is not None else []


def write_model_card(
    out_dir: Path,
    cfg: Any,
    *,
    hparams: dict[str, float],
    pairs: int,
    steps: int,
    last: dict[str, Any] | None,
) -> Path:
    loss = cfg.loss.name
    hp = ", ".join(f"{k}={v:g}" for k, v in hparams.items())
    front = [
        "---",
        "library_name: transformers",
        "tags:",
        *[f"- {t}" for t in dict.fromkeys(["inpo", "preference-optimization", loss])],
        *_base_model(cfg.model.path),
    ]

    if cfg.data.dataset_name and looks_like_hub_id(cfg.data.dataset_name):
        front += ["datasets:", f"- {cfg.data.dataset_name}"]
    front.append("---")
    o = cfg.optim
    rows = [
        ("loss", f"`{loss}` ({hp})" if hp else f"`{loss}`"),
        ("starting weights", f"`{_name(cfg.model.path)}`"),
        ("training data", f"`{_name(str(cfg.data.source))}` ({pairs} pairs)"),
        ("optimizer steps", str(steps)),
        (
            "optimizer",
            f"{o.optimizer}, lr {o.learning_rate:g}, {o.lr_scheduler} schedule, "
            f"warm-up {o.warmup_ratio:g}",
        ),
        ("global batch", f"{o.global_batch_size} pairs ({o.per_device_batch_size} a device)"),
        ("LoRA", f"r={cfg.model.lora.r} (merged)" if cfg.model.lora else "no"),
        ("inpo version", __version__),
    ]
    lines = [
        *front,
        "",
        f"# {out_dir.name}",
        "",
        f"A causal language model trained on preference pairs with inpo (`inpo train`, loss "
        f"`{loss}`).",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    if last:
        keys = ("loss", "accuracy", "margins_mean", "chosen_rewards", "rejected_rewards")
        shown = [(k, last[k]) for k in keys if isinstance(last.get(k), int | float)]
        if shown:
            lines += ["", "Last optimizer step:", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" for k, v in shown]
    lines += _reproduce(out_dir, "train", "train_config.yaml")
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path


def _reproduce(out_dir: Path, command: str, config: str) -> list[str]:
    """The card's last section: the command that trains the same model again, run from the
    card's folder (``config`` records absolute paths) into a new folder beside it."""
    return [
        "",
        f"Reproduce: the resolved settings, with absolute paths, are in `{config}` next to this "
        "card; from this folder (into a new one beside it):",
        "",
        "```bash",
        f"inpo {command} {config} output_dir=../{out_dir.name}-reproduced",
        "```",
        "",
    ]


#: What each oracle kind is, for its card.
_ORACLE_KINDS = {
    "bt": "a Bradley–Terry reward model (one score a response; `annotate.oracle=reward_model`)",
    "pairwise": "a pairwise preference model (reads both responses, answers A or B; "
    "`annotate.oracle=pairwise`)",
    "gpm": "a general preference model (GPM: skew-symmetric embeddings, cyclic preferences; "
    "`annotate.oracle=gpm`)",
}


def write_oracle_card(
    out_dir: Path, cfg: Any, *, pairs: int, steps: int, last: dict[str, Any] | None
) -> Path:
    """The card of an ``inpo train-oracle`` model: kind, starting weights, data, optimizer,
    the last step's metrics and the command that reproduces it."""

    o = cfg.optim
    rows = [
        ("kind", f"`{cfg.kind}`: {_ORACLE_KINDS.get(cfg.kind, cfg.kind)}"),
        ("starting weights", f"`{_name(cfg.model.path)}`"),
        ("training data", f"`{_name(str(cfg.data.source))}` ({pairs} pairs)"),
        ("optimizer steps", str(steps)),
        ("optimizer", f"{o.optimizer}, lr {o.learning_rate:g}, {o.lr_scheduler} schedule"),
        ("global batch", f"{o.global_batch_size} pairs ({o.per_device_batch_size} a device)"),
        ("inpo version", __version__),
    ]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- inpo",
        "- preference-model",
        f"- {cfg.kind}",
        *_base_model(cfg.model.path),
        "---",
        "",
        f"# {out_dir.name}",
        "",
        "A preference oracle trained with inpo (`inpo train-oracle`).",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
    ]
    if last:
        shown = [(k, last[k]) for k in ("loss", "accuracy") if isinstance(last.get(k), int | float)]
        if shown:
            lines += ["", "Last optimizer step:", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4g} |" for k, v in shown]
    lines += _reproduce(out_dir, "train-oracle", "train_oracle_config.yaml")
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
