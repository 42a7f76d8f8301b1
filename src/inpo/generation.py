"""Sampling ``K`` responses a prompt from a causal LM (the pipeline's *generate* stage).

transformers ``generate`` with the KV cache, batched over prompts (left padding), ``K`` samples
per prompt via ``num_return_sequences``. Reproducible and resumable: prompts are processed in
fixed chunks of ``batch_size`` prompts, and each chunk's sampling is seeded with a hash of
``(seed, first prompt index)``, so a chunk gives the same samples whether or not the run was
interrupted before it. Text prompts are tokenised as ``tokenizer(prompt)`` gives them (the same
as :func:`inpo.data.tokenize_pair`), conversational prompts (message lists) through the chat
template with the generation prompt. A completion is the decoded new tokens up to EOS (special
tokens removed); a sample that stops at ``max_new_tokens`` is kept and counted as truncated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["GenerationSettings", "chunk_seed", "generate_chunks", "sample_responses"]


@dataclass
class GenerationSettings:
    """Sampling settings (vLLM's and transformers' names)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    stop_token_ids: list[int] | None = None


def chunk_seed(seed: int, start: int) -> int:
    """The sampling seed of the chunk of prompts starting at index ``start``."""
    digest = hashlib.sha256(f"inpo-generate:{seed}:{start}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    from inpo.data import encode_prompt

    return list(encode_prompt(tokenizer, prompt))


def generate_chunks(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    k: int,
    settings: GenerationSettings,
    *,
    seed: int,
    start_chunk: int = 0,
) -> Iterator[tuple[int, list[list[str]], int]]:
    """Yield ``(chunk_start, samples, truncated)`` per chunk of prompts, from ``start_chunk``.

    ``samples[i]`` holds the ``k`` completions of prompt ``chunk_start + i``.
    """
    import torch

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    bs = max(1, settings.batch_size)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = [tokenizer.eos_token_id, *(settings.stop_token_ids or [])]
    eos = [int(e) for e in eos if e is not None]
    was_training = model.training
    model.eval()
    try:
        for start in range(start_chunk * bs, len(prompts), bs):
            chunk = prompts[start : start + bs]
            encoded = [_encode_prompt(tokenizer, p) for p in chunk]
            length = max(len(e) for e in encoded)
            ids = torch.full((len(chunk), length), int(pad), dtype=torch.long)
            attn = torch.zeros_like(ids)
            for r, e in enumerate(encoded):
                ids[r, length - len(e) :] = torch.tensor(e)
                attn[r, length - len(e) :] = 1
            gen = torch.Generator(device="cpu").manual_seed(chunk_seed(seed, start))
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=attn.to(device),
                    do_sample=settings.temperature > 0,
                    temperature=settings.temperature if settings.temperature > 0 else None,
                    top_p=settings.top_p,
                    top_k=0,
                    max_new_tokens=settings.max_new_tokens,
                    num_return_sequences=k,
                    eos_token_id=eos,
                    pad_token_id=int(pad),
                    use_cache=True,
                )
            new = out[:, length:].cpu()
            samples: list[list[str]] = []
            truncated = 0
            for r in range(len(chunk)):
                row = []
                for j in range(k):
                    toks = new[r * k + j].tolist()
                    stop = next((i for i, t in enumerate(toks) if t in eos), None)
                    if stop is None:
                        truncated += 1
                    else:
                        toks = toks[:stop]
                    row.append(tokenizer.decode(toks, skip_special_tokens=True))
                samples.append(row)
            yield start, samples, truncated
    finally:
        model.train(was_training)


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    k: int,
    settings: GenerationSettings | None = None,
    *,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[list[str]]:
    """``k`` sampled completions for each prompt (see the module docstring)."""
    settings = settings or GenerationSettings()
    out: list[list[str]] = []
    for _start, samples, _trunc in generate_chunks(
        model, tokenizer, prompts, k, settings, seed=seed
    ):
        out.extend(samples)
        if progress is not None:
            progress(len(samples))
    return out


def vllm_sample(
    model_path: str,
    prompts: Sequence[Any],
    k: int,
    settings: GenerationSettings,
    *,
    seed: int,
) -> list[list[str]]:
    """``k`` samples a prompt with vLLM (imported here, only when asked for).

    Conversational prompts go through the tokenizer's chat template, text prompts as they
    are; each prompt gets its own seed (``chunk_seed(seed, index)``), so the samples do not
    depend on how vLLM batches them.
    """
    try:
        from vllm import LLM, SamplingParams
    except ImportError as err:
        from inpo.errors import ConfigError

        raise ConfigError(
            "generate.backend=vllm needs vLLM installed (`pip install vllm`); "
            "or use generate.backend=transformers"
        ) from err
    llm = LLM(model=str(model_path), trust_remote_code=False, seed=seed)
    tok = llm.get_tokenizer()
    texts = [
        p
        if isinstance(p, str)
        else tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    params = [
        SamplingParams(
            n=k,
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=chunk_seed(seed, i),
            stop_token_ids=settings.stop_token_ids,
        )
        for i in range(len(texts))
    ]
    outputs = llm.generate(texts, params)
    return [[c.text for c in out.outputs] for out in outputs]
