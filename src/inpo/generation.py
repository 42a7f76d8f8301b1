"""Sampling ``K`` responses a prompt from a causal LM (the pipeline's *generate* stage).

transformers ``generate`` with the KV cache, batched over prompts (left padding), ``K`` samples
per prompt: each prompt is prefilled once and its cache repeated for its ``K`` sample rows
(:func:`_prefill_once`; the same samples as ``K`` prefills, 1.5× faster on the default task and
3× on 256-token prompts: ``benchmarks/results/generation_prefill.md``). Reproducible whatever the batching: every sample
``(prompt i, sample j)`` draws its tokens from its own generator, seeded with a hash of
``(seed, i, j)`` (:func:`sample_seed`) — a logits processor samples each row's next token
(temperature, top-p) with the row's generator and leaves only that token for the greedy step.
So the samples of a prompt do not depend on the batch size, on which other prompts share its
batch, on how many processes split the prompts, or on whether the run was interrupted.
Text prompts are tokenised as ``tokenizer(prompt)`` gives them (the same as
:func:`inpo.data.tokenize_pair`), conversational prompts (message lists) through the chat
template with the generation prompt (:func:`inpo.data.encode_prompt`, the one place a prompt
becomes ids). A completion is the decoded new tokens up to the first end token — the tokenizer's
EOS or any ``eos_token_id`` of the model's ``generation_config.json`` (:func:`end_token_ids`) —
special tokens removed; a sample that stops at ``max_new_tokens`` is kept and flagged as
truncated (its log-probs are then scored without an end token: :func:`inpo.data.encode_completion`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from inpo.console import pulse
from inpo.data import encode_prompt
from inpo.modelparts import keeps_logits

__all__ = [
    "GenerationSettings",
    "GeometricMixture",
    "RowSampler",
    "end_token_ids",
    "generate_chunks",
    "sample_responses",
    "sample_seed",
]


@dataclass
class GenerationSettings:
    """Sampling settings (vLLM's and transformers' names)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16
    stop_token_ids: list[int] | None = None


def sample_seed(seed: int, index: int, sample: int = 0) -> int:
    """The seed of sample ``sample`` of the prompt at (global) index ``index``."""
    digest = hashlib.sha256(f"inpo-generate:{seed}:{index}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class RowSampler:
    """A transformers logits processor that samples every row with its own generator.

    Row ``r`` of the batch draws one uniform number per decoding step from
    ``torch.Generator().manual_seed(seeds[r])`` and takes the token where it falls in the
    row's temperature-scaled, top-p-truncated distribution (inverse CDF, in float64). The
    returned scores are ``-inf`` except at that token, so greedy decoding (``do_sample=False``)
    emits it. Temperature 0 leaves the scores as they are (greedy).
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float) -> None:
        import torch

        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature = float(temperature)
        self.top_p = float(top_p)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.temperature <= 0:
            return scores
        rows = scores.shape[0]
        if rows != len(self.generators):
            raise ValueError(f"RowSampler has {len(self.generators)} seeds for {rows} rows")
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])
        probs = torch.softmax(scores.double() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # mass of the more likely tokens
            sorted_p = sorted_p.masked_fill(before >= self.top_p, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        cdf = probs.cumsum(-1)
        target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
        token = torch.searchsorted(cdf, target, right=True).squeeze(-1)
        # a token of zero probability is never taken (the CDF is flat over it)
        token = token.clamp(max=scores.shape[-1] - 1)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(rows, device=scores.device), token] = 0.0
        return out


class GeometricMixture:
    """A logits processor that samples from the token-level geometric mixture
    ``π^β(y_n | ·) ∝ π(y_n | ·)^{1−β} π_mix(y_n | ·)^{β}`` (NLHF's Nash-MD sampler for LMs:
    the policy being generated from, and ``mix_model``, usually ``π_ref``), normalised per
    token. ``mix_model`` runs in lock-step with its own KV cache: the whole prompt (left
    padding as ``attn`` says) on the first call, then the last token each step. Placed before
    :class:`RowSampler`, which then samples each row's token from the mixture."""

    def __init__(self, mix_model: Any, beta: float, attn: Any) -> None:
        self.model = mix_model
        self.beta = float(beta)
        self.attn = attn  # [rows, prompt length] of the rows being generated
        self._last_logits = {"logits_to_keep": 1} if keeps_logits(mix_model) else {}
        self.cache = None
        self.mask = None
        self.positions = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        device = next(self.model.parameters()).device
        with torch.no_grad():
            if self.cache is None:
                self.mask = self.attn.to(device)
                pos = (self.mask.long().cumsum(-1) - 1).masked_fill(self.mask == 0, 1)
                out = self.model(
                    input_ids=input_ids.to(device),
                    attention_mask=self.mask,
                    position_ids=pos,
                    use_cache=True,
                    **self._last_logits,  # only the last position's are read
                )
                self.positions = pos[:, -1:]
            else:
                self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=-1)
                self.positions = self.positions + 1
                out = self.model(
                    input_ids=input_ids[:, -1:].to(device),
                    attention_mask=self.mask,
                    position_ids=self.positions,
                    use_cache=True,
                    **{_cache_kwarg(): self.cache},
                )
            self.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            mix = torch.log_softmax(out.logits[:, -1, :].double(), dim=-1)
        own = torch.log_softmax(scores.double(), dim=-1)
        vocab = min(own.shape[-1], mix.shape[-1])
        mixed = (1 - self.beta) * own[:, :vocab] + self.beta * mix.to(own.device)[:, :vocab]
        out_scores = torch.full_like(own, float("-inf"))
        out_scores[:, :vocab] = torch.log_softmax(mixed, dim=-1)
        return out_scores.to(scores.dtype)


