"""Exact summed completion log-probs (inpo.logprobs) against float64 token-by-token references."""

from __future__ import annotations

import copy

import pytest
import torch

from inpo.data import PreferenceCollator, tokenize_pair
from inpo.layout import completion_logps
from inpo.logprobs import naive_sequence_logps, sequence_logps
from inpo.tiny import char_tokenizer, tiny_causal_lm

# prompts of different lengths, completions of different lengths
ROWS = [
    {"prompt": "Hi.", "chosen": " hello there", "rejected": " no"},
    {"prompt": "What is two plus two?", "chosen": " 4", "rejected": " it is five, I think"},
    {"prompt": "Colour?", "chosen": " red", "rejected": " a dog"},
]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(add_bos=True)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request, tok):
    return tiny_causal_lm(request.param, tok, hidden_size=32, num_hidden_layers=2, seed=1).eval()


def reference_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Float64, token by token: score completion token t from a forward over its prefix alone."""
    m64 = (
        model if next(model.parameters()).dtype == torch.float64 else copy.deepcopy(model).double()
    )
    ids = prompt_ids + completion_ids
    total = 0.0
    with torch.no_grad():
        for t in range(len(prompt_ids), len(ids)):
            logits = m64(input_ids=torch.tensor([ids[:t]])).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), -1)[ids[t]])
    return total


def reference_batch(model, tok, rows) -> torch.Tensor:
    model = copy.deepcopy(model).double()
    out = []
    for key in ("chosen", "rejected"):
        for row in rows:
            p, c = tokenize_pair(tok, row["prompt"], row[key], max_prompt_length=None, max_completion_length=None)  # fmt: skip
            out.append(reference_logp(model, p, c))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference(model, tok):
    return reference_batch(model, tok, ROWS)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("side", ["right", "left"])
def test_sequence_logps_equals_float64_token_by_token(model, tok, reference, side, fused):
    batch = PreferenceCollator(tok, padding_side=side, pad_to_multiple_of=8)(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        got = sequence_logps(model, *args, chunk_size=5, fused=fused)
        got64 = sequence_logps(copy.deepcopy(model).double(), *args, chunk_size=5, fused=fused)
    assert got.dtype == torch.float32 and got.shape == (6,)
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-4)
    # a float64 model is scored in float64 (returned as float32): padding and masks are exact,
    # so only the final rounding to float32 is left
    torch.testing.assert_close(got64.double(), reference, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("side", ["right", "left"])
def test_completion_logps_equals_reference(model, tok, reference, side):
    prompts = [r["prompt"] for r in ROWS] * 2
    completions = [r["chosen"] for r in ROWS] + [r["rejected"] for r in ROWS]
    model.train()  # completion_logps evaluates in eval mode and restores the mode
    got = completion_logps(model, tok, prompts, completions, batch_size=4)
    assert model.training
    model.eval()
    assert not got.requires_grad and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-4)


def test_completion_logps_packs_long_batches_by_default_with_the_same_values(model, tok):
    """``packing=None``: batches from ``MIN_PACK_LENGTH`` tokens run packed on CPU (where
    packing measured faster and is exact for these models), shorter ones padded; the values are
    those of the padded path to float rounding, in both cases."""
    from unittest import mock

    from inpo import layout

    prompts = ["Hi.", "Tell me a story", "Q?", "Why?"]
    completions = [" short", " once upon a time " * 5, " a", " because " * 9]
    padded = completion_logps(model, tok, prompts, completions, batch_size=2, packing=False)
    spy = mock.patch.object(layout, "packed_sequence_logps", wraps=layout.packed_sequence_logps)
    with spy as packed:
        auto = completion_logps(model, tok, prompts, completions, batch_size=2)
    assert packed.call_count == 1  # the long batch only (sorted by length: the second)
    assert packed.call_args.args[1].shape[1] >= layout.MIN_PACK_LENGTH
    torch.testing.assert_close(auto, padded, rtol=0, atol=1e-5)
    forced = completion_logps(model, tok, prompts, completions, batch_size=2, packing=True)
    torch.testing.assert_close(forced, padded, rtol=0, atol=1e-5)


def test_completion_logps_conversational(model, tok):
    prompts = [[{"role": "user", "content": "Hi there"}], [{"role": "user", "content": "Q?"}]]
    completions = [
        [{"role": "assistant", "content": "Hello!"}],
        [{"role": "assistant", "content": "A longer answer."}],
    ]
    got = completion_logps(model, tok, prompts, completions, batch_size=1)
    for i in range(2):
        p, c = tokenize_pair(tok, prompts[i], completions[i], max_prompt_length=None, max_completion_length=None)  # fmt: skip
        assert tok.convert_ids_to_tokens(c)[-1] == "</s>"
        assert got[i].item() == pytest.approx(reference_logp(model, p, c), rel=1e-5, abs=1e-4)


def test_completion_logps_truncation_and_validation(model, tok):
    full = completion_logps(model, tok, ["abcdef"], [" xyz"])
    cut = completion_logps(model, tok, ["abcdef"], [" xyz"], max_prompt_length=2, max_completion_length=2)  # fmt: skip
    # truncation keeps prompt "ef" and completion " x"
    assert cut.item() == pytest.approx(
        reference_logp(
            model, tok.convert_tokens_to_ids(["e", "f"]), tok.convert_tokens_to_ids([" ", "x"])
        ),
        rel=1e-5,
    )
    assert cut.item() != pytest.approx(full.item())
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        completion_logps(model, tok, ["a", "b"], ["c"])
    assert completion_logps(model, tok, [], []).shape == (0,)


@pytest.mark.parametrize("side", ["right", "left"])
def test_chunk_sizes_and_paths_agree(model, tok, side):
    batch = PreferenceCollator(tok, padding_side=side)(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        results = [
            sequence_logps(model, *args, chunk_size=c, fused=f)
            for c in (1, 2, 7, 1024)
            for f in (True, False)
        ]
        naive = naive_sequence_logps(model, *args)
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results[-1], naive, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize(("chunk_size", "fused"), [(1, True), (4, True), (1024, True), (4, False)])
def test_gradients_match_naive_full_logits(model, tok, chunk_size, fused):
    batch = PreferenceCollator(tok, padding_side="left")(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    weights = torch.linspace(-1.0, 2.0, 6)

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn() * weights).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = grads(lambda: sequence_logps(model, *args, chunk_size=chunk_size, fused=fused))
    naive = grads(lambda: naive_sequence_logps(model, *args))
    model.zero_grad(set_to_none=True)
    assert ours.keys() == naive.keys() and len(ours) > 5
    for name in ours:
        torch.testing.assert_close(ours[name], naive[name], rtol=1e-4, atol=1e-6, msg=name)


def test_head_with_bias_and_frozen_head(tok):
    model = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=1, seed=4).eval()
    old = model.lm_head
    model.lm_head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(old.weight)
        model.lm_head.bias.normal_()
    batch = PreferenceCollator(tok)(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])

    def grads(fn):
        model.zero_grad(set_to_none=True)
        (fn() * torch.arange(1.0, 7.0)).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    naive = grads(lambda: naive_sequence_logps(model, *args))
    ours = grads(lambda: sequence_logps(model, *args, chunk_size=3))
    assert "lm_head.bias" in ours
    for name in naive:
        torch.testing.assert_close(ours[name], naive[name], rtol=1e-4, atol=1e-6, msg=name)
    model.lm_head.requires_grad_(False)  # a frozen head still passes gradients to the body
    frozen = grads(lambda: sequence_logps(model, *args, chunk_size=3))
    assert "lm_head.weight" not in frozen
    torch.testing.assert_close(frozen["model.norm.weight"], naive["model.norm.weight"])


@pytest.mark.parametrize("mode", ["bfloat16", "autocast"])
def test_half_precision_paths_agree(tok, mode):
    model = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=1, seed=5).eval()
    if mode == "bfloat16":
        model = model.to(torch.bfloat16)
    batch = PreferenceCollator(tok)(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    results = []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            lp = sequence_logps(model, *args, chunk_size=4, fused=fused)
        assert lp.dtype == torch.float32
        lp.sum().backward()
        results.append((lp.detach(), model.lm_head.weight.grad.float().clone()))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=2e-2, atol=2e-2)


def test_goes_through_the_outer_forward_and_supports_checkpointing(tok, monkeypatch):
    """A DDP-like wrapper's forward must run (DDP syncs gradients only after its forward)."""
    import inpo.modelparts

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, **kwargs):
            self.calls += 1
            return self.module(**kwargs)

    inner = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=2, seed=6).eval()
    wrapped = Wrapper(inner)
    batch = PreferenceCollator(tok, padding_side="left")(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])

    def run(model):
        inner.zero_grad(set_to_none=True)
        lp = sequence_logps(model, *args, chunk_size=4)
        lp.sum().backward()
        return lp.detach(), inner.model.norm.weight.grad.clone()

    lp, grad = run(wrapped)
    assert wrapped.calls == 1
    inner.activation_checkpointing_enable()
    inner.train()  # HF checkpointing is active in train mode only; the tiny llama has no dropout
    lp_ckpt, grad_ckpt = run(inner)
    inner.activation_checkpointing_disable()
    inner.eval()
    monkeypatch.setattr(inpo.modelparts, "keeps_logits", lambda model: False)  # no logits_to_keep
    lp_direct, grad_direct = run(inner)
    for other, other_grad in ((lp_ckpt, grad_ckpt), (lp_direct, grad_direct)):
        torch.testing.assert_close(other, lp)
        torch.testing.assert_close(other_grad, grad)


