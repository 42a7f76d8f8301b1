"""Stage 2: the oracle and the selection rule → ``pairs.jsonl``.

The prompts of ``samples.jsonl`` are sharded by index; each rank labels its share with its own
oracle (a local model on its own device, or its own HTTP client) in batches of
``annotate.batch_size`` prompts, every query through the persistent cache, and writes its pairs
(with their prompt's index) to ``pairs.rankNNN.jsonl``. Rank 0 writes ``pairs.jsonl`` in prompt
order and folds the ranks' cache files into ``oracle_cache.sqlite``. A restarted run relabels
only what the cache does not hold: no oracle query is asked twice.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from inpo import selection as sel
from inpo.console import progress
from inpo.data import as_completion, completion_text
from inpo.distributed import shard
from inpo.errors import InpoError
from inpo.hashing import file_sha256
from inpo.oracles.cache import merge_rank_caches
from inpo.pipeline.faults import fault
from inpo.pipeline.runtime import Ctx
from inpo.pipeline.teacher import load_teacher, prompt_key

__all__ = ["merge", "settings", "work"]


def settings(cfg: Any, oracle: Any) -> dict[str, Any]:
    """What changes this stage's pairs (its hash): the annotate settings, the selection rule,
    the oracle; DNO's margin and teacher file (its content hash), only for DNO (the other
    algorithms' hashes stay as they were)."""
    out = {
        "annotate": asdict(cfg.annotate),
        "selection": cfg.selection(),
        "oracle": getattr(oracle, "oracle_id", ""),
    }
    if cfg.spec.pair_filter:
        teacher = file_sha256(cfg.teacher) if cfg.teacher else None
        out["dno"] = {"margin": cfg.margin_value, "teacher": teacher}
    return out


def _with_teacher(chunk: list[dict], teacher: dict[str, str] | None) -> list[dict]:
    """Each row's candidates: its K samples, then the teacher's response (DNO), with their
    cut-at-``max_new_tokens`` flags (a teacher's response ended)."""
    chunk = [{**r, "truncated": _cut_flags(r)} for r in chunk]
    if not teacher:
        return chunk

    return [
        {
            **r,
            "responses": [*r["responses"], teacher[prompt_key(r["prompt"])]],
            "truncated": [*r["truncated"], False],
        }
        for r in chunk
    ]


def _cut_flags(row: dict) -> list[bool]:
    flags = row.get("truncated")
    if not isinstance(flags, list):  # samples written before the flags existed: none known
        return [False] * len(row["responses"])
    return [bool(f) for f in flags]


def _drop_cut(chunk: list[dict]) -> list[dict]:
    """``annotate.truncated=drop``: each row's samples that ended; a row left with fewer than
    two gives no pair."""
    out = []
    for r in chunk:
        keep = [j for j, cut in enumerate(r["truncated"]) if not cut]
        if len(keep) >= 2:
            responses = [r["responses"][j] for j in keep]
            out.append({**r, "responses": responses, "truncated": [False] * len(keep)})
    return out


