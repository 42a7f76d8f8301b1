"""Variable-length attention for packed rows: each sequence attends only to itself, no mask.

Packing concatenates a micro-batch's sequences into rows with position ids restarting at 0 for
each one. transformers then keeps them apart with a dense block-diagonal mask per row under
``sdpa``/``eager`` (``masking_utils.find_packed_sequence_indices``), which computes every
``row × row`` score, and rows had to stay as short as the longest sequence to bound that (so
first-fit packing left about a fifth of each row as filler on the benchmark's data).
``flash_attention_2`` has true variable-length kernels, but only on GPUs.

:func:`varlen_sdpa_attention` is the CPU counterpart, registered with transformers'
``AttentionInterface`` under :data:`VARLEN_ATTENTION`: it reads the segments off the position
ids and runs ``scaled_dot_product_attention`` once per segment (causal, no mask), so a whole
micro-batch fits one row with no filler and attention costs ``Σ len²`` instead of
``rows × width²``. A segment may *branch* once, as a shared-prompt pair ``prompt + chosen +
rejected`` does (positions ``0..p-1, p..p+c-1, p..p+r-1``): tokens after the branch attend to
the first ``p`` tokens (the prompt) and causally to themselves, never to the chosen answer.

Measured on 2 CPU cores in fp32: forward + backward of the log-probs 1.58× the padded batch
against 1.26× for masked rows (``benchmarks/results/packing.md``); ``inpo train`` with
``data.packing`` 2,493 tokens/s against 1,926 before, 65-68% of the matmul peak
(``benchmarks/results/train_throughput.md``).

On CUDA in bf16 or fp16 the same plan runs as one call of torch's variable-length flash
kernel (``torch.nn.attention.varlen.varlen_attn``, :func:`varlen_index`); no GPU has measured it
yet, so on GPUs it runs only when asked for (``varlen=True``).

It is switched on only around a packed forward (:func:`varlen_attention`) and only for models
:func:`supports_varlen` has checked on a probe: the architecture must route attention through
``AttentionInterface`` and pass ``position_ids`` to it (Llama, Qwen2, GPT-2 and window-less
Mistral in transformers 5 do), with no sliding window, soft-capping or attention sinks.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

from inpo.modelparts import final_hidden, parts, unwrap

#: The name :func:`varlen_sdpa_attention` is registered under in ``AttentionInterface``. No
#: mask function is registered with it, so transformers builds no mask for it.
VARLEN_ATTENTION = "inpo_varlen_sdpa"

#: ``(model, attention implementation) -> supported``, filled by :func:`supports_varlen`.
_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class VarlenUnsupported(ValueError):
    """The model called varlen attention with something it cannot honour."""


def _segments(positions: list[int]) -> list[tuple[int, int, int, int]]:
    """``(start, branch, end, prefix)`` of each segment of one row's position ids.

    A segment starts where the position is 0; positions then count up by one, except at most
    once (the *branch*) where they step back to ``prefix`` (``0 < prefix``): tokens from there
    on see the segment's first ``prefix`` tokens and themselves. ``branch == end`` when there is
    none.
    """
    if not positions or positions[0] != 0:
        raise VarlenUnsupported("varlen attention: a packed row must start at position 0")
    out: list[tuple[int, int, int, int]] = []
    start, branch, prefix = 0, -1, 0
    for t in range(1, len(positions) + 1):
        p = positions[t] if t < len(positions) else 0
        if p == 0:
            out.append((start, branch if branch >= 0 else t, t, prefix))
            start, branch, prefix = t, -1, 0
        elif p != positions[t - 1] + 1:
            if branch >= 0 or p > t - start:
                raise VarlenUnsupported(
                    f"varlen attention: position ids branch twice or past the prefix at {t}"
                )
            branch, prefix = t, p
    return out


_PLAN: list[Any] = [None, None]  # (position_ids tensor, plan): all layers of a forward share it


def _plan(position_ids: Any, rows: int, length: int) -> list[list[tuple[int, int, int, int]]]:
    """The segments of each of ``rows`` rows (``position_ids`` ``[rows | 1, length]``), worked
    out once per forward: every layer gets the same ``position_ids`` tensor."""
    if _PLAN[0] is not position_ids:
        plan = [_segments(r) for r in position_ids.reshape(-1, length).tolist()]
        _PLAN[0], _PLAN[1] = position_ids, plan
    plan = _PLAN[1]
    return plan * rows if len(plan) == 1 and rows > 1 else plan


def varlen_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_ids: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers attention function (``[B, H, T, D]`` in, ``[B, T, H, D]`` out) running
    ``scaled_dot_product_attention`` once per packed segment, as read off ``position_ids``."""
    import torch
    import torch.nn.functional as F

    for name in ("softcap", "s_aux", "sinks", "sliding_window", "position_bias"):
        if kwargs.get(name) is not None:
            raise VarlenUnsupported(f"varlen attention: the model passes {name}")
    if position_ids is None:
        raise VarlenUnsupported("varlen attention: the model does not pass position_ids")
    if query.shape[2] != key.shape[2] or position_ids.shape[-1] != query.shape[2]:
        raise VarlenUnsupported("varlen attention: a cache or mismatched lengths")
    gqa = query.shape[1] != key.shape[1]
    plan = _plan(position_ids, query.shape[0], query.shape[2])
    if _flash_varlen_usable(query, dropout):
        return _flash_varlen(query, key, value, plan, scaling), None
    rows = []
    for b, segments in enumerate(plan):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        outs = []
        for start, branch, end, prefix in segments:
            outs.append(
                F.scaled_dot_product_attention(
                    q[:, :, start:branch],
                    k[:, :, start:branch],
                    v[:, :, start:branch],
                    dropout_p=dropout,
                    scale=scaling,
                    is_causal=True,
                    enable_gqa=gqa,
                )
            )
            if branch < end:  # after the branch: the prefix, then causal over themselves
                n = end - branch
                keys = torch.cat([k[:, :, start : start + prefix], k[:, :, branch:end]], 2)
                values = torch.cat([v[:, :, start : start + prefix], v[:, :, branch:end]], 2)
                seen = torch.ones(n, prefix + n, dtype=torch.bool, device=q.device).tril(prefix)
                outs.append(
                    F.scaled_dot_product_attention(
                        q[:, :, branch:end],
                        keys,
                        values,
                        attn_mask=seen,
                        dropout_p=dropout,
                        scale=scaling,
                        enable_gqa=gqa,
                    )
                )
        rows.append(torch.cat(outs, 2) if len(outs) > 1 else outs[0])
    out = torch.cat(rows, 0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def varlen_index(
    plan: list[list[tuple[int, int, int, int]]], length: int
) -> tuple[list[int], list[int], list[int]]:
    """The plan as variable-length attention's inputs over the ``rows × length`` flattened
    tokens: ``(kv_index, cu_q, cu_k)``.

    Queries stay in token order, cut at each segment's start, branch and end (``cu_q``). Keys
    and values are gathered by ``kv_index``: a segment's tokens before its branch, then for
    the tokens after it the segment's first ``prefix`` tokens followed by their own (``cu_k``),
    so with *bottom-right* causal alignment (a query ``i`` of ``n`` sees keys up to
    ``i + len_k - n``) the tokens after a branch see the prompt and themselves.
    """
    kv_index: list[int] = []
    cu_q, cu_k = [0], [0]
    for r, segments in enumerate(plan):
        o = r * length
        for start, branch, end, prefix in segments:
            kv_index += range(o + start, o + branch)
            cu_q.append(o + branch)
            cu_k.append(len(kv_index))
            if branch < end:
                kv_index += range(o + start, o + start + prefix)
                kv_index += range(o + branch, o + end)
                cu_q.append(o + end)
                cu_k.append(len(kv_index))
    return kv_index, cu_q, cu_k


def _flash_varlen_usable(query: Any, dropout: float) -> bool:
    """torch's variable-length flash kernel (``torch.nn.attention.varlen``, CUDA only, fp16 and
    bf16) for a CUDA query without dropout; otherwise one ``sdpa`` call a segment."""
    import torch

    if not query.is_cuda or dropout or query.dtype not in (torch.float16, torch.bfloat16):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def _flash_varlen(query: Any, key: Any, value: Any, plan: list, scaling: float | None) -> Any:
    """All segments in one ``varlen_attn`` call: ``[B, H, T, D]`` in, ``[B, T, H, D]`` out.
    Not measured yet (no GPU lent; ``benchmarks/packing.py --device cuda`` checks and times
    it as ``packed-varlen``), so nothing selects it by default."""
    import inspect

    import torch
    from torch.nn.attention.varlen import varlen_attn

    b, h, t, d = query.shape
    kv_index, cu_q, cu_k = varlen_index(plan, t)
    device = query.device
    q = query.transpose(1, 2).reshape(b * t, h, d)
    index = torch.tensor(kv_index, device=device)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d).index_select(0, index)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d).index_select(0, index)
    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {"scale": scaling}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)  # causal
    else:
        kwargs["is_causal"] = True
    if k.shape[1] != h:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k = k.repeat_interleave(h // k.shape[1], 1)
            v = v.repeat_interleave(h // v.shape[1], 1)
    lq = [y - x for x, y in pairwise(cu_q)]
    lk = [y - x for x, y in pairwise(cu_k)]
    out = varlen_attn(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        torch.tensor(cu_q, device=device, dtype=torch.int32),
        torch.tensor(cu_k, device=device, dtype=torch.int32),
        max(lq),
        max(lk),
        **kwargs,
    )
    return out.reshape(b, t, h, d)


def register() -> None:
    """Register :func:`varlen_sdpa_attention` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)


def _config(model: Any) -> Any:
    return unwrap(model).config


@contextmanager
def varlen_attention(model: Any):
    """Within the block, ``model`` runs :func:`varlen_sdpa_attention` (its forward passes must
    be packed rows with restarting position ids and no mask); restored on exit.

    Only for a model without activation checkpointing: a recomputation in the backward runs
    after the block, under the original attention.
    """
    register()
    config = _config(model)
    old = config._attn_implementation
    config._attn_implementation = VARLEN_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = old
        _PLAN[0] = _PLAN[1] = None


def _checkpointed(model: Any) -> bool:
    """Activation checkpointing on any module (transformers' flag, or torch's checkpoint
    wrappers as accelerate's FSDP plugin applies them)."""
    return any(
        getattr(m, "gradient_checkpointing", False) is True
        or type(m).__name__ == "CheckpointWrapper"
        for m in model.modules()
    )


def supports_varlen(model: Any) -> bool:
    """Whether ``model`` gives the same hidden states under :func:`varlen_attention` on packed
    rows as under its own attention on the sequences alone (cached per model).

    A probe, no grad, in eval mode: two sequences packed in one row, and a branched segment
    ``prompt + chosen + rejected`` against ``prompt + rejected`` alone. False for a model that
    raises :class:`VarlenUnsupported` (no position ids reach attention, a sliding window, ...),
    disagrees, or has activation checkpointing on.
    """
    import torch

    inner = unwrap(model)
    impl = inner.config._attn_implementation
    cached = _SUPPORT.get(inner)
    if cached is not None and cached[0] == impl:
        return cached[1]
    ok = impl in ("sdpa", "eager") and not _checkpointed(inner)
    if ok:
        backbone, _, _ = parts(model)
        device = next(model.parameters()).device
        vocab = inner.get_input_embeddings().num_embeddings
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]], device=device) % vocab
        packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3]], device=device)
        branched = torch.tensor([[0, 1, 2, 3, 4, 3, 4]], device=device)
        ones = torch.ones_like(ids)
        was_training = inner.training
        inner.eval()
        try:
            with torch.no_grad():
                alone = final_hidden(model, backbone, ids[:, 3:], ones[:, 3:]).float()
                pr = torch.cat([ids[:, :3], ids[:, 5:]], 1)
                prompt_rejected = final_hidden(model, backbone, pr, ones[:, :5]).float()
                with varlen_attention(model):
                    got = final_hidden(model, backbone, ids, None, packed)[:, 3:].float()
                    got_branch = final_hidden(model, backbone, ids, None, branched).float()
            scale = alone.abs().max().clamp(min=1e-6)
            ok = (
                float((alone - got).abs().max() / scale) < 1e-2
                and float((prompt_rejected[:, 3:] - got_branch[:, 5:]).abs().max() / scale) < 1e-2
            )
        except (VarlenUnsupported, RuntimeError, ValueError, IndexError, NotImplementedError):
            ok = False  # a model the probe cannot even run keeps the masked path
        finally:
            inner.train(was_training)
    _SUPPORT[inner] = (impl, ok)
    return ok


def use_varlen(model: Any, varlen: bool | None) -> bool:
    """Resolve a ``varlen`` argument: ``None`` is True on CPU for a model that
    :func:`supports_varlen`; ``True`` raises ``ValueError`` for one that does not."""
    if varlen is None:
        device = next(model.parameters()).device
        return device.type == "cpu" and supports_varlen(model)
    if varlen and not supports_varlen(model):
        raise ValueError(
            f"varlen attention is not exact for {type(unwrap(model)).__name__} (its attention "
            "does not take packed position ids, or uses a sliding window, soft-capping or "
            "activation checkpointing)"
        )
    return bool(varlen)
