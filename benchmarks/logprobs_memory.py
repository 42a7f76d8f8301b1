"""Peak memory and time of `sequence_logps` (chunked, completion positions only) vs full logits.

The naive baseline is what most preference trainers do: ``model(...).logits`` ``[N, L, V]`` →
``log_softmax`` → ``gather`` → masked sum. :func:`inpo.logprobs.sequence_logps` runs the backbone,
keeps only the positions that predict completion tokens and applies the LM head + ``logsumexp`` in
chunks: by default with a fused autograd function that keeps no logits and recomputes each chunk
in the backward (``fused-*``), or, for heads that are not a bare ``nn.Linear``, with activation
checkpointing per chunk (``generic-*``). Both do forward + backward of a weighted sum of the per-sequence log-probs on
a small Llama (vocab 32,000, hidden 256, 2 layers) with a batch of 4 × 1,024 tokens, about half of
them completion tokens, in float32 on the CPU.

How memory is measured (CPU, so no ``torch.cuda.max_memory_allocated``): every variant runs in a
fresh subprocess. After the model and inputs are built and one warm-up step has run, the process
resets its peak resident set size (writing ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the
current RSS, Linux >= 4.0), runs one step and reads ``VmHWM`` from ``/proc/self/status``; the
reported peak is ``VmHWM - RSS before the step``: the extra memory that one training step's
log-prob computation needs. glibc is told (``MALLOC_MMAP_THRESHOLD_``) to ``mmap`` every block over
1 MiB, so freed tensors really leave the RSS and the peak is that of live memory, not of allocator
caching. ``tracemalloc`` would not see torch's allocations at all.

Time is measured separately, in one subprocess that interleaves the variants step by step (in a
rotating order) after a warm-up of each, so that changes in the load of the shared CPU cores hit
every variant alike; the table also gives the paired ratio (median over repetitions of the
variant's time over the naive time of the same repetition).

Run: ``python benchmarks/logprobs_memory.py`` (writes ``benchmarks/results/logprobs_memory.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

VOCAB, HIDDEN, LAYERS, BATCH, SEQ = 32_000, 256, 2, 4, 1024
PROMPT_LENGTHS = (448, 512, 544, 576)  # the rest of each 1,024-token row is completion
VARIANTS = {
    "naive": "full logits [N, L, V] → log_softmax → gather",
    "fused-1024": "sequence_logps default: fused head kernel, chunk_size=1024",
    "fused-256": "sequence_logps, fused head kernel, chunk_size=256",
    "generic-1024": "sequence_logps(fused=False): checkpointed chunks (LoRA/hooked heads)",
}
RESULTS = Path(__file__).parent / "results" / "logprobs_memory.md"


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))


def _setup():
    """The model (train mode, float32) and one batch; ``step(variant)`` runs forward + backward."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from inpo.logprobs import naive_sequence_logps, sequence_logps

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).train()
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    completion_mask = torch.zeros(BATCH, SEQ, dtype=torch.long)
    for row, prompt_len in enumerate(PROMPT_LENGTHS):
        completion_mask[row, prompt_len:] = 1
    weights = torch.tensor([1.0, -1.0, 0.5, -0.5])

    def step(variant: str) -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if variant == "naive":
            logps = naive_sequence_logps(model, input_ids, attention_mask, completion_mask)
        else:
            path, chunk = variant.split("-")
            logps = sequence_logps(
                model,
                input_ids,
                attention_mask,
                completion_mask,
                chunk_size=int(chunk),
                fused=path == "fused",
            )
        (logps * weights).sum().backward()
        out = float(logps.detach().sum()), float(model.lm_head.weight.grad.norm())
        model.zero_grad(set_to_none=True)
        return out

    info = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "completion_tokens": int(completion_mask[:, 1:].sum()),
    }
    return step, info


def memory_worker(variant: str) -> dict:
    """Fresh process: build, warm up, then the extra peak RSS of one step (see the docstring)."""
    step, info = _setup()
    step(variant)  # warm-up: lazy initialisation, allocator and thread pools
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    logps_sum, grad_norm = step(variant)
    peak_kib = _status_kib("VmHWM") - rss_before
    return {
        "variant": variant,
        "peak_mib": peak_kib / 1024,
        "logps_sum": logps_sum,
        "grad_norm": grad_norm,
        **info,
    }


def timing_worker(reps: int) -> dict:
    """One process, variants interleaved (rotating order) so load changes hit all of them."""
    step, info = _setup()
    names = list(VARIANTS)
    for name in names:
        step(name)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - start)
    return {"times": times, **info}


