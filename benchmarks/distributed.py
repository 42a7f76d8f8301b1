"""Multi-process `inpo`: the training engine, FSDP's memory, and a whole iteration, 2 vs 1.

Three measurements, each as ratios between runs of the same invocation (interleaved rounds,
the order rotating each round, every run a fresh ``torchrun``), on CPU with gloo:

* **engine**: ``inpo train`` on 2 processes through ``accelerator.prepare`` (DDP) against the
  hand-written per-parameter gradient all-reduce the loop had before (commit ``d535c2a``,
  extracted with ``git archive`` into a temporary folder and run from there, with
  ``ACCELERATE_USE_CPU=1``, which that version needed). Same model, data, config, global batch.
  Throughput is the pairs' tokens per second of optimizer steps (``metrics.jsonl``: ``tokens``
  and ``tokens_per_s`` per step), the first step excluded as warm-up. Claim: not slower.
* **memory**: peak resident memory per process of ``inpo train`` on 2 processes with
  ``fsdp=none`` (DDP), ``fsdp=shard_grad_op``, ``fsdp=full_shard`` and, where DeepSpeed is
  installed (run the script with ``.venv-deepspeed/bin/python``), DeepSpeed ZeRO-3, AdamW (fp32 weights,
  gradients and two moments: 16 bytes a parameter replicated under DDP). Rank 1 is the
  training-only figure: rank 0 also gathers the full state to write the checkpoint and model.
* **iteration**: one whole ``inpo run`` iteration of the default task (``iterations=1
  max_prompts=64 prompt_repeats=8``) on 1 and on 2 processes: wall seconds and seconds per
  stage. On a 2-core machine two processes share the cores, so this reports the overhead.

Usage::

    python benchmarks/distributed.py                 # all three; writes results/distributed.md
    python benchmarks/distributed.py --parts engine --out ''  # one part, printed only
    # memory alone at a size where sharding outweighs the engines' own buffers, with ZeRO-3:
    .venv-deepspeed/bin/python benchmarks/distributed.py --parts memory --hidden 1024 \
        --layers 12 --pairs 32 --steps 3 --rounds 2 --out benchmarks/results/distributed_memory.md
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "distributed.md"
#: The options and their defaults (the full run that writes ``RESULTS``).
DEFAULTS = {
    "rounds": 3,
    "steps": 6,
    "pairs": 64,
    "hidden": 384,
    "layers": 6,
    "parts": "engine,memory,iteration",
    "out": str(RESULTS.relative_to(ROOT)),
}
BASELINE_COMMIT = "d535c2a"
ITERATION_ARGS = "max_prompts=64 prompt_repeats=8"
VOCAB = [f"w{i}" for i in range(2000)]
# glibc keeps freed large blocks in the heap (its mmap threshold grows to 32 MiB after frees), so
# RSS would count FSDP's per-layer gather-and-free buffers long after they are freed; with
# large blocks mmap'ed, RSS follows live memory (measured: +225 MiB vs -124 MiB after 6 steps).
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}
PEAK_WRAPPER = """\
import json, os, resource, sys
from pathlib import Path
from inpo.cli import main
rc = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
Path(os.environ["PEAK_DIR"], f"rank{os.environ.get('RANK', '0')}.json").write_text(
    json.dumps({"peak_rss_mib": peak}))
sys.exit(rc)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
    ]


def load() -> float:
    return os.getloadavg()[0]


