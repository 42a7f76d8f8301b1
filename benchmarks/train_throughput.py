"""Training throughput of ``inpo train`` (INPO step) against TRL's ``DPOTrainer``, same run.

A ~10M-parameter Llama-style model (word-level vocabulary of 4,000 tokens) is built with
``inpo.tiny`` and saved; a synthetic preference dataset (prompts 16-48 words, completions 8-96
words, so pairs are uneven as sampled answers are) is written as JSONL. Then, each in a fresh
subprocess (so peak memory is per trainer):

* ``inpo``: ``inpo.training.train`` with loss ``inpo`` on precomputed ``ref_*``/``prev_*``
  log-probs (computed once before training, timed separately);
* ``inpo-shared``: the same with ``data.share_prompt=true`` (each pair one row
  ``prompt + chosen + rejected``, so the prompt is computed once);
* ``inpo-packed``: the same with ``data.packing=true`` (each micro-batch's sequences packed
  into one padding-free row, attention one sequence at a time: ``inpo.varlen`` on CPU; on a
  GPU rows as long as the longest);
* ``inpo-shared-packed``: both (the rows ``prompt + chosen + rejected`` packed without
  padding, each pair in its own segment);
* ``trl``: ``trl.DPOTrainer`` with its defaults for the reference (a frozen reference model run
  every step);
* ``trl-precompute``: ``DPOTrainer(precompute_ref_log_probs=True)`` (reference pass before
  training, not timed in the steps).

All in fp32 on CPU, no gradient checkpointing, dropout off, same global batch (per-device 4 ×
accumulation 2), same learning rate, same number of optimizer steps (one pass over the data).
Throughput is the pairs' tokens counted the same way for every trainer, ``(prompt + chosen) +
(prompt + rejected)`` without padding, per second of optimizer steps, the first step excluded as
warm-up: for ``inpo-shared`` the prompt counts twice although it is computed once (the metric
``tokens`` of ``inpo train`` counts it so), which is exactly the work that sharing saves. Model FLOPs utilisation
is ``6 × N × tokens/s`` over the fp32 GEMM peak measured here with a large ``torch.matmul``
(``N`` = parameters without the input embedding).

Usage::

    python benchmarks/train_throughput.py            # writes benchmarks/results/train_throughput.md
    python benchmarks/train_throughput.py --steps 4  # quicker
    python benchmarks/train_throughput.py --kinds inpo,inpo-shared  # a subset of the trainers
    python benchmarks/train_throughput.py --device cuda  # one GPU: Qwen2-0.5B sizes in bf16

With ``--device cuda`` the model is a Llama with Qwen2-0.5B's sizes (hidden 896, 24 layers, 14 heads, 2 KV
heads, MLP 4,864, tied embeddings; random weights, a 32,000-word vocabulary), every trainer
trains with bf16 autocast over fp32 weights (``bf16=true`` for both), pairs are longer (prompts
32-128 words, completions 32-384) and a step is 8 pairs × 2; MFU is over the bf16 peak of an
8192³ ``torch.matmul`` measured in each worker. Results go to
``benchmarks/results/train_throughput_gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.md"
RESULTS_GPU = Path(__file__).resolve().parent / "results" / "train_throughput_gpu.md"
VOCAB = [f"w{i}" for i in range(4000)]
MICRO, ACCUM = 4, 2
#: ``--device cuda``: the vocabulary, batch and lengths of the GPU measurement.
GPU = {"vocab": 32000, "micro": 8, "accum": 2, "prompt": (32, 128), "completion": (32, 384)}
KINDS = ("inpo", "inpo-shared", "inpo-packed", "inpo-shared-packed", "trl", "trl-precompute")
OURS = KINDS[:4]


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def matmul_peak_flops(n: int = 2048, repeats: int = 8, device: str = "cpu") -> float:
    """GEMM FLOP/s of ``torch.matmul`` on an ``n × n`` pair (best of ``repeats``): fp32 on CPU;
    on CUDA bf16 at ``n = 8192`` (the dtype the GPU trainers' matrix products run in)."""
    import torch

    if device == "cuda":
        n, dtype = 8192, torch.bfloat16
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            torch.matmul(a, b)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(10):
                torch.matmul(a, b)
            torch.cuda.synchronize()
            best = min(best, (time.perf_counter() - t0) / 10)
        del a, b
        torch.cuda.empty_cache()
        return 2 * n**3 / best
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---- setup -------------------------------------------------------------------------------------


def build(work: Path, pairs: int, device: str = "cpu") -> dict:
    import torch

    from inpo.layout import completion_logps
    from inpo.tiny import QWEN2_05B, save_tiny_lm, word_tokenizer

    gpu = device == "cuda"
    vocab = [f"w{i}" for i in range(GPU["vocab"])] if gpu else VOCAB
    tok = word_tokenizer(vocab)
    if gpu:
        model_dir = save_tiny_lm(work / "model", "llama", tokenizer=tok, **QWEN2_05B)
    else:
        model_dir = save_tiny_lm(
            work / "model",
            "llama",
            tokenizer=tok,
            hidden_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=1024,
            max_position_embeddings=512,
        )
    prompt_words, completion_words = (
        (GPU["prompt"], GPU["completion"]) if gpu else ((16, 48), (8, 96))
    )
    rng = random.Random(0)

    def text(lo_hi: tuple[int, int]) -> str:
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(*lo_hi)))

    rows = [
        {
            "prompt": text(prompt_words),
            "chosen": " " + text(completion_words),
            "rejected": " " + text(completion_words),
        }
        for _ in range(pairs)
    ]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device)
    params = sum(p.numel() for p in model.parameters())
    non_embedding = params - model.get_input_embeddings().weight.numel()
    torch.set_grad_enabled(False)
    t0 = time.perf_counter()
    prompts = [r["prompt"] for r in rows]
    with torch.autocast(device, dtype=torch.bfloat16, enabled=gpu):
        chosen = completion_logps(model, tok, prompts, [r["chosen"] for r in rows], batch_size=16)
        rejected = completion_logps(
            model, tok, prompts, [r["rejected"] for r in rows], batch_size=16
        )
    precompute_s = time.perf_counter() - t0
    del model
    if gpu:
        torch.cuda.empty_cache()
    with (work / "pairs.jsonl").open("w") as fh:
        for r, c, j in zip(rows, chosen.tolist(), rejected.tolist(), strict=True):
            logps = {"ref_chosen_logps": c, "ref_rejected_logps": j}
            logps |= {"prev_chosen_logps": c, "prev_rejected_logps": j}
            fh.write(json.dumps({**r, **logps}) + "\n")
    from inpo.data import encode_pair

    tokens = shared = 0
    for r in rows:
        for key in ("chosen", "rejected"):
            enc = encode_pair(
                tok, r["prompt"], r[key], max_prompt_length=None, max_completion_length=None
            )
            tokens += len(enc.prompt_ids) + len(enc.completion_ids)
            shared += len(enc.completion_ids) + (len(enc.prompt_ids) if key == "chosen" else 0)
    return {
        "model_dir": str(model_dir),
        "data": str(work / "pairs.jsonl"),
        "params": params,
        "non_embedding_params": non_embedding,
        "precompute_s": precompute_s,
        "tokens_per_pair": tokens / pairs,
        "shared_tokens_per_pair": shared / pairs,
        "pairs": pairs,
        "device": device,
        "micro": GPU["micro"] if gpu else MICRO,
        "accum": GPU["accum"] if gpu else ACCUM,
        "vocab": len(tok),
        "model": model_cfg_summary(model_dir),
    }


