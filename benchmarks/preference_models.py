"""Preference models: GPM vs the pairwise oracle's cost, and BT / pairwise / GPM accuracy.

1. **Cost on K = 8** (one process, interleaved rounds): the same random-weight backbone as a
   GPM and as an RLHFlow pairwise model, labelling the K samples of each prompt by the
   tournament (``3K/2 − 1 = 11`` queries; the pairwise model reads both orders: 22 forward
   passes) and by SPPO's all pairs (28 queries; 56 passes). The GPM embeds each response once:
   K passes whatever the rule. Reported: forward passes a prompt, seconds, per-round ratios
   and their median.
2. **Held-out accuracy** of ``inpo train-oracle kind=bt|pairwise|gpm`` on a cyclic (the regular
   tournament of 7 responses: no ranking agrees with more than 15 of its 21 duels) and a
   transitive synthetic set (:func:`inpo.tiny.preference_pairs`), trained on eight prompts,
   scored on two others, for each seed.

    python benchmarks/preference_models.py [--seeds 0,1] [--rounds 3] [--out benchmarks/results/preference_models.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K = 8


def _cost(rounds: int, prompts: int, hidden: int, layers: int) -> tuple[list[str], dict]:
    import random

    import torch

    from inpo.oracles.gpm import GPMOracle, build_gpm
    from inpo.oracles.pairwise import PairwisePreferenceOracle
    from inpo.selection import tournament_batch, win_rates_batch
    from inpo.tiny import char_tokenizer, tiny_causal_lm

    tmp = Path(tempfile.mkdtemp())
    tok = char_tokenizer()
    sizes = {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 8}
    sizes["max_position_embeddings"] = 1024
    tiny_causal_lm("llama", tok, seed=0, **sizes).save_pretrained(tmp / "lm")
    tok.save_pretrained(tmp / "lm")
    torch.manual_seed(0)
    build_gpm(tmp / "lm", dim=6, prompt_scales=True, beta=0.1).save(tmp / "gpm", tok)
    rng = random.Random(0)
    letters = "abcdefghij klmnopqrstuvwxyz"
    ps = ["".join(rng.choice(letters) for _ in range(48)) for _ in range(prompts)]
    resp = [["".join(rng.choice(letters) for _ in range(96)) for _ in range(K)] for _ in ps]

    def run(kind: str, rule: str) -> tuple[float, int, int]:
        oracle = (
            GPMOracle(tmp / "gpm", device="cpu", batch_size=16)
            if kind == "gpm"
            else PairwisePreferenceOracle(tmp / "lm", device="cpu", batch_size=16, format="chat")
        )
        t0 = time.perf_counter()
        if rule == "tournament":
            out = tournament_batch(oracle, ps, resp, tie_policy="first", rng=None)
        else:
            out = win_rates_batch(oracle, ps, resp)
        took = time.perf_counter() - t0
        return took, sum(r.queries for r in out), oracle.stats.extra["sequences_scored"]

    lines, summary = [], {}
    for rule in ("tournament", "all_pairs"):
        ratios, rows = [], []
        for r in range(rounds):
            got = {
                kind: run(kind, rule)
                for kind in (("gpm", "pairwise") if r % 2 == 0 else ("pairwise", "gpm"))
            }
            ratios.append(got["pairwise"][0] / got["gpm"][0])
            rows.append(got)
        g, p = rows[-1]["gpm"], rows[-1]["pairwise"]
        summary[rule] = {
            "queries_per_prompt": g[1] / prompts,
            "gpm_passes_per_prompt": g[2] / prompts,
            "pairwise_passes_per_prompt": p[2] / prompts,
            "ratios": ratios,
            "median": statistics.median(ratios),
        }
        lines.append(
            f"| {rule} | {g[1] / prompts:.0f} | {g[2] / prompts:.0f} | {p[2] / prompts:.0f} | "
            + ", ".join(f"{x:.2f}" for x in ratios)
            + f" | **{statistics.median(ratios):.2f}×** |"
        )
    return lines, summary


def _accuracy(seeds: list[int]) -> tuple[list[str], dict]:
    from inpo.cli import main
    from inpo.tiny import (
        _PAIR_PROMPTS,
        best_transitive_accuracy,
        pair_words,
        preference_pairs,
        save_tiny_lm,
        word_tokenizer,
    )

    tmp = Path(tempfile.mkdtemp())
    results: dict = {}
    for seed in seeds:
        lm = save_tiny_lm(
            tmp / f"lm{seed}", "llama", tokenizer=word_tokenizer(pair_words()), seed=seed
        )
        for rule in ("cyclic", "transitive"):
            for split, prompts in (("train", _PAIR_PROMPTS[:8]), ("eval", _PAIR_PROMPTS[8:])):
                rows = preference_pairs(rule, prompts=prompts)
                (tmp / f"{rule}_{split}.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows)
                )
            for kind in ("bt", "pairwise", "gpm"):
                out = tmp / f"{kind}_{rule}_{seed}"
                args = [
                    "train-oracle", f"kind={kind}", f"model.path={lm}", f"seed={seed}",
                    f"data.train_file={tmp / f'{rule}_train.jsonl'}",
                    f"data.eval_file={tmp / f'{rule}_eval.jsonl'}", f"output_dir={out}",
                    "optim.learning_rate=3e-4", "optim.global_batch_size=16", "optim.epochs=40",
                    "optim.warmup_ratio=0.05", "logging.progress_bar=false", "save_steps=null",
                ]  # fmt: skip
                assert main(["-q", *args]) == 0
                results[(rule, kind, seed)] = json.loads((out / "eval_metrics.json").read_text())
    lines = []
    for rule in ("cyclic", "transitive"):
        best = best_transitive_accuracy(rule, 7)
        for kind in ("bt", "pairwise", "gpm"):
            acc = [results[(rule, kind, s)]["accuracy"] for s in seeds]
            brier = [results[(rule, kind, s)]["brier"] for s in seeds]
            ece = [results[(rule, kind, s)]["ece"] for s in seeds]
            fmt = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
            lines.append(
                f"| {rule} | {kind} | {fmt(acc)} | {fmt(brier)} | {fmt(ece)} | {best:.3f} |"
            )
    return lines, {f"{r}/{k}/{s}": v for (r, k, s), v in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,42")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/preference_models.md"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    load = os.getloadavg()[0]
    t0 = time.time()
    cost_lines, cost = _cost(args.rounds, args.prompts, args.hidden, args.layers)
    acc_lines, acc = _accuracy(seeds)
    took = time.time() - t0
    cyc = {
        k: [acc[f"cyclic/{k}/{s}"]["accuracy"] for s in seeds] for k in ("bt", "pairwise", "gpm")
    }
    verdicts = [
        (
            "GPM: K = 8 forward passes a prompt (pairwise: 22 for the tournament)",
            cost["tournament"]["gpm_passes_per_prompt"] == K
            and cost["tournament"]["pairwise_passes_per_prompt"] == 22,
        ),
        (
            "GPM faster than the pairwise model on the tournament (median)",
            cost["tournament"]["median"] > 1,
        ),
        ("cyclic: GPM above the best ranking (0.714), every seed", min(cyc["gpm"]) > 15 / 21),
        ("cyclic: GPM median held-out accuracy >= 0.85", statistics.median(cyc["gpm"]) >= 0.85),
        ("cyclic: BT <= the best ranking (0.714), every seed", max(cyc["bt"]) <= 15 / 21 + 1e-9),
    ]
    text = [
        "# Preference models: GPM vs pairwise cost, BT / pairwise / GPM accuracy",
        "",
        f"Command: `python benchmarks/preference_models.py --seeds {args.seeds} --rounds {args.rounds}`"
        f" (load average {load:.2f} at the start, {os.cpu_count()} cores, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, {took / 60:.1f} min).",
        "",
        f"## Cost on K = {K} ({args.prompts} prompts, random-weight Llama {args.hidden}×{args.layers},"
        " prompts of 48 and responses of 96 characters, CPU)",
        "",
        "Ratio = pairwise seconds / GPM seconds in the same round (rounds alternate which runs first).",
        "",
        "| rule | queries a prompt | GPM passes a prompt | pairwise passes a prompt | ratio per round | median |",
        "|---|---|---|---|---|---|",
        *cost_lines,
        "",
        f"## Held-out accuracy (seeds {args.seeds}; tiny Llama 32×2 trained from random weights, 168 training pairs on 8 prompts, 42 held-out duels on 2 others; lr 3e-4, 40 epochs)",
        "",
        "| set | kind | accuracy | Brier | ECE | best ranking |",
        "|---|---|---|---|---|---|",
        *acc_lines,
        "",
        "The best ranking's accuracy is what any Bradley–Terry reward can reach at most",
        "(`inpo.tiny.best_transitive_accuracy`, exhaustive over the 7! rankings). On the cyclic",
        "set every item wins half its duels, so the BT maximum-likelihood fit is a constant",
        "reward: its predictions stay at ½ (Brier ≈ 0.25), chance.",
        "Each figure is one tiny model trained from random weights on one seed; the spread",
        "across seeds is part of the measurement (a model can fit the training prompts and",
        "generalise poorly to the held-out ones, as one pairwise seed does on the transitive set).",
        "A GPM trained at lr 1e-3 instead of 3e-4 collapses to P = ½ on most seeds (the",
        "training loss sits at ln 2; `inpo train-oracle` warns when it does).",
        "",
        "## Verdicts",
        "",
        *[f"- {name}: **{'MET' if ok else 'NOT MET'}**" for name, ok in verdicts],
        "",
    ]
    Path(args.out).write_text("\n".join(text))
    print("\n".join(text))
    if not all(ok for _, ok in verdicts):
        sys.exit(1)


if __name__ == "__main__":
    main()