#: Compute each prompt's prefill once for its K samples (``False``: K prefills, as
#: ``num_return_sequences`` does; kept for the benchmark that compares the two).
PREFILL_ONCE = True


#: Preallocate the KV cache (a ``StaticCache`` of prompt + ``max_new_tokens`` positions) where
#: the model supports one, instead of a cache that grows by concatenation every step (which
#: copies the whole cache each token: on CPU, a third of a step at 40M parameters). On CUDA
#: transformers would ``torch.compile`` the forward for a static cache, recompiling as the
#: chunks' prompt lengths change; ``generate_chunks`` turns that off (``disable_compile``): on
#: an H200 one iteration's generate stage of 768 samples × 96 tokens took 101 s with it (3
#: chunks: a compile and a dynamic-shape recompile, by all signs) while the evaluate stage,
#: reusing the graphs, took 4 s (benchmarks/results/gpu_iteration.md; not yet re-measured).
STATIC_CACHE = True


def _prefill_once(
    model: Any, ids: Any, attn: Any, k: int, device: Any, max_new_tokens: int = 0
) -> Any:
    """The KV cache of every prompt but its last token, from one forward over the ``B``
    prompts, repeated to the ``B·K`` sample rows (prompt-major); ``generate`` then runs only the
    last prompt token and the new ones. Positions as ``generate`` computes them under left
    padding. The cache is preallocated (:data:`STATIC_CACHE`) when the model supports it.
    ``None`` where none of this applies (``K = 1``, one-token prompts, a model without a
    ``Cache`` object), and ``generate`` prefills as usual."""
    if k < 2 or ids.shape[1] < 2:
        return None
    import torch
    from transformers import Cache

    positions = attn.long().cumsum(-1) - 1
    positions = positions.masked_fill(attn == 0, 1)

    def prefill(**extra: Any) -> Any:
        out = model(
            input_ids=ids[:, :-1].to(device),
            attention_mask=attn[:, :-1].to(device),
            position_ids=positions[:, :-1].to(device),
            use_cache=True,
            **extra,
        )
        return getattr(out, "cache", None) or getattr(out, "past_key_values", None)

    static = _static_cache(model, ids.shape[1] + max_new_tokens) if STATIC_CACHE else None
    if static is not None:
        prefill(**{_cache_kwarg(): static, "cache_position": torch.arange(ids.shape[1] - 1)})
        if _repeat_static(static, k):
            return static
        # a cache layout this code does not know: grow a plain one instead
    cache = prefill()
    if not isinstance(cache, Cache):
        return None
    cache.batch_repeat_interleave(k)
    return cache


def _static_cache(model: Any, length: int) -> Any:
    """A ``StaticCache`` of ``length`` positions for ``model``, or ``None`` where the model
    cannot take one."""
    if not getattr(model, "_can_compile_fullgraph", False):
        return None
    try:
        from transformers import StaticCache

        return StaticCache(config=model.config, max_cache_len=int(length))
    except (ImportError, TypeError, ValueError):
        return None