def model_cfg_summary(model_dir: Path) -> str:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return (
        f"{cfg['model_type']}, hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
        f"{cfg['num_attention_heads']} heads ({cfg.get('num_key_value_heads')} KV), MLP "
        f"{cfg['intermediate_size']}, tied embeddings {cfg.get('tie_word_embeddings', False)}"
    )


# ---- workers (each in its own process) ---------------------------------------------------------


def run_inpo(setup: dict, work: Path, share_prompt: bool = False, packing: bool = False) -> dict:
    from inpo.config import load_config
    from inpo.training import TrainConfig, train

    before = current_rss_mb()
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"output_dir={work / 'inpo_out'}",
            f"model.path={setup['model_dir']}",
            f"data.train_file={setup['data']}",
            "loss.name=inpo",
            f"optim.global_batch_size={setup['micro'] * setup['accum']}",
            f"optim.per_device_batch_size={setup['micro']}",
            "optim.learning_rate=0.000001",
            "data.max_prompt_length=1024",
            "data.max_completion_length=1024",
            f"bf16={'true' if setup['device'] == 'cuda' else 'false'}",
            "save_steps=null",
            "resume=never",
            "logging.progress_bar=false",
            f"data.share_prompt={str(share_prompt).lower()}",
            f"data.packing={str(packing).lower()}",
        ],
    )
    wall0, cpu0 = time.perf_counter(), time.process_time()
    train(cfg)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    rows = [json.loads(line) for line in (work / "inpo_out" / "metrics.jsonl").open()]
    timed = rows[1:]  # first step is warm-up
    seconds = sum(r["tokens"] / r["tokens_per_s"] for r in timed)
    return {
        "steps": len(rows),
        "tokens": sum(r["tokens"] for r in timed),
        "seconds": seconds,
        "call_tokens": sum(r["tokens"] for r in rows),
        "call_wall_s": wall,
        "call_cpu_s": cpu,
        "peak_rss_mb": rss_mb(),
        "rss_before_mb": before,
    }


