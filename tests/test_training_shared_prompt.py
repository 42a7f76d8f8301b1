"""``data.share_prompt``: each pair as one row ``prompt + chosen + rejected``.

The shared-prompt log-probs, their gradients and whole training runs must equal the unshared
computation (two rows ``prompt + chosen`` and ``prompt + rejected``) up to float rounding. Every
model is a real tiny transformers model saved to disk and reloaded with ``from_pretrained``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inpo.config import load_config
from inpo.data import PreferenceCollator
from inpo.errors import ConfigError
from inpo.layout import bucketed_shared_logps, check_shared_prompt_support
from inpo.logprobs import sequence_logps, shared_prompt_logps, shared_prompt_mask
from inpo.training import TrainConfig, train

ROWS = [
    {"prompt": "Q: what is 2+2?", "chosen": " four", "rejected": " five, or so I think"},
    {"prompt": "hi", "chosen": " hello there, friend", "rejected": " no"},
    {"prompt": "a longer prompt, for padding", "chosen": " x", "rejected": " yy"},
]


def load(tmp_path: Path, arch: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inpo.tiny import save_tiny_lm

    folder = save_tiny_lm(tmp_path / arch, arch, hidden_size=32, num_hidden_layers=2)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn)
    return model, AutoTokenizer.from_pretrained(folder)


def both_ways(model, tok, rows, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2B]`` log-probs (chosen, then rejected) unshared and shared."""
    sep = PreferenceCollator(tok, padding_side=side)(rows)
    want = sequence_logps(model, sep["input_ids"], sep["attention_mask"], sep["completion_mask"])
    sh = PreferenceCollator(tok, padding_side=side, share_prompt=True)(rows)
    mask = shared_prompt_mask(sh["attention_mask"], sh["chosen_mask"], sh["rejected_mask"])
    got = shared_prompt_logps(
        model,
        sh["input_ids"],
        mask,
        sh["position_ids"],
        sh["chosen_mask"],
        sh["rejected_mask"],
        sh["attention_mask"],
    )
    return want, got


def assert_same_gradients(model, want: torch.Tensor, got: torch.Tensor) -> None:
    """The gradients of a weighted sum of ``got`` equal those of ``want`` (to 1e-5)."""
    weights = torch.linspace(-1.0, 2.0, want.numel())
    grads = []
    for lp in (want, got):
        model.zero_grad()
        (lp * weights).sum().backward(retain_graph=True)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_collator_packs_prompt_chosen_rejected_with_restarting_positions():
    from inpo.tiny import char_tokenizer

    tok = char_tokenizer()
    row = {"prompt": "ab", "chosen": "cd", "rejected": "e"}  # completions get an EOS each
    batch = PreferenceCollator(tok, share_prompt=True)([row, {**row, "prompt": "abcd"}])
    assert batch["position_ids"][0, :8].tolist() == [0, 1, 2, 3, 4, 2, 3, 0]
    assert batch["chosen_mask"][0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0]
    assert batch["rejected_mask"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0, 0]
    assert batch["prompt_lengths"].tolist() == [2, 4]
    assert batch["chosen_lengths"].tolist() == [3, 3]
    assert batch["rejected_lengths"].tolist() == [2, 2]
    mask = shared_prompt_mask(batch["attention_mask"], batch["chosen_mask"], batch["rejected_mask"])
    assert mask.shape == (2, 1, 9, 9)
    assert not mask[0, 0, 5:7, 2:5].any()  # rejected never sees chosen
    assert mask[0, 0, 6, :2].all() and mask[0, 0, 6, 5:7].all()  # ... but the prompt and itself
    assert not mask[0, 0, :7, 7:].any()  # no real token sees padding


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_shared_logps_and_gradients_equal_unshared(tmp_path, arch, side):
    model, tok = load(tmp_path, arch)
    want, got = both_ways(model, tok, ROWS, side)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert_same_gradients(model, want, got)


