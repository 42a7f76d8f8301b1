"""``inpo eval`` and its statistics: clustered bootstrap, AlpacaEval 2's length-controlled win
rate (cross-checked against the ``alpaca-eval`` package), Bradley–Terry scores, answer files,
the query cache and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from inpo.cli import main
from inpo.evaluation import (
    bradley_terry_scores,
    cluster_bootstrap,
    length_controlled_win_rate,
    win_rate_summary,
)


def test_cluster_bootstrap_is_wider_than_treating_answers_as_independent():
    rng = np.random.default_rng(0)
    prompt_effect = rng.random(20)  # each prompt's answers are judged alike
    p = np.repeat(prompt_effect, 8)
    clusters = np.repeat(np.arange(20), 8).tolist()
    lo, hi = cluster_bootstrap(lambda i: p[i].mean(), len(p), clusters, seed=1)
    ilo, ihi = cluster_bootstrap(lambda i: p[i].mean(), len(p), list(range(len(p))), seed=1)
    assert lo < p.mean() < hi
    assert (hi - lo) > 2 * (ihi - ilo)  # 8 copies: √8 ≈ 2.8× wider
    same = np.full(10, 0.7)
    assert cluster_bootstrap(lambda i: same[i].mean(), 10, list(range(10))) == pytest.approx(
        (0.7, 0.7)
    )


def test_lc_win_rate_closed_forms():
    rng = np.random.default_rng(0)
    pref = (rng.random(300) < 0.7).astype(float)
    equal = np.full(300, 100.0)
    # no length differences: the GLM's intercept is logit(mean), LC = the raw win rate
    lc = length_controlled_win_rate(pref, equal, equal)
    assert lc["lc_win_rate"] == pytest.approx(pref.mean(), abs=1e-6)
    # a judge moved only by length (no model effect): LC near ½ whatever the raw rate
    delta = rng.normal(50, 100, 3000)
    z = 3 * np.tanh(delta / delta.std(ddof=1))
    biased = (rng.random(3000) < 1 / (1 + np.exp(-z))).astype(float)
    lc = length_controlled_win_rate(biased, 500 + delta, np.full(3000, 500.0))
    assert biased.mean() > 0.6 and abs(lc["lc_win_rate"] - 0.5) < 0.05
    assert lc["coef"]["length"] == pytest.approx(3, abs=0.4)


def test_bradley_terry_scores_are_the_implied_win_rates():
    prompts = list(range(50))
    a = np.r_[np.ones(40), np.zeros(10)]
    b = np.r_[np.ones(20), np.zeros(30)]
    scores = bradley_terry_scores({"a": (a, prompts), "b": (b, prompts)}, samples=200)
    assert scores["a"]["score"] == pytest.approx(0.8, abs=1e-3)
    assert scores["b"]["score"] == pytest.approx(0.4, abs=1e-3)
    lo, hi = scores["a"]["score_ci"]
    assert lo < 0.8 < hi and hi - lo < 0.3


def test_lc_matches_the_alpaca_eval_package():
    """Cross-check against ``alpaca_eval.metrics.glm_winrate`` on the same annotations
    (benchmarks/lc_win_rate.py records five sets: largest difference 0.28 points)."""
    pytest.importorskip("pandas")
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import lc_win_rate as bench
    finally:
        sys.path.pop(0)
    data = bench.synthetic(0)
    for glm in ("length_controlled_minimal", "length_controlled_noreg"):
        assert bench.ours(data, glm) == pytest.approx(bench.theirs(data, glm), abs=0.01), glm


# ---- the command -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    from inpo.tiny import char_tokenizer, tiny_reward_model

    path = tmp_path_factory.mktemp("rm") / "rm"
    tok = char_tokenizer()
    tiny_reward_model("llama", tok).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _answers(path: Path, generator: str, outputs: list[str]) -> Path:
    rows = [
        {"instruction": f"question {i}", "output": o, "generator": generator}
        for i, o in enumerate(outputs)
    ]
    path.write_text(json.dumps(rows))
    return path


def test_eval_judges_both_orders_through_the_cache(reward_model, tmp_path, capsys):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    outs = lambda: [" ".join(rng.choice(words, rng.integers(1, 6))) for _ in range(24)]  # noqa: E731
    a = _answers(tmp_path / "a.json", "model-a", outs())
    b = _answers(tmp_path / "b.json", "model-b", outs())
    base = _answers(tmp_path / "base.json", "base", outs())
    args = ["eval", "--answers", str(a), "--answers", str(b), "--baseline", str(base)]
    args += ["--oracle", "reward_model", "--model", str(reward_model), "--output"]
    args += [str(tmp_path / "ev"), "--bootstrap", "200"]
    assert main(args) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert set(report["models"]) == {"model-a", "model-b"}
    for m in report["models"].values():
        lo, hi = m["win_rate_ci"]
        assert lo <= m["win_rate"] <= hi and m["n"] == 24
        assert 0 <= m["lc_win_rate"] <= 1 and m["position_bias"] == pytest.approx(0, abs=1e-12)
        assert m["bt"]["score"] == pytest.approx(m["win_rate"], abs=0.02)
    assert (tmp_path / "ev" / "win_rates.png").stat().st_size > 1000
    assert "| model-a |" in (tmp_path / "ev" / "eval.md").read_text()
    capsys.readouterr()
    # the same command again: every answer from the cache
    from inpo.oracles.cache import QueryCache

    stored = QueryCache(tmp_path / "ev" / "oracle_cache.sqlite")
    before = len(stored)
    stored.close()
    assert main(args) == 0
    again = QueryCache(tmp_path / "ev" / "oracle_cache.sqlite")
    assert len(again) == before
    second = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert (second["queries_sent"], second["answers_reused"]) == (0, second["oracle_queries"])
    assert report["queries_sent"] > 0
    for counts in ("queries_sent", "answers_reused"):
        second.pop(counts), report.pop(counts)
    assert second == report


def test_bad_answer_files_are_named(reward_model, tmp_path, capsys):
    base = _answers(tmp_path / "base.json", "base", ["x", "y", "z"])
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"instruction": "elsewhere", "output": "x"}]))
    empty = _answers(tmp_path / "empty.json", "m", ["x", "", "z"])
    common = ["--baseline", str(base), "--oracle", "reward_model", "--model", str(reward_model)]
    common += ["--output", str(tmp_path / "ev")]
    assert main(["eval", "--answers", str(other), *common]) == 2
    err = capsys.readouterr().err
    assert "other.json" in err and "base.json" in err and "different instructions" in err
    assert main(["eval", "--answers", str(empty), *common]) == 2
    err = capsys.readouterr().err
    assert "empty.json: row 1: field 'output' is missing, empty or only whitespace" in err
    assert "Traceback" not in err
    number = tmp_path / "number.json"
    number.write_text(json.dumps([{"instruction": t, "output": 5} for t in ("x", "y", "z")]))
    assert main(["eval", "--answers", str(number), *common]) == 2
    assert "number.json: row 0: field 'output' is not text (int)" in capsys.readouterr().err
    assert main(["eval", "--answers", str(empty), *common, "--skip-bad-rows"]) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["instructions"] == 2 and report["models"]["m"]["skipped_rows"] == 1
    assert main(["eval", "--answers", str(base), *common[:-2], "--oracle", "gpm"]) == 2
    capsys.readouterr()
    assert main(["eval", "--answers", str(base), *common, "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "argument --bootstrap: expected an integer >= 1, got 0" in err and "\n" not in err


def test_win_rate_summary_on_a_run_like_layout():
    """task=prompts' evaluation: k answers a prompt, one interval over prompts."""
    rng = np.random.default_rng(3)
    p = rng.random(40)
    out = win_rate_summary(
        p,
        np.repeat(np.arange(10), 4).tolist(),
        100 + rng.normal(0, 5, 40),
        np.full(40, 100.0),
        samples=200,
    )
    assert out["prompts"] == 10 and out["n"] == 40
    assert out["win_rate_ci"][0] <= out["win_rate"] <= out["win_rate_ci"][1]
    assert out["lc_win_rate_ci"][0] <= out["lc_win_rate"] <= out["lc_win_rate_ci"][1]


