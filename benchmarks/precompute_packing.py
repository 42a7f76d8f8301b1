"""``inpo precompute`` (the logps stage's scoring) by default against ``--no-packing``, CPU.

The default packs each batch whose longest sequence has ``MIN_PACK_LENGTH`` tokens or more
(on CPU one row, attention one sequence at a time: ``inpo.varlen``); ``--no-packing`` pads every
batch; ``--share-prompt`` (the logps stage under ``train.data.share_prompt``) scores each pair as one
row ``prompt + chosen + rejected``, packed by the same rule. Precompute sorts the pairs by length before batching, so its batches pad less than a
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
    from inpo.layout import MIN_PACK_LENGTH
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
    kinds = {"no-packing": (False, False), "default": (None, False), "share-prompt": (None, True)}
    load = os.getloadavg()[0]
    runs = {k: [] for k in kinds}
    values = {}
    precompute_logps(data, model, work / "warm", batch_size=args.batch_size)  # warm-up
    for r in range(args.rounds):
        shift = r % len(kinds)  # the order rotates each round
        order = list(kinds)[shift:] + list(kinds)[:shift]
        for kind in order:
            out = work / f"{kind}-{r}"
            packing, share_prompt = kinds[kind]
            res = precompute_logps(
                data, model, out, batch_size=args.batch_size, packing=packing,
                share_prompt=share_prompt,
            )  # fmt: skip
            runs[kind].append(res.manifest)
            from inpo.data import load_preference_dataset

            ds = load_preference_dataset(out)
            values[kind] = torch.tensor([*ds["ref_chosen_logps"], *ds["ref_rejected_logps"]])
    secs = {k: [m["seconds_score"] for m in v] for k, v in runs.items()}
    ratio = {k: [a / b for a, b in zip(secs["no-packing"], secs[k], strict=True)] for k in kinds}
    med = {k: statistics.median(v) for k, v in ratio.items()}
    scale = float(values["no-packing"].abs().max())
    diff = {k: float((values[k] - values["no-packing"]).abs().max()) for k in kinds}
    packed = {k: runs[k][0]["packed_batches"] for k in kinds}
    batches = -(-args.pairs // args.batch_size)
    names = list(kinds)
    lines = [
        "# `inpo precompute`: packing by default vs `--no-packing` (CPU)",
        "",
        f"Command: `python benchmarks/precompute_packing.py --rounds {args.rounds} --threads "
        f"{args.threads} --pairs {args.pairs} --batch-size {args.batch_size}` (load average "
        f"{load:.2f} at the start; {os.cpu_count()} cores, torch {torch.__version__}, fp32).",
        "",
        f"Llama 3.6M parameters (character vocabulary), {args.pairs} pairs (prompts 16-128, "
        f"answers 8-256 characters), {args.batch_size} pairs a forward, sorted by length as "
        f"precompute does; batches packed (those from {MIN_PACK_LENGTH} tokens): default "
        f"{packed['default']} of {batches}, `--share-prompt` {packed['share-prompt']} of "
        f"{batches}. Scoring seconds from the manifests (loading excluded); ratio = "
        "`--no-packing` seconds / the kind's seconds in the same round (the order rotates).",
        "",
        "| round | " + " | ".join(f"{k} (s)" for k in names) + " | default ratio "
        "| --share-prompt ratio |",
        "|---|" + "---:|" * (len(names) + 2),
        *(
            f"| {i + 1} | "
            + " | ".join(f"{secs[k][i]:.2f}" for k in names)
            + f" | {ratio['default'][i]:.2f}× | {ratio['share-prompt'][i]:.2f}× |"
            for i in range(args.rounds)
        ),
        "| **median** | "
        + " | " * (len(names) - 1)
        + f" | **{med['default']:.2f}×** | **{med['share-prompt']:.2f}×** |",
        "",
        f"Largest log-prob difference from `--no-packing`: default {diff['default']:.1e}, "
        f"`--share-prompt` {diff['share-prompt']:.1e} (sums up to {scale:.0f}).",
        "",
    ]
    for k, label in (("default", "the default"), ("share-prompt", "`--share-prompt`")):
        rs = ratio[k]
        lines += [
            f"- {label} faster than `--no-packing` in every round: "
            f"**{'MET' if min(rs) > 1 else 'NOT MET'}** ({', '.join(f'{x:.2f}×' for x in rs)})",
            f"- {label}: the same log-probs (within 1e-6 relative): "
            f"**{'MET' if diff[k] <= 1e-6 * max(scale, 1.0) else 'NOT MET'}**",
        ]
    lines.append("")
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
