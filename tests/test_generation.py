"""Sampling K responses a prompt: one prompt prefill for the K samples gives the samples K
prefills give (the KV cache repeated, positions as generate computes them under left padding),
whatever the batch, for text and chat prompts, on two architectures."""

from __future__ import annotations

import pytest

import inpo.generation as generation
from inpo.generation import GenerationSettings, sample_responses

PROMPTS = [
    "say red",
    "describe a very long and winding green square please",
    "name it",
    "describe the blue circle",
    "a",
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model_and_tokenizer(request):
    from inpo.tiny import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()
    model = tiny_causal_lm(request.param, tok, hidden_size=32, num_hidden_layers=2)
    return model.eval(), tok


def _samples(model, tok, prompts, k, batch_size, once: bool, monkeypatch):
    monkeypatch.setattr(generation, "PREFILL_ONCE", once)
    return sample_responses(
        model, tok, prompts, k, GenerationSettings(1.0, 0.9, 6, batch_size), seed=11
    )


@pytest.mark.parametrize("batch_size", [1, 3])
def test_one_prefill_gives_the_samples_of_k_prefills(model_and_tokenizer, batch_size, monkeypatch):
    model, tok = model_and_tokenizer
    k_prefills = _samples(model, tok, PROMPTS, 4, batch_size, False, monkeypatch)
    one = _samples(model, tok, PROMPTS, 4, batch_size, True, monkeypatch)
    assert one == k_prefills
    assert len(set(map(tuple, one))) > 1 and any(len(set(r)) > 1 for r in one)  # really sampled


def test_chat_prompts_and_k_1(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    if getattr(tok, "chat_template", None) is None:
        pytest.skip("tokenizer without a chat template")
    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:3]]
    for k in (1, 3):
        a = _samples(model, tok, chats, k, 2, False, monkeypatch)
        assert _samples(model, tok, chats, k, 2, True, monkeypatch) == a


def test_samples_do_not_depend_on_the_batch_with_one_prefill(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    whole = _samples(model, tok, PROMPTS, 3, 5, True, monkeypatch)
    assert _samples(model, tok, PROMPTS, 3, 2, True, monkeypatch) == whole


def test_the_geometric_mixture_sampler_is_exact_at_its_ends():
    """Nash-MD's sampler, π_t^{1−β} π_ref^{β} normalised per token: with the same seeds, β = 0
    gives π_t's samples and β = 1 gives π_ref's, exactly; β = ½ gives neither."""
    import torch

    from inpo.generation import GenerationSettings, generate_chunks
    from inpo.tiny import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer(add_bos=True)
    a = tiny_causal_lm("llama", tok, seed=1, hidden_size=32).eval()
    b = tiny_causal_lm("llama", tok, seed=2, hidden_size=32).eval()
    with torch.no_grad():  # peaked distributions, so the two models' samples differ
        a.lm_head.weight.mul_(20)
        b.lm_head.weight.mul_(20)
    prompts = ["hello there", "a b", "xyz xyz xyz"]
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)

    def sample(model, mixture=None):
        chunks = generate_chunks(model, tok, prompts, 3, settings, seed=0, mixture=mixture)
        return [s for _, samples, _ in chunks for s in samples]

    plain_a, plain_b = sample(a), sample(b)
    assert plain_a != plain_b
    assert sample(a, (b, 0.0)) == plain_a
    assert sample(a, (b, 1.0)) == plain_b
    half = sample(a, (b, 0.5))
    assert half not in (plain_a, plain_b)
