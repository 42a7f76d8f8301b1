"""Where a real chat model spends an iteration's time: SmolLM2-135M-Instruct on CPU.

Three measurements, each a ratio against a baseline timed in the same run (rounds interleaved, a
warm-up round dropped, medians reported; wall and process CPU seconds, torch threads fixed, the
load average before and after):

1. **Generation against one batched forward.** ``inpo.generation`` as it ships (one prefill a
   prompt, a static KV cache) samples ``K`` answers to each of ``P`` held-out ``task=panel``
   prompts (conversations through SmolLM2's chat template). The baseline is one no-grad forward
   over the same finished sequences (prompt + sampled tokens + the end token where one was
   sampled), ``K·B`` rows a batch: the floor of what decoding those tokens could cost. The
   sampled tokens are counted by re-tokenising the answers.
2. **The pairwise LM judge against a reward model.** ``PairwisePreferenceOracle`` on SmolLM2
   (``format=chat``, a judging question through the model's own template; each pair's two orders
   in one batched forward) against ``RewardModelOracle`` on a model of the same size and weights
   (SmolLM2 with a fresh one-output head: a reward model's cost, not its judgement), on the same
   pairs — the answers of part 1. Reported as queries (pairs) per second.
3. **An iteration's breakdown** (``--iteration``): one ``inpo run task=panel`` iteration on
   SmolLM2 at the size of ``benchmarks/panel_task.py``, the seconds of each stage as the run
   records them.

    python benchmarks/real_model_speed.py [--rounds 3] [--threads 2] [--iteration] [--out FILE]

Needs ``make real-model`` (SmolLM2 in the inpo cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "real_model_speed.md"
TARGET = 0.8


def _timed(fn, *args):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - w0, time.process_time() - c0, out


def _commit() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)  # fmt: skip
    return out.stdout.strip() or "?"


def _sequences(tok, prompts, samples, cut, end_id):
    from inpo.data import encode_prompt

    seqs, new = [], 0
    for p, row, cuts in zip(prompts, samples, cut, strict=True):
        head = encode_prompt(tok, p)
        for text, was_cut in zip(row, cuts, strict=True):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if not was_cut:
                ids = [*ids, end_id]
            new += len(ids)
            seqs.append(head + ids)
    return seqs, new


def _iteration(model_dir: Path, work: Path) -> dict:
    """One ``inpo run task=panel`` iteration (panel_task.py's size); its stages' seconds."""
    from panel_task import SETTINGS  # the recorded comparison's settings

    size = [s for s in SETTINGS if not s.startswith("iterations=")]
    run_dir = work / "iteration"
    cmd = [sys.executable, "-m", "inpo", "-q", "run", f"run_dir={run_dir}", "task=panel",
           f"reference={model_dir}", "iterations=1", *size]  # fmt: skip
    w0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - w0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"wall": wall, "rows": [r.get("seconds") or {} for r in rows], "cmd": cmd}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    from inpo.pipeline.workloads import PANEL_DEFAULTS

    shipped = PANEL_DEFAULTS["generate"]  # task=panel's own sampling settings
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=shipped["k"])
    ap.add_argument("--new", type=int, default=shipped["max_new_tokens"], help="max new tokens")
    ap.add_argument("--batch", type=int, default=shipped["batch_size"], help="prompts a batch")
    ap.add_argument("--iteration", action="store_true", help="also time one panel iteration")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from generation_speed import forward_batches
    from inpo.generation import GenerationSettings, generate_chunks
    from inpo.oracles.pairwise import PairwisePreferenceOracle
    from inpo.oracles.reward_model import RewardModelOracle
    from inpo.pipeline.workloads import real_model_dir
    from inpo.tasks.panel import panel_prompts

    model_dir = real_model_dir()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="inpo-realspeed-"))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = panel_prompts("test")[: args.prompts]  # conversations
    texts = [p[-1]["content"] for p in prompts]
    settings = GenerationSettings(
        temperature=1.0, top_p=1.0, max_new_tokens=args.new, batch_size=args.batch
    )
    rm_dir = work / "rm"  # SmolLM2's weights under a fresh scalar head: a reward model's cost
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else end_id
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    del rm
    judge = PairwisePreferenceOracle(model_dir, format="chat", batch_size=8, device="cpu",
                                     dtype=torch.float32)  # fmt: skip
    reward = RewardModelOracle(rm_dir, batch_size=16, device="cpu", dtype=torch.float32)

    times: dict[str, list[tuple[float, float]]] = {v: [] for v in ("generate", "forward")}
    judge_times: dict[str, list[tuple[float, float]]] = {v: [] for v in ("pairwise", "reward")}
    reference = None
    for r in range(args.rounds + 1):  # round 0 warms up and is dropped
        gw, gc, chunks = _timed(
            lambda: list(generate_chunks(model, tok, prompts, args.k, settings, seed=0))
        )
        samples = [s for _, rows, _ in chunks for s in rows]
        cut = [c for _, _, cuts in chunks for c in cuts]
        if reference is None:
            reference = (samples, cut)
        assert samples == reference[0], "the samples changed between rounds"
        seqs, new_tokens = _sequences(tok, prompts, samples, cut, end_id)
        fw, fc, _ = _timed(forward_batches, model, seqs, args.batch * args.k)
        a = [row[0] for row in samples]
        b = [row[1] for row in samples]
        pw, pc, _ = _timed(judge.prob_prefers, texts, a, b)
        if hasattr(reward, "clear_cache"):
            reward.clear_cache()  # score every answer each round, as a new pair would
        rw, rc, _ = _timed(reward.prob_prefers, texts, a, b)
        if r:
            times["generate"].append((gw, gc))
            times["forward"].append((fw, fc))
            judge_times["pairwise"].append((pw, pc))
            judge_times["reward"].append((rw, rc))
        print(f"round {r}: generate {gw:.1f}s, forward {fw:.1f}s, pairwise judge {pw:.1f}s, "
              f"reward model {rw:.1f}s", flush=True)  # fmt: skip
    iteration = _iteration(model_dir, work) if args.iteration else None
    load_after = os.getloadavg()

    med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    per_round = [f / g for (g, _), (f, _) in zip(times["generate"], times["forward"])]
    ratio = statistics.median(per_round)
    pairs = len(texts)
    jmed = {k: statistics.median(w for w, _ in v) for k, v in judge_times.items()}
    jratio = [p / q for (q, _), (p, _) in zip(judge_times["pairwise"], judge_times["reward"])]
    n_cut = sum(c for row in reference[1] for c in row)
    lines = [
        "# A real chat model's time: SmolLM2-135M-Instruct on CPU",
        "",
        f"Command: `python benchmarks/real_model_speed.py --rounds {args.rounds} --threads "
        f"{args.threads}{' --iteration' if args.iteration else ''}` at commit {_commit()} ({platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {args.threads} threads, float32); load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after. Date: "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Model: `{model_dir.name}` converted by `make real-model`. Prompts: the first "
        f"{len(prompts)} held-out `task=panel` prompts as conversations (chat template), "
        f"K = {args.k}, ≤ {args.new} new tokens, temperature 1, {args.batch} prompts a batch; "
        f"{new_tokens} tokens sampled ({n_cut} of {len(prompts) * args.k} answers cut at "
        f"{args.new}); the same samples every round (checked).",
        "",
        "## 1. Generation against one batched forward over the same sequences",
        "",
        "| | median s | CPU s | sampled tokens/s |",
        "|---|---|---|---|",
        *(f"| {k} | {med[k]:.2f} | {cpu[k]:.2f} | {new_tokens / med[k]:,.0f} |" for k in med),
        "",
        f"Generation's tokens/s is **{ratio:.2f}×** the forward's (median; per round "
        f"{', '.join(f'{x:.2f}' for x in per_round)}); target ≥ {TARGET}×: "
        f"**{'MET' if ratio >= TARGET else 'NOT MET'}**.",
        "",
        "## 2. The pairwise judge against a reward model, same pairs",
        "",
        f"{pairs} pairs (each prompt's first two answers of part 1).",
        "",
        "| oracle | median s | pairs/s | model sequences |",
        "|---|---|---|---|",
        f"| pairwise LM judge (SmolLM2, format=chat, both orders in one batch) | "
        f"{jmed['pairwise']:.2f} | {pairs / jmed['pairwise']:.1f} | {2 * pairs} (2 a pair) |",
        f"| reward model (SmolLM2 weights + a scalar head) | {jmed['reward']:.2f} | "
        f"{pairs / jmed['reward']:.1f} | {2 * pairs} (1 an answer) |",
        "",
        f"The judge answers **{statistics.median(jratio):.2f}×** the reward model's pairs a "
        f"second (median; per round {', '.join(f'{x:.2f}' for x in jratio)}): both read two "
        "sequences a pair, but the judge's hold the prompt and both answers inside its judging "
        "question, so they are about twice as long.",
    ]
    if iteration is not None:
        stages = iteration["rows"][-1]
        lines += [
            "",
            "## 3. One `task=panel` iteration",
            "",
            "`" + " ".join(str(c) for c in iteration["cmd"][1:]).replace(str(work), "DIR") + "`",
            "",
            "| stage | seconds |",
            "|---|---|",
            *(f"| {k} | {v:.1f} |" for k, v in stages.items() if isinstance(v, int | float)),
            f"| whole command (π_ref's evaluation, start-up included) | {iteration['wall']:.1f} |",
        ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
