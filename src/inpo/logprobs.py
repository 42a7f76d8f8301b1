"""Exact summed completion log-probs ``log π(y | x) = Σ_t log π(y_t | x, y_<t)`` (SPEC.md, Notation).

The memory-hungry part of a causal LM's loss is the ``[N, L, V]`` logits tensor (and its
log-softmax copy). :func:`sequence_logps` never builds it: it runs the model's *backbone* to get the
final hidden states ``[N, L, H]``, keeps only the ``M`` positions that predict a completion token
(``[M, H]``, ``M ≈`` completion tokens in the batch), and applies the LM head + ``logsumexp`` in
chunks of ``chunk_size`` positions in float32.

Two head paths compute the same numbers:

* **fused** (a bare ``nn.Linear`` head, the usual case): an autograd function whose forward keeps
  no logits and whose backward recomputes each ``[chunk_size, V]`` chunk and turns it in place
  into ``∂L/∂logits = g · (onehot − softmax)``; about one such buffer is alive at a time.
* **generic** (any other head module: a LoRA-wrapped ``lm_head``, offloading hooks, quantised
  layers): each chunk runs under activation checkpointing; a few ``[chunk_size, V]`` temporaries
  are alive in its backward.

Either way the head's matmul runs once more in the backward. ``benchmarks/logprobs_memory.py``
measures the peak memory and time of both against the full-logits computation.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, NamedTuple

from inpo.modelparts import (
    attn_implementation,
    default_position_ids,
    final_hidden,
    logit_transform,
    parts,
    postprocess,
    unwrap,
)
from inpo.varlen import use_varlen, varlen_attention

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "SHARED_PROMPT_ATTENTION",
    "naive_sequence_logps",
    "pack_rows",
    "packed_sequence_logps",
    "sequence_logps",
    "shared_prompt_block_mask",
    "shared_prompt_logps",
    "shared_prompt_mask",
]


def _check_shapes(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> None:
    if input_ids.shape != attention_mask.shape or input_ids.shape != completion_mask.shape:
        raise ValueError(
            f"shape mismatch: input_ids {tuple(input_ids.shape)}, attention_mask "
            f"{tuple(attention_mask.shape)}, completion_mask {tuple(completion_mask.shape)}"
        )


def _targets(
    input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Positions predicting a completion token: ``(rows [M], positions [M], target ids [M])``.

    The token at position ``t`` is predicted by the hidden state at ``t - 1``.
    """
    import torch

    completion = completion_mask.bool() & attention_mask.bool()
    if completion[:, 0].any():
        raise ValueError(
            "completion_mask is set on a sequence's first position: the first completion token "
            "needs at least one prompt token before it"
        )
    rows, pos = torch.nonzero(completion[:, 1:], as_tuple=True)
    if rows.numel():
        prev_real = attention_mask.bool()[rows, pos]
        if not bool(prev_real.all()):
            raise ValueError("a completion token follows a padding position (masks disagree)")
    return rows, pos, input_ids[:, 1:][rows, pos]


def _chunk_logps(head: Any, post: Any, compute_dtype: Any, hidden: Tensor, target: Tensor):
    """``log softmax(head(hidden))[target]`` for one chunk: ``[C, H], [C] -> [C]``."""
    logits = post(head(hidden).to(compute_dtype))
    picked = logits.gather(-1, target[:, None]).squeeze(-1)
    return picked - logits.logsumexp(-1)


def _is_plain_linear(head: Any) -> bool:
    """A bare ``nn.Linear`` head (no LoRA wrapper, quantised subclass or offloading hooks)."""
    import torch

    return (
        type(head) is torch.nn.Linear
        and not head._forward_hooks
        and not head._forward_pre_hooks
        and not hasattr(head, "_hf_hook")
    )