@pytest.mark.parametrize("varlen", [False, True], ids=["masked", "varlen"])
@pytest.mark.parametrize("capacity", [None, 10**6])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_shared_logps_and_gradients_equal_unshared(tmp_path, arch, attn, capacity, varlen):
    """``data.share_prompt`` with ``data.packing``: the pairs' rows packed without padding
    (as long as the longest row, or all in one row), each pair in its own segment (a mask, or
    attention one pair at a time with the rejected answer branching off the prompt:
    ``inpo.varlen``), still equal the unshared padded computation, log-probs and gradients."""
    from inpo.logprobs import packed_shared_prompt_logps

    if arch == "gpt2" and attn == "eager":
        pytest.skip("one eager case is enough")
    model, tok = load(tmp_path, arch, attn=attn)
    rows = [*ROWS, {"prompt": "x", "chosen": " a much longer chosen answer", "rejected": " b"}]
    sep = PreferenceCollator(tok)(rows)
    want = sequence_logps(model, sep["input_ids"], sep["attention_mask"], sep["completion_mask"])
    sh = PreferenceCollator(tok, share_prompt=True)(rows)
    got = packed_shared_prompt_logps(
        model, sh["input_ids"], sh["position_ids"], sh["chosen_mask"], sh["rejected_mask"],
        sh["attention_mask"], capacity=capacity, varlen=varlen,
    )  # fmt: skip
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
    assert_same_gradients(model, want, got)


def test_eager_attention_takes_the_additive_mask(tmp_path):
    model, tok = load(tmp_path, "llama", attn="eager")
    want, got = both_ways(model, tok, ROWS, "right")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)


def test_first_rejected_token_is_predicted_from_the_last_prompt_token(tmp_path):
    """Conditioning the rejected completion on the chosen one changes its log-prob: the
    equality above is not an accident of a model that ignores context."""
    model, tok = load(tmp_path, "llama")
    sh = PreferenceCollator(tok, share_prompt=True)(ROWS)
    causal = shared_prompt_mask(
        sh["attention_mask"], torch.zeros_like(sh["chosen_mask"]), sh["rejected_mask"]
    )
    _, want = both_ways(model, tok, ROWS, "right")
    leaky = shared_prompt_logps(
        model,
        sh["input_ids"],
        causal,
        sh["position_ids"],
        sh["chosen_mask"],
        sh["rejected_mask"],
        sh["attention_mask"],
    )
    b = len(ROWS)
    torch.testing.assert_close(leaky[:b], want[:b])  # chosen are unaffected
    assert (leaky[b:] - want[b:]).abs().min() > 1e-3


def test_length_buckets_in_shared_mode_change_nothing(tmp_path):
    model, tok = load(tmp_path, "llama")
    batch = PreferenceCollator(tok, share_prompt=True)(ROWS)
    one = bucketed_shared_logps(model, batch, buckets=1)
    three = bucketed_shared_logps(model, batch, buckets=6)  # 3 groups of one row
    torch.testing.assert_close(three, one, atol=1e-5, rtol=1e-6)


def test_unsupported_attention_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="attn_implementation=flash_attention_2"):
        load_config(
            TrainConfig,
            None,
            [
                f"output_dir={tmp_path}",
                "model.path=x",
                "data.train_file=y",
                "data.share_prompt=true",
                "model.attn_implementation=flash_attention_2",
            ],
        )


def test_sliding_window_architecture_is_refused_naming_it():
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=0,
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    with pytest.raises(ConfigError, match="Qwen2ForCausalLM"):
        check_shared_prompt_support(model)


def test_supported_models_pass_the_check(tmp_path):
    for arch in ("llama", "gpt2"):
        model, _ = load(tmp_path, arch)
        check_shared_prompt_support(model)


