"""Tiny transformers models and tokenizers built from a config, for tests and the default task.

Nothing is downloaded: the tokenizer is built with the ``tokenizers`` library from a vocabulary
we choose, the model from a small ``LlamaConfig``/``GPT2Config``; both save with
``save_pretrained`` (safetensors) and load back with the ``Auto*`` classes, so the real loading
code runs. Requires the ``lm`` extra.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

__all__ = [
    "CHATML_TEMPLATE",
    "CHAT_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "SPECIAL_TOKENS",
    "always_say",
    "char_tokenizer",
    "chat_tokenizer",
    "save_tiny_chat_lm",
    "save_tiny_lm",
    "tiny_causal_lm",
    "tiny_reward_model",
    "word_tokenizer",
]

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")

#: A minimal chat template: ``<|role|>content</s>`` per turn; the generation prompt opens the
#: assistant's turn. Role markers are single tokens in our vocabularies.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")


def _wrap(tk: Any, add_bos: bool):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    bos_id = tk.token_to_id("<s>")
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        additional_special_tokens=list(ROLE_TOKENS),
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


#: A Llama-3-style template: ``{{ bos_token }}`` once, then
#: ``<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`` per turn.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
#: A ChatML (Qwen2) template: ``<|im_start|>role\ncontent<|im_end|>\n`` per turn, no BOS.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CHAT_STYLES: dict[str, dict[str, Any]] = {
    # special tokens, then which is which; Llama 3 adds its BOS to every text it tokenises
    "llama3": {
        "specials": (
            "<|pad|>",
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        "pad": "<|pad|>",
        "bos": "<|begin_of_text|>",
        "eos": "<|end_of_text|>",
        "end_of_turn": "<|eot_id|>",
        "add_bos": True,
        "template": LLAMA3_TEMPLATE,
    },
    # Qwen2-Instruct: no BOS; the tokenizer's EOS is the end of turn
    "chatml": {
        "specials": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "pad": "<|endoftext|>",
        "bos": None,
        "eos": "<|im_end|>",
        "end_of_turn": "<|im_end|>",
        "add_bos": False,
        "template": CHATML_TEMPLATE,
    },
}


def chat_tokenizer(style: Literal["llama3", "chatml"] = "llama3"):
    """A character-level tokenizer with a real chat model's special tokens and template.

    ``llama3``: ``<|begin_of_text|>`` is the BOS, which both the template (``{{ bos_token }}``)
    and ``tokenizer(text)`` write (so a pipeline that tokenises a rendered template again gets
    two: the pitfall the tests guard against); turns end with ``<|eot_id|>``, the tokenizer's EOS
    is ``<|end_of_text|>`` (the model's ``generation_config.json`` lists both, see
    :func:`save_tiny_chat_lm`). ``chatml``: Qwen2's ``<|im_start|>``/``<|im_end|>``, no BOS.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    spec = _CHAT_STYLES[style]
    chars = "\n" + "".join(chr(c) for c in range(32, 127))
    vocab = {t: i for i, t in enumerate([*spec["specials"], "<unk>", *dict.fromkeys(chars)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    if spec["add_bos"]:
        bos = spec["bos"]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
        )
    named = {spec["pad"], spec["bos"], spec["eos"]}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token=spec["pad"],
        bos_token=spec["bos"],
        eos_token=spec["eos"],
        unk_token="<unk>",
        additional_special_tokens=[t for t in spec["specials"] if t not in named],
    )
    tok.chat_template = spec["template"]
    return tok


def save_tiny_chat_lm(
    path: str | Path,
    style: Literal["llama3", "chatml"] = "llama3",
    *,
    seed: int = 0,
    **sizes: int,
) -> Path:
    """A tiny Llama with :func:`chat_tokenizer`'s tokenizer, saved as a chat model ships: its
    ``generation_config.json`` lists every end token (``<|eot_id|>`` and ``<|end_of_text|>``
    for ``llama3``, ``<|im_end|>`` and ``<|endoftext|>`` for ``chatml``)."""
    from transformers import GenerationConfig

    path = Path(path)
    tok = chat_tokenizer(style)
    model = tiny_causal_lm("llama", tok, seed=seed, **sizes)
    spec = _CHAT_STYLES[style]
    ends = [tok.convert_tokens_to_ids(spec["end_of_turn"])]
    other = "<|end_of_text|>" if style == "llama3" else "<|endoftext|>"
    ends.append(tok.convert_tokens_to_ids(other))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=ends, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def char_tokenizer(*, add_bos: bool = False, alphabet: str | None = None):
    """A character-level fast tokenizer over printable ASCII (about 100 tokens).

    ``add_bos=True`` makes ``tokenizer(text)`` prepend ``<s>`` (as Llama's does), which is what
    tests of "no double BOS" need.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    chars = alphabet if alphabet is not None else "".join(chr(c) for c in range(32, 127))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *ROLE_TOKENS, *dict.fromkeys(chars)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tk.decoder = decoders.Fuse()
    return _wrap(tk, add_bos)


def word_tokenizer(words: Sequence[str], *, add_bos: bool = False):
    """A whitespace word-level tokenizer over ``words`` (decoding joins with spaces)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *ROLE_TOKENS, *dict.fromkeys(words)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return _wrap(tk, add_bos)


#: Qwen2-0.5B's sizes, for the GPU benchmarks' random-weight stand-in, built as a Llama
#: (``tiny_causal_lm("llama", tok, **QWEN2_05B)``; Qwen2 adds biases to q/k/v, 0.3% of the
#: FLOPs): under a ``qwen2`` config ``AutoTokenizer`` swaps our word tokenizer for Qwen2's class.
QWEN2_05B = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4096,
}