def _fused_head_logps():
    """Build the ``torch.autograd.Function`` lazily (``torch`` is imported inside functions)."""
    import torch
    import torch.nn.functional as F

    def logits_of(h, weight, bias, scale, softcap, dtype):
        """Raw head output → the architecture's logits, ``[C, V]`` in ``dtype`` (a fresh buffer).

        Also returns ``tanh(·)`` of the soft-cap when there is one (for its derivative).
        """
        z = F.linear(h, weight, bias).to(dtype)  # a fresh buffer: safe to modify in place
        if scale is not None:
            z.mul_(scale)
        tanh = None
        if softcap is not None:
            tanh = z.div_(softcap).tanh_()
            z = tanh.mul(softcap)
        return z, tanh

    class FusedHeadLogps(torch.autograd.Function):
        """``logp[m] = log softmax(post(h[m] @ Wᵀ + b))[target[m]]`` for ``M`` positions, chunked.

        The forward keeps no logits; the backward recomputes one ``[C, V]`` chunk at a time and
        turns it into ``∂L/∂z = g · (onehot − softmax)`` in place (one ``[C, V]`` buffer, two with
        soft-capping), then ``∂L/∂h = (∂L/∂z) W`` and ``∂L/∂W += (∂L/∂z)ᵀ h``.
        """

        @staticmethod
        def forward(ctx, hidden, weight, bias, target, chunk_size, scale, softcap, dtype):
            out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
            for s in range(0, hidden.shape[0], chunk_size):
                z, _ = logits_of(hidden[s : s + chunk_size], weight, bias, scale, softcap, dtype)
                picked = z.gather(-1, target[s : s + chunk_size, None]).squeeze(-1)
                zmax = z.amax(-1, keepdim=True)
                lse = zmax.squeeze(-1) + z.sub_(zmax).exp_().sum(-1).log()
                out[s : s + chunk_size] = picked - lse
                del z
            ctx.save_for_backward(hidden, weight, bias, target)
            ctx.config = (chunk_size, scale, softcap, dtype)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            hidden, weight, bias, target = ctx.saved_tensors
            chunk_size, scale, softcap, dtype = ctx.config
            need_h, need_w, need_b = ctx.needs_input_grad[:3]
            grad_h = torch.empty_like(hidden) if need_h else None
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            grad_b = (
                torch.zeros(bias.shape, dtype=acc, device=bias.device)
                if need_b and bias is not None
                else None
            )
            for s in range(0, hidden.shape[0], chunk_size):
                h = hidden[s : s + chunk_size]
                z, tanh = logits_of(h, weight, bias, scale, softcap, dtype)
                z.sub_(z.amax(-1, keepdim=True)).exp_()
                z.div_(z.sum(-1, keepdim=True))  # softmax p
                rows = torch.arange(z.shape[0], device=z.device)
                z[rows, target[s : s + chunk_size]] -= 1.0  # p - onehot
                z.mul_(-grad_out[s : s + chunk_size, None].to(dtype))  # ∂L/∂logits
                if softcap is not None:
                    z.mul_(1.0 - tanh.square_())  # d(cap·tanh(x/cap))/dx
                    del tanh
                if scale is not None:
                    z.mul_(scale)
                dz = z.to(weight.dtype)
                del z
                if need_h:
                    grad_h[s : s + chunk_size] = dz @ weight
                if need_w:
                    grad_w.addmm_(dz.t().to(acc), h.to(acc))  # no copies unless half precision
                if grad_b is not None:
                    grad_b += dz.sum(0).to(acc)
                del dz
            grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
            grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
            return grad_h, grad_w, grad_b, None, None, None, None, None

    return FusedHeadLogps


_FUSED = None


