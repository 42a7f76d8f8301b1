"""``inpo toy DIR``: a tiny policy, reward model and prompt files to try your-own-model runs.

Everything ``task=prompts`` needs, built here from a config (nothing is downloaded, no GPU):

    DIR/policy/             a tiny Llama (random weights, a word-level tokenizer; safetensors)
    DIR/reward_model/       a tiny Llama reward model (sequence classification, one output)
    DIR/prompts.jsonl       training prompts in TRL's prompt-only format ({"prompt": "..."})
    DIR/eval_prompts.jsonl  held-out prompts, the same format
    DIR/pairs.jsonl         preference pairs (TRL's format) under a cyclic rule over five
                            answers, each beating the next two (no reward model can fit it)
    DIR/pairs_eval.jsonl    the same duels on the held-out prompts

so the commands of ``docs/your-model.md`` run as written; replace them with your own model
folders (or hub ids in your local Hugging Face cache) and prompt files.

``inpo toy DIR --chat`` writes a chat model's kit instead: the policy has a Llama-3-style chat
template (``<|begin_of_text|>``, ``<|eot_id|>`` in its ``generation_config.json``), a reward model
and an RLHFlow-style pairwise model with the same tokenizer, ``prompts_1.jsonl`` …
``prompts_3.jsonl`` (one file an iteration, conversations in TRL's format) and
``eval_prompts.jsonl``.
"""

from __future__ import annotations

import json
from pathlib import Path

from inpo.commands._args import ArgumentParser
from inpo.errors import ConfigError
from inpo.tiny import (
    chat_tokenizer,
    preference_pairs,
    save_tiny_chat_lm,
    save_tiny_lm,
    tiny_causal_lm,
    tiny_reward_model,
    word_tokenizer,
)

__all__ = ["main"]

_WORDS = (
    "say describe name the a red blue green small large circle square star "
    "please one two three yes no"
).split()
_COLOURS = ("red", "blue", "green")
_SHAPES = ("circle", "square", "star")


def _grid(verbs: tuple[str, str], form: str) -> list[str]:
    """``form`` filled with every verb, size, colour and shape (36 prompts)."""
    return [
        form.format(verb=v, size=size, colour=c, shape=shape)
        for v in verbs
        for size in ("small", "large")
        for c in _COLOURS
        for shape in _SHAPES
    ]


def _prompts() -> tuple[list[str], list[str]]:
    every = _grid(("say", "describe"), "{verb} {size} {colour} {shape}")
    return every[::2] + every[1::4], every[3::4]


def main(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="inpo toy",
        description="Write a tiny policy, reward model and prompt files to DIR (no download).",
    )
    parser.add_argument("dir", help="the folder to write (created; existing files are replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument(
        "--chat", action="store_true", help="a chat model and conversational prompt files"
    )
    args = parser.parse_args(argv)
    if Path(args.dir).exists() and not Path(args.dir).is_dir():
        raise ConfigError(f"'{args.dir}' exists and is not a folder; name a folder to write")
    if args.chat:
        return _chat(Path(args.dir), args.seed)

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

    answers = ("red star", "blue circle", "green square", "small star", "large circle")
    for name, prompts in (("pairs.jsonl", train), ("pairs_eval.jsonl", held_out)):
        rows = preference_pairs("cyclic", prompts=prompts, n_items=5, items=answers, template="{}")
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(
        f"wrote {out}/policy, {out}/reward_model, {out}/prompts.jsonl ({len(train)} prompts), "
        f"{out}/eval_prompts.jsonl ({len(held_out)}) and cyclic preference pairs "
        f"{out}/pairs.jsonl, {out}/pairs_eval.jsonl"
    )
    return 0


def _chat(out: Path, seed: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2}
    save_tiny_chat_lm(out / "policy", "llama3", seed=seed, **sizes)
    tok = chat_tokenizer("llama3")
    for name, model in (
        ("reward_model", tiny_reward_model("llama", tok, seed=seed + 1, **sizes)),
        ("pairwise_model", tiny_causal_lm("llama", tok, seed=seed + 2, **sizes)),
    ):
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    # 36 requests: 3 training files of 8, 8 held out, 4 spare
    every = _grid(("Draw", "Describe"), "{verb} a {size} {colour} {shape}.")

    def conversation(text: str, i: int) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": text}]
        if i % 4 == 3:  # some multi-turn histories, with a system turn
            turns = [
                {"role": "system", "content": "Answer in one line."},
                {"role": "user", "content": "Hello."},
                {"role": "assistant", "content": "Hello!"},
                *turns,
            ]
        return turns

    files = {f"prompts_{t + 1}.jsonl": every[8 * t : 8 * t + 8] for t in range(3)}
    files["eval_prompts.jsonl"] = every[24:32]
    for name, texts in files.items():
        rows = [{"prompt": conversation(x, i)} for i, x in enumerate(texts)]
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(
        f"wrote {out}/policy (a chat template), {out}/reward_model, {out}/pairwise_model, "
        f"{out}/prompts_1.jsonl … prompts_3.jsonl (8 conversations each) and "
        f"{out}/eval_prompts.jsonl (8)"
    )
    return 0
