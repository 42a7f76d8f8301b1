"""The reward-model and pairwise-preference oracles on tiny transformers models.

Each model is built from a config with :mod:`inpo.tiny`, saved to a temp folder and reloaded
with ``from_pretrained`` by the oracle, so the real loading code runs. Output heads are scaled
up so that probabilities are far from ½ and differences are visible.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inpo.errors import ConfigError, OracleError
from inpo.oracles.http import HTTPJudgeOracle
from inpo.oracles.pairwise import PairwisePreferenceOracle, combine_orders
from inpo.oracles.reward_model import RewardModelOracle, length_batches
from inpo.oracles.server import OracleServer
from inpo.selection import best_worst_by_reward, tournament, win_rates
from inpo.tiny import char_tokenizer, tiny_causal_lm, tiny_reward_model

PROMPT = "Name a colour."
SAMPLES = ["Red.", "Blue is a colour.", "I like green", "?", "Yellow, like the sun.", "red"]


@pytest.fixture(scope="module")
def rm_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    tok = char_tokenizer()
    model = tiny_reward_model("llama", tok, seed=1, hidden_size=32, num_hidden_layers=2)
    assert model.config.pad_token_id == tok.pad_token_id  # batching needs it
    with torch.no_grad():
        model.score.weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_pm(path, arch: str):
    tok = char_tokenizer()
    model = tiny_causal_lm(arch, tok, seed=2, hidden_size=32, num_hidden_layers=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pm_path(tmp_path_factory):
    return _save_pm(tmp_path_factory.mktemp("pm"), "llama")


@pytest.fixture(scope="module")
def gpt2_pm_path(tmp_path_factory):
    """Absolute position embeddings: left padding needs explicit position ids."""
    return _save_pm(tmp_path_factory.mktemp("pm-gpt2"), "gpt2")


# ---- Bradley–Terry reward model ----


def _manual_reward(path, prompt: str, response: str) -> float:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    text = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        tokenize=False,
    )
    assert text == f"<|user|>{prompt}</s><|assistant|>{response}</s>"
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return float(model(input_ids=ids).logits[0, 0])


def test_reward_model_is_bradley_terry_on_its_own_chat_template(rm_path):
    oracle = RewardModelOracle(rm_path, batch_size=4, device="cpu")
    r0, r1 = (
        _manual_reward(rm_path, PROMPT, SAMPLES[0]),
        _manual_reward(rm_path, PROMPT, SAMPLES[1]),
    )
    np.testing.assert_allclose(oracle.rewards([PROMPT] * 2, SAMPLES[:2]), [r0, r1], rtol=1e-5)
    p = oracle.prob_prefers([PROMPT], [SAMPLES[0]], [SAMPLES[1]])
    assert p.dtype == np.float64 and p.shape == (1,)
    np.testing.assert_allclose(p, [1.0 / (1.0 + np.exp(-(r0 - r1)))], rtol=1e-5)
    assert abs(p[0] - 0.5) > 0.01  # the scaled head makes a visible difference
    assert oracle.oracle_id.startswith("reward-model:") and ":chat:" in oracle.oracle_id


def test_rewards_are_cached_k_forward_passes_for_all_pairs(rm_path):
    oracle = RewardModelOracle(rm_path, batch_size=4, device="cpu", max_padding=np.inf)
    k = len(SAMPLES)
    ii, jj = np.triu_indices(k, 1)
    p = oracle.prob_prefers([PROMPT] * len(ii), [SAMPLES[i] for i in ii], [SAMPLES[j] for j in jj])
    assert oracle.stats.extra["sequences_scored"] == k  # K forward passes, not K(K-1)
    assert oracle.stats.backend_calls == 2  # ceil(6 / 4) batches
    assert oracle.stats.queries == len(ii)
    again = oracle.prob_prefers(
        [PROMPT] * len(ii), [SAMPLES[j] for j in jj], [SAMPLES[i] for i in ii]
    )
    np.testing.assert_allclose(p + again, 1.0, atol=1e-12)
    assert oracle.stats.extra["sequences_scored"] == k  # nothing new computed
    assert oracle.stats.cache_hits == 2 * len(ii)


def test_reward_model_batched_equals_one_by_one(rm_path):
    batched = RewardModelOracle(rm_path, batch_size=16, device="cpu", max_padding=np.inf)
    single = RewardModelOracle(rm_path, batch_size=1, device="cpu")
    prompts = [PROMPT, "Why?", "Count to three, slowly please."] * 2
    responses = SAMPLES
    np.testing.assert_allclose(
        batched.rewards(prompts, responses), single.rewards(prompts, responses), atol=1e-5
    )
    assert batched.stats.backend_calls == 1 and single.stats.backend_calls == len(
        set(zip(prompts, responses))
    )


def test_length_batches_bound_padding():
    lengths = [10, 100, 11, 12, 95, 50, 10]
    batches = length_batches(lengths, batch_size=3, max_padding=0.25)
    assert batches == [[0, 6, 2], [3], [5], [4, 1]]
    for b in batches:
        padded, real = max(lengths[i] for i in b) * len(b), sum(lengths[i] for i in b)
        assert padded <= 1.25 * real
    assert length_batches(lengths, batch_size=4, max_padding=np.inf) == [[0, 6, 2, 3], [5, 4, 1]]


def test_reward_model_without_chat_template_concatenates(rm_path, tmp_path):
    from transformers import AutoModelForSequenceClassification

    tok = char_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    AutoModelForSequenceClassification.from_pretrained(rm_path).save_pretrained(tmp_path)
    oracle = RewardModelOracle(tmp_path, device="cpu", max_length=12)
    assert not oracle.has_chat_template and ":concat:" in oracle.oracle_id
    assert oracle.render("hi", "yo") == tok("hi\n\nyo")["input_ids"]
    long_ids = oracle.render("a long prompt", "and a long answer")
    assert long_ids == tok("a long prompt\n\nand a long answer")["input_ids"][-12:]
    assert oracle.stats.extra["truncated"] == 1


def test_reward_model_bad_inputs(tmp_path, rm_path):
    with pytest.raises(ConfigError, match="not a model folder"):
        RewardModelOracle(tmp_path / "nowhere", device="cpu")
    tok = char_tokenizer()
    two = tiny_reward_model("llama", tok, hidden_size=16, num_hidden_layers=1)
    two.config.num_labels = 2
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_config(two.config).save_pretrained(tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(ConfigError, match="2 labels"):
        RewardModelOracle(tmp_path / "two", device="cpu")
    with pytest.raises(ConfigError, match="unknown dtype"):
        RewardModelOracle(rm_path, device="cpu", dtype="float8")


def test_reward_model_feeds_best_worst_of_k(rm_path):
    oracle = RewardModelOracle(rm_path, device="cpu")
    result = best_worst_by_reward(oracle, PROMPT, SAMPLES)
    r = oracle.rewards([PROMPT] * len(SAMPLES), SAMPLES)
    assert (result.chosen, result.rejected) == (int(np.argmax(r)), int(np.argmin(r)))


# ---- pairwise preference model ----


def _model_card_prob_first(path, conversation, a: str, b: str) -> float:
    """The RLHFlow model card's code, line for line (``tokenizer_plain`` with the card's
    template renders the context; the comparison is the user turn rendered without a generation
    prompt, BOS removed, encoded without special tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inpo.oracles.pairwise import RLHFLOW_CONTEXT_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer_plain = AutoTokenizer.from_pretrained(path)
    tokenizer_plain.chat_template = RLHFLOW_CONTEXT_TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt_template = "[CONTEXT] {context} [RESPONSE A] {response_A} [RESPONSE B] {response_B} \n"
    context = tokenizer_plain.apply_chat_template(conversation, tokenize=False)
    prompt = prompt_template.format(context=context, response_A=a, response_B=b)
    message = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(message, tokenize=False)
    if tokenizer.bos_token:
        text = text.replace(tokenizer.bos_token, "")
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].double()
    id_a = tokenizer.encode("A", add_special_tokens=False)[0]
    id_b = tokenizer.encode("B", add_special_tokens=False)[0]
    return float(torch.softmax(logits[[id_a, id_b]], -1)[0])


