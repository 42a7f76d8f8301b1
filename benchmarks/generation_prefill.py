"""Generation with one prompt prefill for the K samples of a prompt, against K prefills.

``inpo.generation.generate_chunks`` runs the B prompts of a batch once (every token but the
last), repeats the KV cache to the B·K sample rows and lets ``generate`` continue; the
baseline (``PREFILL_ONCE = False``) hands ``generate`` the B·K rows, which prefills every
prompt K times (what ``num_return_sequences`` does). Same model, prompts, seeds and settings
in one process, interleaved rounds; the samples must be identical.

Two workloads: the default task's π_ref (prompts of ~5 tokens, 1–3-word answers: the
pipeline's own generate stage) and a tiny Llama with prompts of ``--prompt-tokens`` tokens
(the shape of real prompts, which are far longer than their answers' first tokens).

    python benchmarks/generation_prefill.py [--rounds 3] [--out benchmarks/results/generation_prefill.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(model, tok, prompts, k, settings, flag: bool) -> tuple[float, list]:
    import inpo.generation as g

    g.PREFILL_ONCE = flag
    t0 = time.perf_counter()
    out = g.sample_responses(model, tok, prompts, k, settings, seed=7)
    return time.perf_counter() - t0, out


def workloads(prompt_tokens: int):
    import torch

    from inpo.generation import GenerationSettings
    from inpo.pipeline.preflight import load_run_config
    from inpo.pipeline.runtime import load_model
    from inpo.pipeline.workloads import get_workload
    from inpo.tiny import char_tokenizer, tiny_causal_lm

    cfg = load_run_config(None, [])
    work = get_workload(cfg)
    model, tok = load_model(work.reference_model(None), "cpu")
    prompts = [p for p in work.train_prompts() for _ in range(cfg.prompt_repeats)]
    g = cfg.generate
    yield (
        "default task's π_ref (672 prompts of ~5 tokens, K = 8, ≤ 4 new tokens)",
        model,
        tok,
        prompts,
        g.k,
        GenerationSettings(g.temperature, g.top_p, g.max_new_tokens, g.batch_size),
    )
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_causal_lm(
        "llama", tok, hidden_size=256, num_hidden_layers=4, max_position_embeddings=1024
    ).eval()
    text = "the quick brown fox jumps over the lazy dog " * (prompt_tokens // 44 + 1)
    long_prompts = [f"{i}: {text}"[:prompt_tokens] for i in range(16)]
    yield (
        f"tiny Llama (hidden 256, 4 layers), 16 prompts of {prompt_tokens} characters-tokens, "
        "K = 8, 16 new tokens",
        model,
        tok,
        long_prompts,
        8,
        GenerationSettings(1.0, 1.0, 16, 4),
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation_prefill.md"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    load = os.getloadavg()
    lines = [
        "# One prompt prefill for K samples",
        "",
        f"`python benchmarks/generation_prefill.py --rounds {args.rounds} --prompt-tokens "
        f"{args.prompt_tokens}` on {os.cpu_count()} CPU cores, load average before "
        f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; interleaved rounds (K prefills, then "
        "one), seconds of `sample_responses`.",
        "",
    ]
    ok_all = True
    for name, model, tok, prompts, k, settings in workloads(args.prompt_tokens):
        timed(model, tok, prompts[:4], k, settings, True)  # warm-up
        ratios, same = [], True
        rows = []
        for i in range(args.rounds):
            t_k, out_k = timed(model, tok, prompts, k, settings, False)
            t_1, out_1 = timed(model, tok, prompts, k, settings, True)
            same = same and out_k == out_1
            ratios.append(t_k / t_1)
            rows.append(f"| {i + 1} | {t_k:.2f} | {t_1:.2f} | {t_k / t_1:.2f}× |")
            print(f"{name}: round {i + 1}: K prefills {t_k:.2f}s, one {t_1:.2f}s", flush=True)
        med = statistics.median(ratios)
        ok_all = ok_all and same
        lines += [
            f"## {name}",
            "",
            "| round | K prefills (s) | one prefill (s) | speed-up |",
            "|---|---|---|---|",
            *rows,
            f"| **median** | | | **{med:.2f}×** |",
            "",
            f"- samples identical to the K-prefill path in every round: {'yes' if same else 'NO'}",
            "",
        ]
        print(f"{'MET' if same else 'NOT MET'}: identical samples ({name})")
        print(f"median speed-up {med:.2f}x ({name})")
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
