"""A real-model ``inpo run`` iteration before and after issue 31, interleaved on one machine.

The same one-iteration ``inpo run task=prompts`` on SmolLM2-135M-Instruct (the policy) with a
reward model of SmolLM2's size (its weights under a fresh scalar head: a reward model's cost),
16 held-out ``task=panel`` conversations as prompts, K = 4, ≤ 48 new tokens, 8 evaluation
prompts × 2 answers, run by the tree at ``--baseline`` (the commit before the issue's first;
checked out with ``git worktree`` into a temporary folder and put first on ``PYTHONPATH``) and
by this tree, alternately for ``--rounds`` rounds. The training keys the baseline knew
(``train.learning_rate``) were renamed since (``train.optim.learning_rate``, issue 28); the
values are the same. Reported: each command's wall seconds and its stages' seconds as the run
records them.

    python benchmarks/real_model_before_after.py [--baseline e2cf8b3] [--rounds 2]

Needs ``make real-model``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "real_model_before_after.md"
TRAIN = {"learning_rate": "1e-6", "global_batch_size": "8", "per_device_batch_size": "4"}


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()  # fmt: skip


def _command(work: Path, model_dir: Path, run_dir: Path, old: bool) -> list[str]:
    train = [f"train.{'' if old else 'optim.'}{k}={v}" for k, v in TRAIN.items()]
    return [sys.executable, "-m", "inpo", "-q", "run", f"run_dir={run_dir}", "task=prompts",
            f"reference={model_dir}", f"prompts={work / 'prompts.jsonl'}",
            f"eval_prompts={work / 'eval.jsonl'}", "annotate.oracle=reward_model",
            f"annotate.model={work / 'rm'}", "iterations=1", "generate.k=4",
            "generate.max_new_tokens=48", "evaluate.num_prompts=8", "evaluate.k=2",
            *train]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="e2cf8b3")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from inpo.pipeline.workloads import real_model_dir
    from inpo.tasks.panel import panel_prompts

    model_dir = real_model_dir()
    work = Path(tempfile.mkdtemp(prefix="inpo-before-after-"))
    held = panel_prompts("test")
    for name, rows in (("prompts.jsonl", held[:16]), ("eval.jsonl", held[16:24])):
        (work / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))
    tok = AutoTokenizer.from_pretrained(model_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1,
                                                            dtype=torch.float32)  # fmt: skip
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    del rm
    tree = work / "baseline"
    _git("worktree", "add", "--detach", str(tree), args.baseline)
    env_before = {**os.environ, "PYTHONPATH": str(tree / "src")}
    load_before = os.getloadavg()
    times: dict[str, list[dict]] = {"before": [], "after": []}
    try:
        for r in range(args.rounds):
            for side in ("before", "after"):
                run_dir = work / f"{side}{r}"
                cmd = _command(work, model_dir, run_dir, old=side == "before")
                env = env_before if side == "before" else dict(os.environ)
                w0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                wall = time.perf_counter() - w0
                if proc.returncode != 0:
                    raise SystemExit(f"{side}: {proc.stderr[-3000:]}")
                rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
                times[side].append({"wall": wall, "stages": rows[-1].get("seconds") or {}})
                print(side, r, f"{wall:.1f}s", json.dumps(times[side][-1]["stages"]), flush=True)
    finally:
        _git("worktree", "remove", "--force", str(tree))
    load_after = os.getloadavg()
    cmd = " ".join(_command(work, model_dir, work / "RUN", old=False)[1:])
    cmd = cmd.replace(str(work), "DIR").replace(str(model_dir), "SMOLLM2")
    med = {s: statistics.median(t["wall"] for t in v) for s, v in times.items()}
    stages = sorted({k for v in times.values() for t in v for k in t["stages"]})
    lines = [
        "# A real-model `inpo run` iteration, before and after issue 31",
        "",
        f"Command: `python benchmarks/real_model_before_after.py --baseline {args.baseline} "
        f"--rounds {args.rounds}` at commit {_git('rev-parse', '--short', 'HEAD')} "
        f"({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}); load "
        f"average {load_before[0]:.2f} before, {load_after[0]:.2f} after; rounds interleaved "
        f"(before, after, before, …). Date: {time.strftime('%Y-%m-%d')}.",
        "",
        f"Each side runs `{cmd}` (the baseline with `train.learning_rate=` etc.; SMOLLM2 is "
        "`make real-model`'s folder, DIR/rm SmolLM2 under a fresh scalar head).",
        "",
        "| tree | " + " | ".join(f"{s} s" for s in stages) + " | whole command s (median) |",
        "|---|" + "---|" * (len(stages) + 1),
    ]
    for side, v in times.items():
        per = [statistics.median(t["stages"].get(s, 0.0) for t in v) for s in stages]
        label = f"before (`{args.baseline}`)" if side == "before" else "after (this tree)"
        lines.append(f"| {label} | " + " | ".join(f"{x:.1f}" for x in per)
                     + f" | {med[side]:.1f} |")  # fmt: skip
    rounds = ", ".join(
        f"{b['wall']:.0f} → {a['wall']:.0f} s" for b, a in zip(times["before"], times["after"])
    )
    lines += [
        "",
        f"Whole command: **{med['before'] / med['after']:.2f}×** as fast after as before "
        f"(per round: {rounds}).",
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