def test_pairwise_matches_a_manual_forward_pass_both_orders(pm_path):
    oracle = PairwisePreferenceOracle(pm_path, batch_size=4, device="cpu")
    a, b = SAMPLES[1], SAMPLES[3]
    conv = [{"role": "user", "content": PROMPT}]
    x = _model_card_prob_first(pm_path, conv, a, b)
    y = _model_card_prob_first(pm_path, conv, b, a)
    p = oracle.prob_prefers([PROMPT], [a], [b])
    np.testing.assert_allclose(p, [0.5 * (x + 1.0 - y)], atol=1e-6)
    assert abs(x - 0.5) > 0.01 and abs(x - (1 - y)) > 1e-4  # a visible position bias, averaged out
    assert oracle.stats.queries == 1 and oracle.stats.extra["sequences_scored"] == 2


def test_pairwise_swap_is_exact_complement_and_self_is_half(pm_path):
    oracle = PairwisePreferenceOracle(pm_path, batch_size=3, device="cpu")
    a, b = SAMPLES[:4], SAMPLES[2:6]
    p_ab = oracle.prob_prefers([PROMPT] * 4, a, b)
    p_ba = oracle.prob_prefers([PROMPT] * 4, b, a)
    assert np.array_equal(p_ba, 1.0 - p_ab)  # bit for bit
    assert np.all(oracle.prob_prefers([PROMPT] * 2, SAMPLES[:2], SAMPLES[:2]) == 0.5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pairwise_batched_equals_one_by_one(arch, request):
    path = request.getfixturevalue("pm_path" if arch == "llama" else "gpt2_pm_path")
    batched = PairwisePreferenceOracle(path, batch_size=16, device="cpu", max_padding=np.inf)
    single = PairwisePreferenceOracle(path, batch_size=1, device="cpu")
    args = ([PROMPT] * 3, SAMPLES[:3], SAMPLES[3:6])
    np.testing.assert_allclose(batched.prob_prefers(*args), single.prob_prefers(*args), atol=1e-6)
    assert batched.stats.backend_calls == 1 and single.stats.backend_calls == 6
    # Per order, in log-odds (the probabilities themselves can be tiny): left padding is exact.
    texts = [batched.render(PROMPT, a, b) for a in SAMPLES[:4] for b in SAMPLES[:4] if a != b]
    assert len({len(t) for t in texts}) > 1  # really padded
    p_batched, p_single = batched.prob_first(texts), single.prob_first(texts)
    log_odds = [np.log(p) - np.log1p(-p) for p in (p_batched, p_single)]
    np.testing.assert_allclose(log_odds[0], log_odds[1], atol=1e-4)


def test_combine_orders_is_exactly_antisymmetric():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(size=1000), rng.uniform(size=1000)
    assert np.array_equal(combine_orders(y, x), 1.0 - combine_orders(x, y))
    np.testing.assert_allclose(combine_orders(x, y), 0.5 * (x + 1.0 - y), atol=1e-15)


def test_pairwise_bad_verdict_tokens_and_lengths(pm_path):
    with pytest.raises(ConfigError, match="'AB' is 2 tokens"):
        PairwisePreferenceOracle(pm_path, token_a="AB", device="cpu")
    with pytest.raises(ConfigError, match="exactly once"):
        PairwisePreferenceOracle(pm_path, template="{prompt} {response_a}", device="cpu")
    short = PairwisePreferenceOracle(pm_path, max_length=20, device="cpu")
    with pytest.raises(OracleError, match="exceeds max_length 20"):
        short.prob_prefers([PROMPT], [SAMPLES[1]], [SAMPLES[2]])


def test_pairwise_runs_the_tournament_and_win_rates(pm_path):
    oracle = PairwisePreferenceOracle(pm_path, device="cpu")
    result = tournament(oracle, PROMPT, SAMPLES[:4])
    assert result.queries == 5  # 3K/2 - 1 for K = 4
    rates = win_rates(oracle, PROMPT, SAMPLES[:4])
    np.testing.assert_allclose(rates.matrix + rates.matrix.T, 1.0, atol=1e-12)


# ---- a model oracle served over HTTP ----


def test_reward_model_served_over_http_matches_local(rm_path):
    local = RewardModelOracle(rm_path, device="cpu")
    served = RewardModelOracle(rm_path, device="cpu")
    with OracleServer(served, port=0) as server:
        judge = HTTPJudgeOracle(server.url, server.model_name, api_key_env=None, concurrency=4)
        ii, jj = np.triu_indices(4, 1)
        args = ([PROMPT] * len(ii), [SAMPLES[i] for i in ii], [SAMPLES[j] for j in jj])
        np.testing.assert_allclose(judge.prob_prefers(*args), local.prob_prefers(*args), atol=1e-6)
        # 2 requests per pair reach the server, but the RM still scores each response once.
        assert server.requests == 2 * len(ii)
        assert served.stats.extra["sequences_scored"] == 4


def test_serve_oracle_builds_model_oracles(rm_path, pm_path):
    from inpo.commands.serve_oracle import _parser, build_oracle

    rm = build_oracle(_parser().parse_args(["--oracle", "reward-model", "--model", str(rm_path)]))
    pm = build_oracle(_parser().parse_args(["--oracle", "pairwise", "--model", str(pm_path)]))
    assert isinstance(rm, RewardModelOracle) and isinstance(pm, PairwisePreferenceOracle)
    assert rm.oracle_id == RewardModelOracle(rm_path, max_length=2048).oracle_id
    # the spelling annotate.oracle and inpo eval use names the same oracle
    same = build_oracle(_parser().parse_args(["--oracle", "reward_model", "--model", str(rm_path)]))
    assert isinstance(same, RewardModelOracle) and same.oracle_id == rm.oracle_id


@pytest.fixture(scope="module")
def llama3_pm_path(tmp_path_factory):
    """A pairwise model whose template writes ``{{ bos_token }}`` (Llama-3 style)."""
    from inpo.tiny import chat_tokenizer

    path = tmp_path_factory.mktemp("pm3")
    tok = chat_tokenizer("llama3")
    model = tiny_causal_lm("llama", tok, seed=2, hidden_size=32, num_hidden_layers=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_pairwise_renders_the_rlhflow_model_cards_format(llama3_pm_path):
    """A multi-turn conversation, rendered and scored exactly as the model card's code does:
    the ``<turn> user`` context, no generation prompt, no BOS (the template's is removed)."""
    from inpo.oracles.pairwise import RLHFLOW_CONTEXT_TEMPLATE, rlhflow_context
    from inpo.tiny import chat_tokenizer

    conv = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another one?"},
    ]
    plain = chat_tokenizer("llama3")
    plain.chat_template = RLHFLOW_CONTEXT_TEMPLATE
    assert rlhflow_context(conv, plain) == plain.apply_chat_template(conv, tokenize=False)
    assert "<turn> assistant\n Red." in rlhflow_context(conv, chat_tokenizer("llama3"))
    assert rlhflow_context("Hi", plain) == plain.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False
    )
    oracle = PairwisePreferenceOracle(llama3_pm_path, device="cpu")
    ids = oracle.render(conv, "Blue.", "?")
    tok = oracle.tokenizer
    assert tok.bos_token_id not in ids
    text = tok.decode(ids)
    assert text.startswith(
        "<|start_header_id|>user<|end_header_id|>\n\n[CONTEXT] \n\n<turn> user\n Name a colour."
    )
    assert text.endswith("[RESPONSE B] ? \n<|eot_id|>")  # no generation prompt after the turn
    a, b = "Blue.", "?"
    x = _model_card_prob_first(llama3_pm_path, conv, a, b)
    y = _model_card_prob_first(llama3_pm_path, conv, b, a)
    np.testing.assert_allclose(
        oracle.prob_prefers([conv], [a], [b]), [0.5 * (x + 1 - y)], atol=1e-6
    )
    # the same conversation as a text prompt is a different query (one user turn)
    assert oracle.render("Name a colour.", a, b) != ids


