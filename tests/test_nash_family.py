"""The Nash family in `inpo run` beyond INPO's own loop: extragradient's two steps an iteration
(egpo, mirror_prox) and DNO-Prct (large-margin pairs, a teacher response, DPO against π_t)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.test_pipeline_run import ToyTask, _cfg

from inpo.config import load_config
from inpo.errors import ConfigError, DataError, InpoError
from inpo.hashing import model_fingerprint
from inpo.pipeline.config import RunConfig
from inpo.pipeline.run import run_pipeline


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# extragradient: egpo / mirror_prox
# ---------------------------------------------------------------------------------------------


def test_egpo_takes_a_half_step_then_the_full_step_from_pi_t(tmp_path):
    """iter_000/half_step/{generate,annotate,logps,train} is π_{t+1/2}, trained from π_t on
    π_t's samples; iter_000/{generate,…} samples π_{t+1/2} and trains from π_t again, both with
    MPO's loss (INPO's at eta + tau); the row counts both steps' queries."""
    task = ToyTask(tmp_path)
    run = run_pipeline(
        _cfg(tmp_path, iterations=1, algorithm="egpo"), log=lambda m: None, task=task
    )
    it = run / "iter_000"
    pi0 = model_fingerprint(task.reference_model(None))
    half_model = it / "half_step" / "train" / "model"
    for name in ("generate", "annotate", "logps", "train"):
        assert (it / "half_step" / name / "manifest.json").is_file()
    assert _manifest(it / "half_step" / "generate")["input_hashes"]["policy"] == pi0
    assert _manifest(it / "generate")["input_hashes"]["policy"] == model_fingerprint(half_model)
    for folder in (it / "half_step", it):  # the prior and the starting weights: π_t
        assert _manifest(folder / "logps")["input_hashes"]["policy"] == pi0
        assert _manifest(folder / "train")["input_hashes"]["policy"] == pi0
    half_q = _manifest(it / "half_step" / "annotate")["summary"]["oracle_queries"]
    full_q = _manifest(it / "annotate")["summary"]["oracle_queries"]
    row = _rows(run)[1]
    assert row["oracle_queries"] == half_q + full_q == 2 * 4 * 5  # two tournaments of K = 4
    assert row["half_step_pairs"] >= 1
    assert {"half_generate", "half_annotate", "half_logps", "half_train", "train"} <= set(
        row["seconds"]
    )
    cfg = load_config(RunConfig, None, ["algorithm=mirror_prox", "eta=0.3", "tau=0.1"])
    assert cfg.loss_hparams() == ("inpo", {"eta": pytest.approx(0.4), "tau": 0.1})


ARGS = [
    "iterations=1",
    "max_prompts=4",
    "prompt_repeats=2",
    "generate.batch_size=2",
    "annotate.batch_size=2",
    "train.optim.global_batch_size=2",
    "train.optim.per_device_batch_size=1",
    "train.optim.epochs=2",
    "train.save_steps=1",
]


