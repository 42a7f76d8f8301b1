"""When do length buckets, and packing, pay on CPU? One padded pass against 4 length buckets
and against one packed row with variable-length attention, by row length.

``inpo train`` can run a micro-batch's sequences as length-sorted buckets, each cut to its own
longest sequence (``data.length_buckets``): less padding computed, but one forward (and
backward) a bucket, each with a fixed cost of Python and kernel launches. This measures the
forward + backward of the completion log-probs (:func:`inpo.training.loop.bucketed_logps`) of
16 sequences, padding about 30% (lengths uniform in ``[L/4, L]``, one at ``L``), for row lengths
``L`` from 8 to 256, on two models: the default task's π_ref (hidden 64, 2 layers) and a
10M-parameter Llama (hidden 256, 8 layers, vocabulary 4,000). Median of 7 repeats each.
The third layout is :func:`inpo.logprobs.packed_sequence_logps` with ``varlen=True``: all 16
sequences in one row, attention one sequence at a time (:mod:`inpo.varlen`). The rules it sets:
by default (``length_buckets: null``) a CPU micro-batch is bucketed only when its longest row
has at least :data:`inpo.training.loop.MIN_BUCKET_LENGTH` tokens, and (``packing: null``)
packed instead when it has at least :data:`inpo.training.loop.MIN_PACK_LENGTH` tokens and
varlen attention is exact for the model (both models here).

    python benchmarks/length_buckets.py [--out benchmarks/results/length_buckets.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def models():
    from transformers import LlamaConfig, LlamaForCausalLM

    from inpo.tasks.default import DefaultTask

    task = DefaultTask()
    task.build_reference()  # cached after the first run (inpo run builds the same)
    ref, _ = task.load_reference()
    ten = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=1024,
            vocab_size=4000,
        )
    )
    return [("default task's π_ref", ref), ("10M Llama", ten)]


def measure(model, length: int, buckets: int, repeats: int = 7) -> float:
    """Median seconds of forward + backward (``buckets=0``: one packed varlen row)."""
    import torch

    from inpo.layout import bucketed_logps
    from inpo.logprobs import packed_sequence_logps, sequence_logps

    g = torch.Generator().manual_seed(length)
    n = 16
    lengths = torch.randint(max(2, length // 4), length + 1, (n,), generator=g)
    lengths[0] = length
    ids = torch.randint(0, model.config.vocab_size, (n, length), generator=g)
    attn = (torch.arange(length)[None] < lengths[:, None]).long()
    comp = attn.clone()
    comp[:, : max(1, length // 3)] = 0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        if buckets:
            lp = bucketed_logps(sequence_logps, model, ids, attn, comp, buckets=buckets)
        else:
            lp = packed_sequence_logps(model, ids, attn, comp, varlen=True)
        lp.sum().backward()
        times.append(time.perf_counter() - t)
    return sorted(times)[repeats // 2], 1 - lengths.sum().item() / (n * length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "length_buckets.md"))
    args = ap.parse_args()
    import torch

    from inpo.layout import MIN_BUCKET_LENGTH, MIN_PACK_LENGTH

    torch.manual_seed(0)
    load = os.getloadavg()
    rows = []
    for name, model in models():
        for length in (8, 16, 32, 64, 128, 256):
            one, pad = measure(model, length, 1)
            four, _ = measure(model, length, 4)
            packed, _ = measure(model, length, 0)
            rows.append((name, length, pad, one, four, packed))
            print(
                f"{name} L={length}: 1 pass {one * 1e3:.1f} ms, 4 buckets {four * 1e3:.1f} ms, "
                f"packed {packed * 1e3:.1f} ms"
            )
    lines = [
        "# Length buckets and packing on CPU: one padded pass, 4 buckets, one packed row",
        "",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU cores, torch "
        f"threads {torch.get_num_threads()}, {platform.platform()}; torch {torch.__version__}",
        f"- 1-minute load average {load[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end",
        "- Command: `python benchmarks/length_buckets.py`",
        "- 16 sequences, forward + backward of the completion log-probs, median of 7",
        "",
        "| model | longest row (tokens) | padding | 1 pass (ms) | 4 buckets (ms) "
        "| packed (ms) | 4 buckets' speed-up | packed's speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {name} | {length} | {pad:.0%} | {one * 1e3:.1f} | {four * 1e3:.1f} "
            f"| {packed * 1e3:.1f} | {one / four:.2f}× | {one / packed:.2f}× |"
            for name, length, pad, one, four, packed in rows
        ],
        "",
        f"Rules on CPU: `data.packing: null` packs a micro-batch whose longest row has at least "
        f"{MIN_PACK_LENGTH} tokens (for a model varlen attention is exact for); otherwise "
        f"`data.length_buckets: null` buckets one of at least {MIN_BUCKET_LENGTH} tokens (with "
        "`data.packing=false`, or a model varlen does not suit), one pass below. Verdicts (the "
        "default's choice against the fastest of the three; and the bucket rule alone against "
        "the faster of 1 pass and 4 buckets):",
    ]
    for name, length, _, one, four, packed in rows:
        bucket_choice = four if length >= MIN_BUCKET_LENGTH else one
        chosen = packed if length >= MIN_PACK_LENGTH else bucket_choice
        best, best_unpacked = min(one, four, packed), min(one, four)

        def verdict(choice: float, fastest: float) -> str:
            return "the fastest" if choice == fastest else f"{choice / fastest:.2f}× the fastest"

        lines.append(
            f"- {name}, {length} tokens: default {verdict(chosen, best)}; bucket rule "
            f"{verdict(bucket_choice, best_unpacked)}"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
