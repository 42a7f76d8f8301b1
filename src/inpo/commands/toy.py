"""``inpo toy DIR``: a tiny policy, reward model and prompt files to try your-own-model runs.

Everything ``task=prompts`` needs, built here from a config (nothing is downloaded, no GPU):

    DIR/policy/             a tiny Llama (random weights, a word-level tokenizer; safetensors)
    DIR/reward_model/       a tiny Llama reward model (sequence classification, one output)
    DIR/prompts.jsonl       training prompts in TRL's prompt-only format ({"prompt": "..."})
    DIR/eval_prompts.jsonl  held-out prompts, the same format

so the commands of ``docs/your-model.md`` run as written; replace them with your own model
folders (or hub ids in your local Hugging Face cache) and prompt files.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["main"]

_WORDS = (
    "say describe name the a red blue green small large circle square star "
    "please one two three yes no"
).split()
_COLOURS = ("red", "blue", "green")
_SHAPES = ("circle", "square", "star")


def _prompts() -> tuple[list[str], list[str]]:
    every = [
        f"{verb} {size} {c} {s}"
        for verb in ("say", "describe")
        for size in ("small", "large")
        for c in _COLOURS
        for s in _SHAPES
    ]
    return every[::2] + every[1::4], every[3::4]


def main(argv: list[str]) -> int:
    from inpo.commands._args import ArgumentParser

    parser = ArgumentParser(
        prog="inpo toy",
        description="Write a tiny policy, reward model and prompt files to DIR (no download).",
    )
    parser.add_argument("dir", help="the folder to write (created; existing files are replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)

    from inpo.tiny import save_tiny_lm, tiny_reward_model, word_tokenizer

    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = word_tokenizer(_WORDS)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2}
    save_tiny_lm(out / "policy", "llama", tokenizer=tok, seed=args.seed, **sizes)
    rm = tiny_reward_model("llama", tok, seed=args.seed + 1, **sizes)
    rm.save_pretrained(out / "reward_model")
    tok.save_pretrained(out / "reward_model")
    train, held_out = _prompts()
    for name, prompts in (("prompts.jsonl", train), ("eval_prompts.jsonl", held_out)):
        (out / name).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(
        f"wrote {out}/policy, {out}/reward_model, {out}/prompts.jsonl ({len(train)} prompts) "
        f"and {out}/eval_prompts.jsonl ({len(held_out)})"
    )
    return 0