def _run(args: list[str]) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--timing-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2, help="memory subprocesses per variant")
    parser.add_argument("--reps", type=int, default=5, help="timed steps per variant")
    args = parser.parse_args()
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker)))
        return
    if args.timing_worker:
        print(json.dumps(timing_worker(args.reps)))
        return

    peaks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    checks: dict[str, dict] = {}
    for r in range(args.rounds):
        for variant in VARIANTS:
            res = _run(["--memory-worker", variant])
            peaks[variant].append(res["peak_mib"])
            checks[variant] = res
            print(f"memory round {r}: {variant:13s} peak {res['peak_mib']:8.1f} MiB", flush=True)
    timing = _run(["--timing-worker", "--reps", str(args.reps)])
    times = timing["times"]
    for variant, ts in times.items():
        print(f"time: {variant:13s} " + " ".join(f"{t:.2f}" for t in ts), flush=True)

    base_peak = statistics.median(peaks["naive"])
    base_time = statistics.median(times["naive"])
    info = checks["naive"]
    logits_mib = BATCH * SEQ * VOCAB * 4 / 2**20
    lines = [
        "# `sequence_logps` memory and time vs full logits",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"shared with other jobs (load average {os.getloadavg()[0]:.1f} at the end), torch "
        f"{info['torch']} CPU, {info['threads']} threads, float32",
        f"- Command: `python benchmarks/logprobs_memory.py --rounds {args.rounds} "
        f"--reps {args.reps}`",
        f"- Model: Llama, vocab {VOCAB:,}, hidden {HIDDEN}, {LAYERS} layers, untied head; "
        f"batch {BATCH} × {SEQ} tokens, {info['completion_tokens']:,} completion tokens "
        f"(prompt lengths {', '.join(map(str, PROMPT_LENGTHS))}); forward + backward of a "
        "weighted sum of the per-sequence summed log-probs.",
        f"- One `[N, L, V]` float32 logits tensor is {logits_mib:.0f} MiB.",
        "- Peak: extra resident memory of one step over the RSS just before it, in a fresh "
        f"subprocess per variant ({args.rounds} rounds; `/proc/self/clear_refs` + `VmHWM`, glibc "
        "mmap threshold 1 MiB; see the script's docstring).",
        f"- Time: one subprocess, variants interleaved in rotating order, {args.reps} timed steps "
        "each after a warm-up; median (min). `paired` is the median over repetitions of "
        "(variant time / naive time in the same repetition), which cancels slow drifts in load.",
        "",
        "| variant | what | peak MiB | vs naive | step s, median (min) | vs naive | paired |"
        " Σ logps | ‖∇ lm_head‖ |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ratios = {}
    for variant in VARIANTS:
        peak = statistics.median(peaks[variant])
        ts = times[variant]
        paired = statistics.median(t / n for t, n in zip(ts, times["naive"], strict=True))
        ratios[variant] = (peak / base_peak, paired)
        spread = (
            f" ({min(peaks[variant]):.0f}–{max(peaks[variant]):.0f})" if args.rounds > 1 else ""
        )
        lines.append(
            f"| {variant} | {VARIANTS[variant]} | {peak:.0f}{spread} | {peak / base_peak:.2f}× | "
            f"{statistics.median(ts):.2f} ({min(ts):.2f}) | "
            f"{statistics.median(ts) / base_time:.2f}× | {paired:.2f}× | "
            f"{checks[variant]['logps_sum']:.3f} | {checks[variant]['grad_norm']:.5f} |"
        )
    mem_ratio, time_ratio = ratios["fused-1024"]
    lines += [
        "",
        f"Goal for the default (`fused-1024`): peak ≤ ¼ of naive: "
        f"**{'met' if mem_ratio <= 0.25 else 'NOT met'}** ({mem_ratio:.2f}×); time ≤ 1.3× "
        f"naive: **{'met' if time_ratio <= 1.3 else 'NOT met'}** ({time_ratio:.2f}× paired).",
        "The Σ logps and gradient-norm columns agree across variants: the same numbers, computed "
        "with less memory.",
        "",
        "Notes:",
        "",
        f"- The naive step holds several `[N, L, V]` tensors at once ({logits_mib:.0f} MiB each: "
        "logits, log-softmax, their gradients). The fused path holds one `[chunk_size, V]` block "
        f"({1024 * VOCAB * 4 / 2**20:.0f} MiB at 1,024; {256 * VOCAB * 4 / 2**20:.0f} MiB at 256) "
        "plus what does not depend on the vocabulary-sized logits (parameter gradients, "
        "activations of the two layers), so smaller chunks save less and less.",
        "- It is also faster: the head runs on the ~2,000 completion positions only (not all "
        "4,096), 4 matmuls of the head (forward, and recompute, ∂h, ∂W in the backward) against "
        "the naive 3 on all positions, and no full-size log-softmax passes are made.",
        "- The generic path (checkpointed chunks, used only for heads that are not a bare "
        "`nn.Linear`, e.g. LoRA on `lm_head`) does **not** reach ¼ at chunk size 1,024: autograd "
        "keeps several `[chunk_size, V]` temporaries in each chunk's backward. Pass a smaller "
        "`chunk_size` there if memory matters.",
        "- Absolute times are inflated and noisy (the two cores were shared with other jobs); "
        "the paired ratios are the numbers to compare.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