def _repeat_static(cache: Any, k: int) -> bool:
    """Repeat a filled ``StaticCache``'s rows ``k`` times (prompt-major), in place. ``False``
    (and the cache unchanged) if its layers are not the ``keys``/``values``/``batch_size``
    layout this expects."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(
        hasattr(layer, "keys") and hasattr(layer, "values") and hasattr(layer, "batch_size")
        for layer in layers
    ):
        return False
    for layer in layers:
        layer.keys = layer.keys.repeat_interleave(k, dim=0)
        layer.values = layer.values.repeat_interleave(k, dim=0)
        layer.batch_size *= k
    return True


def _cache_kwarg() -> str:
    """``generate``'s name for a ready KV cache: ``cache`` (transformers ≥ 5.2x) or
    ``past_key_values`` (before; deprecated after)."""
    try:
        from transformers.generation.utils import ALL_CACHE_NAMES
    except ImportError:
        return "past_key_values"
    return "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"


def end_token_ids(tokenizer: Any, generation_config: Any = None, extra: Any = None) -> list[int]:
    """The ids that end a response: the tokenizer's EOS, every ``eos_token_id`` of the model's
    ``generation_config.json`` (a chat model lists its end-of-turn token there, e.g. Llama 3's
    ``<|eot_id|>``) and ``extra``; in that order, without repeats."""
    ids: list[Any] = [tokenizer.eos_token_id]
    eos = getattr(generation_config, "eos_token_id", None)
    ids += list(eos) if isinstance(eos, list | tuple) else [eos]
    ids += list(extra or [])
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


def _encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
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
    indices: Sequence[int] | None = None,
    mixture: tuple[Any, float] | None = None,
) -> Iterator[tuple[int, list[list[str]], int]]:
    """Yield ``(chunk_start, samples, truncated)`` per chunk of prompts, from ``start_chunk``.

    ``truncated[i][j]`` is true when sample ``j`` of prompt ``chunk_start + i`` was cut at
    ``max_new_tokens`` (no end token generated); ``samples[i]`` holds the ``k`` completions of prompt ``chunk_start + i``. ``indices[i]``
    is prompt ``i``'s index in the whole prompt list (default ``i``): it, with ``seed``, seeds
    the prompt's samples (:func:`sample_seed`), so a shard of the prompts gets the samples the
    whole list would.
    ``mixture=(model, β)``: sample from the token-level geometric mixture of ``model`` (the one
    generating) and this one (:class:`GeometricMixture`; Nash-MD's sampler).
    """
    import torch
    from transformers import LogitsProcessorList

    indices = list(range(len(prompts))) if indices is None else list(indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    bs = max(1, settings.batch_size)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = end_token_ids(
        tokenizer, getattr(model, "generation_config", None), settings.stop_token_ids
    )
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
            sampler = RowSampler(
                [
                    sample_seed(seed, indices[start + r], j)
                    for r in range(len(chunk))
                    for j in range(k)
                ],
                settings.temperature,
                settings.top_p,
            )
            with torch.no_grad():
                # the prompts' KV cache computed once and repeated for their K samples
                cache = (
                    _prefill_once(model, ids, attn, k, device, settings.max_new_tokens)
                    if PREFILL_ONCE
                    else None
                )
                # K rows a prompt (prompt-major), each sampled with its own generator
                out = model.generate(
                    input_ids=ids.repeat_interleave(k, dim=0).to(device),
                    attention_mask=attn.repeat_interleave(k, dim=0).to(device),
                    do_sample=False,  # RowSampler samples; greedy takes its token
                    logits_processor=LogitsProcessorList(
                        [
                            *(
                                []
                                if mixture is None
                                else [
                                    GeometricMixture(
                                        mixture[0], mixture[1], attn.repeat_interleave(k, dim=0)
                                    )
                                ]
                            ),
                            sampler,
                            TokenCounter(eos, length),
                        ]
                    ),
                    max_new_tokens=settings.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=int(pad),
                    use_cache=True,
                    disable_compile=True,  # see STATIC_CACHE
                    **({_cache_kwarg(): cache} if cache is not None else {}),
                )
            new = out[:, length:].cpu()
            samples: list[list[str]] = []
            truncated: list[list[bool]] = []
            for r in range(len(chunk)):
                row, cut = [], []
                for j in range(k):
                    toks = new[r * k + j].tolist()
                    stop = next((i for i, t in enumerate(toks) if t in eos), None)
                    cut.append(stop is None)
                    if stop is not None:
                        toks = toks[:stop]
                    row.append(tokenizer.decode(toks, skip_special_tokens=True))
                samples.append(row)
                truncated.append(cut)
            yield start, samples, truncated
    finally:
        model.train(was_training)


class TokenCounter:
    """A logits processor that changes nothing and counts the tokens generated so far in the
    batch (rows that have not ended), reported by :func:`inpo.console.pulse` — a batch that
    takes minutes still shows progress."""

    def __init__(self, eos: Sequence[int], prompt_length: int) -> None:
        self.eos, self.start, self.tokens = list(eos), prompt_length, 0
        self.done = None

    def __call__(self, input_ids, scores):
        import torch

        if input_ids.shape[1] > self.start:  # the token just generated, per row
            last = input_ids[:, -1]
            ended = torch.isin(last, torch.tensor(self.eos, device=last.device))
            alive = ~self.done if self.done is not None else torch.ones_like(ended)
            self.tokens += int(alive.sum())
            self.done = ended if self.done is None else self.done | ended
            pulse(**{"tokens generated": self.tokens})
        return scores


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    k: int,
    settings: GenerationSettings | None = None,
    *,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    truncated: list[list[bool]] | None = None,
) -> list[list[str]]:
    """``k`` sampled completions for each prompt (see the module docstring); ``truncated``, when
    given, is extended with each prompt's cut-at-``max_new_tokens`` flags."""
    settings = settings or GenerationSettings()
    out: list[list[str]] = []
    for _start, samples, cut in generate_chunks(model, tokenizer, prompts, k, settings, seed=seed):
        out.extend(samples)
        if truncated is not None:
            truncated.extend(cut)
        if progress is not None:
            progress(len(samples))
    return out
