"""task=panel's world without a model: the text panel, its prompts, the cyclic share, the
pool-restricted game and the answer pools (the runs on SmolLM2 are in the real-model tier)."""

from __future__ import annotations

import numpy as np
import pytest

from inpo.errors import ConfigError
from inpo.game.exact import duality_gap, exploitability
from inpo.pipeline.workloads import answer_pools
from inpo.tasks.panel import (
    GROUPS,
    PanelOracle,
    concise,
    cyclic_share,
    friendly,
    panel_prompts,
    pool_game,
    thorough,
)

Q = [{"role": "user", "content": "How do I keep basil alive on a windowsill?"}]


def _sig(x: float) -> float:
    return 1.0 / (1.0 + np.exp(-x))


def test_the_prompts_split_into_train_and_held_out_without_overlap():
    train, test = panel_prompts("train"), panel_prompts("test")
    assert (len(train), len(test)) == (176, 64)
    keys = {p[0]["content"] for p in train}
    assert len(keys) == 176 and not keys & {p[0]["content"] for p in test}
    assert all(len(p) == 1 and p[0]["role"] == "user" for p in train + test)


def test_each_group_scores_its_taste():
    short, long_ = "Water it.", "Water it every morning and give it a sunny spot by it."
    assert concise("", short) - concise("", long_) == pytest.approx(1.0)  # 10 words fewer
    # covers 'basil', 'alive' and 'windowsill' of the prompt's content words
    asked = "How do I keep basil alive on a windowsill?"
    assert thorough(asked, "Basil stays alive on a windowsill.") == pytest.approx(4.0 * 3 / 4)
    assert thorough(asked, "Water it.") == 0.0
    warm = "Glad you asked! Here is what you can do:\n- water\n- light\nGood luck!"
    # glad + luck (2), you ×2 (½), two list lines (1), ends on '!' (½)
    assert friendly("", warm) == pytest.approx(2 + 0.5 + 1 + 0.5)


def test_the_panel_is_the_closed_form_mixture_and_sums_to_one():
    panel = PanelOracle()
    a, b = "Glad you asked! Keep basil in sun.", "Basil needs light, water and warmth on a sill."
    p = panel.prob_prefers([Q], [a], [b])[0]
    x = Q[0]["content"]
    expected = np.mean([_sig((g.score(x, a) - g.score(x, b)) / g.temperature) for g in GROUPS])
    assert p == pytest.approx(expected)
    assert p + panel.prob_prefers([Q], [b], [a])[0] == pytest.approx(1.0)
    m = panel.preference_matrix(Q, [a, b, "Water it."])
    assert m[0, 1] == pytest.approx(p) and np.allclose(m + m.T, 1.0)
    assert panel.stats.queries == 2  # the matrix is not counted as queries


def test_cyclic_share_finds_a_condorcet_cycle_and_no_cycle_in_one_taste():
    # concise ranks x > y > z, thorough y > z > x, friendly z > x > y: each pair won 2 to 1
    ys = [
        "Water it!",
        "Basil stays alive on a windowsill with sun and water.",
        "Glad you asked, you will love your basil, thanks and good luck to you!!",
    ]
    panel = PanelOracle()
    m = panel.preference_matrix(Q, ys)
    assert m[0, 1] > 0.5 and m[1, 2] > 0.5 and m[2, 0] > 0.5, m
    share, n = cyclic_share(panel, [Q], [ys], triples=50)
    assert (share, n) == (1.0, 50)
    one = PanelOracle([GROUPS[0]])  # one taste is a total order: never a cycle
    assert cyclic_share(one, [Q], [ys], triples=50)[0] == 0.0


def test_pool_game_is_inpo_game_on_the_renormalised_pool():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(4, 4))
    p = np.triu(p, 1) + np.tril(1 - p.T, -1) + np.eye(4) * 0.5
    lps = {"ref": np.log([0.1, 0.2, 0.3, 0.1]), "pi": np.log([0.05, 0.05, 0.4, 0.2])}
    out = pool_game(p, lps, "ref", tau=0.1)
    pi = np.exp(lps["pi"]) / np.exp(lps["pi"]).sum()
    ref = np.exp(lps["ref"]) / np.exp(lps["ref"]).sum()
    assert out["pi"]["pool_duality_gap"] == pytest.approx(
        duality_gap(p[None], pi[None], ref[None], 0.1)[0]
    )
    assert out["pi"]["pool_exploitability"] == pytest.approx(exploitability(p[None], pi[None])[0])
    # a policy on the pool's Condorcet winner has no unregularised gap
    p2 = np.full((3, 3), 0.5)
    p2[0, 1:], p2[1:, 0] = 0.9, 0.1
    sure = {"ref": np.zeros(3), "win": np.log([1.0, 1e-12, 1e-12])}
    assert pool_game(p2, sure, "ref", tau=0.0)["win"]["pool_duality_gap"] == pytest.approx(
        0.0, abs=1e-9
    )


def test_answer_pools_keep_each_distinct_answer_once_with_its_flag():
    rows = [
        {"prompt": Q, "answer": "a", "reference_answer": "b", "truncated": True,
         "reference_truncated": False},
        {"prompt": Q, "answer": "b", "reference_answer": "c"},
        {"prompt": "other", "answer": "a", "reference_answer": "a"},
    ]  # fmt: skip
    pools = answer_pools(rows)
    assert pools == [(Q, ["a", "b", "c"], [False, True, True]), ("other", ["a"], [True])]


def test_task_panel_without_the_real_model_names_the_command(tmp_path, monkeypatch):
    from inpo.pipeline.preflight import load_run_config
    from inpo.pipeline.workloads import get_workload

    monkeypatch.setenv("INPO_CACHE_DIR", str(tmp_path))
    cfg = load_run_config(None, ["task=panel", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="make real-model"):
        get_workload(cfg)
    with pytest.raises(ConfigError, match="task=panel has its own training and held-out prompts"):
        load_run_config(None, ["task=panel", "prompts=x.jsonl", f"run_dir={tmp_path / 'r'}"])