def _fused_logps(
    head: Any, hidden: Tensor, target: Tensor, chunk_size: int, config: Any, dtype: Any
) -> Tensor:
    """Per-position log-probs ``[M]`` through a plain ``nn.Linear`` head with the fused kernel."""
    import torch

    global _FUSED
    if _FUSED is None:
        _FUSED = _fused_head_logps()
    weight, bias = head.weight, head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # run the head in the autocast dtype, explicitly
        low = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(low), weight.to(low)
        bias = bias.to(low) if bias is not None else None
    scale, softcap = logit_transform(config)
    with torch.autocast(device_type, enabled=False):
        return _FUSED.apply(hidden, weight, bias, target, chunk_size, scale, softcap, dtype)


def sequence_logps(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    chunk_size: int = 1024,
    fused: bool | None = None,
) -> Tensor:
    """Summed completion log-probs ``Σ_t log π(y_t | x, y_<t)`` of ``N`` sequences.

    Args:
        model: a transformers causal LM (Llama-, GPT-2-style, ...), possibly PEFT-wrapped (LoRA).
            The LM head is ``get_output_embeddings()``; the final hidden states come from the
            base model (``model.model`` / ``model.transformer``). Gemma-style
            ``final_logit_softcapping``, Cohere ``logit_scale`` and Granite ``logits_scaling`` are
            applied as the architecture does.
        input_ids: ``[N, L]`` token ids, left or right padded.
        attention_mask: ``[N, L]``, 1 on real tokens. Position ids are derived from it
            (``cumsum - 1``), so left padding gives the same positions as no padding.
        completion_mask: ``[N, L]``, 1 on completion tokens (the ones scored).
        chunk_size: number of scored positions per LM-head chunk; peak logits memory is
            ``chunk_size × V`` floats (forward and backward).
        fused: ``None`` (default) picks the fused kernel when the head is a plain ``nn.Linear``
            and the generic path otherwise; ``True`` / ``False`` force it (for tests).

    Returns:
        ``[N]`` float32: the **sum** (not mean) over completion tokens of the token log-probs,
        accumulated in float32 (float64 for a float64 model). Differentiable w.r.t. the model's
        parameters when grad is enabled. A sequence without completion tokens gets 0.

    Never materialises ``[N, L, V]``: only the ``M`` positions that predict a completion token go
    through the head. Two head paths give the same numbers: the *fused* one (a bare
    ``nn.Linear`` head: an autograd function that keeps no logits and, in the backward,
    recomputes each chunk and forms ``∂L/∂logits`` in place, so about one ``[chunk_size, V]``
    buffer is alive at a time) and the *generic* one (any head module, e.g. a LoRA-wrapped
    ``lm_head`` or one with offloading hooks: each chunk under activation checkpointing, a few
    ``[chunk_size, V]`` temporaries alive in its backward). The model is called through its own
    (outer) ``forward`` with ``logits_to_keep=1`` and a hook on the backbone, so a
    ``DistributedDataParallel`` or PEFT wrapper may be passed as is. FSDP-sharded heads and
    prompt-learning PEFT adapters are not supported.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_shapes(input_ids, attention_mask, completion_mask)
    backbone, head, config = parts(model)
    rows, pos, target = _targets(input_ids, attention_mask, completion_mask)
    hidden_all = final_hidden(model, backbone, input_ids, attention_mask)
    hidden = hidden_all[rows, pos]  # [M, H]: only positions that predict completion tokens
    return _head_sums(head, config, hidden, target, rows, input_ids.shape[0], chunk_size, fused)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the sequences (by index) in rows of at most ``capacity`` tokens
    (a longer sequence gets a row of its own). Deterministic: ties broken by index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


class _Packing(NamedTuple):
    """Where each real token of ``N`` padded sequences goes in ``R`` packed rows of ``width``."""

    where: Tensor  # [N, L] flat packed index of each real token (0 on padding)
    real: Tensor  # [N, L] bool
    rank: Tensor  # [N, L] the token's index within its own sequence
    shape: tuple[int, int]  # (R, width)
    segment_of: Tensor  # [N] the sequence's segment within its row (0, 1, ...)
    used: Tensor  # [R] real tokens in each row (the filler starts there)
    members: Tensor  # [R] sequences in each row (the filler's segment)


def _pack_layout(attention_mask: Tensor, capacity: int | None) -> _Packing:
    """The packed layout of :func:`pack_rows`, computed with a few whole-tensor operations
    (one host round-trip for the lengths), so a GPU runs no kernel per sequence."""
    import torch

    real = attention_mask.bool()
    lengths = real.sum(-1).tolist()
    bins = pack_rows(lengths, capacity or max(lengths))
    width = max(sum(lengths[i] for i in members) for members in bins)
    base = [0] * len(lengths)
    segment_of = [0] * len(lengths)
    for r, members in enumerate(bins):
        at = 0
        for s, i in enumerate(members):
            base[i], segment_of[i] = r * width + at, s
            at += lengths[i]
    device = attention_mask.device
    rank = real.long().cumsum(-1) - 1
    where = torch.where(real, torch.tensor(base, device=device)[:, None] + rank, 0)
    used = torch.tensor([sum(lengths[i] for i in m) for m in bins], device=device)
    return _Packing(
        where=where,
        real=real,
        rank=rank,
        shape=(len(bins), width),
        segment_of=torch.tensor(segment_of, device=device),
        used=used,
        members=torch.tensor([len(m) for m in bins], device=device),
    )


def _scatter(layout: _Packing, values: Tensor, filler: Tensor) -> Tensor:
    """``values`` ``[N, L]`` moved to the packed ``[R, width]`` layout over ``filler``."""
    out = filler.clone().reshape(-1)
    out[layout.where[layout.real]] = values[layout.real].to(out.dtype)
    return out.reshape(layout.shape)


def _filler_positions(layout: _Packing) -> Tensor:
    """Positions of a packed row's unused tail, restarting at 0 where it starts (a segment of
    its own, never scored); the real tokens' positions are written over the rest."""
    import torch

    r, width = layout.shape
    idx = torch.arange(width, device=layout.used.device).expand(r, width)
    return (idx - layout.used[:, None]).clamp(min=0)


