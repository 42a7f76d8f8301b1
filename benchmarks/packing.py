"""Padding-free packing against padded micro-batches: one training step's log-probs, CPU.

The step of ``inpo train`` minus the optimizer: completion log-probs of a micro-batch's ``2B``
sequences and their backward. Layouts of the same sequences, in one process, interleaved
rounds (the order rotates each round):

* ``padded``: one right-padded ``[2B, L]`` batch (``data.length_buckets=1``);
* ``buckets``: the default, 4 length-sorted groups each cut to its longest sequence;
* ``packed``: ``data.packing=true`` as it runs here: on CPU every sequence in one ``[1, T]`` row
  with attention one sequence at a time (``inpo.varlen``, no mask); on a GPU as
  ``packed-masked``;
* ``packed-masked`` (CPU): padding-free rows as long as the longest sequence (first-fit
  decreasing), position ids restarting per sequence, kept apart by transformers' dense
  block-diagonal mask (``varlen=False``: what packing ran before ``inpo.varlen``);
* ``one-row-masked`` (CPU): every sequence in one row under that mask: attention over ``T²``.

A ~4M-parameter Llama (hidden 256, 6 layers, character vocabulary), pairs with prompts of
16–128 and answers of 8–256 tokens (sampled answers are uneven), micro-batches of 4 pairs.
Throughput counts real tokens only (the same for every layout), per second of wall time and per
second of process CPU time (threads fixed by ``--threads``).

    python benchmarks/packing.py [--rounds 3] [--threads 2] [--out benchmarks/results/packing.md]
    python benchmarks/packing.py --device cuda   # writes benchmarks/results/packing_gpu.md
    python benchmarks/packing.py --forward-only --pairs 8   # results/packing_forward.md

``--forward-only`` times the log-probs without gradients, as the logps stage and ``inpo
precompute`` score pairs (``2 × train.optim.per_device_batch_size`` pairs a forward there).

With ``--device cuda``: a Llama with Qwen2-0.5B's sizes (random weights, 32,000-word vocabulary)
under bf16 autocast, micro-batches of 8 pairs (prompts 32-256 words, answers 32-512), and more
layouts: ``packed-varlen`` (every sequence in one row through torch's variable-length flash
kernel, ``inpo.varlen``, not selected by default on GPUs until measured) and, each with the
model loaded ``attn_implementation="flex_attention"``, ``packed-flex`` (the packed rows as a
block mask) and ``shared-flex`` (``data.share_prompt``'s rows as a block-sparse mask, :func:`inpo.logprobs.shared_prompt_block_mask`), against
``shared-sdpa`` (the same rows with the dense boolean 4D mask through sdpa). First, in fp32, the
flex shared-prompt log-probs and gradients are checked against the sdpa dense mask (torch runs
flex attention's backward on GPUs only, so the CPU tests check its forward alone).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _flex_check(model_dir: Path, batch: dict, tolerance: float = 1e-4) -> str:
    """fp32 shared-prompt log-probs and gradients, flex block mask vs sdpa dense mask."""
    import torch
    from transformers import AutoModelForCausalLM

    from inpo.layout import bucketed_shared_logps

    out = {}
    for attn in ("sdpa", "flex_attention"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn).cuda()
        lp = bucketed_shared_logps(model, batch, buckets=1)
        lp.sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out[attn] = (lp.detach(), grads)
        del model
    dl = float((out["sdpa"][0] - out["flex_attention"][0]).abs().max())
    scale = float(out["sdpa"][1].abs().max())
    dg = float((out["sdpa"][1] - out["flex_attention"][1]).abs().max()) / scale
    ok = dl <= tolerance * max(1.0, float(out["sdpa"][0].abs().max())) and dg <= tolerance
    return (
        f"fp32 shared-prompt check, flex block mask vs sdpa dense mask: largest log-prob "
        f"difference {dl:.1e} (of sums up to {float(out['sdpa'][0].abs().max()):.0f}), largest "
        f"gradient difference {dg:.1e} of the largest gradient: **{'PASS' if ok else 'FAIL'}**"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pairs", type=int, help="pairs a micro-batch (default 4; 8 on cuda)")
    parser.add_argument(
        "--forward-only", action="store_true", help="no backward: scoring, as the logps stage"
    )
    parser.add_argument("--out", help="default: results/packing.md (packing_gpu.md on cuda)")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    stem = "packing" + ("_forward" if args.forward_only else "") + ("_gpu" if gpu else "")
    args.out = args.out or str(ROOT / f"benchmarks/results/{stem}.md")
    import contextlib
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from inpo.data import PreferenceCollator
    from inpo.layout import bucketed_logps, bucketed_shared_logps
    from inpo.logprobs import packed_sequence_logps, sequence_logps
    from inpo.tiny import QWEN2_05B, char_tokenizer, tiny_causal_lm, word_tokenizer

    rng = random.Random(0)
    if gpu:
        vocab = [f"w{i}" for i in range(32000)]
        tok = word_tokenizer(vocab)
        model = tiny_causal_lm("llama", tok, **QWEN2_05B)
        lengths, pairs = ((32, 256), (32, 512)), args.pairs or 8

        def text(lo: int, hi: int) -> str:
            return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))
    else:
        tok = char_tokenizer()
        model = tiny_causal_lm(
            "llama", tok, hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
            max_position_embeddings=1024,
        )  # fmt: skip
        lengths, pairs = ((16, 128), (8, 256)), args.pairs or 4
        letters = "abcdefghijklmnopqrstuvwxyz "

        def text(lo: int, hi: int) -> str:
            return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))

    params = sum(p.numel() for p in model.parameters())
    collate = PreferenceCollator(tok, max_prompt_length=None, max_completion_length=None)
    shared_collate = PreferenceCollator(
        tok, max_prompt_length=None, max_completion_length=None, share_prompt=True
    )
    rows = [
        [
            {
                "prompt": text(*lengths[0]),
                "chosen": text(*lengths[1]),
                "rejected": text(*lengths[1]),
            }
            for _ in range(pairs)
        ]
        for _ in range(args.batches)
    ]
    batches = [collate(r) for r in rows]
    shared = [shared_collate(r) for r in rows]
    flex_note = ""
    if gpu:
        work = Path(tempfile.mkdtemp(prefix="inpo-packing-"))
        model.save_pretrained(work / "model")
        batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
        shared = [{k: v.cuda() for k, v in b.items()} for b in shared]
        flex_note = _flex_check(work / "model", shared[0])
        print(flex_note, flush=True)
        from transformers import AutoModelForCausalLM

        model = model.cuda()
        flex = AutoModelForCausalLM.from_pretrained(
            work / "model", attn_implementation="flex_attention"
        ).cuda()
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if gpu else contextlib.nullcontext
    )
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded_tokens = sum(b["attention_mask"].numel() for b in batches)

    layouts = {
        "padded": lambda b: bucketed_logps(sequence_logps, model, b["input_ids"], b["attention_mask"], b["completion_mask"], buckets=1),
        "buckets": lambda b: bucketed_logps(sequence_logps, model, b["input_ids"], b["attention_mask"], b["completion_mask"], buckets=4),
        "packed": lambda b: packed_sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"]),
        "packed-masked": lambda b: packed_sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], varlen=False),
        "one-row-masked": lambda b: packed_sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], capacity=10**9, varlen=False),
    }  # fmt: skip
    if gpu:  # the shared rows are batch i of `shared`: the layouts below take the index
        del layouts["one-row-masked"], layouts["packed-masked"]
        layouts |= {
            # all sequences in one row through torch's variable-length flash kernel (inpo.varlen)
            "packed-varlen": lambda b: packed_sequence_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"], varlen=True),
            "packed-flex": lambda b: packed_sequence_logps(flex, b["input_ids"], b["attention_mask"], b["completion_mask"]),
            "shared-sdpa": lambda b: bucketed_shared_logps(model, shared[b["i"]], buckets=1),
            "shared-flex": lambda b: bucketed_shared_logps(flex, shared[b["i"]], buckets=1),
        }  # fmt: skip
        for i, b in enumerate(batches):
            b["i"] = i

    def run(name: str) -> tuple[float, float, torch.Tensor]:
        fn = layouts[name]
        out = []
        w0, c0 = time.perf_counter(), time.process_time()
        for b in batches:
            model.zero_grad(set_to_none=True)
            if gpu:
                flex.zero_grad(set_to_none=True)
            with autocast(), torch.set_grad_enabled(not args.forward_only):
                lp = fn(b)
            if not args.forward_only:
                lp.sum().backward()
            out.append(lp.detach().float())
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - w0, time.process_time() - c0, torch.cat(out)

    load = os.getloadavg()[0]
    names = list(layouts)
    for name in names:  # warm-up (flex compiles its kernels on first use)
        run(name)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    values = {}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            w, c, lp = run(name)
            wall[name].append(w)
            cpu[name].append(c)
            values[name] = lp
    worst = max(float((values[n] - values["padded"]).abs().max()) for n in names)
    scale = float(values["padded"].abs().max())
    ratio = {n: [wall["padded"][i] / wall[n][i] for i in range(args.rounds)] for n in names}
    cpu_ratio = {n: [cpu["padded"][i] / cpu[n][i] for i in range(args.rounds)] for n in names}
    med = {n: statistics.median(ratio[n]) for n in names}
    rows = [
        f"| {n} | {real / statistics.median(wall[n]):.0f} | "
        + ", ".join(f"{x:.2f}" for x in ratio[n])
        + f" | **{med[n]:.2f}×** | {statistics.median(cpu_ratio[n]):.2f}× |"
        for n in names
    ]
    best = max(names, key=med.get)
    if gpu:
        setting = (
            f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast; "
            "`--device cuda`"
        )
        model_line = f"Llama with Qwen2-0.5B's sizes, {params / 1e6:.0f}M parameters"
    else:
        setting = f"{os.cpu_count()} cores, torch {torch.__version__}, fp32"
        model_line = f"Llama {params / 1e6:.1f}M parameters"
    text_out = [
        f"# Padding-free packing vs padded micro-batches ({'GPU' if gpu else 'CPU, sdpa'})",
        "",
        f"Command: `python benchmarks/packing.py --rounds {args.rounds} --threads {args.threads}"
        + (f" --pairs {args.pairs}" if args.pairs else "")
        + (" --forward-only" if args.forward_only else "")
        + (" --device cuda`" if gpu else "`")
        + f" (load average {load:.2f} at the start; {setting}).",
        "",
        f"{model_line}, {args.batches} micro-batches of {pairs} pairs: {real} real "
        f"tokens, {padded_tokens} once padded ({100 * (1 - real / padded_tokens):.0f}% padding). "
        + (
            "Forward only (no gradient: the logps stage's scoring) of the completion log-probs. "
            if args.forward_only
            else "Forward and backward of the completion log-probs. "
        )
        + "Ratio = padded seconds / layout "
        "seconds in the same round.",
        "",
        "| layout | real tokens/s (median) | ratio per round | median | CPU-time ratio |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Largest log-prob difference from the padded layout: {worst:.1e} (sums up to "
        f"{scale:.0f}{'; bf16 autocast' if gpu else ''}).",
        "",
        *([flex_note, ""] if flex_note else []),
        f"- Fastest layout here: **{best}**.",
        f"- packed at least as fast as the default length buckets: "
        f"**{'MET' if med['packed'] >= med['buckets'] else 'NOT MET'}**",
        f"- packed faster than padded: **{'MET' if med['packed'] > 1 else 'NOT MET'}**",
    ]
    if gpu:
        text_out += [
            f"- shared prompt through flex attention faster than through sdpa's dense mask: "
            f"**{'MET' if med['shared-flex'] > med['shared-sdpa'] else 'NOT MET'}**",
            f"- packed through the varlen flash kernel faster than masked packed rows: "
            f"**{'MET' if med['packed-varlen'] > med['packed'] else 'NOT MET'}** (if MET, "
            "`inpo.varlen.use_varlen` can select it on GPUs)",
            "",
        ]
    else:
        text_out += [
            "",
            "With `sdpa` on CPU transformers keeps a packed row's sequences apart with a dense "
            "block-diagonal mask: one row of all `T` real tokens costs `T²` in attention "
            "(`one-row-masked`), so masked rows stay as long as the longest sequence "
            "(`packed-masked`), and first-fit then leaves part of each row as filler. "
            "`inpo.varlen` (the CPU default, `packed`) computes each sequence's attention on "
            "its own, so one row holds them all with no filler. On a GPU see `packing_gpu.md` "
            "(`--device cuda`).",
            "",
        ]
    Path(args.out).write_text("\n".join(text_out))
    print("\n".join(text_out))


if __name__ == "__main__":
    main()