def build(work: Path, hidden: int, layers: int, pairs: int) -> int:
    """A Llama-style model and a JSONL of pairs with precomputed reference log-probs."""
    from inpo.precompute import precompute_logps
    from inpo.tiny import save_tiny_lm, word_tokenizer

    save_tiny_lm(
        work / "model",
        "llama",
        tokenizer=word_tokenizer(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=hidden * 8 // 3,
        num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(4, hidden // 64),
        max_position_embeddings=256,
    )
    rng = random.Random(0)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(VOCAB) for _ in range(rng.randint(lo, hi)))

    with open(work / "pairs.jsonl", "w") as fh:
        for _ in range(pairs):
            row = {"prompt": text(16, 32), "chosen": text(8, 48), "rejected": text(8, 48)}
            fh.write(json.dumps(row) + "\n")
    precompute_logps(
        work / "pairs.jsonl",
        work / "model",
        work / "data",
        columns="ref",
        max_prompt_length=64,
        max_completion_length=64,
    )
    from safetensors import safe_open

    with safe_open(str(work / "model" / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def write_config(work: Path, steps: int) -> None:
    (work / "cfg.yaml").write_text(
        f"model: {{path: {work / 'model'}}}\n"
        f"data: {{train_file: {work / 'data'}, max_prompt_length: 64, "
        "max_completion_length: 64}\n"
        "loss: {name: dpo, beta: 0.1}\n"
        "optim: {learning_rate: 1.0e-4, global_batch_size: 8, per_device_batch_size: 2, "
        f"warmup_ratio: 0.0, optimizer: adamw, max_steps: {steps}}}\n"
        "logging: {progress_bar: false}\nsave_steps: null\n"
    )


def train_run(work: Path, src: Path, out: str, extra: list[str], env_extra: dict) -> dict:
    """One ``inpo train`` on 2 processes; tokens/s after the first step, peak RSS per rank."""
    peak_dir = work / f"peak-{out}"
    peak_dir.mkdir()
    wrapper = work / "peak_wrapper.py"
    wrapper.write_text(PEAK_WRAPPER)
    env = {
        **os.environ,
        "PYTHONPATH": str(src),
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
        "PEAK_DIR": str(peak_dir),
        **env_extra,
    }
    t0 = time.perf_counter()
    cmd = [*torchrun(2), str(wrapper), "train", str(work / "cfg.yaml"), f"output_dir={out}"]
    proc = subprocess.run(
        [*cmd, *extra], cwd=work, env=env, capture_output=True, text=True, timeout=1800
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"inpo train failed ({out}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (work / out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r][1:]
    tokens = sum(r["tokens"] for r in rows)
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in rows)
    peaks = [json.loads((peak_dir / f"rank{r}.json").read_text())["peak_rss_mib"] for r in range(2)]
    return {"tokens_per_s": tokens / seconds, "wall": wall, "peak": peaks}


def baseline_src(work: Path) -> Path:
    """The ``src`` folder of the commit before the engine change, extracted with git archive."""
    dest = work / "baseline"
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BASELINE_COMMIT, "src"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def engine_part(work: Path, rounds: int) -> dict:
    base = baseline_src(work)
    kinds = {
        "prepare": (ROOT / "src", {}),
        "manual": (base, {"ACCELERATE_USE_CPU": "1"}),
    }
    res: dict[str, list[dict]] = {k: [] for k in kinds}
    names = list(kinds)
    for r in range(rounds):
        for k in names[r % 2 :] + names[: r % 2]:
            src, env = kinds[k]
            res[k].append(train_run(work, src, f"engine-{k}-{r}", [], env))
            print(f"engine round {r + 1} {k}: {res[k][-1]['tokens_per_s']:.0f} tok/s", flush=True)
    return res


#: What ``accelerate launch --config_file ds.yaml`` (ZeRO-3, no offload) puts in the environment.
ZERO3_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
    "ACCELERATE_MIXED_PRECISION": "no",
}


def memory_part(work: Path, rounds: int) -> dict:
    import importlib.util

    kinds = {
        "ddp": (["fsdp=none"], {}),
        "shard_grad_op": (["fsdp=shard_grad_op"], {}),
        "full_shard": (["fsdp=full_shard"], {}),
    }
    if importlib.util.find_spec("deepspeed") is not None:  # make deepspeed-env
        kinds["deepspeed_zero3"] = ([], ZERO3_ENV)
    res: dict[str, list[dict]] = {k: [] for k in kinds}
    names = list(kinds)
    for r in range(rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            extra, env = kinds[k]
            res[k].append(train_run(work, ROOT / "src", f"mem-{k}-{r}", extra, MALLOC | env))
            print(f"memory round {r + 1} {k}: {res[k][-1]['peak']} MiB", flush=True)
    return res


def iteration_run(work: Path, nproc: int, name: str) -> dict:
    launch = torchrun(nproc) if nproc > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(2 // nproc)}
    env["TQDM_DISABLE"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [*launch, "-m", "inpo", "run", f"run_dir={name}", "iterations=1", *ITERATION_ARGS.split()],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"inpo run failed ({name}):\n{proc.stderr[-3000:]}")
    stages = {}
    for stage in ("generate", "annotate", "logps", "train", "evaluate"):
        manifest = work / name / "iter_000" / stage / "manifest.json"
        stages[stage] = json.loads(manifest.read_text())["seconds"]
    return {"wall": wall, "stages": stages}


def iteration_part(work: Path, rounds: int) -> dict:
    res: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(rounds):
        for n in [1, 2] if r % 2 == 0 else [2, 1]:
            res[n].append(iteration_run(work, n, f"iter-{n}-{r}"))
            print(f"iteration round {r + 1}, {n} process(es): {res[n][-1]['wall']:.1f}s")
    return res


def fmt(xs: list[float], spec: str = ",.0f") -> str:
    return ", ".join(format(x, spec) for x in xs)


def zero3_line(med: dict, params: int) -> str:
    """The DeepSpeed ZeRO-3 row's reading (measured where DeepSpeed is installed)."""
    if "deepspeed_zero3" not in med:
        return "- DeepSpeed ZeRO-3: not measured (DeepSpeed is not installed in this run)."
    z = med["ddp"] - med["deepspeed_zero3"]
    vs_fsdp = med["deepspeed_zero3"] - med["full_shard"]
    master = 4 * params / 2**20 / 2
    line = (
        f"- DeepSpeed ZeRO-3 (its accelerate environment, `.venv-deepspeed`) saves {z:,.0f} MiB "
        f"on rank 1 against DDP ({vs_fsdp:+,.0f} MiB against FSDP full_shard). Claim "
        f'"ZeRO-3 uses less memory per process than DDP": **{"met" if z > 0 else "NOT met"}**. '
        "Beside the partitioned weights, ZeRO-3 keeps a flat fp32 master copy of each "
        f"partition for its optimizer ({master:,.0f} MiB here, which FSDP does not hold in "
        "fp32 training), communication buffers of its own, and its import (~25 MiB, measured); "
        "its gradient buckets are sized by the model's hidden size (`inpo` sets accelerate's "
        "`auto` where the config sets none: with DeepSpeed's fixed 5e8-element bucket, ZeRO-3 "
        "used 3,848 MiB on rank 1 at 155M parameters, more than DDP's 3,731)."
    )
    if z <= 0:
        line += (
            " At this size its own buffers outweigh what sharding saves; "
            "`benchmarks/results/distributed_memory.md` measures a model large enough for "
            "sharding to pay, and docs/scale.md's table (0.5B to 70B parameters) computes it "
            "at scale."
        )
    return line


def command(args, meta: dict) -> str:
    """The exact command that produced a report: every option that differs from its default."""
    python = ".venv-deepspeed/bin/python" if meta["deepspeed"] else "python"
    words = [python, "benchmarks/distributed.py"]
    for name, default in DEFAULTS.items():
        value = getattr(args, name)
        if value != default:
            words += [f"--{name}", str(value)]
    return " ".join(words)


def header(args, meta: dict) -> list[str]:
    title = "Multi-process `inpo`: " + (
        "the engine, FSDP memory, and a whole iteration on 2 vs 1"
        if args.parts == DEFAULTS["parts"]
        else f"{args.parts.replace(',', ', ')} (2 processes)"
    )
    return [
        f"# {title}",
        "",
        f"- Date: {meta['date']}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {platform.platform()}; "
        f"no GPU; gloo. 1-minute load average {meta['load_start']:.1f} at the start, "
        f"{meta['load_end']:.1f} at the end.",
        f"- Versions: torch {meta['torch']}, accelerate {meta['accelerate']}, "
        f"deepspeed {meta['deepspeed'] or 'not installed'}, Python {platform.python_version()}",
        f"- Command: `{command(args, meta)}`",
        f"- Training model: Llama-style, {meta['params'] / 1e6:.1f}M parameters, hidden "
        f"{args.hidden}, {args.layers} layers, fp32, AdamW; {args.pairs} pairs with precomputed "
        f"reference log-probs; global batch 8 (2 processes × 2 pairs × 2 micro-batches), "
        f"{args.steps} steps; loss dpo. Each process runs with OMP_NUM_THREADS=1.",
        "",
    ]


def engine_section(engine: dict) -> list[str]:
    p = [x["tokens_per_s"] for x in engine["prepare"]]
    m = [x["tokens_per_s"] for x in engine["manual"]]
    ratios = [a / b for a, b in zip(p, m, strict=True)]
    return [
        "## Engine: `accelerator.prepare` (DDP) vs the old hand-written all-reduce, 2 processes",
        "",
        f"Baseline: `src/` of commit `{BASELINE_COMMIT}` (per-parameter `all_reduce` after "
        "each step's backward), run with `ACCELERATE_USE_CPU=1`. Tokens/s over steps 2..end.",
        "",
        "| engine | tokens/s per round | median |",
        "|---|---:|---:|",
        f"| accelerator.prepare (DDP, bucketed) | {fmt(p)} | {statistics.median(p):,.0f} |",
        f"| hand-written all-reduce ({BASELINE_COMMIT}) | {fmt(m)} | {statistics.median(m):,.0f} |",
        "",
        f"Ratio prepare / hand-written per round: {fmt(ratios, '.2f')}; median "
        f"**{statistics.median(ratios):.2f}×**.",
        f'- Claim "not slower" (median ratio ≥ 0.95, the rounds\' noise): '
        f"**{'met' if statistics.median(ratios) >= 0.95 else 'NOT met'}**.",
        "",
    ]


def memory_section(meta: dict, memory: dict) -> list[str]:
    lines = [
        "## Peak memory per process: DDP vs FSDP2 (and DeepSpeed ZeRO-3), 2 processes",
        "",
        f"Model states under DDP: 16 bytes × {meta['params'] / 1e6:.1f}M = "
        f"{16 * meta['params'] / 2**20:,.0f} MiB a process (weights, gradients, two Adam "
        "moments); full_shard keeps half of each on each of 2 processes. Peak RSS includes "
        "the Python/torch runtime (~the same for all). Rank 0 also gathers the full model and "
        "optimizer state to write the checkpoint and the model; rank 1 shows training alone. "
        "Run with `MALLOC_MMAP_THRESHOLD_=65536` so that RSS follows live memory: with glibc's "
        "default, freed large blocks stay in the heap and FSDP's per-layer gather-and-free "
        "cycles read as growth (measured on rank 1 after 6 steps of the 12M model: full_shard "
        "+225 MiB over DDP with the default, -124 MiB with large blocks mmap'ed). On a GPU the "
        "figure to read is `torch.cuda.max_memory_allocated` (benchmarks/gpu_iteration.py).",
        "",
        "| engine | rank 0 peak RSS (MiB) per round | rank 1 peak RSS (MiB) per round | "
        "rank 1 median |",
        "|---|---:|---:|---:|",
    ]
    med = {}
    for k, runs in memory.items():
        r0 = [x["peak"][0] for x in runs]
        r1 = [x["peak"][1] for x in runs]
        med[k] = statistics.median(r1)
        lines.append(f"| {k} | {fmt(r0)} | {fmt(r1)} | {med[k]:,.0f} |")
    saved = med["ddp"] - med["full_shard"]
    expected = 16 * meta["params"] / 2**20 / 2
    return [
        *lines,
        "",
        f"full_shard saves {saved:,.0f} MiB on rank 1 (model states halved: "
        f"{expected:,.0f} MiB expected).",
        f'- Claim "FSDP full_shard uses less memory per process than DDP" (rank 1): '
        f"**{'met' if saved > 0 else 'NOT met'}**.",
        zero3_line(med, meta["params"]),
        "",
    ]


def iteration_section(iteration: dict) -> list[str]:
    lines = [
        "## One whole `inpo run` iteration: 2 processes vs 1",
        "",
        f"`inpo run iterations=1 {ITERATION_ARGS}` (the default task's tiny policy, the "
        "reference model already cached), 1 process with 2 threads vs 2 processes with 1 "
        "thread each (the same 2 cores). Seconds per stage from each stage's manifest, median "
        "of rounds; the wall time includes start-up (imports, process group, model loading).",
        "",
        "| processes | wall s per round | generate | annotate | logps | train | evaluate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, runs in iteration.items():
        cells = [
            f"{statistics.median(x['stages'][s] for x in runs):.1f}"
            for s in ("generate", "annotate", "logps", "train", "evaluate")
        ]
        lines.append(
            f"| {n} | {fmt([x['wall'] for x in runs], '.1f')} | " + " | ".join(cells) + " |"
        )
    w1 = [x["wall"] for x in iteration[1]]
    w2 = [x["wall"] for x in iteration[2]]
    ratios = [b / a for a, b in zip(w1, w2, strict=True)]
    return [
        *lines,
        "",
        f"2-process / 1-process wall time per round: {fmt(ratios, '.2f')}; median "
        f"{statistics.median(ratios):.2f}×. On 2 cores the second process brings no new "
        "compute, so this is the cost of the process group, the per-rank model copies, the "
        "barriers and the merge; on N devices the sharded stages divide by N.",
        "",
    ]


def report(args, meta: dict, engine: dict, memory: dict, iteration: dict) -> str:
    lines = header(args, meta)
    if engine:
        lines += engine_section(engine)
    if memory:
        lines += memory_section(meta, memory)
    if iteration:
        lines += iteration_section(iteration)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in DEFAULTS.items():
        ap.add_argument(f"--{name}", type=type(default), default=default)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= {"engine", "memory", "iteration"}:
        ap.error(f"--parts: choose from engine, memory, iteration, got {args.parts!r}")
    import importlib.metadata

    import accelerate
    import torch

    try:
        deepspeed = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        deepspeed = None
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_start": load(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "deepspeed": deepspeed,
    }
    with tempfile.TemporaryDirectory(prefix="inpo-dist-bench-") as tmp:
        work = Path(tmp)
        meta["params"] = build(work, args.hidden, args.layers, args.pairs)
        write_config(work, args.steps)
        engine = engine_part(work, args.rounds) if "engine" in parts else {}
        memory = memory_part(work, args.rounds) if "memory" in parts else {}
        iteration = iteration_part(work, args.rounds) if "iteration" in parts else {}
    meta["load_end"] = load()
    text = report(args, meta, engine, memory, iteration)
    print(text)
    if args.out:
        Path(ROOT, args.out).write_text(text)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
