"""The default task: grammar, cyclic panel, BT oracle, cached reference, exact evaluation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from inpo.errors import ConfigError, OracleError
from inpo.game.exact import duality_gap, exploitability
from inpo.tasks import DefaultTask, DefaultTaskConfig, PolicyTable
from inpo.tasks.bt import bt_log_likelihood_grad
from inpo.tasks.sft import MANIFEST, cached_build, read_manifest


@pytest.fixture(scope="module")
def task():
    return DefaultTask(DefaultTaskConfig())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The default task with its reference built once for the module: (task, model, tokenizer)."""
    t = DefaultTask(DefaultTaskConfig())
    t.build_reference(tmp_path_factory.mktemp("cache"))
    model, tok = t.load_reference()
    return t, model, tok


def _cyclic_triple(p: np.ndarray) -> tuple[int, int, int] | None:
    """Indices ``a, b, c`` with a strict majority ``a ≻ b ≻ c ≻ a``, if any."""
    beats = p > 0.5
    two = beats.astype(float) @ beats.astype(float)  # two[a, c] = #b with a ≻ b ≻ c
    cand = np.argwhere((two > 0) & beats.T)  # ... and c ≻ a
    if not len(cand):
        return None
    a, c = (int(v) for v in cand[0])
    b = int(np.flatnonzero(beats[a] & beats[:, c])[0])
    return a, b, c


# ---------------------------------------------------------------------------------------------
# Grammar, panel, BT oracle (no model)
# ---------------------------------------------------------------------------------------------


def test_grammar_and_enumeration_are_deterministic(task):
    again = DefaultTask(DefaultTaskConfig())
    assert again.prompts_train == task.prompts_train
    assert again.prompts_eval == task.prompts_eval
    assert again.responses() == task.responses()
    assert len(task.prompts_eval) == 12 and len(task.prompts_train) == 54 - 12
    assert not set(task.prompts_eval) & set(task.prompts_train)
    ys = task.responses()
    assert len(ys) == 7 + 49 + 343 == len(set(ys))
    assert ys[:2] == ["red", "blue"] and ys[-1] == "very very very"
    assert sorted(np.bincount(task.lengths)[1:]) == [7, 49, 343]
    other = DefaultTask(DefaultTaskConfig(seed=1))
    assert other.prompts_eval != task.prompts_eval  # the split follows the seed
    assert task.grammar.keyword_of("describe a red circle") == "red"
    assert task.grammar.keyword_of("draw a star in blue") == "star"
    with pytest.raises(OracleError, match="not one of the default task"):
        task.responses("describe a purple circle")


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="noise"):
        DefaultTask(DefaultTaskConfig(noise=0.0))
    with pytest.raises(ConfigError, match="n_eval_prompts"):
        DefaultTask(DefaultTaskConfig(n_eval_prompts=54))
    with pytest.raises(ConfigError, match="tau"):
        DefaultTask(DefaultTaskConfig(tau=0.2, eta=0.1))
    with pytest.raises(ConfigError, match="sft_length_probs"):
        DefaultTask(DefaultTaskConfig(sft_length_probs=[0.5, 0.5]))
    with pytest.raises(ConfigError, match="max_len"):
        DefaultTask(DefaultTaskConfig(max_len=4))
    with pytest.raises(ConfigError, match="template word"):
        DefaultTask(DefaultTaskConfig(colors=["red", "a"]))


def test_config_loads_with_overrides():
    from inpo.config import load_config

    cfg = load_config(DefaultTaskConfig, overrides=["tau=0.1", "colors=red,blue", "seed=3"])
    assert cfg.tau == 0.1 and cfg.colors == ["red", "blue"] and cfg.seed == 3
    task = DefaultTask(cfg)
    assert len(task.prompts) == 6 * 2 * 3 and len(task.responses()) == 6 + 36 + 216
    with pytest.raises(ConfigError, match="did you mean 'noise'"):
        load_config(DefaultTaskConfig, overrides=["nois=0.2"])


