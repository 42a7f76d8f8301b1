"""The training loop: config validation, loss wiring, invariants, checkpoint/resume, NaN guard.

Every test trains a real tiny Llama (``inpo.tiny``) saved to disk and reloaded with
``from_pretrained``, on a tiny JSONL dataset whose reference/previous log-probs are computed from
the same weights (so the policy starts equal to both references).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from inpo.config import load_config
from inpo.errors import ConfigError, DataError, TrainingDivergedError
from inpo.training import TrainConfig, train
from inpo.training.checkpoint import find_latest_checkpoint
from inpo.training.optim import WarmupSchedule


def make_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append(
            {
                "prompt": f"Q{i}: add {i} and {i + 1}?",
                "chosen": f" {2 * i + 1}.",
                "rejected": f" maybe {i * 7 % 11} or so",
                "tie": i % 4 == 3,
                "chosen_winrate": 0.75,
                "rejected_winrate": 0.25,
            }
        )
    return rows


def write_dataset(path: Path, model_dir: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSONL with ref/prev log-probs computed by the model in ``model_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inpo.layout import completion_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [r["prompt"] for r in rows]
    chosen = completion_logps(model, tok, prompts, [r["chosen"] for r in rows])
    rejected = completion_logps(model, tok, prompts, [r["rejected"] for r in rows])
    with path.open("w") as fh:
        for r, c, j in zip(rows, chosen.tolist(), rejected.tolist(), strict=True):
            extra = {"ref_chosen_logps": c, "ref_rejected_logps": j}
            extra |= {"prev_chosen_logps": c, "prev_rejected_logps": j}
            fh.write(json.dumps({**r, **extra}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama and a 12-pair dataset with precomputed log-probs from its own weights."""
    from inpo.tiny import save_tiny_lm

    root = tmp_path_factory.mktemp("tiny")
    model_dir = save_tiny_lm(root / "model", "llama", hidden_size=32, num_hidden_layers=2)
    data = write_dataset(root / "pairs.jsonl", model_dir, make_rows(12))
    return model_dir, data


def make_cfg(tiny, out: Path, *overrides: str) -> TrainConfig:
    model_dir, data = tiny
    base = [
        f"output_dir={out}",
        f"model.path={model_dir}",
        f"data.train_file={data}",
        "optim.global_batch_size=4",
        "optim.per_device_batch_size=4",
        "optim.learning_rate=0.001",
        "optim.warmup_ratio=0.0",
        "optim.max_steps=3",
        "loss.eta=0.1",
        "logging.progress_bar=false",
    ]
    return load_config(TrainConfig, None, [*base, *overrides])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---- config ----------------------------------------------------------------------------------


def test_unknown_key_says_did_you_mean(tmp_path):
    with pytest.raises(
        ConfigError, match=r"optim\.learning_rat.*did you mean 'optim\.learning_rate'"
    ):
        load_config(TrainConfig, None, ["output_dir=x", "optim.learning_rat=0.1"])


def test_tau_above_eta_fails_naming_the_key_before_any_model_loads(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        "output_dir: out\nmodel: {path: /nonexistent/model}\n"
        "data: {train_file: /nonexistent/data.jsonl}\nloss: {name: inpo, eta: 0.005, tau: 0.01}\n"
    )
    with pytest.raises(ConfigError, match=r"loss\.tau"):
        load_config(TrainConfig, cfg)


def test_hyperparameter_the_loss_does_not_take_is_rejected():
    with pytest.raises(ConfigError, match=r"loss\.eta .*'dpo' does not take it"):
        load_config(
            TrainConfig,
            None,
            ["output_dir=o", "model.path=m", "data.train_file=d", "loss.name=dpo", "loss.eta=0.1"],
        )


def test_unknown_loss_name_suggests():
    with pytest.raises(ConfigError, match="did you mean 'inpo'"):
        load_config(
            TrainConfig,
            None,
            ["output_dir=o", "model.path=m", "data.train_file=d", "loss.name=inp"],
        )


def test_paper_defaults_fill_unset_hyperparameters():
    cfg = load_config(TrainConfig, None, ["output_dir=o", "model.path=m", "data.train_file=d"])
    assert cfg.optim.learning_rate == 5e-7 and cfg.optim.global_batch_size == 128
    assert cfg.loss.hparams() == pytest.approx({"eta": 0.005, "tau": 0.005 / 3})


