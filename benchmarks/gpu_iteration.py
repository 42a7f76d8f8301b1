"""One whole ``inpo run`` iteration on one GPU: Qwen2-0.5B's sizes, a reward-model oracle.

Nothing is downloaded: the policy is a random-weight Llama with Qwen2-0.5B's sizes (hidden 896, 24
layers, 14 heads, 2 KV heads, MLP 4,864, tied embeddings) over a 32,000-word vocabulary, the
oracle is a small random Llama reward model (hidden 256) on the same tokenizer, and the prompts
are random words. The same iteration runs twice, each a fresh ``inpo run``:

* ``plain``: ``python -m inpo run ...`` (one process, the model through ``accelerator.prepare``);
* ``fsdp``: ``torchrun --standalone --nproc_per_node 1 -m inpo run ... train.fsdp=full_shard``
  (FSDP2 through accelerate's plugin, one shard).

The second run starts from a copy of the first one's folder (``--reuse``, the default): the
pipeline's resume logic keeps π_0's evaluation, the samples and the pairs (their settings do not
name ``train.fsdp``) and reruns what depends on the training settings (log-probs, training,
evaluation), so the FSDP run spends its minutes on what FSDP changes. ``--no-reuse`` runs both
from scratch and checks that samples and pairs are byte-identical. The table is rewritten after
each run, so a run cut by a time limit leaves the ones before it.

Both with ``train.bf16=true`` (autocast over fp32 weights), K = 8 samples of up to
``--max-new-tokens`` a prompt, best-vs-worst pairs by the reward model, ``--prompts`` training
prompts and 32 held-out ones. Seconds per stage come from the run's ``metrics.jsonl``;
generation tokens/s from the samples; training tokens/s is the median of the train stage's
steps after the first, and MFU is ``6 · N · tokens/s`` over the bf16 peak of an 8192³
``torch.matmul`` measured before the runs (N without the input embedding).

    python benchmarks/gpu_iteration.py            # writes benchmarks/results/gpu_iteration.md
    python benchmarks/gpu_iteration.py --size tiny --prompts 16 --max-new-tokens 16  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate", "annotate", "logps", "train", "evaluate")


def build(work: Path, size: str, prompts: int, eval_prompts: int) -> dict:
    from inpo.tiny import QWEN2_05B, save_tiny_lm, word_tokenizer

    vocab = [f"w{i}" for i in range(32000 if size == "0.5b" else 200)]
    tok = word_tokenizer(vocab)
    sizes = QWEN2_05B if size == "0.5b" else {"hidden_size": 64, "num_hidden_layers": 2}
    save_tiny_lm(work / "policy", "llama", tokenizer=tok, **sizes)
    from inpo.tiny import tiny_reward_model

    rm = tiny_reward_model("llama", tok, hidden_size=256 if size == "0.5b" else 32)
    rm.save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    rng = random.Random(0)
    for name, n in (("prompts", prompts), ("eval_prompts", eval_prompts)):
        with (work / f"{name}.jsonl").open("w") as fh:
            for _ in range(n):
                words = " ".join(rng.choice(vocab) for _ in range(rng.randint(16, 64)))
                fh.write(json.dumps({"prompt": words}) + "\n")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "policy")
    params = sum(p.numel() for p in model.parameters())
    body = params - model.get_input_embeddings().weight.numel()
    return {"params": params, "non_embedding": body, "vocab": len(tok)}


def bf16_peak(device: str) -> float:
    import torch

    if device != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(8):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best


def run(kind: str, work: Path, args: argparse.Namespace) -> dict:
    common = [
        f"run_dir={work / kind}",
        "task=prompts",
        f"prompts={work / 'prompts.jsonl'}",
        f"eval_prompts={work / 'eval_prompts.jsonl'}",
        f"reference={work / 'policy'}",
        "annotate.oracle=reward_model",
        f"annotate.model={work / 'rm'}",
        "annotate.selection=best_worst",
        "iterations=1",
        "generate.k=8",
        f"generate.max_new_tokens={args.max_new_tokens}",
        f"generate.batch_size={args.generate_batch}",
        f"train.bf16={'true' if args.bf16 else 'false'}",
        "train.optim.learning_rate=1e-5",
        f"train.optim.global_batch_size={args.global_batch}",
        f"train.optim.per_device_batch_size={args.micro}",
        "train.data.max_prompt_length=128",
        f"train.data.max_completion_length={args.max_new_tokens}",
        f"evaluate.num_prompts={args.eval_prompts}",
        "seed=0",
    ]
    if kind == "plain":
        cmd = [sys.executable, "-m", "inpo", "run", *common]
    else:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
            "-m", "inpo", "run", *common, "train.fsdp=full_shard",
        ]  # fmt: skip
    if args.reuse and args.first and args.first != kind:
        # π_0's evaluation, samples and pairs are reused by the pipeline's own resume logic
        shutil.copytree(work / args.first, work / kind, ignore=shutil.ignore_patterns("*.lock"))
    path = os.pathsep.join(x for x in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if x)
    env = dict(os.environ, PYTHONPATH=path)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"{kind}: inpo run failed ({proc.returncode})")
    run_dir = work / kind
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    it = run_dir / "iter_000"
    steps = [json.loads(x) for x in (it / "train" / "model" / "metrics.jsonl").open()]
    reused = [s for s in STAGES if f"[iter_000/{s}] complete, skipped" in proc.stdout + proc.stderr]
    timed = steps[1:] or steps
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(work / "policy")
    generated = 0
    samples = 0
    for line in (it / "generate" / "samples.jsonl").open():
        for response in json.loads(line)["responses"]:
            generated += len(tok(response, add_special_tokens=False)["input_ids"])
            samples += 1
    return {
        "wall": wall,
        "seconds": row["seconds"],
        "train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "train_steps": len(steps),
        "train_max_memory_gib": max((r.get("max_memory_gib", 0.0) for r in steps), default=0.0),
        "generated_tokens": generated,
        "samples": samples,
        "metrics": {k: v for k, v in row.items() if isinstance(v, int | float)},
        "reused": reused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("0.5b", "tiny"), default="0.5b")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--generate-batch", type=int, default=32)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro", type=int, default=8)
    parser.add_argument("--kinds", default="plain,fsdp")
    parser.add_argument(
        "--reuse",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="later runs start from a copy of the first run's folder (samples and pairs reused)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/gpu_iteration.md"))
    parser.add_argument(
        "--work", help="folder for the models and runs (default: a new temporary one)"
    )
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.bf16 = device == "cuda"
    load0 = os.getloadavg()[0]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="inpo-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    info = build(work, args.size, args.prompts, args.eval_prompts)
    peak = bf16_peak(device)
    results: dict[str, dict] = {}
    kinds = args.kinds.split(",")
    args.first = kinds[0]
    for kind in kinds:
        results[kind] = run(kind, work, args)
        print(kind, json.dumps(results[kind]), flush=True)
        write(args, device, load0, info, peak, work, results)
    if len(results) == 2:
        write(args, device, load0, info, peak, work, results, weights_diff(work, kinds))


def weights_diff(work: Path, kinds: list[str]) -> float:
    """The largest difference between the two runs' trained weights, relative to the largest
    weight (the same samples and pairs when reused: only the engine differs)."""
    from safetensors.torch import load_file

    a, b = (load_file(work / k / "iter_000/train/model/model.safetensors") for k in kinds)
    diff = max((a[n].float() - b[n].float()).abs().max().item() for n in a)
    return diff / max(t.float().abs().max().item() for t in a.values())


def write(args, device, load0, info, peak, work, results, diff: float | None = None) -> None:
    import torch

    n = info["non_embedding"]
    lines = [
        "# One `inpo run` iteration on one GPU (Qwen2-0.5B sizes, random weights)",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        + (f"GPU: {torch.cuda.get_device_name()}; " if device == "cuda" else "no GPU; ")
        + f"{os.cpu_count()} CPU cores, load average {load0:.1f} at the start; torch "
        f"{torch.__version__}, Python {platform.python_version()}",
        f"- Command: `python benchmarks/gpu_iteration.py --size {args.size} --prompts "
        f"{args.prompts} --max-new-tokens {args.max_new_tokens}"
        f"{'' if args.reuse else ' --no-reuse'}`",
        f"- Policy: {info['params'] / 1e6:.0f}M parameters ({n / 1e6:.0f}M without the input "
        f"embedding), vocabulary {info['vocab']:,}; oracle: a reward model (Llama, hidden 256); "
        f"{args.prompts} training prompts × K = 8 samples of up to {args.max_new_tokens} tokens "
        f"(generate.batch_size={args.generate_batch}), best-vs-worst pairs, "
        f"{args.global_batch} pairs a step ({args.micro} a micro-batch), "
        f"{args.eval_prompts} held-out prompts; "
        + ("bf16 autocast over fp32 weights" if args.bf16 else "fp32"),
        f"- bf16 GEMM peak (8192³ `torch.matmul`): {peak / 1e12:.0f} TFLOP/s; training MFU = "
        "6 · N · tokens/s ÷ peak (median step after the first)",
        "",
        "| run | " + " | ".join(STAGES) + " | whole command (s) | generated tokens/s "
        "| train tokens/s | train MFU | train peak GPU memory (GiB) |",
        "|---|" + "---:|" * (len(STAGES) + 5),
    ]
    for kind, r in results.items():
        # a stage reused from the first run's folder took no time here: shown as "reused"
        secs = [None if s in r["reused"] else r["seconds"].get(s) for s in STAGES]
        gen = (
            "reused"
            if "generate" in r["reused"]
            else f"{r['generated_tokens'] / r['seconds']['generate']:,.0f}"
        )
        mfu = 6 * n * r["train_tokens_per_s"] / peak
        lines.append(
            f"| {kind} | "
            + " | ".join(
                f"{x:.1f}" if x is not None else ("reused" if s in r["reused"] else "–")
                for s, x in zip(STAGES, secs, strict=True)
            )
            + f" | {r['wall']:.0f} | {gen} | {r['train_tokens_per_s']:,.0f} | {mfu:.0%} "
            f"| {r['train_max_memory_gib']:.1f} |"
        )
    same = {}
    if len(results) == 2 and not args.reuse:
        a, b = (work / k / "iter_000" for k in results)
        for path in ("generate/samples.jsonl", "annotate/pairs.jsonl"):
            same[path] = (a / path).read_bytes() == (b / path).read_bytes()
    lines += [
        "",
        "Stage seconds are the manifests' (each stage's own work, model loading included); the "
        "whole command adds Python and CUDA start-up. Samples: "
        + ", ".join(
            f"{k}: {r['samples']} ({r['generated_tokens']:,} tokens)" for k, r in results.items()
        )
        + "."
        + "".join(
            f" `{path}` {'byte-identical' if ok else 'DIFFERS'} between the two runs."
            for path, ok in same.items()
        )
        + "".join(
            f" The {k} run reused the {args.first} run's {', '.join(r['reused'])} (a copy of its"
            " folder; the pipeline skipped the stages whose settings and inputs were unchanged)."
            for k, r in results.items()
            if r["reused"]
        )
        + (
            f" Trained weights, {' vs '.join(results)}: largest difference {diff:.1e} of the "
            "largest weight."
            if diff is not None
            else ""
        ),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))
    record = {"info": info, "peak": peak, "runs": results, "same": same, "weights_diff": diff}
    Path(args.out).with_suffix(".json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