def test_exact_matrix_is_the_panels(task):
    prompts = task.prompts_eval[:3]
    p = task.preference_matrix(prompts)
    ys = task.responses()
    assert p.shape == (3, 399, 399)
    np.testing.assert_allclose(p + p.transpose(0, 2, 1), 1.0, atol=1e-12)
    assert np.all(np.diagonal(p, axis1=1, axis2=2) == 0.5)
    # Bit-for-bit the panel's own (pure Python) matrix, on a subset of responses.
    rng = np.random.default_rng(0)
    sub = sorted(rng.choice(len(ys), size=40, replace=False))
    ref = task.panel().preference_matrix(prompts[0], [ys[i] for i in sub])
    assert np.array_equal(p[0][np.ix_(sub, sub)], ref)
    # And the panel's prob_prefers on random pairs (the lower triangle is 1 − P[j, i]).
    i, j = rng.integers(len(ys), size=(2, 50))
    for m, x in enumerate(prompts):
        got = task.panel().prob_prefers([x] * 50, [ys[k] for k in i], [ys[k] for k in j])
        np.testing.assert_allclose(got, p[m, i, j], rtol=0, atol=1e-15)


def test_panel_is_cyclic_without_condorcet_winner(task):
    one_per_keyword = {task.grammar.keyword_of(x): x for x in task.prompts}
    assert len(one_per_keyword) == 6
    p = task.preference_matrix(list(one_per_keyword.values()))
    for pm in p:
        triple = _cyclic_triple(pm)
        assert triple is not None
        a, b, c = triple
        assert pm[a, b] > 0.5 and pm[b, c] > 0.5 and pm[c, a] > 0.5
        # No response beats every other by a majority.
        assert not ((pm > 0.5).sum(axis=1) == pm.shape[0] - 1).any()


def test_bt_oracle_is_the_mle_and_misses_the_cycle(task):
    bt = task.bt_reward_oracle()
    prompts = task.prompts_eval[:2]
    p = task.preference_matrix(prompts)
    ys = task.responses()
    r = np.stack([bt.rewards([x] * len(ys), ys) for x in prompts])
    assert np.abs(bt_log_likelihood_grad(p, r)).max() < 1e-8

    # A perturbation lowers the likelihood (a maximum, not just a stationary point).
    def loglik(rr):
        d = rr[:, None] - rr[None, :]
        return np.sum(p[0] * -np.logaddexp(0.0, -d))

    bump = np.random.default_rng(0).normal(size=len(ys)) * 1e-2
    assert loglik(r[0]) > loglik(r[0] + bump)
    # σ(r_a − r_b) cannot be > ½ on all three pairs of the panel's cycle.
    a, b, c = _cyclic_triple(p[0])
    x = prompts[0]
    bt_says = bt.prob_prefers([x] * 3, [ys[a], ys[b], ys[c]], [ys[b], ys[c], ys[a]])
    assert (bt_says <= 0.5).any()
    np.testing.assert_allclose(bt.matrix(x)[[a, b, c], [b, c, a]], bt_says)
    # Out-of-set responses rank with the worst enumerable one; unknown prompts are errors.
    assert bt.rewards([x], ["red red red red"])[0] == r[0].min()
    assert bt.stats.extra["outside_set"] == 1
    # The panel itself compares any string (its tastes are defined on all text).
    got = task.panel().prob_prefers([x], ["red red red red"], ["red <unk>"])[0]
    assert 0.0 < got < 1.0
    with pytest.raises(OracleError, match="no rewards for prompt"):
        bt.rewards(["hello"], ["red"])


def test_exact_tabular_inpo_halves_the_gap_of_a_broad_reference(task):
    """On the task's matrices from the SFT target μ, the exact INPO iteration at the task's η, τ
    halves the duality gap within 3 iterations (the target the LM pipeline aims for)."""
    mu = task.sft_distribution()
    assert mu.sum() == pytest.approx(1.0) and mu[0] == pytest.approx(1 / 3 / 7)
    logps = np.log(np.tile(mu, (len(task.prompts_eval), 1)))
    ref = PolicyTable(task.prompts_eval, task.responses(), logps)
    out = task.tabular_inpo(ref, iterations=3)
    assert out["gap"][0] > 0.1
    assert out["gap"][3] < out["gap"][0] / 2
    assert out["gap"] == sorted(out["gap"], reverse=True)


