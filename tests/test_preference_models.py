"""Preference models: the GPM's algebra, its oracle's linear cost, ``inpo train-oracle`` for
each kind (the folder its oracle loads, held-out metrics, resume, bad input), and the GPM
paper's claim on a cyclic preference (slow tier)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from inpo.cli import main
from inpo.oracles.gpm import gpm_score
from inpo.tiny import (
    _PAIR_PROMPTS,
    best_transitive_accuracy,
    pair_words,
    preference_pairs,
    save_tiny_lm,
    word_tokenizer,
)
from inpo.training.oracle_loop import preference_metrics


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    """A tiny Llama over the pairs' words, cyclic and transitive pairs (train: eight prompts;
    held out: two)."""
    root = tmp_path_factory.mktemp("kit")
    save_tiny_lm(root / "lm", "llama", tokenizer=word_tokenizer(pair_words()), hidden_size=32)
    for rule in ("cyclic", "transitive"):
        _write(root / f"{rule}_train.jsonl", preference_pairs(rule, prompts=_PAIR_PROMPTS[:8]))
        _write(root / f"{rule}_eval.jsonl", preference_pairs(rule, prompts=_PAIR_PROMPTS[8:]))
    return root


def _train(kit: Path, out: Path, kind: str, rule: str = "cyclic", *extra: str) -> dict:
    args = [
        "train-oracle",
        f"kind={kind}",
        f"model.path={kit / 'lm'}",
        f"data.train_file={kit / f'{rule}_train.jsonl'}",
        f"data.eval_file={kit / f'{rule}_eval.jsonl'}",
        f"output_dir={out}",
        "optim.learning_rate=3e-4",
        "optim.global_batch_size=16",
        "optim.warmup_ratio=0.05",
        "logging.progress_bar=false",
        "save_steps=null",
        *extra,
    ]
    assert main(args) == 0
    return json.loads((out / "eval_metrics.json").read_text())


# ---- the GPM's algebra ----------------------------------------------------------------------


def test_gpm_score_is_skew_symmetric_and_represents_a_cycle():
    rng = np.random.default_rng(0)
    a, b, lam = rng.normal(size=(5, 6)), rng.normal(size=(5, 6)), rng.random((5, 3))
    assert np.array_equal(gpm_score(a, b, lam), -gpm_score(b, a, lam))  # bit for bit
    assert np.all(gpm_score(a, a, lam) == 0)
    # k = 1: three unit embeddings 120° apart beat each other in a cycle (no reward can)
    angle = 2 * np.pi * np.arange(3) / 3
    v = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    s = lambda i, j: float(gpm_score(v[i], v[j], np.ones(1)))  # noqa: E731
    assert s(0, 1) > 0 and s(1, 2) > 0 and s(2, 0) > 0
    # ⟨R v_a, v_b⟩ with R = [[0, −1], [1, 0]]: the paper's operator, written out
    r = np.array([[0.0, -1.0], [1.0, 0.0]])
    assert s(0, 1) == pytest.approx(float((r @ v[0]) @ v[1]))


def test_preference_metrics_by_hand():
    p = np.array([0.9, 0.8, 0.3, 0.5, 0.6])
    y = np.array([1.0, 1.0, 1.0, 1.0, 0.5])  # the last is a tie
    m = preference_metrics(p, y, bins=5)
    assert m["accuracy"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    assert m["brier"] == pytest.approx((0.01 + 0.04 + 0.49 + 0.25 + 0.01) / 5)
    # confidences 0.9 (right), 0.8 (right), 0.7 (wrong), 0.5 (half): bins of width 0.1
    assert m["ece"] == pytest.approx((0.1 + 0.2 + 0.7 + 0.0) / 4)
    assert m["strict_pairs"] == 4 and m["pairs"] == 5


def test_gpm_oracle_costs_one_forward_pass_per_response(kit, tmp_path):
    from inpo.oracles.gpm import GPMOracle, build_gpm
    from inpo.selection import win_rates_batch
    from inpo.tiny import word_tokenizer

    model = build_gpm(kit / "lm", dim=4, prompt_scales=True, beta=0.1)
    model.save(tmp_path / "gpm", word_tokenizer(pair_words()))
    oracle = GPMOracle(tmp_path / "gpm", device="cpu")
    k = 8
    responses = [f"the answer is {w}" for w in ("apple", "brick", "cloud", "drum")] * 2
    responses = [f"{r} {'is' * (i // 4)}".strip() for i, r in enumerate(responses)]
    (res,) = win_rates_batch(oracle, ["pick one"], [responses])
    assert res.queries == k * (k - 1) // 2  # every pair answered
    assert oracle.stats.extra["sequences_scored"] == k  # from K embeddings
    a, b = responses[:4], responses[4:]
    p_ab = oracle.prob_prefers(["pick one"] * 4, a, b)
    p_ba = oracle.prob_prefers(["pick one"] * 4, b, a)
    np.testing.assert_allclose(p_ab + p_ba, 1.0, atol=1e-12)
    assert np.all(oracle.prob_prefers(["vote now"], [a[0]], [a[0]]) == 0.5)
    assert oracle.stats.extra["sequences_scored"] == k + 1  # one new prompt: one new pass


def test_serve_oracle_serves_a_gpm_with_the_local_probabilities(kit, tmp_path):
    """``inpo serve-oracle --oracle gpm``: the HTTP judge answers what the local GPM does."""
    from inpo.commands.serve_oracle import _parser, build_oracle
    from inpo.oracles.gpm import GPMOracle, build_gpm
    from inpo.oracles.http import HTTPJudgeOracle
    from inpo.oracles.server import OracleServer
    from inpo.tiny import word_tokenizer

    build_gpm(kit / "lm", dim=4, prompt_scales=True, beta=0.1).save(
        tmp_path / "gpm", word_tokenizer(pair_words())
    )
    args = ["--oracle", "gpm", "--model", str(tmp_path / "gpm"), "--device", "cpu"]
    served = build_oracle(_parser().parse_args(args))
    assert isinstance(served, GPMOracle)
    local = GPMOracle(tmp_path / "gpm", device="cpu")
    a = [f"the answer is {w}" for w in ("apple", "brick", "cloud")]
    b = [f"the answer is {w}" for w in ("cloud", "apple", "brick")]
    with OracleServer(served, port=0) as server:
        judge = HTTPJudgeOracle(server.url, server.model_name, api_key_env=None)
        got = judge.prob_prefers(["pick one"] * 3, a, b)
    np.testing.assert_allclose(got, local.prob_prefers(["pick one"] * 3, a, b), atol=1e-6)


# ---- inpo train-oracle ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bt", "gpm"])
def test_gradient_checkpointing_trains_the_same_oracle(kit, tmp_path, kind):
    """``model.gradient_checkpointing=true`` recomputes activations, nothing else: the same
    losses step by step and the same held-out metrics."""
    plain = _train(kit, tmp_path / "plain", kind, "cyclic", "optim.max_steps=3")
    ckpt = _train(
        kit,
        tmp_path / "ckpt",
        kind,
        "cyclic",
        "optim.max_steps=3",
        "model.gradient_checkpointing=true",
    )
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").open()]
        for run in ("plain", "ckpt")
    ]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and len(losses[0]) == 3
    assert ckpt["accuracy"] == pytest.approx(plain["accuracy"], abs=1e-6)
    # and the layers do recompute (the flag transformers' decoder layers read)
    from transformers import AutoTokenizer

    from inpo.config import load_config
    from inpo.training.oracle_config import OracleTrainConfig
    from inpo.training.oracle_loop import _load_model

    settings = [f"kind={kind}", f"model.path={kit / 'lm'}", "output_dir=o"]
    settings.append(f"data.train_file={kit / 'cyclic_train.jsonl'}")
    for flag in (False, True):
        flagged = [*settings, f"model.gradient_checkpointing={str(flag).lower()}"]
        cfg = load_config(OracleTrainConfig, None, flagged)
        model = _load_model(cfg, kit / "lm", AutoTokenizer.from_pretrained(kit / "lm"))
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) is flag


@pytest.mark.parametrize("kind", ["bt", "pairwise", "gpm"])
def test_each_kind_trains_a_folder_its_oracle_loads(kit, tmp_path, kind):
    from inpo.training.oracle_loop import load_oracle

    metrics = _train(kit, tmp_path / kind, kind, "transitive", "optim.max_steps=3")
    assert metrics["pairs"] == 42 and 0 <= metrics["brier"] <= 1 and 0 <= metrics["ece"] <= 1
    assert (tmp_path / kind / "model.safetensors").is_file()
    assert len((tmp_path / kind / "metrics.jsonl").read_text().splitlines()) == 3
    oracle = load_oracle(kind, tmp_path / kind, device="cpu")
    p = oracle.prob_prefers(["pick one"], ["the answer is apple"], ["the answer is grape"])
    assert 0 <= float(p[0]) <= 1
    if kind == "pairwise":  # two orders per pair: 2 × 42 comparisons
        assert metrics["forward_passes"] == 84
    else:  # one pass per distinct (prompt, response): 2 prompts × 7 items
        assert metrics["forward_passes"] == 14


def test_bt_reads_ties_and_margins(kit, tmp_path, capsys):
    rows = preference_pairs("transitive", prompts=["pick one"])
    rows = [{**r, "margin": 0.5, "tie": i == 0} for i, r in enumerate(rows)]
    _write(tmp_path / "m.jsonl", rows)
    assert (
        main(
            [
                "train-oracle",
                f"model.path={kit / 'lm'}",
                f"data.train_file={tmp_path / 'm.jsonl'}",
                f"output_dir={tmp_path / 'out'}",
                "optim.max_steps=2",
                "logging.progress_bar=false",
            ]
        )
        == 0
    )
    base = [f"model.path={kit / 'lm'}", f"output_dir={tmp_path / 'out2'}"]
    _write(tmp_path / "bad.jsonl", [*rows[:3], {**rows[3], "margin": None}])
    assert main(["train-oracle", f"data.train_file={tmp_path / 'bad.jsonl'}", *base]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 4" in err and "'margin'" in err
    _write(tmp_path / "mixed.jsonl", [*rows[:3], {**rows[3], "margin": "big"}])
    assert main(["train-oracle", f"data.train_file={tmp_path / 'mixed.jsonl'}", *base]) == 2
    err = capsys.readouterr().err
    assert "mixed.jsonl" in err and "'margin'" in err and "Traceback" not in err


def test_bad_input_is_named_before_any_model_loads(kit, tmp_path, capsys):
    from inpo.errors import ConfigError
    from inpo.pipeline.preflight import load_run_config

    rows = preference_pairs("cyclic", prompts=["pick one"])
    _write(tmp_path / "no_chosen.jsonl", [rows[0], {"prompt": "x", "rejected": "y"}])
    base = [f"model.path={kit / 'lm'}", f"output_dir={tmp_path / 'o'}"]
    assert main(["train-oracle", f"data.train_file={tmp_path / 'no_chosen.jsonl'}", *base]) == 2
    err = capsys.readouterr().err
    assert "no_chosen.jsonl" in err and "line 2" in err and "chosen" in err
    assert "Traceback" not in err
    assert main(["train-oracle", "kind=gmp", f"data.train_file={tmp_path / 'x'}", *base]) == 2
    assert "gpm" in capsys.readouterr().err  # a did-you-mean or the list of kinds
    with pytest.raises(ConfigError, match="not a GPM"):
        load_run_config(None, ["annotate.oracle=gpm", f"annotate.model={kit / 'lm'}"])


@pytest.mark.slow
def test_a_killed_training_resumes_to_the_same_weights(kit, tmp_path):
    from safetensors.torch import load_file

    from inpo.config import load_config
    from inpo.errors import ConfigError
    from inpo.training.oracle_config import OracleTrainConfig
    from inpo.training.oracle_loop import train_oracle

    def cfg(out: Path, *more: str):
        return load_config(
            OracleTrainConfig,
            None,
            [
                "kind=gpm",
                f"model.path={kit / 'lm'}",
                f"data.train_file={kit / 'cyclic_train.jsonl'}",
                f"output_dir={out}",
                "optim.max_steps=6",
                "optim.global_batch_size=16",
                "optim.learning_rate=1e-3",
                "save_steps=2",
                "logging.progress_bar=false",
                *more,
            ],
        )

    train_oracle(cfg(tmp_path / "whole"))
    stopped = train_oracle(cfg(tmp_path / "cut"), stop_after=3)  # as if killed after step 3
    assert stopped.steps == 3
    # a setting that changes training, on the unfinished run or the finished one: refused,
    # naming the key and both values; nothing recorded claims it
    recorded = (tmp_path / "cut" / "train_oracle_config.yaml").read_text()
    for folder, more in (("cut", "optim.learning_rate=5e-4"), ("whole", "seed=7")):
        with pytest.raises(
            ConfigError,
            match=r"(learning_rate: 0.001 then, 0.0005 now|seed: 42 then, 7 now).*resume=never",
        ):
            train_oracle(cfg(tmp_path / folder, more))
    assert (tmp_path / "cut" / "train_oracle_config.yaml").read_text() == recorded
    train_oracle(cfg(tmp_path / "whole", "save_steps=3"))  # no effect on training: fine
    again = train_oracle(cfg(tmp_path / "cut"))
    assert again.resumed_from is not None and again.resumed_from.name == "step_000002"
    for name in ("model.safetensors", "gpm_head.safetensors"):
        a, b = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
        for key in a:
            assert b[key].equal(a[key]), (name, key)


@pytest.mark.slow
def test_gpm_learns_a_cycle_that_no_bradley_terry_model_can(kit, tmp_path):
    """The GPM paper's claim (Zhang et al. 2024, §5.1) on a tiny model: on a regular cyclic
    tournament of 7 responses, a trained BT model stays near chance (its best possible is the
    best ranking's 0.714), a trained GPM predicts the held-out prompts' duels; on a transitive
    set all three kinds fit."""
    ceiling = best_transitive_accuracy("cyclic", 7)
    assert ceiling == pytest.approx(15 / 21)
    cyclic = {
        k: _train(kit, tmp_path / f"c_{k}", k, "cyclic", "optim.epochs=40") for k in ("bt", "gpm")
    }
    assert cyclic["bt"]["accuracy"] <= ceiling + 1e-9
    assert cyclic["bt"]["brier"] > 0.24  # its predictions stay near ½
    assert cyclic["gpm"]["accuracy"] >= 0.8  # above any ranking's 0.714 (0.83 here)
    transitive = _train(kit, tmp_path / "t_bt", "bt", "transitive", "optim.epochs=40")
    assert transitive["accuracy"] >= 0.95
    assert not math.isnan(cyclic["gpm"]["ece"])


@pytest.mark.slow
def test_two_processes_train_the_oracle_of_one(kit, tmp_path):
    """The engine's invariant for the oracle loop: torchrun with 2 processes (gloo, DDP through
    ``accelerator.prepare``) trains the GPM that 1 process trains, to fp32 tolerance."""
    import os
    import subprocess

    from safetensors.torch import load_file

    from helpers import torchrun

    def run(n: int) -> Path:
        out = tmp_path / f"p{n}"
        cmd = [*torchrun(n), "-m", "inpo", "train-oracle", "kind=gpm"]
        cmd += [f"model.path={kit / 'lm'}", f"data.train_file={kit / 'cyclic_train.jsonl'}"]
        cmd += [f"output_dir={out}", "optim.learning_rate=3e-4", "optim.max_steps=4"]
        cmd += ["optim.global_batch_size=16", "optim.per_device_batch_size=4", "save_steps=null"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out

    one, two = run(1), run(2)
    for name in ("model.safetensors", "gpm_head.safetensors"):
        a, b = load_file(one / name), load_file(two / name)
        for key in a:
            assert float((a[key] - b[key]).abs().max()) < 1e-5, (name, key)


@pytest.mark.parametrize("kind", ["bt", "gpm"])
def test_lora_adapters_are_merged_into_a_folder_the_oracle_loads(kit, tmp_path, kind):
    from safetensors.torch import load_file

    from inpo.training.oracle_loop import load_oracle

    out = tmp_path / kind
    _train(kit, out, kind, "transitive", "optim.max_steps=2", "model.lora.r=4")
    assert (out / "adapter" / "adapter_config.json").is_file()
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in weights)  # merged: a plain model
    oracle = load_oracle(kind, out, device="cpu")
    assert 0 <= float(oracle.prob_prefers(["pick one"], ["the answer is apple"], ["a"])[0]) <= 1


@pytest.mark.parametrize("kind", ["bt", "pairwise", "gpm"])
def test_conversational_pairs_train_through_the_chat_template(tmp_path, kind):
    """TRL's conversational format: the prompt a message list, chosen/rejected assistant turns;
    each kind renders them as its oracle will (the chat template; RLHFlow's context)."""
    from inpo.oracles.reward_model import render_response
    from inpo.tiny import chat_tokenizer, save_tiny_chat_lm

    save_tiny_chat_lm(tmp_path / "chat", "llama3", hidden_size=32)
    rows = [
        {
            "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }
        for p, r in zip(["Pick one."] * 21, preference_pairs("transitive", prompts=["x"]))
    ]
    _write(tmp_path / "chat.jsonl", rows)
    assert main(
        [
            "train-oracle", f"kind={kind}", f"model.path={tmp_path / 'chat'}",
            f"data.train_file={tmp_path / 'chat.jsonl'}", f"data.eval_file={tmp_path / 'chat.jsonl'}",
            f"output_dir={tmp_path / 'out'}", "optim.max_steps=2", "logging.progress_bar=false",
        ]
    ) == 0  # fmt: skip
    assert json.loads((tmp_path / "out" / "eval_metrics.json").read_text())["pairs"] == 21
    # the prompt's last token is where the GPM reads its scale gate: inside the template's
    # generation prompt, before the answer
    tok = chat_tokenizer("llama3")
    r = render_response(tok, rows[0]["prompt"], "the answer is apple", 512, prompt_index=True)
    head = tok.apply_chat_template(rows[0]["prompt"], tokenize=False, add_generation_prompt=True)
    assert tok.decode(r.ids[: r.prompt_index + 1]) == head


def test_pairwise_verdict_tokens_are_checked_before_anything_runs(tmp_path, capsys):
    """A tokenizer that reads 'A' and 'B' as one token (its unknown one) could only ever say
    ½: refused before the model loads or the output folder is written, naming the token."""
    from inpo.tiny import save_tiny_lm

    save_tiny_lm(tmp_path / "lm", "llama", tokenizer=word_tokenizer(["red", "blue"]))
    rows = preference_pairs("cyclic", prompts=["pick one"])
    capsys.readouterr()  # the model writer's progress bar
    _write(tmp_path / "pairs.jsonl", rows)
    argv = ["train-oracle", "kind=pairwise", f"model.path={tmp_path / 'lm'}"]
    argv += [f"data.train_file={tmp_path / 'pairs.jsonl'}", f"output_dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "'A' and 'B' are the same token" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_train_oracle_writes_a_model_card_whose_command_reproduces_it(kit, tmp_path):
    """Every trained oracle gets a card (kind, data, steps, metrics); its reproduce command,
    run from the card's folder, trains the same weights into a new folder beside it."""
    import re
    import shlex
    import subprocess
    import sys

    from safetensors.torch import load_file

    _train(kit, tmp_path / "rm", "bt", "cyclic", "optim.max_steps=2")
    card = (tmp_path / "rm" / "README.md").read_text()
    assert "| kind | `bt`" in card and "| optimizer steps | 2 |" in card
    command = shlex.split(re.search(r"```bash\n(inpo train-oracle .*)\n```", card).group(1))
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", *command[1:]], cwd=tmp_path / "rm",
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("rm", "rm-reproduced"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