def packed_sequence_logps(
    model: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    *,
    capacity: int | None = None,
    chunk_size: int = 1024,
    fused: bool | None = None,
    varlen: bool | None = None,
) -> Tensor:
    """:func:`sequence_logps` without padding: the ``N`` sequences' real tokens concatenated
    into rows, position ids restarting at 0 for each sequence.

    ``varlen``: attention one sequence at a time (:mod:`inpo.varlen`), so all ``N`` fit in one
    row with no filler; ``None`` (default): on CPU for a model it is exact for
    (:func:`inpo.varlen.supports_varlen`), where it measured 1.25× the masked rows
    (``benchmarks/results/packing.md``).

    ``capacity``: tokens a row (first-fit decreasing, :func:`pack_rows`); ``None``: all of
    them under ``varlen``, else the longest sequence's length, so attention over a row costs no
    more than over one padded sequence while the padding is gone. A row's unused tail is filler
    tokens with positions of their own: a segment nothing real attends to, never scored.

    transformers 5 reads restarting position ids as packed sequences and gives each token
    attention to its own sequence only (``masking_utils.find_packed_sequence_indices``): with
    ``flash_attention_2`` as variable-length kernels, with ``flex_attention`` as a block mask,
    with ``sdpa``/``eager`` as a dense block-diagonal mask per row. The same numbers as the
    padded path (tests: log-probs and gradients to 1e-5) for models whose attention honours it
    (:func:`inpo.layout.check_packing_support`). Same arguments and result as :func:`sequence_logps`.
    """
    import torch

    _check_shapes(input_ids, attention_mask, completion_mask)
    backbone, head, config = parts(model)
    rows, pos, target = _targets(input_ids, attention_mask, completion_mask)
    varlen = use_varlen(model, varlen)
    if varlen and capacity is None:
        capacity = int(attention_mask.sum())
    layout = _pack_layout(attention_mask, capacity)
    first = input_ids[layout.real][0]  # any token does for the filler, never scored
    ids = _scatter(layout, input_ids, torch.full(layout.shape, first, device=input_ids.device))
    positions = _scatter(layout, layout.rank, _filler_positions(layout))
    where = layout.where
    with varlen_attention(model) if varlen else nullcontext():
        hidden_all = final_hidden(model, backbone, ids, None, positions)
    hidden = hidden_all.reshape(-1, hidden_all.shape[-1])[where[rows, pos]]
    return _head_sums(head, config, hidden, target, rows, input_ids.shape[0], chunk_size, fused)


