"""`inpo train CONFIG.yaml [key=value ...]` end to end on a tiny model and tiny files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inpo.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_train_help(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: inpo train" in out and "key=value" in out


def test_example_config_is_valid():
    from inpo.config import load_config
    from inpo.training import TrainConfig

    cfg = load_config(TrainConfig, REPO / "examples" / "train_inpo.yaml")
    assert cfg.loss.name == "inpo" and cfg.optim.learning_rate == pytest.approx(5e-7)


def test_bad_key_is_one_line_error_exit_2(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("output_dir: o\nmodel: {path: m}\ndata: {train_file: d}\n")
    assert main(["train", str(cfg), "optim.max_step=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "did you mean 'optim.max_steps'" in err


def test_no_config_and_no_settings_is_one_line_error(capsys):
    assert main(["train"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.path" in err and "data.train_file" in err


def test_key_value_settings_alone_train_without_a_config_file(tmp_path, capsys):
    from inpo.tiny import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "model", "llama", hidden_size=32, num_hidden_layers=2)
    rows = [
        {"prompt": f"Say {i}", "chosen": f" {i}", "rejected": " no"}
        | {"ref_chosen_logps": -9.0 - i, "ref_rejected_logps": -12.0}
        for i in range(4)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    settings = [f"model.path={model_dir}", f"data.train_file={data}", f"output_dir={out}"]
    settings += ["loss.name=dpo", "optim.global_batch_size=4", "optim.max_steps=1"]
    assert main(["train", *settings, "logging.progress_bar=false"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    assert yaml_loss_name(out / "train_config.yaml") == "dpo"


def yaml_loss_name(path: Path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["loss"]["name"]


def test_cli_trains_a_tiny_model_end_to_end(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from inpo.tiny import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "model", "llama", hidden_size=32, num_hidden_layers=2)
    rows = [
        # reference log-probs from some earlier model (any values <= 0 do)
        {"prompt": f"Say {i}", "chosen": f" {i}", "rejected": " no", "tie": i == 2}
        | {"ref_chosen_logps": -9.0 - i, "ref_rejected_logps": -12.0}
        for i in range(6)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {{path: {model_dir}}}\ndata: {{train_file: {data}}}\n"
        "loss: {name: todo, beta: 0.5}\n"
        "optim: {global_batch_size: 4, per_device_batch_size: 2, learning_rate: 1.0e-3}\n"
        "logging: {progress_bar: false}\n"
    )
    out = tmp_path / "out"
    assert main(["train", str(cfg), f"output_dir={out}", "optim.max_steps=2"]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "trained 2 steps" in printed
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    AutoModelForCausalLM.from_pretrained(out)
    # the same command again: resumes from the final checkpoint, does nothing
    assert main(["train", str(cfg), f"output_dir={out}", "optim.max_steps=2"]) == 0
    assert "already finished" in capsys.readouterr().out


def test_a_deepspeed_launch_without_deepspeed_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    """``accelerate launch --config_file ds.yaml`` sets ``ACCELERATE_USE_DEEPSPEED``. Where
    DeepSpeed is not installed the launch stops with a one-line error naming what to install or
    use instead, before anything trains (DeepSpeed itself: tests/test_training_deepspeed.py)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("DeepSpeed is installed here (its tests: make test-deepspeed)")
    from inpo.tiny import save_tiny_lm

    model_dir = save_tiny_lm(tmp_path / "model", "llama", hidden_size=32, num_hidden_layers=2)
    data = tmp_path / "pairs.jsonl"
    row = {"prompt": "Say", "chosen": " yes", "rejected": " no", "ref_chosen_logps": -9.0}
    data.write_text(json.dumps(row | {"ref_rejected_logps": -12.0}) + "\n")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"model: {{path: {model_dir}}}\ndata: {{train_file: {data}}}\nloss: {{name: dpo}}\n"
        "optim: {global_batch_size: 1, per_device_batch_size: 1}\n"
        "logging: {progress_bar: false}\n"
    )
    capsys.readouterr()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    code = main(["train", str(cfg), f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "\n" not in err and "pip install deepspeed" in err and "train.fsdp=full_shard" in err
    assert not (tmp_path / "out" / "model.safetensors").exists()
