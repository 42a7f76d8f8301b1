"""One place that decides how a batch of pairs becomes forward passes, and computes its log-probs.

A *layout* is one of: right-padded rows (optionally cut into length buckets), packed rows without
padding, or one row ``prompt + chosen + rejected`` a pair (``share_prompt``, padded or packed).
:class:`Layout` chooses among them from the model, the device, the batch's width and the user's
settings (``data.packing``, ``data.share_prompt``, ``data.length_buckets``), checks that the
model computes the chosen layout exactly, and returns the ``[2B]`` summed completion log-probs
(chosen ``0..B-1``, rejected ``B..2B-1``). Training (``inpo train``), scoring (``inpo
precompute``) and evaluation (:func:`completion_logps`) all call it, so a layout is decided the
same way everywhere. The kernels themselves live in :mod:`inpo.logprobs` and :mod:`inpo.varlen`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from inpo.console import pulse
from inpo.data import encode_pair
from inpo.errors import ConfigError
from inpo.logprobs import (
    SHARED_PROMPT_ATTENTION,
    naive_sequence_logps,
    packed_sequence_logps,
    packed_shared_prompt_logps,
    sequence_logps,
    shared_prompt_logps,
    shared_prompt_mask,
)
from inpo.modelparts import final_hidden, parts, unwrap
from inpo.varlen import supports_varlen

__all__ = [
    "MIN_BUCKET_LENGTH",
    "MIN_PACK_LENGTH",
    "Layout",
    "bucketed_logps",
    "bucketed_shared_logps",
    "check_packing_support",
    "check_shared_prompt_support",
    "completion_logps",
    "packed_shared_logps",
    "packing_pays",
]

#: ``(model, input_ids, attention_mask, completion_mask) -> [N]`` summed completion log-probs.
LogpsFn = Callable[[Any, Tensor, Tensor, Tensor], Tensor]


@dataclass
class Layout:
    """How this job turns a collator batch into forward passes (see the module's docstring).

    Build it from the settings, then :meth:`check` it on the model (or :meth:`choose`: both).

    Attributes:
        share_prompt: one row ``prompt + chosen + rejected`` a pair (the collator's
            ``share_prompt`` batches).
        packing: ``True``/``False`` forced; ``None``: pack a batch of :data:`MIN_PACK_LENGTH`
            tokens or more where :func:`packing_pays` (probed once, at :meth:`probe` or at the
            first batch that long).
        length_buckets: padded rows cut into this many length-sorted groups; ``None``: per
            device and width (4 on CPU from :data:`MIN_BUCKET_LENGTH` tokens, else 1).
        logps_fn: padded rows' log-probs (default :func:`inpo.logprobs.sequence_logps`;
            :func:`inpo.logprobs.naive_sequence_logps` when sharded).
        chunk_size: the LM head's chunk (positions) for the default kernels; ``None``: theirs.
        setting: the name a refusal of ``packing=True`` gives the setting.
        device_type: where the model runs (``cpu``, ``cuda``, ...; set by :meth:`check`).
        sharded: FSDP or DeepSpeed shards the weights: one forward a micro-batch (a collective
            a layer), the LM head inside the model's forward, never packed by default.
    """

    share_prompt: bool = False
    packing: bool | None = None
    length_buckets: int | None = 1
    logps_fn: LogpsFn | None = None
    chunk_size: int | None = None
    setting: str = "data.packing"
    device_type: str = "cpu"
    sharded: bool = False
    _pays: bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.logps_fn is not None and self.share_prompt:
            raise ValueError(
                "logps_fn is not used with data.share_prompt=true; pass one or the other"
            )
        if self.logps_fn is not None and self.packing is True:
            raise ValueError("logps_fn is not used with data.packing=true; pass one or the other")

    def check(self, model: Any, *, device_type: str | None = None, sharded: bool = False) -> Layout:
        """Check that ``model`` computes what the settings force exactly (a
        :class:`~inpo.errors.ConfigError` naming the setting and why, else ``self``), and note
        where it runs: ``device_type`` (default: where its parameters are) and whether the
        engine shards it."""
        if self.share_prompt:
            check_shared_prompt_support(model)  # a ConfigError naming the architecture
        elif self.packing is True:
            try:
                check_packing_support(model)
            except ValueError as err:
                raise ConfigError(f"{self.setting}: {err}") from None
        self.device_type = device_type or next(model.parameters()).device.type
        self.sharded = sharded
        return self

    @classmethod
    def choose(cls, model: Any, **settings: Any) -> Layout:
        """``Layout(**settings).check(model)``: the layout for ``model`` where it is."""
        return cls(**settings).check(model)

    @property
    def auto_packing(self) -> bool:
        """Whether ``packing: null`` may pack here: not when sharded (the LM head must run
        inside the model's forward), not with a caller's ``logps_fn``, and not shared rows on
        a GPU (unmeasured there)."""
        if self.packing is not None or self.sharded or self.logps_fn is not None:
            return False
        return not (self.share_prompt and self.device_type != "cpu")

    def probe(self, model: Any) -> bool:
        """Decide ``packing: null`` now, on ``model`` as loaded (before a wrapper whose
        forward is a collective: every rank then probes at the same point); whether batches of
        :data:`MIN_PACK_LENGTH` tokens or more will run packed."""
        if self.auto_packing and self._pays is None:
            self._pays = packing_pays(model, self.device_type)
        return self.auto_packing and bool(self._pays)

    def packs(self, model: Any, width: int) -> bool:
        """Whether a batch ``width`` tokens wide runs packed."""
        if self.packing is not None:
            return self.packing
        if not self.auto_packing or width < MIN_PACK_LENGTH:
            return False
        if self._pays is None:
            self._pays = packing_pays(model, self.device_type)
        return self._pays

    def buckets(self, width: int, packed: bool) -> int:
        """Length groups for a padded batch ``width`` tokens wide (1 when sharded or packed:
        every rank must run as many forwards)."""
        if packed or self.sharded or self.packing is True:
            return 1
        if self.length_buckets is not None:
            return self.length_buckets
        return 4 if self.device_type == "cpu" and width >= MIN_BUCKET_LENGTH else 1

    def logps(self, model: Any, batch: dict[str, Tensor]) -> Tensor:
        """The ``[2B]`` summed completion log-probs of a collator batch on the model's device
        (chosen ``0..B-1``, rejected ``B..2B-1``)."""
        width = batch["input_ids"].shape[1]
        packed = self.packs(model, width)
        buckets = self.buckets(width, packed)
        if self.share_prompt and packed:
            return packed_shared_logps(model, batch)
        if self.share_prompt:
            return bucketed_shared_logps(model, batch, buckets=buckets)
        chunk = {} if self.chunk_size is None else {"chunk_size": self.chunk_size}
        rows = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        if packed:
            return packed_sequence_logps(model, *rows, **chunk)
        fn = self.logps_fn
        if fn is None and self.sharded:
            fn = naive_sequence_logps
        elif fn is None:
            fn = sequence_logps if not chunk else _chunked(self.chunk_size)
        return bucketed_logps(fn, model, *rows, buckets=buckets)


def _chunked(chunk_size: int) -> LogpsFn:
    def fn(model: Any, ids: Tensor, attn: Tensor, comp: Tensor) -> Tensor:
        return sequence_logps(model, ids, attn, comp, chunk_size=chunk_size)

    return fn


#: The longest sequence (tokens) from which a batch is packed by default (``data.packing: null``,
#: ``inpo precompute`` without ``--no-packing``), where :func:`packing_pays`. On CPU into one
#: row with attention one sequence at a time (:mod:`inpo.varlen`): from 64 tokens training beat
#: one padded pass and 4 length buckets on both models measured (1.08-1.63× one pass; below,
#: 0.54-0.99× on the default task's small model; benchmarks/results/length_buckets.md); scoring
#: 1.80× padded (packing_forward.md). On a CUDA GPU into rows as long as the longest sequence,
#: measured at 32-384-token completions (1.18× padded in both rounds, bf16, Qwen2-0.5B sizes,
#: packing_gpu.md); below 64 tokens it is unmeasured there and rows stay padded.
MIN_PACK_LENGTH = 64


def packing_pays(model: Any, device: str | None = None) -> bool:
    """Whether packing measured faster than padding for ``model`` on ``device`` (a device type;
    default: where its parameters are), and is exact.

    On CPU when variable-length attention gives the model's own hidden states
    (:func:`inpo.varlen.supports_varlen`); on a CUDA GPU when its attention keeps packed
    sequences apart (:func:`check_packing_support`: masked rows); never on other devices. The
    probe runs in eval mode (no dropout) and gives the model its mode back.
    """
    kind = device or next(model.parameters()).device.type
    if kind == "cpu":
        return supports_varlen(model)
    if kind != "cuda":
        return False
    was_training = model.training
    model.eval()
    try:
        check_packing_support(model)
        return True
    except Exception:  # any model the probe cannot run stays padded
        return False
    finally:
        model.train(was_training)


def check_packing_support(model: Any) -> None:
    """Raise ``ValueError`` unless ``model``'s attention keeps packed sequences apart.

    A probe of two 3-token sequences: the second one's final hidden states alone and packed
    after the first must agree (a model whose mask code ignored restarting position ids would
    let the second attend to the first; Llama, Qwen2 and GPT-2 pass in transformers 5).
    """
    import torch

    backbone, _, _ = parts(model)
    param = next(model.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]], device=param.device)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]], device=param.device)
    with torch.no_grad():
        alone = final_hidden(model, backbone, ids[:, 3:], None, pos[:, 3:]).float()
        packed = final_hidden(model, backbone, ids, None, pos)[:, 3:].float()
    scale = alone.abs().max().clamp(min=1e-6)
    if float((alone - packed).abs().max() / scale) > 1e-2:
        arch = type(unwrap(model)).__name__
        raise ValueError(
            f"{arch} lets packed sequences attend to each other (its attention ignores "
            "restarting position ids), so data.packing=true would mix pairs; use "
            "data.packing=false for it"
        )


def check_shared_prompt_support(model: torch.nn.Module) -> None:
    """Raise a ConfigError naming the architecture unless ``data.share_prompt`` is exact for it.

    Prompt sharing passes a prepared 4D attention mask and explicit position ids
    (:func:`inpo.logprobs.shared_prompt_logps`). transformers' ``create_causal_mask`` returns a
    4D mask as is for ``sdpa`` and ``eager`` attention; sliding-window layers would lose their
    window under it, and an architecture could ignore either input. So, besides those static
    checks, one tiny pair is scored both ways (no grad, eval mode) and must agree.
    """
    inner = unwrap(model)
    arch = type(inner).__name__
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else None
    config = config if config is not None else inner.config
    impl = getattr(inner.config, "_attn_implementation", None)
    if impl not in SHARED_PROMPT_ATTENTION:
        raise ConfigError(
            f"data.share_prompt=true: {arch} runs attention '{impl}', which takes no custom 4D "
            f"attention mask; set model.attn_implementation to one of {SHARED_PROMPT_ATTENTION} "
            "or data.share_prompt=false"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "layer_types", None) is None and getattr(config, "sliding_window", None):
        if getattr(config, "use_sliding_window", True):  # a config without per-layer types
            layer_types.add("sliding_attention")
    if layer_types != {"full_attention"}:
        raise ConfigError(
            f"data.share_prompt=true is not supported for {arch}: its layers "
            f"{sorted(layer_types)} are not all full attention (a 4D mask would drop their "
            "window); set data.share_prompt=false"
        )
    device = next(model.parameters()).device
    vocab = int(inner.get_input_embeddings().weight.shape[0])
    # c > r: pad the rejected row; long enough for flex attention's CPU kernels (>= 16 a block)
    prompt, chosen, rejected = list(range(1, 25)), list(range(25, 45)), list(range(45, 57))
    ids = [t % vocab for t in prompt + chosen + rejected]
    p, c, r = len(prompt), len(chosen), len(rejected)
    one = torch.ones(1, p + c + r, dtype=torch.long, device=device)
    chosen_mask = torch.zeros_like(one)
    chosen_mask[0, p : p + c] = 1
    rejected_mask = torch.zeros_like(one)
    rejected_mask[0, p + c :] = 1
    positions = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])[None].to(device)
    separate = torch.tensor([ids[: p + c], ids[:p] + ids[p + c :] + [0] * (c - r)], device=device)
    attn = torch.tensor([[1] * (p + c), [1] * (p + r) + [0] * (c - r)], device=device)
    comp = torch.tensor([[0] * p + [1] * c, [0] * p + [1] * r + [0] * (c - r)], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = sequence_logps(model, separate, attn, comp)
            mask = shared_prompt_mask(one, chosen_mask, rejected_mask)
            got = shared_prompt_logps(
                model,
                torch.tensor([ids], device=device),
                mask,
                positions,
                chosen_mask,
                rejected_mask,
                one,
            )
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"data.share_prompt=true is not supported for {arch}: {err}") from err
    finally:
        model.train(was_training)
    low = inner.get_input_embeddings().weight.dtype in (torch.bfloat16, torch.float16)
    tol = 0.05 if low else 1e-3
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        raise ConfigError(
            f"data.share_prompt=true is not supported for {arch}: its forward does not honour a "
            f"custom 4D attention mask / position ids (shared {got.tolist()} vs separate "
            f"{want.tolist()}); set data.share_prompt=false"
        )


def bucketed_logps(
    logps_fn: LogpsFn,
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    buckets: int,
) -> torch.Tensor:
    """``logps_fn`` on length-sorted groups of the ``N`` right-padded sequences, each group cut
    to its own longest sequence: the same ``[N]`` log-probs with less padding computed.

    Exact for right padding under a causal mask (a real token never attends to padding on its
    right). ``buckets`` groups of about equal size (``1``: one call on the whole batch).
    """
    n = input_ids.shape[0]
    if buckets <= 1 or n <= 1:
        return logps_fn(model, input_ids, attention_mask, completion_mask)
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True)
    out = torch.zeros(n, device=input_ids.device)
    for group in torch.tensor_split(order, min(buckets, n)):
        width = int(lengths[group].max())
        lp = logps_fn(
            model,
            input_ids[group, :width],
            attention_mask[group, :width],
            completion_mask[group, :width],
        )
        out = out.index_add(0, group, lp.float())
    return out


def bucketed_shared_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, buckets: int
) -> torch.Tensor:
    """:func:`inpo.logprobs.shared_prompt_logps` on a ``share_prompt`` collator batch of ``B``
    right-padded rows ``prompt + chosen + rejected``, run as length-sorted groups each cut to
    its longest row. Returns ``[2B]``: chosen ``0..B-1``, rejected ``B..2B-1``.

    ``buckets`` counts groups of the ``2B`` *unshared* sequences (``data.length_buckets``); the
    ``B`` shared rows go in ``max(1, buckets // 2)`` groups, so a forward pass holds about as
    many rows either way (single-row passes measured slower on CPU).
    """
    attention_mask = batch["attention_mask"]
    b = attention_mask.shape[0]
    lengths = attention_mask.sum(-1)
    order = torch.argsort(lengths, descending=True, stable=True)
    groups = torch.tensor_split(order, min(max(1, buckets // 2), b))
    out = torch.zeros(2 * b, device=attention_mask.device)
    for group in groups:
        width = int(lengths[group].max()) if len(groups) > 1 else attention_mask.shape[1]
        cut = {
            k: batch[k][group, :width]
            for k in ("input_ids", "attention_mask", "position_ids", "chosen_mask", "rejected_mask")
        }
        mask = shared_prompt_mask(cut["attention_mask"], cut["chosen_mask"], cut["rejected_mask"])
        lp = shared_prompt_logps(
            model,
            cut["input_ids"],
            mask,
            cut["position_ids"],
            cut["chosen_mask"],
            cut["rejected_mask"],
            cut["attention_mask"],
        )
        out = out.index_add(0, torch.cat([group, group + b]), lp.float())
    return out


def packed_shared_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`inpo.logprobs.packed_shared_prompt_logps` on a ``share_prompt`` collator batch
    (``data.share_prompt`` with ``data.packing``). Returns ``[2B]`` as
    :func:`bucketed_shared_logps` does."""
    keys = ("input_ids", "position_ids", "chosen_mask", "rejected_mask", "attention_mask")
    return packed_shared_prompt_logps(model, *(batch[k] for k in keys)).float()


#: The longest row (tokens) from which a CPU micro-batch is cut into length buckets by
#: default: below it one padded pass is faster (each pass has a fixed cost; 4 buckets measured
#: 0.35-0.70× of one pass at 8-32 tokens, 1.10-1.39× from 128 on a 10M model,
#: benchmarks/results/length_buckets.md).
MIN_BUCKET_LENGTH = 128


def completion_logps(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    packing: bool | None = None,
    ended: Sequence[bool] | None = None,
) -> Tensor:
    """Summed log-probs ``log π(completion | prompt)`` of ``n`` pairs, float32 ``[n]``, no grad.

    ``ended[i] = False`` scores completion ``i`` as a sample cut at ``max_new_tokens``, without
    an end token (:func:`inpo.data.encode_completion`); default: every completion ended.

    Tokenisation is :func:`inpo.data.tokenize_pair`'s: text prompts as ``tokenizer(prompt)``
    gives them, text completions without special tokens plus EOS; conversational prompts and
    completions (message lists) through the chat template. Pairs are sorted by length and scored
    ``batch_size`` at a time on the model's device; the model is put in eval mode for the call
    and restored afterwards. ``packing``: score a batch as padding-free rows
    (:func:`packed_sequence_logps`; the same values up to float rounding); ``None`` (default):
    the batches of :data:`MIN_PACK_LENGTH` tokens or more where :func:`packing_pays` (as
    ``inpo precompute`` does), ``False``: right-padded rows always.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(prompts)
    result = torch.zeros(n, dtype=torch.float32)
    if n == 0:
        return result
    ended = [True] * n if ended is None else [bool(e) for e in ended]
    if len(ended) != n:
        raise ValueError(f"{len(ended)} ended flags for {n} completions")
    encoded = [
        encode_pair(
            tokenizer,
            p,
            c,
            max_prompt_length=max_prompt_length,
            max_completion_length=max_completion_length,
            ended=e,
        )
        for p, c, e in zip(prompts, completions, ended, strict=True)
    ]
    for e in encoded:
        if not e.prompt_ids:
            raise ValueError("a prompt tokenises to no tokens; nothing conditions the completion")
    order = sorted(
        range(n), key=lambda i: len(encoded[i].prompt_ids) + len(encoded[i].completion_ids)
    )
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = int(pad) if pad is not None else 0
    was_training = model.training
    model.eval()
    try:
        layout = Layout.choose(model, packing=packing, setting="packing")
        with torch.no_grad():
            for start in range(0, n, batch_size):
                pulse(**{"sequences scored": f"{start}/{n}"})
                idx = order[start : start + batch_size]
                seqs = [encoded[i] for i in idx]
                length = max(len(s.prompt_ids) + len(s.completion_ids) for s in seqs)
                ids = torch.full((len(seqs), length), pad, dtype=torch.long)
                attn = torch.zeros_like(ids)
                comp = torch.zeros_like(ids)
                for r, s in enumerate(seqs):
                    full = s.prompt_ids + s.completion_ids
                    ids[r, : len(full)] = torch.tensor(full)
                    attn[r, : len(full)] = 1
                    comp[r, len(s.prompt_ids) : len(full)] = 1
                batch = {"input_ids": ids, "attention_mask": attn, "completion_mask": comp}
                lp = layout.logps(model, {k: v.to(device) for k, v in batch.items()})
                result[torch.tensor(idx)] = lp.cpu()
    finally:
        model.train(was_training)
    return result