def _head_sums(
    head: Any,
    config: Any,
    hidden: Tensor,
    target: Tensor,
    rows: Tensor,
    n: int,
    chunk_size: int,
    fused: bool | None,
) -> Tensor:
    """``Σ`` over the ``M`` scored positions of each of ``n`` sums: ``[M, H], [M], [M] -> [n]``.

    ``hidden[m]`` predicts ``target[m]``, which is added to sum ``rows[m]``; the head runs in
    chunks of ``chunk_size`` positions (fused kernel or checkpointed generic path).
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    post = postprocess(config)
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    total = torch.zeros(n, dtype=compute_dtype, device=hidden.device)
    if fused is None:
        fused = _is_plain_linear(head)
    elif fused and not _is_plain_linear(head):
        raise ValueError(f"fused=True needs a plain nn.Linear LM head, got {type(head).__name__}")
    if fused:
        logps = _fused_logps(head, hidden, target, chunk_size, config, compute_dtype)
        return total.index_add(0, rows, logps).float()
    use_ckpt = torch.is_grad_enabled() and hidden.requires_grad
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], target[start : start + chunk_size]
        if use_ckpt:
            lp = checkpoint(_chunk_logps, head, post, compute_dtype, h, t, use_reentrant=False)
        else:
            lp = _chunk_logps(head, post, compute_dtype, h, t)
        total = total.index_add(0, rows[start : start + chunk_size], lp)
    return total.float()


# ----------------------------------------------------------------------------------------------
# Prompt sharing: one row ``prompt + chosen + rejected`` per pair
# ----------------------------------------------------------------------------------------------

#: Attention implementations that take a prepared 4D ``attention_mask`` as is (transformers'
#: ``masking_utils.create_causal_mask`` returns a 4D mask unchanged): ``sdpa`` as a boolean mask
#: (``True`` = attend), ``eager`` as an additive float mask (``0`` / dtype minimum),
#: ``flex_attention`` as a block-sparse ``BlockMask`` (:func:`shared_prompt_block_mask`: the
#: fused kernel skips the blocks a row never attends; torch runs its backward on GPUs only).
SHARED_PROMPT_ATTENTION = ("sdpa", "eager", "flex_attention")


def shared_prompt_block_mask(
    attention_mask: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    segment: Tensor | None = None,
):
    """:func:`shared_prompt_mask` as flex attention's ``BlockMask``, from the ``[B, L]`` token
    masks alone (no ``[B, L, L]`` tensor): causal over real tokens, rejected tokens blind to
    chosen ones, every position seeing itself (and, given ``segment``, only its own segment)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    real = attention_mask.bool()
    chosen, rejected = chosen_mask.bool(), rejected_mask.bool()
    seg = segment if segment is not None else torch.zeros_like(attention_mask, dtype=torch.long)

    def mask_mod(b, h, q, kv):
        seen = (kv <= q) & real[b, kv] & real[b, q] & ~(rejected[b, q] & chosen[b, kv])
        return (seen & (seg[b, q] == seg[b, kv])) | (q == kv)

    batch, length = real.shape
    return create_block_mask(
        mask_mod, batch, None, length, length, device=attention_mask.device, _compile=False
    )