def run_trl(setup: dict, work: Path, precompute: bool) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    before = current_rss_mb()
    rows = [json.loads(line) for line in open(setup["data"])]
    ds = datasets.Dataset.from_list(
        [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
    )
    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"])
    tok = AutoTokenizer.from_pretrained(setup["model_dir"])
    times: list[float] = []

    class StepTimer(TrainerCallback):
        # wall time between consecutive optimizer-step ends: the whole step, data included
        def on_train_begin(self, args, state, control, **kwargs):
            self.last = None

        def on_step_end(self, args, state, control, **kwargs):
            if setup["device"] == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.last is not None:
                times.append(now - self.last)
            self.last = now

    cfg = DPOConfig(
        output_dir=str(work / "trl_out"),
        per_device_train_batch_size=setup["micro"],
        gradient_accumulation_steps=setup["accum"],
        num_train_epochs=1,
        learning_rate=1e-6,
        lr_scheduler_type="cosine",
        bf16=setup["device"] == "cuda",
        gradient_checkpointing=False,
        max_length=2048,
        precompute_ref_log_probs=precompute,
        report_to="none",
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=42,
    )
    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()]
    )
    t0, cpu0 = time.perf_counter(), time.process_time()
    trainer.train()
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    steps = len(times) + 1
    pairs_timed = len(times) * setup["micro"] * setup["accum"]
    return {
        "steps": steps,
        "tokens": pairs_timed * setup["tokens_per_pair"],
        "seconds": sum(times),
        "call_tokens": steps * setup["micro"] * setup["accum"] * setup["tokens_per_pair"],
        "call_wall_s": total,
        "call_cpu_s": cpu,
        "step_times": times,
        "train_call_s": total,
        "peak_rss_mb": rss_mb(),
        "rss_before_mb": before,
    }


def worker(kind: str, setup_path: Path) -> None:
    setup = json.loads(setup_path.read_text())
    work = setup_path.parent
    gemm_before = matmul_peak_flops(device=setup["device"])
    if kind in OURS:
        out = run_inpo(setup, work, share_prompt="shared" in kind, packing="packed" in kind)
    else:
        out = run_trl(setup, work, precompute=kind == "trl-precompute")
    # the machine's speed drifts with other jobs: measure its peak around each run
    out["gemm_peak"] = max(gemm_before, matmul_peak_flops(device=setup["device"]))
    if setup["device"] == "cuda":
        import torch

        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(out))


# ---- driver ------------------------------------------------------------------------------------


#: A round whose 1-minute load average moved more than this during a worker is flagged: its
#: wall-time figures compare trainers under different loads (its CPU-time figures less so).
LOAD_CHANGE = 0.5


