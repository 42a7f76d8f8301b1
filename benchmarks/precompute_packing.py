"""``inpo precompute`` (the logps stage's scoring) by default against ``--no-packing``, CPU.

The default packs each batch whose longest sequence has ``MIN_PACK_LENGTH`` tokens or more
(on CPU one row, attention one sequence at a time: ``inpo.varlen``); ``--no-packing`` pads every
batch. Precompute sorts the pairs by length before batching, so its batches pad less than a
training micro-batch (``packing.py --forward-only`` times random micro-batches): this measures
the stage as it runs. The same ~4M-parameter Llama and pair lengths as ``packing.py`` (prompts
16-128, answers 8-256 characters), ``--pairs`` pairs, ``--batch-size`` pairs a forward;
interleaved rounds (the order alternates), scoring seconds from each run's manifest (model
loading excluded), process threads fixed by ``--threads``.

    python benchmarks/precompute_packing.py [--rounds 3] [--out benchmarks/results/precompute_packing.md]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/precompute_packing.md"))
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from inpo.logprobs import MIN_PACK_LENGTH
    from inpo.precompute import precompute_logps
    from inpo.tiny import char_tokenizer, save_tiny_lm

    work = Path(tempfile.mkdtemp(prefix="inpo-precompute-"))
    tok = char_tokenizer()
    model = save_tiny_lm(
        work / "model", "llama", tokenizer=tok, hidden_size=256, num_hidden_layers=6,
        num_attention_heads=8, max_position_embeddings=1024,
    )  # fmt: skip
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "

    def text(lo: int, hi: int) -> str:
        return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))

    data = work / "pairs.jsonl"
    with data.open("w") as fh:
        for _ in range(args.pairs):
            row = {"prompt": text(16, 128), "chosen": text(8, 256), "rejected": text(8, 256)}
            fh.write(json.dumps(row) + "\n")
    kinds = {"no-packing": False, "default": None}
    load = os.getloadavg()[0]
    runs = {k: [] for k in kinds}
    values = {}
    precompute_logps(data, model, work / "warm", batch_size=args.batch_size)  # warm-up
    for r in range(args.rounds):
        order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
        for kind in order:
            out = work / f"{kind}-{r}"
            res = precompute_logps(
                data, model, out, batch_size=args.batch_size, packing=kinds[kind]
            )
            runs[kind].append(res.manifest)
            from inpo.data import load_preference_dataset

            ds = load_preference_dataset(out)
            values[kind] = torch.tensor([*ds["ref_chosen_logps"], *ds["ref_rejected_logps"]])
    secs = {k: [m["seconds_score"] for m in v] for k, v in runs.items()}
    ratio = [a / b for a, b in zip(secs["no-packing"], secs["default"], strict=True)]
    med = statistics.median(ratio)
    diff = float((values["default"] - values["no-packing"]).abs().max())
    scale = float(values["no-packing"].abs().max())
    packed = runs["default"][0]["packed_batches"]
    batches = -(-args.pairs // args.batch_size)
    lines = [
        "# `inpo precompute`: packing by default vs `--no-packing` (CPU)",
        "",
        f"Command: `python benchmarks/precompute_packing.py --rounds {args.rounds} --threads "
        f"{args.threads} --pairs {args.pairs} --batch-size {args.batch_size}` (load average "
        f"{load:.2f} at the start; {os.cpu_count()} cores, torch {torch.__version__}, fp32).",
        "",
        f"Llama 3.6M parameters (character vocabulary), {args.pairs} pairs (prompts 16-128, "
        f"answers 8-256 characters), {args.batch_size} pairs a forward, sorted by length as "
        f"precompute does: the default packed {packed} of {batches} batches (those from "
        f"{MIN_PACK_LENGTH} tokens). Scoring seconds from the manifests (loading excluded); "
        "ratio = `--no-packing` seconds / default seconds in the same round.",
        "",
        "| round | --no-packing (s) | default (s) | ratio |",
        "|---|---:|---:|---:|",
        *(
            f"| {i + 1} | {a:.2f} | {b:.2f} | {x:.2f}× |"
            for i, (a, b, x) in enumerate(
                zip(secs["no-packing"], secs["default"], ratio, strict=True)
            )
        ),
        f"| **median** | | | **{med:.2f}×** |",
        "",
        f"Largest log-prob difference: {diff:.1e} (sums up to {scale:.0f}).",
        "",
        f"- the default faster than `--no-packing` in every round: "
        f"**{'MET' if min(ratio) > 1 else 'NOT MET'}** ({', '.join(f'{x:.2f}×' for x in ratio)})",
        f"- the same log-probs (within 1e-6 relative): "
        f"**{'MET' if diff <= 1e-6 * max(scale, 1.0) else 'NOT MET'}**",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