# ---- the training loop -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inpo.layout import completion_logps
    from inpo.tiny import save_tiny_lm

    root = tmp_path_factory.mktemp("shared")
    model_dir = save_tiny_lm(root / "model", "llama", hidden_size=32, num_hidden_layers=2)
    rows = [
        {
            "prompt": f"Q{i}: add {i} and {i + 1}, please?",
            "chosen": f" {2 * i + 1}.",
            "rejected": f" maybe {i * 7 % 11} or so",
        }
        for i in range(8)
    ]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [r["prompt"] for r in rows]
    chosen = completion_logps(model, tok, prompts, [r["chosen"] for r in rows])
    rejected = completion_logps(model, tok, prompts, [r["rejected"] for r in rows])
    data = root / "pairs.jsonl"
    with data.open("w") as fh:
        for r, c, j in zip(rows, chosen.tolist(), rejected.tolist(), strict=True):
            extra = {"ref_chosen_logps": c, "ref_rejected_logps": j}
            extra |= {"prev_chosen_logps": c, "prev_rejected_logps": j}
            fh.write(json.dumps({**r, **extra}) + "\n")
    return model_dir, data


def run(tiny, out: Path, *overrides: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    model_dir, data = tiny
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"output_dir={out}",
            f"model.path={model_dir}",
            f"data.train_file={data}",
            "optim.global_batch_size=4",
            "optim.per_device_batch_size=2",
            "optim.learning_rate=0.001",
            "optim.warmup_ratio=0.0",
            "optim.max_steps=3",
            "loss.eta=0.1",
            "logging.progress_bar=false",
            *overrides,
        ],
    )
    train(cfg)
    return load_file(str(out / "model.safetensors"))


def test_training_with_shared_prompt_gives_the_same_weights(tiny, tmp_path):
    plain = run(tiny, tmp_path / "plain")
    shared = run(tiny, tmp_path / "shared", "data.share_prompt=true")
    start = run(tiny, tmp_path / "none", "optim.learning_rate=1e-30")
    moved = max((plain[k] - start[k]).abs().max().item() for k in plain)
    assert moved > 1e-3  # training did change the weights
    for key, value in plain.items():
        torch.testing.assert_close(shared[key], value, atol=1e-5, rtol=1e-5, msg=key)
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("plain", "shared")]
    tokens = [[json.loads(x)["tokens"] for x in run_lines] for run_lines in lines]
    assert tokens[0] == tokens[1]  # tokens count (prompt + chosen) + (prompt + rejected) both ways


def test_custom_logps_fn_with_shared_prompt_is_refused(tiny, tmp_path):
    model_dir, data = tiny
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"output_dir={tmp_path}",
            f"model.path={model_dir}",
            f"data.train_file={data}",
            "data.share_prompt=true",
        ],
    )
    with pytest.raises(ValueError, match="share_prompt"):
        train(cfg, logps_fn=sequence_logps)


@pytest.mark.slow
def test_flex_attention_takes_a_block_mask_from_the_token_masks(tmp_path):
    """``flex_attention``: the shared-prompt mask as a block-sparse ``BlockMask`` built from the
    ``[B, L]`` token masks (no dense ``[B, L, L]``), the same log-probs as sdpa's dense mask.
    Forward only: torch runs flex attention's backward on GPUs only (compiled by inductor here),
    so training with it is for GPU machines."""
    from transformers import AutoModelForCausalLM

    from inpo.logprobs import shared_prompt_block_mask

    model, tok = load(tmp_path, "llama")
    flex = AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", attn_implementation="flex_attention"
    )
    sh = PreferenceCollator(tok, share_prompt=True)(ROWS)
    block = shared_prompt_block_mask(sh["attention_mask"], sh["chosen_mask"], sh["rejected_mask"])
    dense = shared_prompt_mask(sh["attention_mask"], sh["chosen_mask"], sh["rejected_mask"])
    assert block.shape[0] == len(ROWS) and block.shape[-1] == dense.shape[-1]
    args = (
        sh["input_ids"],
        dense,
        sh["position_ids"],
        sh["chosen_mask"],
        sh["rejected_mask"],
        sh["attention_mask"],
    )
    with torch.no_grad():
        want = shared_prompt_logps(model, *args)
        got = shared_prompt_logps(flex, *args)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6)
