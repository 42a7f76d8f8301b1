"""Synthetic oracles: exact tables, annotator panels (Condorcet cycles), deterministic hard labels."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inpo.errors import ConfigError, OracleError
from inpo.oracles.base import PreferenceOracle
from inpo.oracles.synthetic import (
    AnnotatorGroup,
    AnnotatorPanel,
    HardLabelOracle,
    TableOracle,
    brevity,
    hard_labels,
    keyword,
    lexicographic,
    pair_uniform,
    score_taste,
    validate_preference_matrix,
)

RPS = np.array([[0.5, 1.0, 0.0], [0.0, 0.5, 1.0], [1.0, 0.0, 0.5]])  # cyclic: r ≻ p ≻ s ≻ r


def test_imports_stay_light():
    code = (
        "import sys, inpo.oracles.synthetic, inpo.oracles.cache, inpo.selection\n"
        "heavy = {'torch', 'transformers', 'httpx', 'datasets', 'matplotlib', 'scipy'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- TableOracle ------------------------------------------------------------------------------


def test_table_returns_exact_entries_and_counts():
    ys = ["r", "p", "s"]
    oracle = TableOracle(RPS, ys)
    assert isinstance(oracle, PreferenceOracle)
    got = oracle.prob_prefers(["x"] * 4, ["r", "p", "s", "r"], ["p", "s", "r", "r"])
    assert got.dtype == np.float64 and got.tolist() == [1.0, 1.0, 1.0, 0.5]
    assert (oracle.stats.queries, oracle.stats.backend_calls) == (4, 1)
    np.testing.assert_array_equal(oracle.matrix(), RPS)
    assert oracle.responses() == ys


def test_table_validation_names_the_first_offending_entry():
    with pytest.raises(ConfigError, match=r"matrix\[0, 2\] = 0\.7 and matrix\[2, 0\] = 0\.4"):
        TableOracle([[0.5, 0.5, 0.7], [0.5, 0.5, 0.5], [0.4, 0.5, 0.5]], ["a", "b", "c"])
    with pytest.raises(ConfigError, match=r"matrix\[0, 1\] = -0\.5; entries must be in \[0, 1\]"):
        TableOracle([[0.5, -0.5], [1.5, 0.5]], ["a", "b"])
    with pytest.raises(ConfigError, match=r"matrix\[0, 0\] = nan"):
        TableOracle([[np.nan]], ["a"])
    with pytest.raises(ConfigError, match="square"):
        validate_preference_matrix(np.full((2, 3), 0.5))
    with pytest.raises(ConfigError, match="3 responses"):
        TableOracle(np.full((2, 2), 0.5), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="lists response 'a' twice"):
        TableOracle(np.full((2, 2), 0.5), ["a", "a"])


def test_table_unknown_response_and_per_prompt_tables():
    oracle = TableOracle(RPS, ["r", "p", "s"])
    with pytest.raises(OracleError, match="response 'q'"):
        oracle.prob_prefers(["x"], ["r"], ["q"])
    two = np.array([[0.5, 0.2], [0.8, 0.5]])
    per = TableOracle(None, None, per_prompt={"hi": (two, ["u", "v"])})
    assert per.prob_prefers(["hi", "hi"], ["u", "v"], ["v", "u"]).tolist() == [0.2, 0.8]
    with pytest.raises(OracleError, match="no table for prompt 'other'"):
        per.prob_prefers(["other"], ["u"], ["v"])
    mixed = TableOracle(RPS, ["r", "p", "s"], per_prompt={"hi": (two, ["u", "v"])})
    assert mixed.prob_prefers(["hi", "bye"], ["u", "r"], ["v", "p"]).tolist() == [0.2, 1.0]
    with pytest.raises(ConfigError, match=r"per_prompt\['hi'\]\[0, 1\]"):
        TableOracle(None, None, per_prompt={"hi": ([[0.5, 0.3], [0.3, 0.5]], ["u", "v"])})


def test_oracle_id_is_stable_and_content_addressed():
    a = TableOracle(RPS, ["r", "p", "s"]).oracle_id
    assert a == TableOracle(RPS.copy(), ["r", "p", "s"]).oracle_id
    assert a != TableOracle(RPS.T, ["r", "p", "s"]).oracle_id
    assert a != TableOracle(RPS, ["R", "p", "s"]).oracle_id
    assert a.startswith("table-v1:")
    p1, _ = AnnotatorPanel.condorcet(epsilon=0.1)
    p2, _ = AnnotatorPanel.condorcet(epsilon=0.2)
    assert (
        p1.oracle_id != p2.oracle_id
        and p1.oracle_id == AnnotatorPanel.condorcet(epsilon=0.1)[0].oracle_id
    )


# ---- AnnotatorPanel -----------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_condorcet_panel_majority_is_cyclic(eps):
    panel, ys = AnnotatorPanel.condorcet(epsilon=eps)
    p = panel.preference_matrix("any prompt", ys)
    strong = 2 / 3 * (1 - eps) + 1 / 3 * eps
    np.testing.assert_allclose([p[0, 1], p[1, 2], p[2, 0]], [strong] * 3, atol=1e-12)
    np.testing.assert_allclose(p + p.T, 1.0, atol=1e-12)
    assert p[0, 1] > 0.5 and p[1, 2] > 0.5 and p[2, 0] > 0.5  # r0 ≻ r1 ≻ r2 ≻ r0
    # The exact game has the uniform Nash: every response wins exactly half against uniform.
    np.testing.assert_allclose(p.mean(axis=1), 0.5, atol=1e-12)
    # The matrix feeds an exact TableOracle that answers the same.
    table = TableOracle(p, ys)
    q = ["x"] * 3
    np.testing.assert_allclose(
        table.prob_prefers(q, ys, ys[1:] + ys[:1]), panel.prob_prefers(q, ys, ys[1:] + ys[:1])
    )


def test_panel_probability_formula_with_weights_and_ties():
    groups = [
        AnnotatorGroup(brevity(), weight=3.0),
        AnnotatorGroup(keyword("Yes"), weight=1.0),
        AnnotatorGroup(lexicographic(reverse=True), weight=1.0),
    ]
    panel = AnnotatorPanel(groups, epsilon=0.1)
    # "nah" vs "yes": brevity tie (w .6); keyword and reverse-lex (w .2 each) prefer "yes".
    got = panel.prob_prefers(["x"], ["nah"], ["yes"])[0]
    assert got == pytest.approx(0.6 * 0.5 + 0.2 * 0.1 + 0.2 * 0.1)
    assert panel.prob_prefers(["x"], ["yes"], ["yes"])[0] == pytest.approx(0.5)
    custom = score_taste("prompt overlap", lambda x, y: len(set(x.split()) & set(y.split())))
    solo = AnnotatorPanel([AnnotatorGroup(custom)], epsilon=0.25)
    assert solo.prob_prefers(["red fox"], ["a red fox"], ["a dog"]).tolist() == [0.75]


def test_panel_validation():
    with pytest.raises(ConfigError, match="at least one group"):
        AnnotatorPanel([])
    with pytest.raises(ConfigError, match=r"epsilon=0\.7"):
        AnnotatorPanel([AnnotatorGroup(brevity())], epsilon=0.7)
    with pytest.raises(ConfigError, match="weight -1"):
        AnnotatorPanel([AnnotatorGroup(brevity(), weight=-1)])
    with pytest.raises(ConfigError, match="share the taste name 'brevity'"):
        AnnotatorPanel([AnnotatorGroup(brevity()), AnnotatorGroup(brevity())])


@settings(max_examples=40, deadline=None)
@given(
    ys=st.lists(st.text(alphabet="ab pl", max_size=8), min_size=1, max_size=6),
    eps=st.floats(0.0, 0.5),
)
def test_property_panel_matrix_is_a_preference_matrix(ys, eps):
    panel = AnnotatorPanel(
        [
            AnnotatorGroup(brevity(), 2.0),
            AnnotatorGroup(keyword("pl")),
            AnnotatorGroup(lexicographic()),
        ],
        epsilon=eps,
    )
    p = panel.preference_matrix("x", ys)
    validate_preference_matrix(p)  # P + Pᵀ = 1, entries in [0, 1]
    n = len(ys)
    direct = panel.prob_prefers(["x"] * n * n, [a for a in ys for _ in ys], ys * n)
    np.testing.assert_allclose(direct.reshape(n, n), p, atol=1e-12)


# ---- hard labels -----------------------------------------------------------------------------


def test_hard_labels_are_deterministic_order_free_and_antisymmetric():
    panel, ys = AnnotatorPanel.condorcet(epsilon=0.2, seed=5)
    queries = [(f"prompt {i}", ys[i % 3], ys[(i + 1) % 3]) for i in range(300)]
    prompts, a, b = (list(t) for t in zip(*queries))
    labels = panel.sample_labels(prompts, a, b)
    assert set(labels.tolist()) <= {0.0, 1.0}
    perm = np.random.default_rng(0).permutation(len(queries))
    shuffled = panel.sample_labels(
        [prompts[i] for i in perm], [a[i] for i in perm], [b[i] for i in perm]
    )
    np.testing.assert_array_equal(shuffled, labels[perm])  # independent of batch order
    single = [panel.sample_labels([x], [u], [v])[0] for x, u, v in queries[:20]]
    np.testing.assert_array_equal(single, labels[:20])  # independent of batch composition
    reverse = panel.sample_labels(prompts, b, a)
    np.testing.assert_array_equal(reverse, 1.0 - labels)
    # Unbiased: the label frequency is the panel probability (0.6 here), within 4 sigma.
    assert abs(labels.mean() - 0.6) < 4 * np.sqrt(0.24 / len(labels))
    other_seed = AnnotatorPanel.condorcet(epsilon=0.2, seed=6)[0].sample_labels(prompts, a, b)
    assert not np.array_equal(other_seed, labels)


def test_hard_label_wrapper_over_any_oracle():
    table = TableOracle(np.array([[0.5, 0.7], [0.3, 0.5]]), ["u", "v"])
    hard = HardLabelOracle(table, seed=1)
    assert hard.oracle_id.startswith("hard-labels-v1(seed=1)/table-v1:")
    prompts = [f"p{i}" for i in range(2000)]
    got = hard.prob_prefers(prompts, ["u"] * 2000, ["v"] * 2000)
    assert set(got.tolist()) == {0.0, 1.0}
    assert abs(got.mean() - 0.7) < 4 * np.sqrt(0.21 / 2000)
    assert hard.prob_prefers(["p"], ["u"], ["u"]).tolist() == [0.5]  # exact ½ stays a tie
    np.testing.assert_array_equal(hard.prob_prefers(prompts[:50], ["u"] * 50, ["v"] * 50), got[:50])
    assert hard.stats.queries == 2051
    with pytest.raises(ConfigError, match="no oracle_id"):
        HardLabelOracle(object())  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None)
@given(p=st.floats(0.0, 1.0), x=st.text(max_size=5), a=st.text(max_size=5), b=st.text(max_size=5))
def test_property_hard_label_is_a_threshold_of_one_uniform(p, x, a, b):
    u = pair_uniform(3, x, a, b)
    assert 0.0 <= u < 1.0 and u == pair_uniform(3, x, b, a)
    lab = hard_labels(np.array([p]), [x], [a], [b], seed=3)[0]
    if p == 0.5:
        assert lab == 0.5
    elif a <= b:
        assert lab == float(u < p)
    else:
        assert lab == 1.0 - hard_labels(np.array([1 - p]), [x], [b], [a], seed=3)[0]


def test_hard_labels_make_the_k2_tournament_final_confirm():
    from inpo.selection import tournament

    panel, ys = AnnotatorPanel.condorcet(epsilon=0.3)
    hard = HardLabelOracle(panel, seed=2)
    for i in range(30):
        pair = [ys[i % 3], ys[(i + 1) % 3]]
        res = tournament(hard, f"prompt {i}", pair)
        assert res.chosen is not None and res.queries == 2  # antisymmetric labels: no rejection


@pytest.mark.parametrize("bad", [float("nan"), 1.7, -0.1, float("inf")])
def test_hard_labels_refuse_probabilities_outside_0_1(bad):
    from inpo.errors import OracleError
    from inpo.oracles.synthetic import HardLabelOracle

    class Broken:
        oracle_id = "broken"

        def prob_prefers(self, prompts, a, b):
            return np.array([0.3, bad])

    with pytest.raises(OracleError, match=r"query 1 .*expected a value in \[0, 1\]"):
        HardLabelOracle(Broken(), seed=0).prob_prefers(["p", "q"], ["a", "b"], ["c", "d"])


def test_the_three_label_estimators_through_the_run_config(tmp_path):
    """``annotate.labels``: ``sample`` draws Bernoulli(P) (mean P over many pairs),
    ``threshold`` is the INPO authors' ``P > ½`` (biased), ``soft`` is P itself; each is its
    own oracle id, so switching never reuses the other's cached answers."""
    from inpo.pipeline.config import AnnotateConfig
    from inpo.pipeline.oracle import build_oracle

    p = 0.7
    table = np.array([[0.5, p], [1 - p, 0.5]])
    base = TableOracle(table, ["u", "v"])
    prompts = [f"x{i}" for i in range(2000)]
    got, ids = {}, set()
    for kind in ("sample", "threshold", "soft"):
        oracle = build_oracle(
            AnnotateConfig(oracle="task", labels=kind),
            tmp_path / f"{kind}.sqlite",
            task_oracle=base,
            seed=1,
        )
        ids.add(oracle.oracle_id)
        got[kind] = oracle.prob_prefers(prompts, ["u"] * 2000, ["v"] * 2000)
    assert len(ids) == 3
    assert set(np.unique(got["sample"])) == {0.0, 1.0}
    assert abs(got["sample"].mean() - p) < 0.04  # unbiased: E[label] = P
    assert (got["threshold"] == 1.0).all()  # P = 0.7 > ½: always a win
    assert np.allclose(got["soft"], p)
    half = build_oracle(
        AnnotateConfig(oracle="task", labels="threshold"),
        tmp_path / "h.sqlite",
        task_oracle=base,
        seed=1,
    )
    assert half.prob_prefers(["x"], ["u"], ["u"])[0] == 0.5  # a tie stays a tie


def test_hard_labels_key_still_maps_onto_labels():
    from inpo.pipeline.config import AnnotateConfig

    assert AnnotateConfig(hard_labels=True).labels == "sample"
    assert AnnotateConfig(hard_labels=False).labels == "soft"
