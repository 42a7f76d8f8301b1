"""Stage 3: ``log π_ref`` and ``log π_t`` of every chosen and rejected response, once.

:func:`inpo.precompute.precompute_logps` on every rank: each scores its share of the pairs on
its device, rank 0 writes the dataset (``datasets`` format) with the new columns. One model in
memory at a time. At iteration 0 (``π_t = π_ref``) the previous-iterate columns are a copy of the
reference ones, not a second identical pass.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inpo.losses import get_loss
from inpo.pipeline.faults import fault
from inpo.pipeline.runtime import Ctx
from inpo.precompute import precompute_logps

__all__ = ["merge", "settings", "work"]


def settings(cfg: Any) -> dict[str, Any]:
    """What changes this stage's log-probs (its hash): the loss (which columns it reads) and
    the train section (lengths, layout)."""
    return {"loss": cfg.loss_hparams()[0], "train": asdict(cfg.train)}


def work(ctx: Ctx, pairs: Path, ref: Path, policy: Path, folder: Path) -> None:
    cfg, dist = ctx.cfg, ctx.dist
    spec = get_loss(cfg.loss_hparams()[0])
    data = cfg.train.data
    kw = {
        "max_prompt_length": data.max_prompt_length,
        "max_completion_length": data.max_completion_length,
        "batch_size": cfg.train.optim.per_device_batch_size * 2,
        "packing": data.packing,  # null: long batches where packing measured faster
        "share_prompt": data.share_prompt,  # each prompt computed once, as in the train stage
    }
    current = pairs
    for columns, model in (("ref", ref), ("prev", policy)):
        needed = spec.needs_ref if columns == "ref" else spec.needs_prev
        if not needed:
            continue
        out = folder / f"with_{columns}"
        same = Path(policy).resolve() == Path(ref).resolve()
        if columns == "prev" and spec.needs_ref and same:
            # π_t is π_ref (iteration 0): its log-probs are the ones just computed.
            if dist.is_main:
                _copy_ref_to_prev(current, out)
            dist.barrier()
        else:
            precompute_logps(current, model, out, columns=columns, overwrite=True, **kw)
        current = out
        fault("logps", 1 if columns == "ref" else 2)


def merge(ctx: Ctx, pairs: Path, folder: Path) -> dict[str, Any]:
    spec = get_loss(ctx.cfg.loss_hparams()[0])
    final = folder / "data"
    current = next(
        (folder / f"with_{c}" for c in ("prev", "ref") if (folder / f"with_{c}").exists()), None
    )
    if current is None:
        final.mkdir()
        shutil.copy(pairs, final / "pairs.jsonl")
    else:
        current.rename(final)
        for leftover in folder.glob("with_*"):
            shutil.rmtree(leftover)
    return {"columns": list(spec.precomputed_inputs)}


def _copy_ref_to_prev(src: Path, out: Path) -> None:
    """A copy of the dataset at ``src`` with ``prev_*_logps`` equal to its ``ref_*_logps``."""
    from datasets import load_from_disk

    data = load_from_disk(str(src))
    for side in ("chosen", "rejected"):
        name = f"prev_{side}_logps"
        if name in data.column_names:
            data = data.remove_columns(name)
        data = data.add_column(name, data[f"ref_{side}_logps"])
    if out.exists():
        shutil.rmtree(out)
    data.save_to_disk(str(out))
    if (src / "manifest.json").is_file():
        shutil.copy(src / "manifest.json", out / "manifest.json")
