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
    "CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "char_tokenizer",
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