def _config(arch: str, tokenizer: Any, **sizes: int):
    from transformers import GPT2Config, LlamaConfig

    vocab_size = len(tokenizer)
    hidden = sizes.get("hidden_size", 32)
    layers = sizes.get("num_hidden_layers", 2)
    heads = sizes.get("num_attention_heads", 4)
    max_pos = sizes.get("max_position_embeddings", 256)
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=sizes.get("intermediate_size", 2 * hidden),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=sizes.get("num_key_value_heads", max(1, heads // 2)),
            max_position_embeddings=max_pos,
            tie_word_embeddings=sizes.get("tie_word_embeddings", False),
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_pos,
            **ids,
        )
    raise ValueError(f"unknown tiny architecture '{arch}' (llama, gpt2)")


def tiny_causal_lm(arch: Literal["llama", "gpt2"], tokenizer: Any, *, seed: int = 0, **sizes: int):
    """A randomly initialised causal LM sized by ``sizes`` (hidden_size, num_hidden_layers, ...)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_config(arch, tokenizer, **sizes))


def tiny_reward_model(
    arch: Literal["llama", "gpt2"], tokenizer: Any, *, seed: int = 0, **sizes: int
):
    """A randomly initialised sequence-classification model with one output (a scalar reward)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = _config(arch, tokenizer, **sizes)
    cfg.num_labels = 1
    return AutoModelForSequenceClassification.from_config(cfg)


def save_tiny_lm(
    path: str | Path,
    arch: Literal["llama", "gpt2"] = "llama",
    *,
    tokenizer: Any = None,
    seed: int = 0,
    **sizes: int,
) -> Path:
    """Build a tiny causal LM and its tokenizer and save both to ``path`` (safetensors)."""
    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else char_tokenizer()
    model = tiny_causal_lm(arch, tokenizer, seed=seed, **sizes)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def always_say(path: str | Path, token: str) -> None:
    """Rewrite the tiny Llama saved in ``path`` so it emits ``token`` at every step, whatever
    the input (for tests of end tokens and truncation): the layers add nothing to the residual
    stream, every embedding is the first unit vector, and only ``token``'s output row reads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[:, 0] = 1.0
        head = model.get_output_embeddings().weight
        head.zero_()
        head[tok.convert_tokens_to_ids(token), 0] = 50.0
    model.save_pretrained(path)


#: The items of :func:`preference_pairs` (responses are "the answer is ITEM").
PREFERENCE_ITEMS = ("apple", "brick", "cloud", "drum", "eagle", "flute", "grape")
_PAIR_PROMPTS = (
    "pick one",
    "which is better",
    "choose the best",
    "what do you prefer",
    "tell me your pick",
    "which one please",
    "best one now",
    "choose one please",
    "vote now",
    "what is your choice",
)


def item_beats(rule: Literal["cyclic", "transitive"], i: int, j: int, n: int) -> bool:
    """Whether item ``i`` beats item ``j`` (``i ≠ j``) under ``rule``: ``cyclic``, the regular
    tournament on a circle (``i`` beats the next ``(n−1)/2`` items: every item wins half its
    duels, as rock–paper–scissors for ``n = 3``; a GPM with ``k = 1`` represents it with
    embeddings ``2π i / n`` apart, no Bradley–Terry reward beats chance on it); ``transitive``,
    the lower index wins."""
    if rule == "transitive":
        return i < j
    return 1 <= (j - i) % n <= (n - 1) // 2


def preference_pairs(
    rule: Literal["cyclic", "transitive"],
    *,
    prompts: Sequence[str] = _PAIR_PROMPTS,
    n_items: int = 7,
    repeats: int = 1,
    items: Sequence[str] | None = None,
    template: str = "the answer is {}",
) -> list[dict[str, str]]:
    """Preference pairs in TRL's format over text responses labelled by :func:`item_beats`:
    every unordered pair of the first ``n_items`` items under every prompt, ``repeats`` times,
    the winner as ``chosen`` (deterministic order). ``n_items`` is odd for ``cyclic``."""
    if rule == "cyclic" and n_items % 2 == 0:
        raise ValueError("a regular cyclic tournament needs an odd number of items")
    items = list(items or PREFERENCE_ITEMS)[:n_items]
    rows = []
    for _ in range(repeats):
        for prompt in prompts:
            for i in range(n_items):
                for j in range(i + 1, n_items):
                    win, lose = (i, j) if item_beats(rule, i, j, n_items) else (j, i)
                    rows.append(
                        {
                            "prompt": prompt,
                            "chosen": template.format(items[win]),
                            "rejected": template.format(items[lose]),
                        }
                    )
    return rows


def best_transitive_accuracy(rule: Literal["cyclic", "transitive"], n_items: int = 7) -> float:
    """The largest fraction of :func:`item_beats`' duels that one ranking of the items agrees
    with (exhaustive over the ``n!`` rankings): what any Bradley–Terry reward can reach."""
    import itertools

    duels = [(i, j) for i in range(n_items) for j in range(i + 1, n_items)]
    best = 0
    for order in itertools.permutations(range(n_items)):
        rank = {item: pos for pos, item in enumerate(order)}
        agree = sum((rank[i] < rank[j]) == item_beats(rule, i, j, n_items) for i, j in duels)
        best = max(best, agree)
    return best / len(duels)


def pair_words() -> list[str]:
    """Every word of :func:`preference_pairs`' rows (for a :func:`word_tokenizer`)."""
    words = ["the", "answer", "is", *PREFERENCE_ITEMS, "A", "B", "[CONTEXT]", "[RESPONSE"]
    words += ["A]", "B]", "<turn>", "user", "assistant"]
    words += [w for p in _PAIR_PROMPTS for w in p.split()]
    return list(dict.fromkeys(words))