def shared_prompt_mask(
    attention_mask: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    segment: Tensor | None = None,
) -> Tensor:
    """Boolean ``[B, 1, L, L]`` attention (``True`` = query attends key) of shared-prompt rows.

    Causal over real tokens, except that rejected tokens do not see chosen tokens, so the
    rejected completion is conditioned on the prompt alone. Every position also sees itself, so
    padding queries never have an empty row (no NaN in ``softmax``); no real token sees padding.
    Inputs are ``[B, L]`` (``attention_mask`` 1 on real tokens). ``segment`` (``[B, L]``, packed
    rows): tokens attend only within their own segment (one pair's ``prompt + chosen +
    rejected`` each).
    """
    import torch

    length = attention_mask.shape[1]
    idx = torch.arange(length, device=attention_mask.device)
    real = attention_mask.bool()
    allowed = (idx[:, None] >= idx[None, :])[None] & real[:, :, None] & real[:, None, :]
    allowed &= ~(rejected_mask.bool()[:, :, None] & chosen_mask.bool()[:, None, :])
    if segment is not None:
        allowed &= segment[:, :, None] == segment[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool, device=idx.device)[None]
    return allowed[:, None]


def _model_mask(model: Any, mask_4d: Tensor, dtype: Any) -> Tensor:
    """The boolean 4D mask in the form the model's attention implementation takes."""
    import torch

    impl = attn_implementation(model)
    if impl == "sdpa":
        return mask_4d
    if impl == "eager":
        zero = torch.zeros((), dtype=dtype, device=mask_4d.device)
        return zero.masked_fill(~mask_4d, torch.finfo(dtype).min)
    raise NotImplementedError(
        f"shared_prompt_logps: {type(unwrap(model)).__name__} runs attention "
        f"'{impl}', which takes no custom 4D attention mask; load the model with "
        f"attn_implementation in {SHARED_PROMPT_ATTENTION}"
    )