def run_worker(kind: str, work: Path) -> dict:
    load_before = os.getloadavg()[0]
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--setup", str(work / "setup.json")],
        capture_output=True,
        text=True,
        check=False,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"worker {kind} failed")
    result = json.loads(line[len("RESULT ") :])
    result["load"] = (load_before, os.getloadavg()[0])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (one epoch)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats")
    parser.add_argument("--worker", choices=KINDS)
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}"
    )
    parser.add_argument("--setup")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cpu", help="cuda: a 0.5B model in bf16"
    )
    parser.add_argument("--micro", type=int, help="pairs a micro-batch (default: 4; cuda: 8)")
    parser.add_argument("--accum", type=int, help="micro-batches a step (default: 2)")
    parser.add_argument("--out", help="the results file (default: results/train_throughput*.md)")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (tokens/s are timed from the second step on)")
    args.out = args.out or str(RESULTS_GPU if args.device == "cuda" else RESULTS)
    if args.worker:
        worker(args.worker, Path(args.setup))
        return

    import trl  # noqa: F401  (missing: fail now, not after the set-up)

    kinds = tuple(k for k in KINDS if k in args.kinds.split(","))
    unknown = set(args.kinds.split(",")) - set(KINDS)
    if unknown or not kinds:
        parser.error(f"--kinds: unknown {sorted(unknown)}; choose from {KINDS}")
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="inpo-bench-"))
    gpu = args.device == "cuda"
    micro, accum = (GPU["micro"], GPU["accum"]) if gpu else (MICRO, ACCUM)
    micro, accum = args.micro or micro, args.accum or accum
    setup = build(work, pairs=args.steps * micro * accum, device=args.device)
    setup["micro"], setup["accum"] = micro, accum
    (work / "setup.json").write_text(json.dumps(setup))
    peak = matmul_peak_flops(device=args.device)
    print(f"params {setup['params'] / 1e6:.1f}M, GEMM peak {peak / 1e9:.1f} GFLOP/s", flush=True)
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for round_ in range(args.rounds):
        # rotate the order, so no trainer always runs in the same slot of the machine's load
        shift = round_ % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            r = run_worker(kind, work)
            runs[kind].append(r)
            print(
                f"round {round_ + 1} {kind}: {r['tokens'] / r['seconds']:.0f} tokens/s", flush=True
            )
        if round_ + 1 < args.rounds:  # a time limit cutting a later round keeps this table
            report(args, kinds, setup, runs, peak, None, load0, round_ + 1)
    peak2 = matmul_peak_flops(device=args.device)
    report(args, kinds, setup, runs, peak, peak2, load0, args.rounds)


