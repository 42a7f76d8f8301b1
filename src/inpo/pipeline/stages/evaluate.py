"""Stage 5 (and ``reference/evaluate``): the metrics of a policy, sharded by held-out prompt.

Every rank evaluates its share through the workload (``evaluate_shard``: for the default
workload, the exact tables of ``π`` and ``π_ref`` on its prompts); rank 0 puts them together
(``evaluate_merge``) and writes ``metrics.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inpo.pipeline.faults import fault
from inpo.pipeline.runtime import Ctx

__all__ = ["merge", "settings", "work"]


def settings(cfg: Any, workload: Any) -> dict[str, Any]:
    """What changes this stage's metrics (its hash): the task, the evaluate section and what
    else the workload's evaluation reads (a sampled evaluation's judge and sampling settings)."""
    extra = workload.evaluation_settings() if hasattr(workload, "evaluation_settings") else {}
    return {
        "task": workload.describe(),
        "evaluate": asdict(cfg.evaluate),
        **({"reads": extra} if extra else {}),
    }


def work(ctx: Ctx, workload: Any, policy: Path, ref: Path, folder: Path) -> None:
    workload.evaluate_shard(policy, ref, folder, ctx.dist.rank, ctx.dist.world)
    fault("evaluate", 1)


def merge(ctx: Ctx, workload: Any, folder: Path) -> dict[str, Any]:
    metrics = workload.evaluate_merge(folder, ctx.dist.world)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