def _shared_targets(
    input_ids: Tensor, attention_mask: Tensor, chosen_mask: Tensor, rejected_mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scored positions of shared-prompt rows: ``(rows, source, target ids, is_rejected)``, ``[M]``.

    A completion token at index ``t`` is predicted by the hidden state at ``t - 1``, except the
    *first rejected* token: the token before it is the last chosen one, which the rejected
    completion must not condition on, so it is predicted from the last **prompt** token (index
    ``first_chosen - 1``), as in the unshared ``prompt + rejected`` sequence.
    """
    import torch

    real = attention_mask.bool()
    chosen = chosen_mask.bool() & real
    rejected = rejected_mask.bool() & real
    if bool((chosen & rejected).any()):
        raise ValueError("chosen_mask and rejected_mask overlap")
    scored = chosen | rejected
    if bool(scored[:, 0].any()):
        raise ValueError("a completion token is on a row's first position: no prompt before it")
    rows, tpos = torch.nonzero(scored, as_tuple=True)
    source = tpos - 1
    has_chosen = chosen.any(-1)
    first_chosen = torch.where(has_chosen, chosen.int().argmax(-1), 0)
    prev_rejected = torch.zeros_like(rejected)
    prev_rejected[:, 1:] = rejected[:, :-1]
    starts = rejected & ~prev_rejected & has_chosen[:, None]  # first rejected token after chosen
    is_start = starts[rows, tpos]
    source = torch.where(is_start, first_chosen[rows] - 1, source)
    if rows.numel():
        from_chosen, from_rejected = chosen[rows, source], rejected[rows, source]
        to_rejected = rejected[rows, tpos]
        ok = real[rows, source] & ~(from_chosen & to_rejected) & ~(from_rejected & ~to_rejected)
        if not bool(ok.all()):
            raise ValueError(
                "shared-prompt masks disagree: each row must be [padding] prompt chosen rejected "
                "[padding] with a non-empty prompt"
            )
    return rows, source, input_ids[rows, tpos], rejected[rows, tpos]


def _check_shared_shapes(
    input_ids: Tensor,
    position_ids: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    attention_mask: Tensor,
) -> None:
    for name, t in (
        ("position_ids", position_ids),
        ("chosen_mask", chosen_mask),
        ("rejected_mask", rejected_mask),
        ("attention_mask", attention_mask),
    ):
        if t.shape != input_ids.shape:
            raise ValueError(f"{name} {tuple(t.shape)} != input_ids {tuple(input_ids.shape)}")


def shared_prompt_logps(
    model: Any,
    input_ids: Tensor,
    attention_mask_4d: Tensor,
    position_ids: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    attention_mask: Tensor,
    *,
    chunk_size: int = 1024,
    fused: bool | None = None,
) -> Tensor:
    """Summed completion log-probs of ``B`` pairs run as ``B`` rows ``prompt + chosen + rejected``.

    Each row computes its prompt once; the chosen and rejected completions both continue it:
    positions ``0..p-1`` (prompt), ``p..p+c-1`` (chosen), ``p..p+r-1`` (rejected, restarting
    after the prompt), and rejected tokens do not attend to chosen tokens. The sums equal
    :func:`sequence_logps` on the ``2B`` unshared sequences ``prompt + chosen`` and
    ``prompt + rejected`` (up to float rounding), and so do their gradients: the prompt's hidden
    states receive the sum of both completions' gradients, as the two unshared copies would.

    Args:
        model: a transformers causal LM whose attention takes a prepared 4D mask
            (``attn_implementation`` ``sdpa``, ``eager`` or ``flex_attention``; see
            :data:`SHARED_PROMPT_ATTENTION`).
        input_ids: ``[B, L]`` packed rows (left or right padded).
        attention_mask_4d: boolean ``[B, 1, L, L]`` from :func:`shared_prompt_mask` (converted to
            an additive float mask for ``eager``).
        position_ids: ``[B, L]`` as above (any value on padding).
        chosen_mask, rejected_mask: ``[B, L]``, 1 on the chosen / rejected completion tokens.
        attention_mask: ``[B, L]``, 1 on real tokens.
        chunk_size, fused: as in :func:`sequence_logps`.

    Returns:
        ``[2B]`` float32 sums (not means): chosen ``0..B-1``, rejected ``B..2B-1``, the layout of
        :func:`sequence_logps` on a :class:`inpo.data.PreferenceCollator` batch.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, length = input_ids.shape
    _check_shared_shapes(input_ids, position_ids, chosen_mask, rejected_mask, attention_mask)
    if tuple(attention_mask_4d.shape) != (b, 1, length, length):
        raise ValueError(
            f"attention_mask_4d {tuple(attention_mask_4d.shape)} != {(b, 1, length, length)}"
        )
    backbone, head, config = parts(model)
    rows, source, target, is_rejected = _shared_targets(
        input_ids, attention_mask, chosen_mask, rejected_mask
    )
    embed = unwrap(model).get_input_embeddings()
    if attn_implementation(model) == "flex_attention":  # block-sparse: no dense [L, L] mask
        mask = shared_prompt_block_mask(attention_mask, chosen_mask, rejected_mask)
    else:
        mask = _model_mask(model, attention_mask_4d.bool(), embed.weight.dtype)
    hidden_all = final_hidden(model, backbone, input_ids, mask, position_ids)
    hidden = hidden_all[rows, source]  # [M, H]
    sums = rows + b * is_rejected.long()
    return _head_sums(head, config, hidden, target, sums, 2 * b, chunk_size, fused)


def packed_shared_prompt_logps(
    model: Any,
    input_ids: Tensor,
    position_ids: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    attention_mask: Tensor,
    *,
    capacity: int | None = None,
    chunk_size: int = 1024,
    fused: bool | None = None,
    varlen: bool | None = None,
) -> Tensor:
    """:func:`shared_prompt_logps` without padding: the ``B`` rows ``prompt + chosen +
    rejected`` (a ``share_prompt`` collator batch) concatenated into packed rows as long as the
    longest of them (``capacity``; first-fit decreasing, :func:`pack_rows`), or all in one row
    under ``varlen`` (as in :func:`packed_sequence_logps`: each pair's attention computed on
    its own, the rejected answer seeing the prompt and itself, no mask).

    Each pair keeps its own positions (restarting after the prompt for the rejected answer)
    and attends only within its own segment, with the shared-prompt rule inside it
    (:func:`shared_prompt_mask` with ``segment``; a block mask with ``flex_attention``). The
    same sums as :func:`shared_prompt_logps` and as :func:`sequence_logps` on the ``2B``
    unshared sequences, and their gradients (tests: to 1e-5): the prompt computed once, no
    padding computed. Returns ``[2B]``: chosen ``0..B-1``, rejected ``B..2B-1``.
    """
    import torch

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_shared_shapes(input_ids, position_ids, chosen_mask, rejected_mask, attention_mask)
    backbone, head, config = parts(model)
    b = input_ids.shape[0]
    rows, source, target, is_rejected = _shared_targets(
        input_ids, attention_mask, chosen_mask, rejected_mask
    )
    varlen = use_varlen(model, varlen)
    if varlen and capacity is None:
        capacity = int(attention_mask.sum())
    layout = _pack_layout(attention_mask, capacity)
    device, shape = input_ids.device, layout.shape
    first = input_ids[layout.real][0]  # any token does for the filler, never scored
    ids = _scatter(layout, input_ids, torch.full(shape, first, device=device))
    positions = _scatter(layout, position_ids, _filler_positions(layout))
    segments = layout.segment_of[:, None].expand_as(input_ids)
    segment = _scatter(layout, segments, layout.members[:, None].expand(shape))
    no = torch.zeros(shape, dtype=torch.bool, device=device)
    chosen = _scatter(layout, chosen_mask.bool(), no)
    rejected = _scatter(layout, rejected_mask.bool(), no)
    where = layout.where
    every = torch.ones(shape, dtype=torch.long, device=device)
    if varlen:  # the segments and the branch to the rejected answer read off the positions
        with varlen_attention(model):
            hidden_all = final_hidden(model, backbone, ids, None, positions)
    else:
        if attn_implementation(model) == "flex_attention":
            mask = shared_prompt_block_mask(every, chosen, rejected, segment)
        else:
            embed = unwrap(model).get_input_embeddings()
            dense = shared_prompt_mask(every, chosen, rejected, segment)
            mask = _model_mask(model, dense, embed.weight.dtype)
        hidden_all = final_hidden(model, backbone, ids, mask, positions)
    hidden = hidden_all.reshape(-1, hidden_all.shape[-1])[where[rows, source]]
    sums = rows + b * is_rejected.long()
    return _head_sums(head, config, hidden, target, sums, 2 * b, chunk_size, fused)


def naive_sequence_logps(
    model: Any, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> Tensor:
    """Reference implementation: full ``[N, L, V]`` logits → log_softmax → gather → masked sum.

    Same contract as :func:`sequence_logps`; kept for tests and the memory benchmark only.
    """
    import torch

    _, _, config = parts(model)
    post = postprocess(config)
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=default_position_ids(attention_mask),
        use_cache=False,
    ).logits
    compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    # transformers already applies soft-capping / scaling inside forward(): do not re-apply.
    del post
    logps = logits[:, :-1].to(compute_dtype).log_softmax(-1)
    picked = logps.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = (completion_mask.bool() & attention_mask.bool())[:, 1:]
    return (picked * mask).sum(-1).float()


# ----------------------------------------------------------------------------------------------
# Public convenience: score (prompt, completion) pairs
# ----------------------------------------------------------------------------------------------