def report(
    args: argparse.Namespace,
    kinds: tuple[str, ...],
    setup: dict,
    runs: dict[str, list[dict]],
    peak: float,
    peak2: float | None,
    load0: float,
    done: int,
) -> None:
    """Write the table of the ``done`` rounds that finished (all of them: ``peak2`` measured)."""
    import torch
    import transformers
    import trl

    gpu = args.device == "cuda"
    micro, accum = setup["micro"], setup["accum"]
    final = peak2 is not None
    n = setup["non_embedding_params"]

    def tps(r: dict) -> float:
        return r["tokens"] / r["seconds"]

    def tpc(r: dict) -> float:  # tokens per CPU-second of the whole train call
        return r["call_tokens"] / r["call_cpu_s"]

    def mfu(r: dict) -> float:
        return 6 * n * tps(r) / r["gemm_peak"]

    def median(values: list[float]) -> float:
        v = sorted(values)
        return (v[(len(v) - 1) // 2] + v[len(v) // 2]) / 2

    lines = [
        "# Training throughput: `inpo train` (INPO, with and without prompt sharing) vs TRL "
        "`DPOTrainer`",
        "",
        *(
            []
            if final
            else [
                f"Status: **partial**, {done} of {args.rounds} rounds (written after each round; "
                "the run did not finish).",
                "",
            ]
        ),
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible "
        f"(torch threads: {torch.get_num_threads()}), {platform.platform()}; "
        + (f"GPU: {torch.cuda.get_device_name()}. " if gpu else "no GPU. ")
        + f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        f"- Versions: torch {torch.__version__}, transformers {transformers.__version__}, trl "
        f"{trl.__version__}, Python {platform.python_version()}",
        f"- Command: `python benchmarks/train_throughput.py --steps {args.steps} "
        f"--rounds {args.rounds}"
        + (" --device cuda" if gpu else "")
        + (f" --micro {args.micro}" if args.micro else "")
        + (f" --accum {args.accum}" if args.accum else "")
        + (f" --kinds {','.join(kinds)}`" if kinds != KINDS else "`"),
        f"- Model: {setup['model']}, vocabulary {setup['vocab']:,}; "
        f"{setup['params'] / 1e6:.2f}M parameters ({n / 1e6:.2f}M without the input embedding); "
        + ("bf16 autocast over fp32 weights for every trainer" if gpu else "fp32"),
        f"- Data: {setup['pairs']} synthetic pairs, {setup['tokens_per_pair']:.0f} tokens a pair "
        f"on average counted as (prompt + chosen) + (prompt + rejected) for every trainer, "
        f"{setup['shared_tokens_per_pair']:.0f} when the prompt is shared; per-device batch "
        f"{micro} × accumulation {accum} = {micro * accum} pairs a step, {args.steps} steps; "
        "tokens/s over steps 2..end (wall time between optimizer-step ends)",
        (
            f"- bf16 GEMM peak (8192³ `torch.matmul` on the GPU, mean of 10, best of 8): "
            f"{peak / 1e12:.0f} TFLOP/s before the runs"
            + (f", {peak2 / 1e12:.0f} after" if final else "")
            if gpu
            else f"- fp32 GEMM peak (2048² `torch.matmul`, best of 8): {peak / 1e9:.1f} GFLOP/s "
            "before the runs" + (f", {peak2 / 1e9:.1f} after" if final else "")
        )
        + "; each run's MFU uses the peak measured around that "
        "run (`6 · N · tokens/s ÷ peak`, N without the input embedding)",
        f"- INPO reference/previous log-probs precomputed once before training in "
        f"{setup['precompute_s']:.1f} s (no-grad forward of all pairs), not in the step times",
        f"- Each trainer ran {args.rounds} times, interleaved (the order rotates each round), "
        "each in a fresh process. The load from other jobs can change a lot during a run, so "
        "the fairest comparison is within a round (same minutes); the per-round ratios and the "
        "medians are both given.",
        "- What `inpo train` does differently: reference/previous log-probs are dataset columns "
        "(no reference model in memory or in the step); micro-batches of a step are "
        "length-sorted and each micro-batch's 2B sequences run as 4 length buckets cut to their "
        "own longest sequence (`data.length_buckets`); the LM head runs only on completion "
        "positions (`inpo.logprobs.sequence_logps`). With `data.share_prompt=true` each "
        "micro-batch runs B rows `prompt + chosen + rejected` instead (rejected tokens do not "
        "attend to chosen ones, positions restart after the prompt; a boolean 4D mask through "
        "sdpa), the B rows in 2 length buckets (`length_buckets // 2`). With "
        "`data.packing=true` the micro-batch's sequences (or those B rows) are packed into one "
        "padding-free row on CPU, attention computed one sequence (pair) at a time "
        "(`inpo.varlen`, no mask; a pair's rejected answer sees the prompt and itself). AdamW "
        "is torch's fused kernel. The first two kinds run with `data.packing=false` (the "
        "default, `null`, would pack these rows on CPU, as the packed kinds do).",
        "",
        "- Beside wall time, each worker's CPU time (`time.process_time()` over its whole train "
        "call, all threads): tokens per CPU-second move less than tokens/s when other jobs take "
        f"cores. A round is flagged ⚠ when the 1-minute load average moved by more than "
        f"{LOAD_CHANGE} during one of its workers.",
        "",
        "| trainer | tokens/s per round | median tokens/s | tokens per CPU-s per round "
        "| median tokens per CPU-s | MFU per round | peak RSS (MiB) | RSS growth in training (MiB) |"
        + (" peak GPU memory (MiB) |" if gpu else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else ""),
    ]
    flagged = {
        i
        for kind in kinds
        for i, r in enumerate(runs[kind])
        if abs(r["load"][1] - r["load"][0]) > LOAD_CHANGE
    }

    def mark(i: int) -> str:
        return " ⚠" if i in flagged else ""

    names = {
        "inpo": "inpo train (loss=inpo, precomputed ref/prev)",
        "inpo-shared": "inpo train, data.share_prompt=true",
        "inpo-packed": "inpo train, data.packing=true",
        "inpo-shared-packed": "inpo train, data.share_prompt=true data.packing=true",
        "trl": "TRL DPOTrainer (reference model each step)",
        "trl-precompute": "TRL DPOTrainer (precompute_ref_log_probs=True)",
    }
    for kind in kinds:
        rs = runs[kind]
        lines.append(
            f"| {names[kind]} | {', '.join(f'{tps(r):,.0f}{mark(i)}' for i, r in enumerate(rs))} "
            f"| {median([tps(r) for r in rs]):,.0f} "
            f"| {', '.join(f'{tpc(r):,.0f}' for r in rs)} "
            f"| {median([tpc(r) for r in rs]):,.0f} "
            f"| {', '.join(f'{mfu(r):.0%}' for r in rs)} "
            f"| {max(r['peak_rss_mb'] for r in rs):,.0f} "
            f"| {max(r['peak_rss_mb'] - r['rss_before_mb'] for r in rs):,.0f} |"
            + (f" {max(r['peak_gpu_mib'] for r in rs):,.0f} |" if gpu else "")
        )
    lines += [
        "",
        "| speed-up (tokens/s ratio) | per round | median of rounds | tokens per CPU-s ratio "
        "(median) |",
        "|---|---:|---:|---:|",
    ]
    pairs = [
        (ours, base)
        for ours in OURS
        for base in ("trl", "trl-precompute", "inpo")
        if ours != base and ours in kinds and base in kinds
    ]
    ratios: dict[tuple[str, str], list[float]] = {}
    for ours, base in pairs:
        per_round = [tps(a) / tps(b) for a, b in zip(runs[ours], runs[base], strict=True)]
        per_cpu = [tpc(a) / tpc(b) for a, b in zip(runs[ours], runs[base], strict=True)]
        ratios[ours, base] = per_round
        shown = ", ".join(f"{x:.2f}×{mark(i)}" for i, x in enumerate(per_round))
        lines.append(
            f"| {names[ours]} over {names[base]} | {shown} | {median(per_round):.2f}× "
            f"| {median(per_cpu):.2f}× |"
        )
    if flagged:
        lines.append(
            f"\n⚠ Round(s) {', '.join(str(i + 1) for i in sorted(flagged))}: the load changed "
            "during a worker; read their wall-time ratios with care (the CPU-time ratio is the "
            "steadier figure)."
        )
    lines += [
        "",
        "Reading: precomputing the reference log-probs alone can give at most about 4/3 over "
        "TRL's default (its step is policy forward + backward, about 3 forward-equivalents, plus "
        "one reference forward); the rest of the gap comes from computing less padding, "
        "running the LM head only on completion tokens and, with `data.share_prompt`, "
        f"computing each prompt once ({setup['shared_tokens_per_pair']:.0f} of the "
        f"{setup['tokens_per_pair']:.0f} counted tokens a pair are computed, so its MFU is an "
        "effective one, crediting the prompt's second copy it does not compute). On a busy "
        "machine the rounds scatter by up to 10× (other jobs); compare trainers within a round.",
    ]
    if gpu:
        lines.append(
            "- On the GPU TRL's LM head and padding cost less than on CPU (the matrix products "
            "are not the bottleneck at this size); the lead left is the reference pass (default) "
            "and the padding and prompt copies `inpo train` does not compute."
        )
    goals = (("trl", 2.0, "TRL DPOTrainer's default"), ("trl-precompute", 1.5, "TRL's best"))
    for ours in OURS:
        for base, target, label in goals:
            if (ours, base) not in ratios:
                continue
            per_round = ratios[ours, base]
            hits = sum(r >= target for r in per_round)
            verdict = "MET" if hits == len(per_round) else "NOT MET"
            lines.append(
                f"- Goal ≥ {target}× over {label} in every round, {names[ours]}: **{verdict}** "
                f"({hits} of {len(per_round)} rounds; median {median(per_round):.2f}×)."
            )
    mfu_goal = 0.35 if gpu else 0.55
    computed = setup["shared_tokens_per_pair"] / setup["tokens_per_pair"]
    for kind in kinds:
        if kind.startswith("inpo"):
            x = median([mfu(r) for r in runs[kind]])
            # the verdict counts the tokens computed: a shared prompt's second copy is not
            note = f"median {x:.0%}"
            if "shared" in kind:
                note = f"median {x * computed:.0%} of the tokens computed, {x:.0%} effective"
                x *= computed
            verdict = "MET" if x >= mfu_goal else "NOT MET"
            lines.append(
                f"- Goal MFU ≥ {mfu_goal:.0%} ({'bf16, GPU' if gpu else 'fp32, CPU'}), "
                f"{names[kind]}: **{verdict}** ({note})."
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    if final:
        print("\n".join(lines))
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