def _run(run_dir: Path, cache: Path, fault: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "INPO_CACHE_DIR": str(cache), "TQDM_DISABLE": "1"}
    env.pop("INPO_FAULT_KILL", None)
    if fault:
        env["INPO_FAULT_KILL"] = fault
    return subprocess.run(
        [sys.executable, "-m", "inpo", "run", f"run_dir={run_dir}", *ARGS, *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.slow
def test_egpo_resumes_inside_either_step_with_the_same_weights(tmp_path):
    """kill -9 in the half step's training, then in the full step's annotation, then in the
    full step's training (a finished half step is skipped, so the same hook reaches the full
    step): every re-run resumes, and the weights equal an uninterrupted run's."""
    import torch
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    base = _run(tmp_path / "base", cache, None, "algorithm=egpo")
    assert base.returncode == 0, base.stderr[-3000:]
    run = tmp_path / "killed"
    it = run / "iter_000"
    first = _run(run, cache, "train:2", "algorithm=egpo")
    assert first.returncode == -9, first.stderr[-2000:]
    assert (it / "half_step" / "train.partial").is_dir() and not (it / "generate").exists()
    second = _run(run, cache, "annotate:1", "algorithm=egpo")
    assert second.returncode == -9, second.stderr[-2000:]
    assert "[iter_000/half_step/train] resuming partial work" in second.stderr
    assert (it / "half_step" / "train").is_dir() and (it / "annotate.partial").is_dir()
    third = _run(run, cache, "train:2", "algorithm=egpo")
    assert third.returncode == -9, third.stderr[-2000:]
    assert "[iter_000/half_step/train] complete, skipped" in third.stderr
    assert (it / "train.partial").is_dir()
    last = _run(run, cache, None, "algorithm=egpo")
    assert last.returncode == 0, last.stderr[-3000:]
    assert "[iter_000/train] resuming partial work" in last.stderr
    for sub in ("half_step/train/model", "train/model"):
        want = load_file(tmp_path / "base" / "iter_000" / sub / "model.safetensors")
        got = load_file(it / sub / "model.safetensors")
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)

    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert timeless(_rows(run)) == timeless(_rows(tmp_path / "base"))


# ---------------------------------------------------------------------------------------------
# DNO-Prct
# ---------------------------------------------------------------------------------------------


def _teacher(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


#: the default task's first four training prompts (max_prompts=4)
DEFAULT_PROMPTS = [
    f"describe a {x}" for x in ("red circle", "red square", "red star", "blue circle")
]
DEFAULT_PROMPT = DEFAULT_PROMPTS[0]


@pytest.mark.parametrize(
    "override,needle",
    [
        ("margin=0.3", "margin is for algorithm=dno"),
        ("teacher=x.jsonl", "teacher is for algorithm=dno"),
        ("algorithm=dno margin=1.5", r"margin must be in \[0, 1\)"),
        ("algorithm=dno annotate.selection=tournament", "dno needs annotate.selection=all_pairs"),
        ("algorithm=dno teacher=/nonexistent.jsonl", "teacher: file '/nonexistent.jsonl'"),
    ],
)
def test_dno_settings_are_checked(override, needle):
    from inpo.pipeline.preflight import load_run_config

    with pytest.raises(ConfigError, match=needle):
        load_run_config(None, override.split())


def test_a_teacher_file_missing_prompts_fails_at_the_config_check(tmp_path):
    """Before any model loads: how many training prompts have no teacher response, and one."""
    from inpo.pipeline.preflight import load_run_config

    bad = _teacher(tmp_path / "t.jsonl", [{"prompt": "say hello", "completion": "hello"}])
    with pytest.raises(ConfigError, match=r"no response for 4 of the 4 training prompts .*red"):
        load_run_config(None, ["algorithm=dno", f"teacher={bad}", "max_prompts=4"])
    with pytest.raises(ConfigError, match=r"no response for \d+ of the \d+ training prompts"):
        load_run_config(None, ["algorithm=dno", f"teacher={bad}"])
    rows = [{"prompt": DEFAULT_PROMPT}]
    with pytest.raises(
        (ConfigError, DataError), match=r"t2.jsonl: line 1: missing field 'completion'"
    ):
        load_run_config(None, ["algorithm=dno", f"teacher={_teacher(tmp_path / 't2.jsonl', rows)}"])
    rows = [{"prompt": DEFAULT_PROMPT, "completion": [{"role": "user", "content": "x"}]}]
    with pytest.raises(
        (ConfigError, DataError), match=r"line 1: field 'completion': expected a non-empty text"
    ):
        load_run_config(None, ["algorithm=dno", f"teacher={_teacher(tmp_path / 't3.jsonl', rows)}"])
    ok = _teacher(
        tmp_path / "ok.jsonl",
        [
            {"prompt": x, "completion": [{"role": "assistant", "content": "red"}]}
            for x in DEFAULT_PROMPTS
        ],
    )
    cfg = load_run_config(None, ["algorithm=dno", f"teacher={ok}", "max_prompts=4"])
    assert cfg.loss_hparams() == ("dpo", {"beta": cfg.eta})  # DNO's eta multiplies log-ratios


def test_dno_ranks_the_teacher_with_the_samples_and_trains_against_pi_t(tmp_path):
    """K = 4 samples + the teacher: all 10 pairs asked a prompt; pairs below the margin are
    dropped and counted; iteration 1's DPO reference is π_1 (the previous iterate), not π_ref;
    a margin nothing clears says so."""
    task = ToyTask(tmp_path)
    teacher = _teacher(
        tmp_path / "teacher.jsonl",
        [{"prompt": p, "completion": "red"} for p in task.train_prompts()],
    )
    cfg = _cfg(tmp_path, algorithm="dno", margin=0.0)
    cfg.teacher = str(teacher)  # (the config check reads the default task's prompts)
    run = run_pipeline(cfg, log=lambda m: None, task=task)
    rows = _rows(run)
    assert rows[1]["oracle_queries"] == 4 * (5 * 4 // 2)
    pairs = [
        json.loads(x)
        for x in (run / "iter_000" / "annotate" / "pairs.jsonl").read_text().splitlines()
    ]
    assert any(p["chosen"] == "red" for p in pairs)  # the panel likes the teacher's answer
    assert _manifest(run / "iter_000" / "annotate")["summary"]["below_margin"] == 0
    ref = model_fingerprint(task.reference_model(None))
    assert _manifest(run / "iter_000" / "logps")["input_hashes"]["reference"] == ref
    pi1 = model_fingerprint(run / "iter_000" / "train" / "model")
    assert _manifest(run / "iter_001" / "logps")["input_hashes"]["reference"] == pi1
    strict = _cfg(tmp_path / "strict", iterations=1, algorithm="dno", margin=0.99)
    with pytest.raises(InpoError, match=r"confirmed no pair .*or lower margin"):
        run_pipeline(strict, log=lambda m: None, task=ToyTask(tmp_path))
    summary = _manifest(run / "iter_000" / "annotate")["summary"]
    assert summary["pairs"] == len(pairs)


def test_sppo_with_soft_labels_estimates_win_rates_from_the_oracles_probabilities(tmp_path):
    """annotate.labels=soft (SPPO's paper: PairRM's probabilities): each pair's win rates are
    the means of the oracle's P over the K samples, recomputed here from the panel itself."""
    import numpy as np

    task = ToyTask(tmp_path)
    cfg = _cfg(tmp_path, iterations=1, algorithm="sppo")
    cfg.annotate.selection, cfg.annotate.labels = "all_pairs", "soft"
    run = run_pipeline(cfg, log=lambda m: None, task=task)
    samples = [
        json.loads(x)
        for x in (run / "iter_000" / "generate" / "samples.jsonl").read_text().splitlines()
    ]
    pairs = [
        json.loads(x)
        for x in (run / "iter_000" / "annotate" / "pairs.jsonl").read_text().splitlines()
    ]
    panel = task.oracle(cfg.annotate, cache=tmp_path / "unused.sqlite")
    soft = False
    for pair in pairs:
        row = next(
            r
            for r in samples
            if r["prompt"] == pair["prompt"]
            and pair["chosen"] in r["responses"]
            and pair["rejected"] in r["responses"]
        )
        rs = row["responses"]
        k = len(rs)
        m = np.full((k, k), 0.5)
        for i in range(k):
            for j in range(i + 1, k):
                m[i, j] = panel.prob_prefers([row["prompt"]], [rs[i]], [rs[j]])[0]
                m[j, i] = 1 - m[i, j]
        rates = m.mean(axis=1)
        assert pair["chosen_winrate"] == pytest.approx(rates.max(), abs=1e-9)
        assert pair["rejected_winrate"] == pytest.approx(rates.min(), abs=1e-9)
        soft |= not np.allclose(rates * 2 * k, np.round(rates * 2 * k))  # not from 0/1 labels
    assert soft


def _default_run(tmp_path: Path, algorithm: str, *extra: str) -> list[dict]:
    run = tmp_path / algorithm
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "inpo",
            "-q",
            "run",
            f"run_dir={run}",
            f"algorithm={algorithm}",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _rows(run)


def _exact(twin: str) -> list[float]:
    from inpo.pipeline.workloads import RUN_DEFAULTS
    from inpo.tasks import DefaultTask, DefaultTaskConfig

    task = DefaultTask(DefaultTaskConfig(eta=RUN_DEFAULTS["eta"], tau=RUN_DEFAULTS["tau"]))
    task.build_reference()
    return task.tabular_inpo(task.reference_table(), iterations=3, algorithm=twin)["gap"]


@pytest.mark.slow
def test_egpo_on_the_default_task_tracks_the_exact_extragradient_update(tmp_path):
    """Three iterations (six trainings) against the exact mirror-prox iterates from the same
    π_ref table: the last gap within a factor 1.6 of the exact one, and under half of π_ref's.
    (Two seeds recorded in benchmarks/results/lm_vs_exact.md.)"""
    rows, exact = _default_run(tmp_path, "egpo"), _exact("extragradient")
    assert rows[0]["duality_gap"] == pytest.approx(exact[0], rel=1e-6)
    assert 1 / 1.6 < rows[-1]["duality_gap"] / exact[-1] < 1.6, (rows, exact)
    assert rows[-1]["duality_gap"] < 0.5 * rows[0]["duality_gap"]


@pytest.mark.slow
def test_dno_tracks_its_idealised_update_for_one_iteration_then_overshoots(tmp_path):
    """DNO's idealised update is multiplicative weights π_t exp(P(·≻π_t)/η) (DNO's Algorithm 1,
    the exact 'sppo' step). DNO-Prct trains DPO against π_t on best-vs-worst pairs instead: on
    pairs that always come in the same order, DPO's logistic loss has no finite minimiser, so
    the step is set by the optimiser's budget, not by η. It tracks the first update (within a
    factor 1.6) and then moves past it: with no KL to π_ref, KL(π_t‖π_ref) grows every
    iteration and the regularised gap ends above the exact one (recorded, two seeds, in
    benchmarks/results/lm_vs_exact.md)."""
    rows, exact = _default_run(tmp_path, "dno"), _exact("sppo")
    assert rows[0]["duality_gap"] == pytest.approx(exact[0], rel=1e-6)
    assert 1 / 1.6 < rows[1]["duality_gap"] / exact[1] < 1.6, (rows, exact)
    kl = [r["kl_to_ref"] for r in rows]
    assert kl[0] == 0 < kl[1] < kl[2] < kl[3], kl
    assert rows[-1]["duality_gap"] > exact[-1]
    assert rows[-1]["exploitability"] < rows[0]["exploitability"]  # the unregularised game