def test_import_is_light():
    code = "import sys, inpo.tasks; print('transformers' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cached_build_is_atomic(tmp_path):
    def broken(_tmp):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_build(tmp_path / "x", "k1", broken)
    assert list(tmp_path.iterdir()) == []  # no final folder, no temporary left behind
    calls = []

    def build(tmp):
        calls.append(1)
        (tmp / "f.txt").write_text("hi")
        return {"n": 1}

    path, built = cached_build(tmp_path / "x", "k1", build)
    assert built and (path / "f.txt").read_text() == "hi" and read_manifest(path)["n"] == 1
    assert cached_build(tmp_path / "x", "k1", build) == (path, False)
    assert cached_build(tmp_path / "x", "k2", build) == (path, True)  # stale key: rebuilt
    assert len(calls) == 2 and read_manifest(path)["key"] == "k2"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_cached_folder_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    def build(tmp):
        (tmp / "model.safetensors").write_bytes(bytes(range(256)) * 4)
        return {}

    path, _ = cached_build(tmp_path / "x", "k", build)
    target = path / "model.safetensors"
    raw = target.read_bytes()
    if damage == "flip":
        target.write_bytes(raw[:10] + bytes([raw[10] ^ 1]) + raw[11:])
    elif damage == "truncate":
        target.write_bytes(raw[:100])
    else:
        target.unlink()
    with caplog.at_level("WARNING"):
        assert cached_build(tmp_path / "x", "k", build) == (path, True)
    assert "not usable" in caplog.text and "rebuilding" in caplog.text
    assert target.read_bytes() == raw


# ---------------------------------------------------------------------------------------------
# The reference LM and exact evaluation
# ---------------------------------------------------------------------------------------------


