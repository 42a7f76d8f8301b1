"""Running one stage folder on every process: skip, redo or resume, then rank 0 finishes it.

Every rank calls :meth:`StageRunner.__call__` with the same arguments (SPMD). Rank 0 decides
from the folder's manifest (:func:`inpo.pipeline.artifacts.check_stage`) whether the finished
stage can be reused and tells the others; if not, rank 0 prepares ``<stage>.partial/``, every
rank runs its shard of the work into it (``work(folder)``), and after a barrier rank 0 alone
merges the shards (``merge(folder) -> summary``), writes the manifest and renames the folder.
A barrier separates stages, so a stage reads only what the previous one finished.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from inpo.config import config_hash
from inpo.errors import InpoError
from inpo.pipeline.artifacts import IDENTITY, check_stage, finish_stage, start_stage
from inpo.pipeline.runtime import Ctx

__all__ = ["Interrupted", "StageRunner", "stage_result", "stop_signals"]


def stage_result(name: str, summary: Any) -> str:
    """What a finished stage produced, in a few words (``": 672 prompts × 8 samples"``)."""
    if not isinstance(summary, dict):
        return ""
    s = summary
    parts: list[str] = []
    if name == "generate" and "prompts" in s:
        k = s.get("samples", 0) // max(1, s["prompts"])
        parts.append(f"{s['prompts']} prompts × {k} samples")
        if s.get("truncated"):
            parts.append(f"{s['truncated']} cut at max_new_tokens")
    elif name == "annotate" and "pairs" in s:
        parts.append(f"{s['pairs']} pairs from {s.get('oracle_queries', 0)} oracle queries")
        fresh = s.get("backend_queries")
        if fresh is not None and fresh != s.get("oracle_queries"):
            parts.append(f"{fresh} asked anew")
        if s.get("ties"):
            parts.append(f"{s['ties']} ties")
    elif name == "logps" and s.get("columns"):
        parts.append(f"{len(s['columns'])} log-prob columns")
    elif name == "train" and "steps" in s:
        loss = s.get("loss")
        parts.append(
            f"{s['steps']} steps" + (f", last loss {loss:.4g}" if loss is not None else "")
        )
    elif name == "evaluate":
        for key, label in (("duality_gap", "duality gap"), ("win_rate_vs_ref", "win rate")):
            if isinstance(s.get(key), int | float):
                parts.append(f"{label} {s[key]:.4g}")
    return f": {', '.join(parts)}" if parts else ""


class Interrupted(InpoError):
    """SIGINT/SIGTERM: the run stopped at a safe point; re-run the command to continue."""


@contextmanager
def stop_signals():
    """Turn SIGTERM into KeyboardInterrupt (SIGINT already is one) for the duration."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class StageRunner:
    """Runs or skips one stage folder on every rank, printing (on rank 0) what it does and why."""

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.redone: list[str] = []
        self.skipped = False  # whether the last call reused a finished folder

    def __call__(
        self,
        folder: Path,
        name: str,
        iteration: int,
        settings: Any,
        inputs: dict[str, str],
        work: Callable[[Path], None],
        merge: Callable[[Path], dict[str, Any]],
    ) -> tuple[Path, dict[str, Any]]:
        ctx, dist = self.ctx, self.ctx.dist
        chash = config_hash(settings)
        rel = folder.relative_to(ctx.run_dir)
        decision = None
        if dist.is_main:
            status = check_stage(folder, chash, inputs)
            if status.reusable:
                decision = ("skip", status.manifest["summary"])
            else:
                if folder.exists() or status.manifest is not None:
                    ctx.log(f"[{rel}] redo: {status.reason}")
                    self.redone.append(str(rel))
                partial, discarded = start_stage(folder, chash, inputs)
                if discarded:
                    ctx.log(f"[{rel}] discarding partial work: {discarded}")
                resumed = any(p.name != IDENTITY for p in partial.iterdir())
                ctx.log(f"[{rel}] {'resuming partial work' if resumed else 'running'}")
                decision = ("run", None)
        decision = dist.broadcast(decision)
        self.skipped = decision[0] == "skip"
        if decision[0] == "skip":
            ctx.log(f"[{rel}] complete, skipped")
            return folder, decision[1]
        started = time.time()
        partial = folder.with_name(folder.name + ".partial")
        work(partial)
        dist.barrier()
        summary = None
        if dist.is_main:
            summary = merge(partial)
            manifest = finish_stage(
                partial,
                folder,
                stage=name,
                iteration=iteration,
                config_hash=chash,
                input_hashes=inputs,
                summary=summary,
                started=started,
            )
            ctx.log(f"[{rel}] done in {manifest['seconds']:.1f}s{stage_result(name, summary)}")
        summary = dist.broadcast(summary)
        return folder, summary