def test_a_positional_judge_is_asked_each_order_and_its_bias_reported(tmp_path):
    """A pairwise model reads "[RESPONSE A] … [RESPONSE B] …": inpo eval asks each order on its
    own, reports the lean towards the first-shown answer, and its preference is the oracle's
    own two-order average."""
    from inpo.oracles.pairwise import PairwisePreferenceOracle
    from inpo.tiny import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()
    tiny_causal_lm("llama", tok, seed=3).save_pretrained(tmp_path / "pm")
    tok.save_pretrained(tmp_path / "pm")
    outs = [["yes it is", "no", "maybe so", "one two"], ["no it is not", "yes", "so", "three"]]
    a = _answers(tmp_path / "a.json", "m", outs[0])
    base = _answers(tmp_path / "base.json", "base", outs[1])
    args = ["eval", "--answers", str(a), "--baseline", str(base), "--oracle", "pairwise"]
    args += ["--model", str(tmp_path / "pm"), "--output", str(tmp_path / "ev"), "--bootstrap", "50"]
    assert main(args) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())["models"]["m"]
    oracle = PairwisePreferenceOracle(tmp_path / "pm", device="cpu")
    prompts = [f"question {i}" for i in range(4)]
    first = oracle.position_probs(prompts, outs[0], outs[1])
    swapped = oracle.position_probs(prompts, outs[1], outs[0])
    bias = 0.5 * np.mean(first - (1 - swapped))
    assert report["position_bias"] == pytest.approx(bias, abs=1e-9) and abs(bias) > 1e-6
    both = oracle.prob_prefers(prompts, outs[0], outs[1])
    assert report["win_rate"] == pytest.approx(float(both.mean()), abs=1e-9)