def test_missing_precomputed_column_names_it_before_the_model_loads(tmp_path):
    data = tmp_path / "raw.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    cfg = load_config(
        TrainConfig,
        None,
        [f"output_dir={tmp_path / 'o'}", "model.path=/nonexistent", f"data.train_file={data}"],
    )
    with pytest.raises(
        DataError, match=r"'inpo' needs column\(s\) ref_chosen_logps.*inpo precompute"
    ):
        train(cfg)
    assert not (tmp_path / "o").exists()


def test_warmup_then_cosine_schedule():
    s = WarmupSchedule("cosine", warmup=2, total=10)
    assert [s(0), s(1), s(2)] == pytest.approx([0.5, 1.0, 1.0])
    assert s(6) == pytest.approx(0.5)  # half-way through the decay
    assert s(10) == pytest.approx(0.0)
    assert WarmupSchedule("constant", 0, 10)(7) == 1.0


# ---- the loop --------------------------------------------------------------------------------


def test_inpo_margin_is_zero_when_the_policy_equals_both_references(tiny, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(tiny, out, "optim.max_steps=1", "loss.tau=0.03"))
    first = metrics(out)[0]
    assert first["margins_abs_max"] < 1e-5
    assert first["loss"] > 0


def test_micro_batch_split_does_not_change_training(tiny, tmp_path):
    """8 × 1 == 2 × 4 == 3 × 3 (uneven): the step's gradient is the mean over its pairs."""
    runs = {}
    for optimizer in ("sgd", "adamw"):
        for micro in (8, 2, 3):
            out = tmp_path / f"{optimizer}{micro}"
            cfg = make_cfg(
                tiny,
                out,
                "optim.global_batch_size=8",  # 12 pairs: steps of 8 then 4 pairs
                f"optim.per_device_batch_size={micro}",
                f"optim.optimizer={optimizer}",
                "optim.max_grad_norm=null",
            )
            train(cfg)
            runs[micro] = weights(out)
        assert max_diff(runs[8], runs[2]) < 1e-6, optimizer
        assert max_diff(runs[8], runs[3]) < 1e-6, optimizer
        assert max_diff(runs[8], weights(tiny[0])) > 1e-3  # it did train (by ~100x the tolerance)


@pytest.mark.parametrize("arch", ["llama", pytest.param("gpt2", marks=pytest.mark.slow)])
def test_resumed_run_equals_uninterrupted_run(tiny, tmp_path, arch):
    """Stop after step 4 (mid-epoch), resume from the checkpoint: same weights as a straight run.

    Dropout is on (Llama: attention dropout; GPT-2: its default 0.1 everywhere), so the RNG
    state must be restored too; GPT-2 also ties its embeddings.
    """
    from inpo.tiny import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "model", arch, hidden_size=32, num_hidden_layers=2)
    if arch == "llama":
        conf = json.loads((model_dir / "config.json").read_text())
        (model_dir / "config.json").write_text(json.dumps({**conf, "attention_dropout": 0.2}))
    setup = (model_dir, tiny[1])
    args = (
        "optim.max_steps=6",
        "save_steps=2",
        "optim.warmup_ratio=0.2",
        "optim.max_grad_norm=0.5",
    )

    straight = tmp_path / "straight"
    train(make_cfg(setup, straight, *args))
    stopped = tmp_path / "stopped"
    first = train(make_cfg(setup, stopped, *args), stop_after=4)
    assert not first.finished and not (stopped / "model.safetensors").exists()
    second = train(make_cfg(setup, stopped, *args))
    assert second.resumed_from == stopped / "checkpoints" / "step_000004"
    assert max_diff(weights(straight), weights(stopped)) < 1e-6
    assert [m["step"] for m in metrics(stopped)] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in metrics(stopped)] == pytest.approx(
        [m["loss"] for m in metrics(straight)]
    )
    # a third run of the same command is a no-op
    third = train(make_cfg(setup, stopped, *args))
    assert third.resumed_from == stopped / "checkpoints" / "step_000006"
    assert max_diff(weights(straight), weights(stopped)) < 1e-6