def test_no_completion_tokens_gives_zero_and_masks_are_checked(model, tok):
    batch = PreferenceCollator(tok)(ROWS[:1])
    comp = batch["completion_mask"].clone()
    comp[1] = 0
    with torch.no_grad():
        got = sequence_logps(model, batch["input_ids"], batch["attention_mask"], comp)
    assert got[1].item() == 0.0 and got[0].item() < 0
    bad = torch.zeros_like(comp)
    bad[:, 0] = 1
    with pytest.raises(ValueError, match="first position"):
        sequence_logps(model, batch["input_ids"], batch["attention_mask"], bad)
    with pytest.raises(ValueError, match="shape mismatch"):
        sequence_logps(model, batch["input_ids"], batch["attention_mask"], comp[:, 1:])
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_logps(model, batch["input_ids"], batch["attention_mask"], comp, chunk_size=0)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_peft_lora_model(tok, targets):
    """LoRA on the body (fused head path) and on the LM head itself (generic head path)."""
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=2, seed=2)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    ).eval()
    batch = PreferenceCollator(tok, padding_side="left")(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])

    def grads(fn):
        lora.zero_grad(set_to_none=True)
        out = fn()
        (out * torch.arange(1.0, 7.0)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in lora.named_parameters() if p.grad is not None}  # fmt: skip

    ours, ours_grads = grads(lambda: sequence_logps(lora, *args, chunk_size=3))
    naive, naive_grads = grads(lambda: naive_sequence_logps(lora, *args))
    with torch.no_grad(), lora.disable_adapter():
        no_adapter = sequence_logps(lora, *args)
    torch.testing.assert_close(ours, naive, rtol=1e-6, atol=1e-5)
    assert (ours - no_adapter).abs().max() > 1e-3  # the adapter is really applied
    assert ours_grads.keys() == naive_grads.keys()
    assert ours_grads and all("lora_" in n for n in ours_grads)
    assert any("lm_head" in n for n in ours_grads) == ("lm_head" in targets)
    for name, grad in naive_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_prompt_learning_peft_is_refused(tok):
    peft = pytest.importorskip("peft")
    base = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=1)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    model = peft.get_peft_model(base, cfg)
    batch = PreferenceCollator(tok)(ROWS[:1])
    with pytest.raises(NotImplementedError, match="prompt-learning"):
        sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])


