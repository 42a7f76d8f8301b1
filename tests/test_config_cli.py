"""`inpo config` and the --help of run/train: the keys are discoverable, a resolved config is
printable and loads back as the same config."""

from __future__ import annotations

import yaml

from inpo.cli import main


def test_keys_of_run_and_train_are_listed(capsys):
    assert main(["config", "keys", "run"]) == 0
    out = capsys.readouterr().out
    for key in ("generate.temperature", "annotate.oracle", "train.fsdp", "iterations", "eta"):
        assert f"  {key} " in out, key
    assert main(["config", "keys", "train"]) == 0
    out = capsys.readouterr().out
    assert "  optim.learning_rate " in out and "  loss.name " in out


def test_show_prints_the_resolved_config_and_it_loads_back(tmp_path, capsys):
    from inpo.pipeline.preflight import load_run_config

    assert main(["config", "show", "run", "iterations=2", "generate.k=4"]) == 0
    text = capsys.readouterr().out
    shown = yaml.safe_load(text)
    assert shown["iterations"] == 2 and shown["generate"]["k"] == 4
    assert shown["eta"] == load_run_config(None, []).eta  # the task's defaults, resolved
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    assert load_run_config(path, []) == load_run_config(None, ["iterations=2", "generate.k=4"])


def test_show_train_says_what_is_missing(capsys):
    assert main(["config", "show", "train", "loss.name=dpo"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# not yet valid: ") and "model.path" in out
    assert yaml.safe_load(out)["loss"]["name"] == "dpo"


def test_help_lists_every_key_and_config_is_a_flag_too(tmp_path, capsys):
    from inpo.config import parse_config_args as parse_args

    assert main(["run", "--help"]) == 0
    assert "  train.optim.learning_rate " in capsys.readouterr().out
    (tmp_path / "c.yaml").write_text("iterations: 1\n")
    assert parse_args(["--config", str(tmp_path / "c.yaml"), "seed=3"]) == (
        tmp_path / "c.yaml",
        ["seed=3"],
    )
    assert main(["train", "--help"]) == 0
    assert "  optim.max_grad_norm " in capsys.readouterr().out
    assert main(["config", "frobnicate", "run"]) == 2
    assert "usage: inpo config" in capsys.readouterr().err


def test_help_gives_every_key_its_type_default_and_its_whole_doc(capsys):
    """Generated from the config dataclasses (their ``#:`` comments): nothing typed twice; a
    long doc is printed whole, wrapped, never cut."""
    from inpo.commands.config import _config_class, _rows

    for kind in ("run", "train"):
        rows = _rows(_config_class(kind))
        missing = [key for key, _, _, doc in rows if not doc]
        assert not missing, f"{kind}: keys without a doc: {missing}"
    assert main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    assert all(len(line) <= 120 for line in out.splitlines())
    flat = " ".join(out.split())
    assert "``soft`` (P itself)".replace("``", "") in flat  # annotate.labels' doc, to its end
    lines = out.splitlines()
    at = lines.index("  train.optim.learning_rate  float = 5e-07")
    assert lines[at + 1].strip().startswith("Peak learning rate")
    assert "  train.model.lora.r  int = 16" in lines and '  report_to  str = "none"' in lines
    # one help style for run and train: usage, description, examples, keys
    assert main(["train", "--help"]) == 0
    train_help = capsys.readouterr().out
    for text in (out, train_help):
        assert text.startswith("usage: inpo ") and "\nexamples:\n" in text
        assert "keys (section.key=value), type = default:" in text


def test_push_to_hub_is_validated_before_any_model_loads(tmp_path, monkeypatch):
    """The option is checked (repository id, a token from the environment or `hf auth login`);
    the upload itself is never exercised here (no network)."""
    import pytest

    from inpo.config import load_config
    from inpo.errors import ConfigError
    from inpo.pipeline.preflight import load_run_config
    from inpo.training import TrainConfig

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token either
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "tokens"))
    train = [f"output_dir={tmp_path / 'o'}", "model.path=m", "data.train_file=d"]
    with pytest.raises(ConfigError, match="hub_model_id must be a hub repository id"):
        load_config(TrainConfig, None, [*train, "push_to_hub=true"])
    with pytest.raises(ConfigError, match=r"needs a Hugging Face token: set \$HF_TOKEN"):
        load_config(TrainConfig, None, [*train, "push_to_hub=true", "hub_model_id=me/m"])
    with pytest.raises(ConfigError, match="needs a Hugging Face token"):
        load_run_config(None, ["push_to_hub=true", "hub_model_id=me/inpo-run"])
    monkeypatch.setenv("HF_TOKEN", "hf_test_token_not_real")
    cfg = load_config(TrainConfig, None, [*train, "push_to_hub=true", "hub_model_id=me/m"])
    assert cfg.push_to_hub and cfg.hub_model_id == "me/m"
    assert load_run_config(None, ["push_to_hub=true", "hub_model_id=me/inpo-run"]).push_to_hub
    from inpo.config import config_to_dict

    assert "hf_test_token" not in str(config_to_dict(cfg))  # the token is never in a config


def test_run_help_lists_every_algorithm_with_its_paper(capsys):
    """Each algorithm of ``inpo run`` names the paper (and equation) its LM form follows."""
    from inpo.algorithms import ALGORITHMS

    PAPERS = {name: spec.paper for name, spec in ALGORITHMS.items()}
    assert main(["run", "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in ALGORITHMS:
        at = lines.index(f"  {name}")
        cited = " ".join(x.strip() for x in lines[at + 1 : at + 8])
        assert PAPERS[name].split(",")[0] in cited, name  # the first author
        assert " 20" in cited, name  # and the year


def test_an_unknown_kind_and_a_file_for_a_folder_are_one_line(tmp_path, capsys):
    assert main(["config", "keys", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "inpo config: error: expected 'run', 'train' or 'train-oracle', got 'nope'"
    (tmp_path / "file").write_text("")
    for extra in ([], ["--chat"]):
        assert main(["toy", str(tmp_path / "file"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert "exists and is not a folder" in err and "\n" not in err


def test_hostile_config_files_are_refused_early_and_bounded(tmp_path, capsys):
    """An alias bomb in one list key, a file of 300,000 unknown keys, and a huge value of the
    wrong type: each is one short line, at once, and no message formats an unbounded value."""
    import time

    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(["x_defs:", *("  " + line for line in levels),
                               "model: {path: m, lora: {target_modules: *a8}}"]))  # fmt: skip
    many = tmp_path / "many.yaml"
    many.write_text("".join(f"key{i}: {i}\n" for i in range(300_000)))
    wide = tmp_path / "wide.yaml"
    wide.write_text("optim: {learning_rate: [" + ", ".join(["1"] * 20_000) + "]}\n")
    for path, needle in ((bomb, "alias references"), (many, "bytes; a config is at most"),
                         (wide, "must be a number")):  # fmt: skip
        start = time.perf_counter()
        assert main(["config", "show", "train", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and len(err) < 400, err[:500]
        assert time.perf_counter() - start < 5