def test_reference_is_cached_and_loads_with_auto_classes(reference, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task, _, _ = reference
    path = task.reference_path
    assert task.reference_built
    manifest = read_manifest(path)
    assert manifest["key"] == task.reference_key()
    assert manifest["mass_outside"]["eval"] < 0.05
    assert (path / "model.safetensors").is_file()
    mtime = (path / MANIFEST).stat().st_mtime_ns
    again = DefaultTask(DefaultTaskConfig())
    assert again.build_reference(path.parent) == path
    assert not again.reference_built
    assert (path / MANIFEST).stat().st_mtime_ns == mtime
    # The panel, τ and η do not change the reference; the SFT settings do.
    assert (
        DefaultTask(DefaultTaskConfig(noise=0.2, tau=0.1)).reference_key() == task.reference_key()
    )
    assert DefaultTask(DefaultTaskConfig(sft_steps=10)).reference_key() != task.reference_key()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("describe a red circle")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [
        "<s>",
        "describe",
        "a",
        "red",
        "circle",
        "<|assistant|>",
    ]
    assert model.config.vocab_size == len(tok)
    # Plain decoding spells every enumerable response as the set does (so a generic sampler,
    # e.g. ``inpo.generation``, finds its samples in the oracle's tables).
    for y in task.responses():
        ids = tok(y, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(y.split()) and tok.decode(ids, skip_special_tokens=True) == y


def test_policy_table_is_exact(reference):
    import torch

    task, model, tok = reference
    table = task.policy_table(model, tok)
    assert table.logps.shape == (12, 399)
    sums = table.probs.sum(axis=1)
    assert np.all(sums <= 1.0 + 1e-6)
    np.testing.assert_allclose(table.mass_outside, np.clip(1.0 - sums, 0, 1))
    assert table.mass_outside.mean() < 0.05
    np.testing.assert_allclose(table.policy.sum(axis=1), 1.0)
    # Direct float64 computation, token by token, for two responses of two prompts.
    m64 = type(model).from_pretrained(task.reference_path, dtype=torch.float64).eval()
    ys = task.responses()
    for mi, ni in [(0, ys.index("red")), (5, ys.index("star square red"))]:
        ids = tok(table.prompts[mi])["input_ids"]
        total = 0.0
        for t in [*tok(ys[ni], add_special_tokens=False)["input_ids"], tok.eos_token_id]:
            with torch.no_grad():
                logits = m64(torch.tensor([ids])).logits[0, -1]
            total += float(torch.log_softmax(logits, -1)[t])
            ids = [*ids, t]
        assert table.logps[mi, ni] == pytest.approx(total, abs=1e-4)
    # Same numbers as the pipeline's own scorer.
    from inpo.layout import completion_logps

    lp = completion_logps(model, tok, [table.prompts[1]] * 3, ys[:3], batch_size=2)
    np.testing.assert_allclose(lp.numpy(), table.logps[1, :3], atol=1e-5)


def test_evaluate_reference_against_itself(reference):
    task, model, tok = reference
    ref = task.reference_table()
    metrics = task.evaluate(model, tok)
    assert metrics["win_rate_vs_ref"] == pytest.approx(0.5, abs=1e-12)
    assert metrics["kl_to_ref"] == pytest.approx(0.0, abs=1e-12)
    p = task.preference_matrix()
    gap = duality_gap(p, ref.policy, ref.policy, task.config.tau).mean()
    assert metrics["duality_gap"] == pytest.approx(gap, rel=1e-12)
    assert metrics["duality_gap"] > 0.1  # far from the regularised Nash: room for INPO
    assert metrics["exploitability"] == pytest.approx(exploitability(p, ref.policy).mean())
    assert metrics["mass_outside"] == pytest.approx(ref.mass_outside.mean())
    assert 1.5 < metrics["mean_length"] < 2.5  # π_ref ≈ μ: lengths 1, 2, 3 equally likely
    # A different policy (the reference's best response, as a table) wins against π_ref.
    w = np.einsum("mij,mj->mi", p, ref.policy)
    assert (w.max(axis=1) > 0.5).all()


def test_evaluate_another_policy_matches_the_game_functions(reference):
    """A policy that is not π_ref (its "very" logit perturbed): metrics equal inpo.game.exact
    on its table."""
    import copy

    import torch

    from inpo.game.exact import kl

    task, model, tok = reference
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight[tok.convert_tokens_to_ids("very")] += 2.0
    ref = task.reference_table()
    table = task.policy_table(other, tok)
    metrics = task.evaluate(other, tok)
    p = task.preference_matrix()
    pi, pr = table.policy, ref.policy
    tau = task.config.tau
    assert metrics["duality_gap"] == pytest.approx(duality_gap(p, pi, pr, tau).mean(), rel=1e-12)
    assert metrics["exploitability"] == pytest.approx(exploitability(p, pi).mean(), rel=1e-12)
    assert metrics["kl_to_ref"] == pytest.approx(kl(pi, pr).mean(), rel=1e-12) and (
        metrics["kl_to_ref"] > 0.1
    )
    win = np.mean([pi[m] @ p[m] @ pr[m] for m in range(len(pi))])
    assert metrics["win_rate_vs_ref"] == pytest.approx(win, rel=1e-12)
    assert metrics["win_rate_vs_ref"] != pytest.approx(0.5, abs=1e-3)
    very = np.array(["very" in y.split() for y in task.responses()])
    assert (np.abs(pi[:, very].sum(1) - pr[:, very].sum(1)) > 0.1).all()
    # KL(π* ‖ π) to the regularised Nash, on two prompts (solving π* costs ~1 s a prompt).
    two = task.prompts_eval[:2]
    ref2 = task.reference_table(two)
    out = task.evaluate(other, tok, ref_table=ref2, prompts=two, nash=True)
    star = task.regularized_nash(ref2)
    assert duality_gap(task.preference_matrix(two), star, ref2.policy, tau).max() < 1e-9
    pi2 = task.policy_table(other, tok, two).policy
    assert out["kl_nash"] == pytest.approx(kl(star, pi2).mean(), rel=1e-12)
    assert task.evaluate(model, tok, ref_table=ref2, prompts=two, nash=True)["kl_nash"] == (
        pytest.approx(kl(star, ref2.policy).mean(), rel=1e-12)
    )


def test_sample_responses_reproducible_and_inside(reference):
    from inpo.tasks import sample_responses

    task, model, tok = reference
    prompts = task.prompts_eval[:4]
    a = task.sample(model, tok, prompts, 8, seed=3)
    assert a == task.sample(model, tok, prompts, 8, seed=3)
    assert a != task.sample(model, tok, prompts, 8, seed=4)
    # Batching does not change a sample: one random stream per (seed, prompt, sample index).
    b = sample_responses(model, tok, prompts[::-1], 8, seed=3, max_new_tokens=4, batch_size=5)
    assert b[::-1] == a
    inside = set(task.responses())
    flat = [y for ys in a for y in ys]
    assert len(flat) == 32 and np.mean([y in inside for y in flat]) >= 0.9
    greedy = task.sample(model, tok, prompts[:1], 2, temperature=0.0)
    assert greedy[0][0] == greedy[0][1]


def test_samples_follow_the_exact_table(reference):
    """Empirical frequencies of 1200 samples match the exact table (length and first word)."""
    task, model, tok = reference
    x = task.prompts_eval[0]
    n = 1200
    samples = task.sample(model, tok, [x], n, seed=11)[0]
    table = task.policy_table(model, tok, [x])
    ys = task.responses()
    probs = dict(zip(ys, table.probs[0]))
    for length in (1, 2, 3):
        want = sum(q for y, q in probs.items() if len(y.split()) == length)
        got = np.mean([s in probs and len(s.split()) == length for s in samples])
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-3
    for word in task.grammar.vocab:
        want = sum(q for y, q in probs.items() if y.split()[0] == word)
        got = np.mean([s in probs and s.split()[0] == word for s in samples])
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) / n) + 1e-3