LOGIT_TRANSFORMS = {
    # architecture: (config class, model class, attribute, value, neutral value)
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", "final_logit_softcapping", 0.5, None),
    "granite": ("GraniteConfig", "GraniteForCausalLM", "logits_scaling", 4.0, 1.0),
    "cohere": ("CohereConfig", "CohereForCausalLM", "logit_scale", 0.25, 1.0),
}


@pytest.mark.parametrize("arch", list(LOGIT_TRANSFORMS))
def test_architecture_logit_transforms_are_applied(tok, arch):
    """Soft-capping (Gemma 2) and logit scaling (Granite, Cohere) as the model's forward does."""
    import transformers

    config_cls, model_cls, attribute, value, neutral = LOGIT_TRANSFORMS[arch]
    cfg = getattr(transformers, config_cls)(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    setattr(cfg, attribute, value)
    torch.manual_seed(3)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50.0)  # large raw logits: capping matters
    batch = PreferenceCollator(tok)(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    naive = naive_sequence_logps(model, *args)
    model.zero_grad(set_to_none=True)
    naive.sum().backward()
    naive_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        ours = sequence_logps(model, *args, chunk_size=4, fused=fused)
        ours.sum().backward()
        torch.testing.assert_close(ours, naive, rtol=1e-6, atol=1e-5)
        for name, grad in naive_grads.items():
            got = dict(model.named_parameters())[name].grad
            torch.testing.assert_close(got, grad, rtol=1e-4, atol=1e-5, msg=f"{arch} {name}")
    setattr(model.config, attribute, neutral)
    with torch.no_grad():
        plain = sequence_logps(model, *args)
    assert (ours.detach() - plain).abs().max() > 1.0  # the transform really changes the answer


def test_model_without_backbone_is_refused():
    class Bare(torch.nn.Module):
        def get_output_embeddings(self):
            return torch.nn.Linear(2, 2)

    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(NotImplementedError, match="cannot find the backbone"):
        sequence_logps(Bare(), ids, ids, ids * 0)


# ---- padding-free packing ------------------------------------------------------------------


def _qwen2(tok):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(2)
    cfg = Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("varlen", [False, True], ids=["masked", "varlen"])
@pytest.mark.parametrize("capacity", [None, 10**6, 1], ids=["longest", "one-row", "own-rows"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_packing_gives_the_padded_logps_and_gradients(tok, arch, side, capacity, varlen):
    """Padding-free rows with position ids restarting per sequence (rows of the longest
    sequence, all in one row, each in its own), attention through transformers' block-diagonal
    mask or one sequence at a time (``inpo.varlen``): the same log-probs and gradients as the
    padded batch (to 1e-5), whatever the padding side."""
    from inpo.layout import check_packing_support
    from inpo.logprobs import packed_sequence_logps

    model = (
        _qwen2(tok)
        if arch == "qwen2"
        else tiny_causal_lm(arch, tok, hidden_size=32, num_hidden_layers=2, seed=1).eval()
    )
    check_packing_support(model)
    batch = PreferenceCollator(tok, padding_side=side)(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()  # padding
    weights = torch.linspace(-1.0, 2.0, 6)

    def run(fn):
        model.zero_grad(set_to_none=True)
        lp = fn(model, *args)
        (lp * weights).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded, g_padded = run(sequence_logps)
    packed, g_packed = run(lambda *a: packed_sequence_logps(*a, capacity=capacity, varlen=varlen))
    assert model.config._attn_implementation == "sdpa"  # switched back after the forward
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)
    for name in g_padded:
        torch.testing.assert_close(g_packed[name], g_padded[name], rtol=1e-4, atol=1e-5, msg=name)
