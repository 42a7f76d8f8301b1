"""The model card (``README.md``) written next to every model ``inpo train`` saves.

Hugging Face's format: YAML front matter (``library_name``, ``tags``, ``base_model``) that the
Hub reads, then what was trained from what, with which loss and hyper-parameters, the last
step's metrics and the command that reproduces it. No secret, no absolute home path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_model_card"]


def _name(path: str) -> str:
    """A local folder by its last two parts (no home directory in a card); a hub id as is."""
    p = Path(path)
    return "/".join(p.parts[-2:]) if p.is_absolute() else str(path)


def write_model_card(
    out_dir: Path,
    cfg: Any,
    *,
    hparams: dict[str, float],
    pairs: int,
    steps: int,
    last: dict[str, Any] | None,
) -> Path:
    from inpo import __version__

    loss = cfg.loss.name
    hp = ", ".join(f"{k}={v:g}" for k, v in hparams.items())
    front = [
        "---",
        "library_name: transformers",
        "tags:",
        *[f"- {t}" for t in dict.fromkeys(["inpo", "preference-optimization", loss])],
        f"base_model: {_name(cfg.model.path)}",
    ]
    from inpo.hub import looks_like_hub_id

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
    lines += [
        "",
        "Reproduce: the resolved settings, with absolute paths, are in `train_config.yaml` next "
        "to this card; from this folder (into a new one beside it):",
        "",
        "```bash",
        f"inpo train train_config.yaml output_dir=../{out_dir.name}-reproduced",
        "```",
        "",
    ]
    path = out_dir / "README.md"
    path.write_text("\n".join(lines))
    return path