class CutLoses:
    """``annotate.truncated=lose``: a sample cut at ``max_new_tokens`` loses to one that ended
    (``P = 0`` or ``1``) without asking the oracle; every other query goes to ``oracle``."""

    def __init__(self, oracle: Any, chunk: list[dict]) -> None:
        self.oracle = oracle
        self.stats = getattr(oracle, "stats", None)
        self.cut = {
            (json.dumps(r["prompt"], sort_keys=True), y)
            for r in chunk
            for y, c in zip(r["responses"], r["truncated"])
            if c
        }

    def prob_prefers(self, prompts, responses_a, responses_b):
        import numpy as np

        out = np.full(len(prompts), np.nan)
        ask = []
        for i, (p, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
            key = json.dumps(p, sort_keys=True)
            a_cut, b_cut = (key, a) in self.cut, (key, b) in self.cut
            if a_cut != b_cut:
                out[i] = 0.0 if a_cut else 1.0
            else:
                ask.append(i)
        if ask:
            got = self.oracle.prob_prefers(
                [prompts[i] for i in ask],
                [responses_a[i] for i in ask],
                [responses_b[i] for i in ask],
            )
            out[ask] = np.asarray(got, dtype=np.float64)
        return out


def _pairs(
    rule: str,
    oracle: Any,
    chunk: list[dict],
    tie_policy: str,
    margin: float | None = None,
    truncated: str = "keep",
) -> tuple[list[dict], int, int]:
    """The selected pairs of a batch of sample rows, the queries the rule asked, and the pairs
    DNO's ``margin`` dropped (win-rate selection only). Each pair carries its responses'
    ``chosen_truncated``/``rejected_truncated`` flags; ``truncated`` is ``annotate.truncated``."""

    if truncated == "drop":
        chunk = _drop_cut(chunk)
    elif truncated == "lose":
        oracle = CutLoses(oracle, chunk)
    if not chunk:
        return [], 0, 0

    def cut(r: dict, chosen: int, rejected: int) -> dict[str, bool]:
        return {
            "chosen_truncated": r["truncated"][chosen],
            "rejected_truncated": r["truncated"][rejected],
        }

    # Oracles get the prompt as it is (a conversation stays a message list) and render it in
    # their own format; the pairs are in TRL's format (an assistant turn after a conversation).
    oprompts = [r["prompt"] for r in chunk]
    resp = [r["responses"] for r in chunk]
    pairs, queries, below = [], 0, 0
    if rule in ("tournament", "best_worst"):
        if rule == "tournament":
            results = sel.tournament_batch(oracle, oprompts, resp, tie_policy=tie_policy, rng=None)
        else:
            results = sel.best_worst_by_reward_batch(oracle, oprompts, resp)
        for r, res in zip(chunk, results):
            queries += res.queries if rule == "tournament" else len(r["responses"])
            if res.chosen is None or r["responses"][res.chosen] == r["responses"][res.rejected]:
                continue
            tie = bool(res.is_tie) if rule == "tournament" else False
            pairs.append(
                {
                    "index": r["index"],
                    "prompt": r["prompt"],
                    "chosen": as_completion(r["prompt"], r["responses"][res.chosen]),
                    "rejected": as_completion(r["prompt"], r["responses"][res.rejected]),
                    "tie": tie,
                    **cut(r, res.chosen, res.rejected),
                }
            )
    else:  # all_pairs (SPPO, DNO): the best and worst by estimated win rate, with their rates
        for r, res in zip(chunk, sel.win_rates_batch(oracle, oprompts, resp)):
            queries += res.queries
            rates = [float(x) for x in res.win_rates]
            best = max(range(len(rates)), key=rates.__getitem__)
            worst = min(range(len(rates)), key=rates.__getitem__)
            if r["responses"][best] == r["responses"][worst]:
                continue
            if margin is not None and rates[best] - rates[worst] < margin:
                below += 1  # DNO keeps large-margin pairs only
                continue
            pairs.append(
                {
                    "index": r["index"],
                    "prompt": r["prompt"],
                    "chosen": as_completion(r["prompt"], r["responses"][best]),
                    "rejected": as_completion(r["prompt"], r["responses"][worst]),
                    "chosen_winrate": float(rates[best]),
                    "rejected_winrate": float(rates[worst]),
                    **cut(r, best, worst),
                }
            )
    return pairs, queries, below


def _model_passes(oracle: Any) -> int | None:
    """Forward passes the oracle's model has run (``sequences_scored`` of the backend under the
    cache and label wrappers), or ``None`` for a backend without a model of its own."""
    seen = 0
    while oracle is not None and seen < 8:
        extra = getattr(getattr(oracle, "stats", None), "extra", {}) or {}
        if "sequences_scored" in extra:
            return int(extra["sequences_scored"])
        oracle = getattr(oracle, "oracle", None) or getattr(oracle, "_reward", None)
        seen += 1
    return None


def work(ctx: Ctx, oracle: Any, samples: Path, folder: Path) -> None:
    dist, cfg = ctx.dist, ctx.cfg
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    mine = [rows[i] for i in shard(rows, dist.rank, dist.world)]
    stats = getattr(oracle, "stats", None)
    misses_before = stats.as_dict().get("cache_misses", 0) if stats is not None else 0
    passes_before = _model_passes(oracle)
    rule, bs = cfg.selection(), cfg.annotate.batch_size
    margin = teacher = None
    if cfg.spec.pair_filter:
        margin = cfg.margin_value
        teacher = load_teacher(cfg.teacher) if cfg.teacher else None
    pairs, queries, below = [], 0, 0
    bar = progress(len(mine), f"annotate ({rule})", enabled=dist.is_main, unit=" prompts")
    for start in range(0, len(mine), bs):
        if start:
            fault("annotate", start // bs)
        chunk = _with_teacher(mine[start : start + bs], teacher)
        got, asked, dropped = _pairs(
            rule, oracle, chunk, cfg.annotate.tie_policy, margin, cfg.annotate.truncated
        )
        pairs += got
        queries += asked
        below += dropped
        bar.update(min(bs, len(mine) - start))
    bar.close()
    misses = stats.as_dict().get("cache_misses", 0) - misses_before if stats is not None else None
    passes = _model_passes(oracle)
    with open(folder / f"pairs.rank{dist.rank:03d}.jsonl", "w") as fh:
        for p in pairs:
            fh.write(json.dumps(p) + "\n")
    counts = {
        "oracle_queries": queries,
        "backend_queries": misses,
        # the oracle model's forward passes (a GPM or reward model: one per response; a
        # pairwise model: two per pair asked anew)
        "model_passes": None if passes is None else passes - (passes_before or 0),
        "prompts": len(mine),
        "below_margin": below if margin is not None else None,
    }
    (folder / f"counts.rank{dist.rank:03d}.json").write_text(json.dumps(counts))


def merge(ctx: Ctx, folder: Path) -> dict[str, Any]:
    """``pairs.jsonl`` in prompt order; the ranks' query counts summed."""

    merge_rank_caches(ctx.run_dir / "oracle_cache.sqlite")
    pairs: list[dict] = []
    for f in sorted(folder.glob("pairs.rank*.jsonl")):
        pairs += [json.loads(line) for line in f.read_text().splitlines()]
    pairs.sort(key=lambda p: p["index"])  # stable: a prompt's pairs keep their order
    counts = [json.loads(f.read_text()) for f in sorted(folder.glob("counts.rank*.json"))]
    # The data loader rejects empty completions (a malformed row in a dataset); a sampled
    # response that is only EOS cannot be trained on through it, so such pairs are dropped and
    # counted.
    kept = [
        p
        for p in pairs
        if completion_text(p["chosen"]).strip() and completion_text(p["rejected"]).strip()
    ]
    n_prompts = sum(c["prompts"] for c in counts)
    if not kept:
        raise InpoError(
            f"annotate: the oracle confirmed no pair among {n_prompts} prompts; "
            "raise generate.k or generate.temperature"
            + (" (or lower margin)" if any(c.get("below_margin") for c in counts) else "")
        )
    with open(folder / "pairs.jsonl", "w") as fh:
        for p in kept:
            p.pop("index")
            fh.write(json.dumps(p) + "\n")
    for f in [*folder.glob("pairs.rank*.jsonl"), *folder.glob("counts.rank*.json")]:
        f.unlink()
    backend = [c["backend_queries"] for c in counts]
    passes = [c.get("model_passes") for c in counts]
    below = [c["below_margin"] for c in counts if c.get("below_margin") is not None]
    return {
        # DNO: prompts whose best and worst differ by less than the margin (only for it)
        **({"below_margin": sum(below)} if below else {}),
        "pairs": len(kept),
        "prompts": n_prompts,
        "ties": sum(bool(p.get("tie")) for p in kept),
        # pairs with a response cut at max_new_tokens (scored as sampled: no end token)
        "cut_pairs": sum(
            bool(p.get("chosen_truncated") or p.get("rejected_truncated")) for p in kept
        ),
        "dropped_empty": len(pairs) - len(kept),
        # Queries the selection rule asked, and of those the ones the backend answered (the
        # rest came from the persistent cache, e.g. after a restart).
        "oracle_queries": sum(c["oracle_queries"] for c in counts),
        "backend_queries": None if None in backend else sum(backend),
        **({} if None in passes else {"model_passes": sum(passes)}),
    }