def test_an_oracle_that_cannot_read_the_text_warns_once_naming_the_share(tmp_path, caplog):
    """A reward model with a word-level tokenizer reading text in words it does not know."""
    import logging

    from inpo.oracles.reward_model import RewardModelOracle
    from inpo.tiny import tiny_reward_model, word_tokenizer

    tok = word_tokenizer(["red", "blue"])
    rm = tiny_reward_model("llama", tok, hidden_size=32)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    oracle = RewardModelOracle(tmp_path / "rm", device="cpu")
    with caplog.at_level(logging.WARNING, logger="inpo.oracles.reward_model"):
        for _ in range(3):
            oracle.prob_prefers(
                ["say a colour please"] * 2, ["red is nice", "blue"], ["x y", "red"]
            )
    said = [r.getMessage() for r in caplog.records if "unknown token" in r.getMessage()]
    assert len(said) == 1 and " of " in said[0] and "%" in said[0], said
    caplog.clear()
    known = word_tokenizer(["red", "blue", "say", "a", "colour"])
    rm = tiny_reward_model("llama", known, hidden_size=32)
    rm.save_pretrained(tmp_path / "rm2")
    known.save_pretrained(tmp_path / "rm2")
    with caplog.at_level(logging.WARNING, logger="inpo.oracles.reward_model"):
        RewardModelOracle(tmp_path / "rm2", device="cpu").prob_prefers(
            ["say a colour"], ["red"], ["blue"]
        )
    assert not [r for r in caplog.records if "unknown token" in r.getMessage()]
