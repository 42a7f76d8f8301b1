"""Variable-length attention (``inpo.varlen``): segments read off position ids, attention one
segment at a time equal to the dense masked attention, and the guard that keeps it off models
it would get wrong."""

from __future__ import annotations

import pytest
import torch

from inpo.logprobs import shared_prompt_mask
from inpo.tiny import char_tokenizer, tiny_causal_lm
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


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_attention_equals_the_dense_masked_attention(kv_heads):
    """Two packed rows, each with plain and branched segments: per-segment attention equals
    one ``scaled_dot_product_attention`` over the whole row under the shared-prompt mask with
    segments (``inpo.logprobs.shared_prompt_mask``), the mask the masked path builds."""
    g = torch.Generator().manual_seed(0)
    rows = [[0, 1, 2, 0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 2, 3, 0, 1, 2, 3, 4]]
    # chosen / rejected / segment of each token, as the collator and packer lay them out
    chosen = [[0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0]]
    rejected = [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]]
    segment = [[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]]
    b, t, h, d = 2, 11, 4, 8
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, kv_heads, t, d, generator=g)
    v = torch.randn(b, kv_heads, t, d, generator=g)
    pos = torch.tensor(rows)
    got, _ = varlen_sdpa_attention(_Module(), q, k, v, None, scaling=0.3, position_ids=pos)
    mask = shared_prompt_mask(
        torch.ones(b, t), torch.tensor(chosen), torch.tensor(rejected), torch.tensor(segment)
    )
    rep = h // kv_heads
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


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
    ckpt.gradient_checkpointing_enable()
    assert not supports_varlen(ckpt)


def test_the_switch_is_undone_on_error(tok):
    model = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=2)
    with pytest.raises(RuntimeError, match="boom"), varlen_attention(model):
        assert model.config._attn_implementation == VARLEN_ATTENTION
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