def test_eval_reads_a_runs_iteration_folders(tmp_path, capsys):
    """``--answers RUN/iter_00t``: the answers that iteration's evaluation judged; as
    ``--baseline``, the π_ref answers judged against them; intervals over prompts."""
    assert main(["toy", str(tmp_path / "toy")]) == 0
    run = tmp_path / "run"
    toy = tmp_path / "toy"
    assert main(
        [
            "-q", "run", "task=prompts", f"prompts={toy / 'prompts.jsonl'}",
            f"eval_prompts={toy / 'eval_prompts.jsonl'}", f"reference={toy / 'policy'}",
            "annotate.oracle=reward_model", f"annotate.model={toy / 'reward_model'}",
            "iterations=1", f"run_dir={run}", "evaluate.k=2",
        ]
    ) == 0  # fmt: skip
    rows = [
        json.loads(x) for x in (run / "iter_000/evaluate/answers.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 9 * 2 and {"prompt", "sample", "answer", "reference_answer"} <= set(rows[0])
    args = ["eval", "--answers", str(run / "iter_000"), "--baseline", str(run / "iter_000")]
    args += ["--oracle", "reward_model", "--model", str(toy / "reward_model")]
    args += ["--output", str(tmp_path / "ev"), "--bootstrap", "100"]
    assert main(args) == 0
    report = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert report["baseline"] == "run-iter_000-reference"
    m = report["models"]["run-iter_000"]
    assert m["n"] == 18 and m["prompts"] == 9  # two answers a prompt, one cluster a prompt
    capsys.readouterr()
    assert main([*args[:2], str(tmp_path / "toy"), *args[3:]]) == 2
    assert "no evaluate/answers.jsonl" in capsys.readouterr().err


def test_an_http_judge_each_order_and_one_answering_nonsense(tmp_path, capsys):
    """The real ``inpo serve-oracle`` server on loopback, judging from a known table: the win
    rate is the table's; a judge answering neither A nor B is an error naming the pair, and no
    such answer is cached."""
    from inpo.oracles.cache import QueryCache
    from inpo.oracles.server import FaultInjection, OracleServer
    from inpo.oracles.synthetic import TableOracle

    ys = ["a careful answer", "a wrong answer", "a short answer"]
    p = np.array([[0.5, 0.9, 0.7], [0.1, 0.5, 0.3], [0.3, 0.7, 0.5]])
    model = _answers(tmp_path / "m.json", "m", [ys[0], ys[2], ys[0], ys[1]])
    base = _answers(tmp_path / "b.json", "b", [ys[1], ys[1], ys[2], ys[0]])
    expected = np.mean([p[0, 1], p[2, 1], p[0, 2], p[1, 0]])
    for faults, out in ((None, "ok"), (FaultInjection(bad_verdict_first_n=1000), "bad")):
        server = OracleServer(TableOracle(p, ys), port=0, faults=faults).start()
        try:
            args = ["eval", "--answers", str(model), "--baseline", str(base), "--oracle", "http"]
            args += ["--url", server.url, "--judge-model", server.model_name, "--api-key-env"]
            args += ["INPO_TEST_NO_KEY", "--output", str(tmp_path / out), "--bootstrap", "50"]
            code = main(args)
        finally:
            server.shutdown()
        if out == "ok":
            assert code == 0
            report = json.loads((tmp_path / "ok" / "eval.json").read_text())["models"]["m"]
            assert report["win_rate"] == pytest.approx(expected, abs=1e-6)
            assert report["position_bias"] == pytest.approx(0, abs=1e-6)
        else:
            assert code == 2
            err = capsys.readouterr().err
            assert "neither A nor B" in err and "pair " in err and "Traceback" not in err
            assert len(QueryCache(tmp_path / "bad" / "oracle_cache.sqlite")) == 0


def test_an_http_judge_failing_part_way_is_never_asked_an_answered_query_again(tmp_path, capsys):
    """A judge (the real server on loopback) that answers 25 of the 40 requests and then fails:
    the 25 answers are kept, so the re-run sends the 15 unanswered requests only, and
    ``eval.json`` tells queries sent from answers reused."""
    from inpo.oracles.server import FaultInjection, OracleServer
    from inpo.oracles.synthetic import TableOracle

    ys = [f"answer {i}" for i in range(40)]
    p = np.full((40, 40), 0.5)
    for i in range(0, 40, 2):
        p[i, i + 1], p[i + 1, i] = 0.8, 0.2
    model = _answers(tmp_path / "m.json", "m", ys[0::2])
    base = _answers(tmp_path / "b.json", "b", ys[1::2])
    out = tmp_path / "out"

    def run(faults):
        server = OracleServer(TableOracle(p, ys), port=0, faults=faults).start()
        try:
            args = ["eval", "--answers", str(model), "--baseline", str(base), "--oracle", "http"]
            args += ["--url", server.url, "--judge-model", server.model_name, "--api-key-env"]
            args += ["INPO_TEST_NO_KEY", "--output", str(out), "--bootstrap", "50"]
            return main(args), server.requests
        finally:
            server.shutdown()

    code, sent = run(FaultInjection(fail_after_n=25, fail_status=400))
    assert code == 2 and "Traceback" not in capsys.readouterr().err
    assert sent >= 25
    code, sent = run(None)
    assert code == 0
    assert sent == 40 - 25  # nothing answered before the failure is asked again
    report = json.loads((out / "eval.json").read_text())
    assert (report["queries_sent"], report["answers_reused"]) == (15, 25)
    assert report["models"]["m"]["win_rate"] == pytest.approx(0.8)
    code, sent = run(None)  # everything cached: nothing sent
    report = json.loads((out / "eval.json").read_text())
    assert code == 0 and sent == 0 and report["queries_sent"] == 0
    assert report["answers_reused"] == report["oracle_queries"] == 40


@pytest.mark.parametrize("names", [("same", "same"), ("a/b", "a_b")])
def test_two_answer_files_never_share_a_row_or_an_annotations_file(tmp_path, capsys, names):
    """Two ``--answers`` files with one generator name, or names that make one file name, are
    refused naming both files, before the judge is asked anything."""
    first = _answers(tmp_path / "one.json", names[0], ["x", "y"])
    second = _answers(tmp_path / "two.json", names[1], ["y", "x"])
    base = _answers(tmp_path / "b.json", "b", ["z", "z"])
    args = ["eval", "--answers", str(first), "--answers", str(second), "--baseline", str(base)]
    args += ["--oracle", "http", "--url", "http://127.0.0.1:9", "--judge-model", "m"]
    assert main([*args, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "one.json" in err and "two.json" in err and "rename one" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_output_that_is_a_file_or_a_foreign_folder_is_refused(tmp_path, capsys):
    """``--output`` naming a file, or a non-empty folder that is not an eval folder (a user's own
    ``eval.md``-less folder of notes), is one line, and nothing in it changes; an earlier eval
    folder is accepted (its judge cache is reused)."""
    first = _answers(tmp_path / "one.json", "m", ["x", "y"])
    base = _answers(tmp_path / "b.json", "b", ["z", "z"])
    args = ["eval", "--answers", str(first), "--baseline", str(base)]
    args += ["--oracle", "http", "--url", "http://127.0.0.1:9", "--judge-model", "m"]
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.md").write_text("my notes")
    (tmp_path / "a-file").write_text("x")
    for output, needle in ((notes, "not an inpo eval folder (it holds notes.md)"),
                           (tmp_path / "a-file", "is a file")):  # fmt: skip
        assert main([*args, "--output", str(output)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err
    assert sorted(p.name for p in notes.iterdir()) == ["notes.md"]
    assert (notes / "notes.md").read_text() == "my notes"
    from inpo.commands.eval import _check_output

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "eval.json").write_text("{}")
    _check_output(earlier)  # an earlier eval's folder: accepted
    _check_output(tmp_path / "new")  # a new folder: accepted
