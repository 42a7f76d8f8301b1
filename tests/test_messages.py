"""Messages said once: a command's result line, a warning about the same data."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

from inpo.config import load_config
from inpo.training import pairs
from inpo.training.config import TrainConfig
from inpo.training.pairs import load_pairs as _load_data


def test_precompute_prints_its_result_once(tmp_path):
    subprocess.run([sys.executable, "-m", "inpo", "toy", str(tmp_path / "toy")], check=True,
                   capture_output=True)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", "precompute", str(tmp_path / "toy/pairs.jsonl"),
         "--model", str(tmp_path / "toy/policy"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    both = proc.stdout + proc.stderr
    assert both.count("270 pairs") == 1, both


def test_a_loss_that_ignores_columns_says_so_once_a_process(tmp_path, caplog, monkeypatch):
    # a fresh process's memory: another test on this worker may have said it already
    monkeypatch.setattr(pairs, "_WARNED_IGNORED", set())
    rows = [
        {"prompt": f"p{i}", "chosen": "a", "rejected": "b", "chosen_winrate": 0.7,
         "rejected_winrate": 0.2, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}
        for i in range(4)
    ]  # fmt: skip
    data = tmp_path / "dno.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        TrainConfig, None,
        [f"data.train_file={data}", f"model.path={tmp_path}", "loss.name=dpo",
         f"output_dir={tmp_path / 'out'}"],
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="inpo.training.pairs"):
        for _ in range(3):  # three iterations of `inpo run algorithm=dno` in one process
            _load_data(cfg)
    said = [r for r in caplog.records if "ignores the dataset's column(s)" in r.getMessage()]
    assert len(said) == 1 and "chosen_winrate" in said[0].getMessage()


def test_lora_shows_no_deprecation_warning_a_user_cannot_act_on(tmp_path):
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model:
    that FutureWarning is not shown, for the policy's LoRA and the oracle's alike; a bad
    ``target_modules`` is still one clear line."""
    import warnings

    import pytest

    from inpo.errors import ConfigError
    from inpo.tiny import save_tiny_lm, word_tokenizer
    from inpo.training.config import LoraSettings, ModelConfig
    from inpo.training.modeling import load_policy

    save_tiny_lm(tmp_path / "m", "llama", tokenizer=word_tokenizer(["a", "b"]), hidden_size=32)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        load_policy(ModelConfig(path=str(tmp_path / "m"), lora=LoraSettings(r=4)))
    assert not [w for w in seen if "is_gradient_checkpointing" in str(w.message)]
    bad = LoraSettings(r=4, target_modules=["no_such_module"])
    with pytest.raises(ConfigError, match=r"model\.lora\.target_modules"):
        load_policy(ModelConfig(path=str(tmp_path / "m"), lora=bad))
