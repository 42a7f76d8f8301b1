"""Variable-length attention (``inpo.varlen``): segments read off position ids, attention one
segment at a time equal to the dense masked attention, and the guard that keeps it off models
it would get wrong."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from inpo.logprobs import shared_prompt_mask
from inpo.tiny import char_tokenizer, tiny_causal_lm
from inpo.training.modeling import enable_activation_checkpointing
from inpo.varlen import (
    VARLEN_ATTENTION,
    VarlenUnsupported,
    _segments,
    supports_varlen,
    use_varlen,
    varlen_attention,
    varlen_sdpa_attention,
)


def test_segments_read_off_positions():
    # two plain sequences, then a shared-prompt pair: prompt 3, chosen 2, rejected 2
    positions = [0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 3, 4]
    assert _segments(positions) == [(0, 3, 3, 0), (3, 5, 5, 0), (5, 10, 12, 3)]
    assert _segments([0]) == [(0, 1, 1, 0)]


@pytest.mark.parametrize(
    "positions",
    [[1, 2, 3], [0, 1, 2, 1, 2, 1], [0, 1, 5]],
    ids=["no-start", "two-branches", "past-prefix"],
)
def test_segments_refuse_other_layouts(positions):
    with pytest.raises(VarlenUnsupported):
        _segments(positions)


class _Module:
    num_key_value_groups = 2


def _rows_and_dense_reference(kv_heads: int, dtype=torch.float32, device="cpu"):
    """Two packed rows with plain and branched segments, q/k/v, and the dense masked sdpa
    over them (the mask the masked path builds, ``shared_prompt_mask`` with segments)."""
    g = torch.Generator().manual_seed(0)
    rows = [[0, 1, 2, 0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 2, 3, 0, 1, 2, 3, 4]]
    # chosen / rejected / segment of each token, as the collator and packer lay them out
    chosen = [[0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    rejected = [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]]
    segment = [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]
    b, t, h, d = 2, 11, 4, 8
    q, k, v = (
        torch.randn(b, n, t, d, generator=g).to(device, dtype) for n in (h, kv_heads, kv_heads)
    )
    mask = shared_prompt_mask(
        torch.ones(b, t), torch.tensor(chosen), torch.tensor(rejected), torch.tensor(segment)
    ).to(device)
    rep = h // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    return torch.tensor(rows, device=device), q, k, v, want


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_attention_equals_the_dense_masked_attention(kv_heads):
    """Two packed rows, each with plain and branched segments: per-segment attention equals
    one ``scaled_dot_product_attention`` over the whole row under the shared-prompt mask with
    segments, the mask the masked path builds."""
    pos, q, k, v, want = _rows_and_dense_reference(kv_heads)
    got, _ = varlen_sdpa_attention(_Module(), q, k, v, None, scaling=0.3, position_ids=pos)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_varlen_index_gives_the_dense_attention():
    """The flash kernel's inputs (``varlen_index``): queries cut at segment starts, branches
    and ends, keys gathered so that each cut attends with bottom-right causal alignment;
    attention over them (bottom-right causal ``sdpa`` a cut, the kernel's semantics) equals
    the dense masked attention."""
    from inpo.varlen import _segments, varlen_index

    pos, q, k, v, want = _rows_and_dense_reference(4)
    b, h, t, d = q.shape
    kv_index, cu_q, cu_k = varlen_index([_segments(r) for r in pos.tolist()], t)
    qf = q.transpose(1, 2).reshape(b * t, h, d)
    kf = k.transpose(1, 2).reshape(b * t, h, d)[torch.tensor(kv_index)]
    vf = v.transpose(1, 2).reshape(b * t, h, d)[torch.tensor(kv_index)]
    out = []
    for (q0, q1), (k0, k1) in zip(pairwise(cu_q), pairwise(cu_k), strict=True):
        lq, lk = q1 - q0, k1 - k0
        seen = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)  # bottom-right causal
        out.append(
            torch.nn.functional.scaled_dot_product_attention(
                qf[q0:q1].transpose(0, 1), kf[k0:k1].transpose(0, 1), vf[k0:k1].transpose(0, 1),
                attn_mask=seen, scale=0.3,
            ).transpose(0, 1)
        )  # fmt: skip
    torch.testing.assert_close(torch.cat(out).reshape(b, t, h, d), want, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_flash_varlen_kernel_gives_the_dense_attention(kv_heads):
    """On CUDA in bf16 the attention runs torch's variable-length flash kernel: the dense
    masked attention to bf16 tolerance."""
    from inpo.varlen import _flash_varlen_usable

    pos, q, k, v, want = _rows_and_dense_reference(kv_heads, torch.bfloat16, "cuda")
    assert _flash_varlen_usable(q, 0.0)
    got, _ = varlen_sdpa_attention(_Module(), q, k, v, None, scaling=0.3, position_ids=pos)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_attention_refuses_what_it_cannot_honour():
    q = torch.randn(1, 2, 3, 4)
    pos = torch.tensor([[0, 1, 2]])
    with pytest.raises(VarlenUnsupported, match="position_ids"):
        varlen_sdpa_attention(_Module(), q, q, q, None)
    with pytest.raises(VarlenUnsupported, match="sliding_window"):
        varlen_sdpa_attention(_Module(), q, q, q, None, position_ids=pos, sliding_window=2)
    with pytest.raises(VarlenUnsupported, match="cache"):
        varlen_sdpa_attention(_Module(), q, q[:, :, :2], q[:, :, :2], None, position_ids=pos)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _mistral(tok, window):
    from transformers import AutoModelForCausalLM, MistralConfig

    cfg = MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
        sliding_window=window,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def test_supported_models_and_refused_ones(tok):
    """The probe passes Llama, GPT-2 and a window-less Mistral; it refuses a sliding window
    (attention would lose it) and activation checkpointing (the backward's recomputation runs
    after the switch is undone), and ``varlen=True`` then says why."""
    llama = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=2).train()
    assert supports_varlen(llama)
    assert llama.training  # the probe's eval mode is undone
    assert supports_varlen(tiny_causal_lm("gpt2", tok, hidden_size=32, num_hidden_layers=2))
    assert supports_varlen(_mistral(tok, None))
    windowed = _mistral(tok, 4)
    assert not supports_varlen(windowed)
    assert use_varlen(windowed, None) is False
    with pytest.raises(ValueError, match="not exact for MistralForCausalLM"):
        use_varlen(windowed, True)
    ckpt = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=2)
    enable_activation_checkpointing(ckpt)  # as model.gradient_checkpointing=true does
    assert not supports_varlen(ckpt)


def test_the_switch_is_undone_on_error(tok):
    model = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=2)
    with pytest.raises(RuntimeError, match="boom"), varlen_attention(model):
        assert model.config._attn_implementation == VARLEN_ATTENTION
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