def test_incomplete_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_000002").mkdir(parents=True)
    (root / "step_000004.tmp").mkdir()
    assert find_latest_checkpoint(root, verify=False) == root / "step_000002"
    # verified, the folder without checksums is set aside, kept for inspection
    assert find_latest_checkpoint(root) is None
    assert (root / "step_000002.corrupt").is_dir()


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(tiny, tmp_path, caplog, damage):
    """A byte flipped in the newest checkpoint's weights, or its optimizer state truncated:
    detected by the checksums, set aside, and the run resumes from the checkpoint before it —
    to the weights of an uninterrupted run."""
    args = ("optim.max_steps=5", "save_steps=1")
    straight = tmp_path / "straight"
    train(make_cfg(tiny, straight, *args))
    out = tmp_path / "run"
    train(make_cfg(tiny, out, *args), stop_after=3)
    newest = out / "checkpoints" / "step_000003"
    if damage == "flip":
        target = newest / "model.safetensors"
        raw = bytearray(target.read_bytes())
        raw[-5] ^= 0x01
        target.write_bytes(bytes(raw))
    else:
        target = newest / "optimizer.pt"
        target.write_bytes(target.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        result = train(make_cfg(tiny, out, *args))
    assert result.resumed_from == out / "checkpoints" / "step_000002"
    assert "step_000003" in caplog.text and "checksum" in caplog.text
    assert (out / "checkpoints" / "step_000003.corrupt").is_dir()
    assert max_diff(weights(straight), weights(out)) < 1e-6


def test_checkpoint_trained_on_other_data_is_never_resumed(tiny, tmp_path):
    model_dir, _ = tiny
    out = tmp_path / "run"
    train(make_cfg(tiny, out, "optim.max_steps=4", "save_steps=1"), stop_after=2)
    rows = make_rows(12)
    rows[5]["rejected"] = " a different answer"  # one pair changed
    other = write_dataset(tmp_path / "other.jsonl", model_dir, rows)
    with pytest.raises(ConfigError, match=r"other inputs \(data.train_file's rows differ\)"):
        train(make_cfg((model_dir, other), out, "optim.max_steps=4", "save_steps=1"))
    # back on its own data, it resumes
    result = train(make_cfg(tiny, out, "optim.max_steps=4", "save_steps=1"))
    assert result.resumed_from == out / "checkpoints" / "step_000002"


def _poison_row(marker_token: int, mode: str):
    from inpo.logprobs import sequence_logps

    def logps(model, input_ids, attention_mask, completion_mask):
        out = sequence_logps(model, input_ids, attention_mask, completion_mask)
        hit = (input_ids == marker_token).any(-1)
        if mode == "loss":
            return torch.where(hit, torch.full_like(out, float("nan")), out)
        # finite value, NaN gradient (on the marked rows only): d/dx sqrt(0·x) = 0 · inf
        poisoned = out.clone()
        poisoned[hit] = out[hit] + torch.sqrt(0.0 * out[hit])
        return poisoned

    return logps


@pytest.mark.parametrize("mode", ["loss", pytest.param("grad", marks=pytest.mark.slow)])
def test_non_finite_loss_stops_with_step_and_rows_after_saving_last_good_state(
    tmp_path, tiny, mode
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = make_rows(12)
    rows[9]["prompt"] = "Q9: add # and #?"  # the only row with '#': rows 8-11 are step 3
    data = write_dataset(tmp_path / "pairs.jsonl", tiny[0], rows)
    out = tmp_path / "run"
    cfg = make_cfg((tiny[0], data), out, "optim.max_steps=5", "data.shuffle=false")
    marker = AutoTokenizer.from_pretrained(tiny[0]).convert_tokens_to_ids("#")
    with pytest.raises(TrainingDivergedError) as err:
        train(cfg, logps_fn=_poison_row(marker, mode))
    msg = str(err.value)
    assert "step 3" in msg and "after step 2" in msg
    assert "9" in msg.split("rows")[1]
    if mode == "loss":
        assert "rows [9]" in msg
    ckpt = out / "checkpoints" / "step_000002"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(metrics(out)) == 2


def test_output_loads_with_from_pretrained_and_generates(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    result = train(make_cfg(tiny, out, "optim.max_steps=2"))
    assert result.finished and result.steps == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Q1: add", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids.shape[1] + 4
    saved = (out / "train_config.yaml").read_text()
    assert "max_steps: 2" in saved and "eta: 0.1" in saved
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss") and len(rows) == 3
    assert max_diff(weights(out), weights(tiny[0])) > 1e-5
    # the model card: Hub front matter, what was trained from what, how to reproduce
    import yaml

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers" and "inpo" in front["tags"]
    assert "| optimizer steps | 2 |" in card and "eta=0.1" in card
    assert "inpo train train_config.yaml output_dir=../run-reproduced" in card
    assert str(Path.home()) not in card
    # a re-run that trains nothing keeps the card of the run that trained
    train(make_cfg(tiny, out, "optim.max_steps=2"))
    assert (out / "README.md").read_text() == card


@pytest.mark.slow
@pytest.mark.parametrize(
    ("loss", "hparams"),
    [
        ("dpo", ["loss.beta=0.5"]),
        ("ipo", ["loss.beta=0.5"]),
        ("inpo", ["loss.eta=0.5", "loss.tau=0.1"]),
        ("sppo", ["loss.eta=0.5"]),
        ("todo", ["loss.beta=0.5"]),
    ],
)
def test_every_loss_trains_and_its_loss_decreases(tiny, tmp_path, loss, hparams):
    out = tmp_path / loss
    cfg = make_cfg(
        tiny,
        out,
        f"loss.name={loss}",
        "loss.eta=null",
        *hparams,
        "optim.global_batch_size=12",
        "optim.per_device_batch_size=6",
        "optim.max_steps=20",
        "optim.lr_scheduler=constant",
        "save_steps=null",
    )
    train(cfg)
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses


@pytest.mark.slow
def test_lora_trains_and_saves_merged_weights(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    cfg = make_cfg(tiny, out, "model.lora.r=4", "model.lora.alpha=8", "optim.learning_rate=0.01")
    train(cfg)
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = weights(out)
    assert not any("lora" in k for k in merged)
    base = weights(tiny[0])
    changed = [k for k in base if (merged[k] - base[k]).abs().max() > 1e-6]
    assert changed and all("proj" in k for k in changed)  # only LoRA targets moved
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_training(tiny, tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "gc"
    train(make_cfg(tiny, plain))
    train(make_cfg(tiny, ckpt, "model.gradient_checkpointing=true"))
    assert max_diff(weights(plain), weights(ckpt)) < 1e-6


@pytest.mark.slow
def test_tensorboard_through_accelerate_under_trl_names(tiny, tmp_path, monkeypatch):
    """accelerate's TensorBoard tracker gets TRL's metric names, each step; the project a user
    set in $WANDB_PROJECT is kept, not overridden."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    out = tmp_path / "tb"
    train(make_cfg(tiny, out, "optim.max_steps=2", "logging.report_to=tensorboard"))
    folder = out / "trackers" / "my-project"
    assert list(folder.rglob("events.out.tfevents.*")), "no TensorBoard events written"
    acc = EventAccumulator(str(folder))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for name in ("loss", "rewards/chosen", "rewards/margins", "rewards/accuracies", "grad_norm"):
        assert name in tags, (name, tags)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]


def test_gradient_checkpointing_option_recomputes_the_layers(tiny):
    """With the option on, a decoder layer runs twice per step (forward + recompute)."""
    from inpo.logprobs import sequence_logps
    from inpo.training.config import ModelConfig
    from inpo.training.modeling import load_policy

    for enabled, expected_calls in ((False, 1), (True, 2)):
        model = load_policy(ModelConfig(path=str(tiny[0]), gradient_checkpointing=enabled))
        calls = []
        model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        ids = torch.tensor([[5, 6, 7, 8], [5, 6, 9, 9]])
        mask = torch.ones_like(ids)
        logps = sequence_logps(model, ids, mask, torch.tensor([[0, 0, 1, 1]] * 2))
        logps.sum().backward()
        assert len(calls) == expected_calls


def test_an_unknown_tracker_is_named_with_a_suggestion(tiny, tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown tracker 'tensorbord'.*did you mean 'tensorboard'"
    ):
        make_cfg(tiny, tmp_path / "x", "logging.report_to=mlflow,tensorbord")


def test_report_to_wandb_without_wandb_is_a_clear_error(tiny, tmp_path):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed")
    with pytest.raises(ConfigError, match="pip install wandb"):
        train(make_cfg(tiny, tmp_path / "w", "logging.report_to=wandb"))
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_length_buckets_default_by_device_and_row_length(tmp_path):
    """null: 4 buckets on CPU only for rows of MIN_BUCKET_LENGTH tokens or more (shorter rows
    run faster in one pass, benchmarks/results/length_buckets.md), 1 on accelerators; a set
    value is kept whatever the length."""

    from inpo.layout import MIN_BUCKET_LENGTH, Layout

    base = ["model.path=x", "data.train_file=y", f"output_dir={tmp_path}"]
    auto = load_config(TrainConfig, None, base)
    three = load_config(TrainConfig, None, [*base, "data.length_buckets=3"])

    def _length_buckets(cfg, device, width):
        return Layout(length_buckets=cfg.data.length_buckets, device_type=device).buckets(
            width, packed=False
        )

    cpu, gpu = "cpu", "cuda"
    assert _length_buckets(auto, cpu, MIN_BUCKET_LENGTH - 1) == 1
    assert _length_buckets(auto, cpu, MIN_BUCKET_LENGTH) == 4
    assert _length_buckets(auto, gpu, 4 * MIN_BUCKET_LENGTH) == 1
    assert _length_buckets(three, cpu, 8) == _length_buckets(three, gpu, 512) == 3


def test_length_buckets_give_the_same_logps_and_gradients(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from inpo.data import PreferenceCollator
    from inpo.layout import bucketed_logps
    from inpo.logprobs import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(tiny[0])
    rows = make_rows(6)
    rows[2]["chosen"] = " a much longer answer than the others, to make padding"
    batch = PreferenceCollator(AutoTokenizer.from_pretrained(tiny[0]))(rows)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    results = []
    for buckets in (1, 3, 12):
        model.zero_grad()
        lp = bucketed_logps(sequence_logps, *args, buckets=buckets)
        (lp * torch.arange(1.0, 13.0)).sum().backward()
        results.append((lp.detach(), model.lm_head.weight.grad.clone()))
    for lp, grad in results[1:]:
        torch.testing.assert_close(lp, results[0][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(grad, results[0][1], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_trains_on_the_folder_inpo_precompute_writes(tiny, tmp_path, caplog):
    """Raw pairs → precompute ref, then prev (same weights) → INPO: margin 0 at step 0."""
    from inpo.precompute import precompute_logps

    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in make_rows(8)))
    lengths = {"max_prompt_length": 512, "max_completion_length": 512}
    precompute_logps(raw, tiny[0], tmp_path / "ref", columns="ref", **lengths)
    precompute_logps(tmp_path / "ref", tiny[0], tmp_path / "both", columns="prev", **lengths)
    out = tmp_path / "run"
    cfg = make_cfg(tiny, out, f"data.train_file={tmp_path / 'both'}", "optim.max_steps=1")
    with caplog.at_level("WARNING"):
        train(cfg)
    assert metrics(out)[0]["margins_abs_max"] < 1e-5
    assert "precomputed with" not in caplog.text
    # other truncation limits than the precompute's are flagged where they cut a pair...
    longest = json.loads((tmp_path / "both" / "manifest.json").read_text())
    longest = longest["longest_completion_tokens"]
    assert longest > 4
    cfg = make_cfg(
        tiny,
        tmp_path / "run2",
        f"data.train_file={tmp_path / 'both'}",
        "optim.max_steps=1",
        "data.max_completion_length=4",
    )
    with caplog.at_level("WARNING"):
        train(cfg)
    assert "max_completion_length=4" in caplog.text and "precomputed with" in caplog.text
    assert f"its longest has {longest} tokens" in caplog.text
    # ...and not where both limits exceed the longest completion (they cut nothing)
    caplog.clear()
    cfg = make_cfg(
        tiny,
        tmp_path / "run3",
        f"data.train_file={tmp_path / 'both'}",
        "optim.max_steps=1",
        f"data.max_completion_length={longest}",
    )
    with caplog.at_level("WARNING"):
        train(cfg)
    assert "precomputed with" not in caplog.text


def test_old_checkpoints_are_pruned_and_each_is_complete(tiny, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(tiny, out, "optim.max_steps=4", "save_steps=1", "keep_checkpoints=2"))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step_000003", "step_000004"]
    files = {p.name for p in (out / "checkpoints" / "step_000003").iterdir()}
    expected = {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pt"}
    assert expected | {"trainer_state.json", "config.json"} <= files
    state = json.loads((out / "checkpoints" / "step_000003" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (3, 1, 0)  # 12 pairs / 4


def test_a_finished_training_is_not_returned_for_other_settings(tiny, tmp_path):
    out = tmp_path / "run"
    train(make_cfg(tiny, out, "optim.max_steps=2"))
    saved = (out / "train_config.yaml").read_text()
    model = (out / "model.safetensors").read_bytes()
    with pytest.raises(
        ConfigError, match=r"finished training with other settings \(changed: loss\.eta"
    ):
        train(make_cfg(tiny, out, "optim.max_steps=2", "loss.eta=0.2"))
    assert (out / "train_config.yaml").read_text() == saved  # still describes the model
    assert (out / "model.safetensors").read_bytes() == model
    # settings that do not change the model (logging, checkpoint cadence) are fine
    assert train(make_cfg(tiny, out, "optim.max_steps=2", "save_steps=7")).finished


def test_resuming_with_another_lora_rank_is_a_clear_error(tiny, tmp_path):
    out = tmp_path / "run"
    lora = "model.lora={r: 8, alpha: 16.0, dropout: 0.0, target_modules: [q_proj, v_proj]}"
    train(make_cfg(tiny, out, "optim.max_steps=3", "save_steps=1", lora), stop_after=1)
    with pytest.raises(ConfigError, match=r"does not fit the model .*LoRA"):
        train(make_cfg(tiny, out, "optim.max_steps=3", "save_steps=1", lora.replace("8", "16")))


def test_a_hub_id_in_the_local_cache_is_a_model_path(tiny, tmp_path, monkeypatch):
    """`model.path=acme/tiny-llama` trains when the id is in the local Hugging Face cache (the
    cache laid out as huggingface_hub writes it); an id that is not cached is one line saying
    how to fetch it. Nothing is downloaded."""
    import shutil

    model_dir, _ = tiny
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(model_dir, snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "run"
    result = train(make_cfg(tiny, out, "optim.max_steps=1", "model.path=acme/tiny-llama"))
    assert result.finished and (out / "model.safetensors").is_file()
    assert "base_model: acme/tiny-llama" in (out / "README.md").read_text()  # a hub id
    with pytest.raises(ConfigError, match=r"'acme/other' is not a local folder.*hf download"):
        train(make_cfg(tiny, tmp_path / "x", "model.path=acme/other"))


def test_a_hub_dataset_in_the_local_cache_trains_as_its_file_does(tiny, tmp_path, monkeypatch):
    """`data.dataset_name=acme/prefs` (+ `data.split`) reads a hub dataset through
    `datasets.load_dataset` from the local cache (laid out as huggingface_hub writes it; parquet
    files, two splits) and trains the same weights as the same rows from a file; the model card
    names the dataset; an id that is not cached is one line; nothing is downloaded."""
    from inpo.data import load_preference_dataset

    _, data = tiny
    rows = load_preference_dataset(data).remove_columns("row_id")
    cache = tmp_path / "hub"
    repo = cache / "datasets--acme--prefs"
    snap = repo / "snapshots" / "0123abcd"
    (snap / "data").mkdir(parents=True)
    rows.to_parquet(str(snap / "data" / "train-00000-of-00001.parquet"))
    rows.select(range(4)).to_parquet(str(snap / "data" / "test-00000-of-00001.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert len(load_preference_dataset("acme/prefs", split="test")) == 4
    hub = train(
        make_cfg(tiny, tmp_path / "hub_run", "data.train_file=", "data.dataset_name=acme/prefs")
    )
    from_file = train(make_cfg(tiny, tmp_path / "file_run"))
    a, b = weights(hub.output_dir), weights(from_file.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = (hub.output_dir / "README.md").read_text()
    assert "datasets:\n- acme/prefs" in card
    with pytest.raises(ConfigError, match=r"'acme/nope' is not a local file.*--repo-type dataset"):
        make_cfg(tiny, tmp_path / "x", "data.train_file=", "data.dataset_name=acme/nope")
    with pytest.raises(ConfigError, match=r"set one of data\.train_file"):
        make_cfg(tiny, tmp_path / "x", "data.dataset_name=acme/prefs")  # both


def test_final_checkpoint_false_writes_no_last_checkpoint_and_reruns_to_the_same_weights(
    tiny, tmp_path
):
    """`inpo run`'s train stage sets final_checkpoint=false (its merge deleted the last
    checkpoint anyway): only the periodic ones are written, and a re-run from the newest of them
    ends with the same weights."""
    out = tmp_path / "run"
    cfg = make_cfg(tiny, out, "optim.max_steps=3", "save_steps=2", "final_checkpoint=false")
    train(cfg)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002"]
    first = weights(out)
    again = train(cfg)
    assert again.resumed_from is not None and again.resumed_from.name == "step_000002"
    assert all(torch.equal(first[k], weights(out)[k]) for k in first)


def test_packing_trains_the_weights_of_the_padded_batch(tiny, tmp_path):
    """``data.packing=true``: one padding-free row a micro-batch, the same training."""
    runs = {}
    for packing in ("false", "true"):
        out = tmp_path / packing
        train(make_cfg(tiny, out, f"data.packing={packing}", "optim.per_device_batch_size=2"))
        runs[packing] = weights(out)
    assert max_diff(runs["true"], runs["false"]) < 1e-5
    assert max_diff(runs["true"], weights(tiny[0])) > 1e-3


def _spy_varlen(monkeypatch) -> list[int]:
    """The row lengths varlen attention ran on (the real function is still what runs)."""
    import inpo.varlen as varlen

    seen: list[int] = []
    real = varlen.varlen_sdpa_attention

    def spy(module, query, *args, **kwargs):
        seen.append(query.shape[2])
        return real(module, query, *args, **kwargs)

    monkeypatch.setattr(varlen, "varlen_sdpa_attention", spy)
    return seen


@pytest.mark.parametrize(
    "extra",
    [[], ["data.share_prompt=true"], ["model.lora.r=4", "model.lora.alpha=8"]],
    ids=["unshared", "shared", "lora"],
)
def test_packing_null_packs_long_cpu_micro_batches(tiny, tmp_path, monkeypatch, extra):
    """``data.packing: null`` (the default): on CPU a micro-batch whose longest row has
    ``MIN_PACK_LENGTH`` tokens or more runs packed into one row with variable-length attention,
    a shorter one padded as before; the same training as ``data.packing=false``."""
    from inpo.layout import MIN_PACK_LENGTH

    model_dir, _ = tiny
    rows = make_rows(8)
    for r in rows[::2]:  # half the pairs long
        r["prompt"] = r["prompt"] * 6
    data = write_dataset(tmp_path / "long.jsonl", model_dir, rows)
    seen = _spy_varlen(monkeypatch)
    runs, packed_rows = {}, {}
    for packing in ("false", "null"):
        out = tmp_path / packing
        seen.clear()
        train(
            make_cfg(
                (model_dir, data), out, f"data.packing={packing}", *extra,
                "optim.per_device_batch_size=2", "optim.global_batch_size=4",
                "optim.learning_rate=0.01",
            )
        )  # fmt: skip
        runs[packing] = weights(out)
        packed_rows[packing] = [n for n in seen if n >= MIN_PACK_LENGTH]
    assert packed_rows["false"] == []
    assert packed_rows["null"]  # some micro-batches ran packed
    assert max_diff(runs["null"], runs["false"]) < 1e-5
    assert max_diff(runs["null"], weights(model_dir)) > 1e-3


def test_packing_null_on_cuda_packs_unshared_pairs_of_models_that_keep_sequences_apart(
    tiny, tmp_path, monkeypatch
):
    """``data.packing: null`` on a CUDA device: packed (masked rows, the fastest layout on an
    H200, packing_gpu.md) for unshared pairs when the model's attention keeps packed sequences
    apart (the real probe, run here on the CPU copy of the model); padded with
    ``data.share_prompt``, under FSDP, on other devices, when the probe fails or when set."""

    from transformers import AutoModelForCausalLM

    import inpo.layout
    from inpo.layout import Layout

    model = AutoModelForCausalLM.from_pretrained(tiny[0]).train()

    def _auto_packing(cfg, kind, model, sharded=False):
        layout = Layout(
            share_prompt=cfg.data.share_prompt,
            packing=cfg.data.packing,
            length_buckets=cfg.data.length_buckets,
            device_type=kind,
            sharded=sharded,  # FSDP or DeepSpeed
        )
        return layout.probe(model)

    def cfg(*extra):
        return make_cfg(tiny, tmp_path / "unused", *extra)

    assert _auto_packing(cfg(), "cuda", model)
    assert model.training  # the probe ran in eval mode and gave the mode back
    assert not _auto_packing(cfg("data.share_prompt=true"), "cuda", model)
    assert not _auto_packing(cfg("data.packing=false"), "cuda", model)
    assert not _auto_packing(cfg(), "cuda", model, sharded=True)
    assert not _auto_packing(cfg(), "mps", model)

    def mixes(model):
        raise ValueError("lets packed sequences attend to each other")

    monkeypatch.setattr(inpo.layout, "check_packing_support", mixes)
    assert not _auto_packing(cfg(), "cuda", model)


@pytest.mark.gpu
def test_packing_null_on_cuda_trains_the_weights_of_padded_micro_batches(
    tiny, tmp_path, monkeypatch
):
    """On a CUDA GPU (fp32) ``data.packing: null`` packs the long micro-batches into masked
    rows and trains the weights ``data.packing=false`` trains."""
    import inpo.layout
    from inpo.layout import MIN_PACK_LENGTH

    model_dir, _ = tiny
    rows = make_rows(8)
    for r in rows[::2]:
        r["prompt"] = r["prompt"] * 6
    data = write_dataset(tmp_path / "long.jsonl", model_dir, rows)
    seen: list[int] = []
    real = inpo.layout.packed_sequence_logps

    def spy(model, input_ids, *args, **kwargs):
        seen.append(input_ids.shape[1])
        assert input_ids.is_cuda
        return real(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(inpo.layout, "packed_sequence_logps", spy)
    runs = {}
    for packing in ("false", "null"):
        out = tmp_path / packing
        train(
            make_cfg(
                (model_dir, data), out, f"data.packing={packing}",
                "optim.per_device_batch_size=2", "optim.global_batch_size=4",
                "optim.learning_rate=0.01",
            )
        )  # fmt: skip
        runs[packing] = weights(out)
    assert [n for n in seen if n >= MIN_PACK_LENGTH]
    assert max_diff(runs["null"], runs["false"]) < 1e-4


def test_packing_null_leaves_short_rows_padded(tiny, tmp_path, monkeypatch):
    """Rows under ``MIN_PACK_LENGTH`` tokens (the default task's, this dataset's) are not
    packed by default: one padded pass is faster there (length_buckets.md)."""
    from inpo.layout import MIN_PACK_LENGTH

    seen = _spy_varlen(monkeypatch)
    train(make_cfg(tiny, tmp_path / "run", "optim.per_device_batch_size=2"))
    assert [n for n in seen if n >= MIN_PACK_LENGTH] == []
    assert seen  # ... though the probe found varlen exact for this model


def test_packing_with_share_prompt_trains_the_weights_of_the_padded_batch(tiny, tmp_path):
    """``data.packing`` with ``data.share_prompt``: the rows ``prompt + chosen + rejected``
    packed without padding, each pair in its own segment: the same training as unshared
    padded micro-batches."""
    runs = {}
    for name, extra in (
        ("padded", ()),
        ("shared_packed", ("data.packing=true", "data.share_prompt=true")),
    ):
        out = tmp_path / name
        train(make_cfg(tiny, out, *extra, "optim.per_device_batch_size=2"))
        runs[name] = weights(out)
    assert max_diff(runs["shared_packed"], runs["padded"]) < 1e-5
    assert max_diff(runs["shared_packed"], weights(tiny[0])) > 1e-3


@pytest.mark.slow
def test_the_model_cards_command_reproduces_the_model_from_its_folder(tmp_path):
    """Trained from relative paths in one folder, reproduced by the card's own command run in
    the card's folder: the same weights, in a new folder beside it."""
    import re
    import shlex
    import subprocess
    import sys

    from helpers import tiny_pairs

    tiny_pairs(tmp_path)
    run = [sys.executable, "-m", "inpo", "train"]
    subprocess.run([*run, "cfg.yaml", "output_dir=out"], cwd=tmp_path, check=True,
                   capture_output=True)  # fmt: skip
    card = (tmp_path / "out" / "README.md").read_text()
    command = re.search(r"```bash\n(inpo train .*)\n```", card).group(1)
    argv = shlex.split(command)
    proc = subprocess.run([*run, *argv[2:]], cwd=tmp_path / "out", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert max_diff(weights(tmp_path / "out-reproduced"), weights(tmp_path / "out")) < 1e-6


def test_a_model_cards_base_model_is_a_hub_id_only_for_a_hub_model(tmp_path, monkeypatch):
    """``base_model`` (front matter the Hub links) is written for a model that came from the hub
    (an ``owner/name`` id, or a folder in the Hugging Face cache), never for a local folder whose
    last two parts merely look like one (``…/models/smollm2``); the card's table names a local
    folder as given, the home directory as ``~``."""
    from inpo.training.modelcard import _base_model, _name

    local = tmp_path / "models" / "smollm2"
    local.mkdir(parents=True)
    assert _base_model(str(local)) == [] and _name(str(local)) == str(local)
    snap = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    assert _base_model(str(snap)) == ["base_model: acme/tiny-llama"]
    assert _base_model("acme/not-a-folder") == ["base_model: acme/not-a-folder"]
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _name(str(local)) == "~/models/smollm2"
