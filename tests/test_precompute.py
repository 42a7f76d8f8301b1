"""The log-prob precompute stage (inpo.precompute and `inpo precompute`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from inpo.cli import main as cli_main
from inpo.data import PreferenceCollator, load_preference_dataset
from inpo.errors import ConfigError, DataError
from inpo.layout import completion_logps
from inpo.logprobs import sequence_logps
from inpo.precompute import MANIFEST_NAME, dataset_hash, precompute_logps
from inpo.tiny import char_tokenizer, save_tiny_lm

PAIRS = [
    {"prompt": f"Question {i}: {'why ' * (i % 4)}?", "chosen": " yes" * (1 + i % 3), "rejected": " no"}
    for i in range(11)
]  # fmt: skip


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tok = char_tokenizer(add_bos=True)
    ref = save_tiny_lm(root / "ref", "llama", tokenizer=tok, seed=0, hidden_size=32)
    prev = save_tiny_lm(root / "prev", "llama", tokenizer=tok, seed=1, hidden_size=32)
    return ref, prev


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    return path


def _training_step_logps(model_path, output, **collator_kwargs):
    """What a training step computes: load the dataset, collate with the same collator, score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    tok = AutoTokenizer.from_pretrained(model_path)
    collator = PreferenceCollator(tok, **collator_kwargs)
    ds = load_preference_dataset(output)
    got, stored = [], []
    for start in range(0, len(ds), 3):  # a different batch size and order than precompute's
        batch = collator(ds.select(range(start, min(start + 3, len(ds)))).to_list())
        with torch.no_grad():
            lp = sequence_logps(
                model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            )
        b = len(batch["row_id"])
        got.append(lp)
        stored.append(torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]))
        assert lp.shape == (2 * b,)
    return torch.cat(got), torch.cat(stored)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_precomputed_values_equal_a_training_step(models, data_file, tmp_path, side, packing):
    ref, _ = models
    lengths = {"max_prompt_length": 9, "max_completion_length": 6, "padding_side": side}
    result = precompute_logps(
        data_file, ref, tmp_path / "out", batch_size=4, packing=packing, **lengths
    )
    assert result.manifest.get("packing", False) == packing  # absent when off: old keys hold
    assert not result.skipped
    assert result.manifest["truncated_prompts"] > 0 and result.manifest["truncated_completions"] > 0
    # the longest prompt and completion before truncation, as an unlimited collator counts them
    from transformers import AutoTokenizer

    unlimited = PreferenceCollator(AutoTokenizer.from_pretrained(ref))
    unlimited([json.loads(line) for line in data_file.read_text().splitlines()])
    assert result.manifest["longest_prompt_tokens"] == unlimited.longest_prompt > 9
    assert result.manifest["longest_completion_tokens"] == unlimited.longest_completion > 6
    got, stored = _training_step_logps(ref, tmp_path / "out", **lengths)
    torch.testing.assert_close(stored, got, rtol=0, atol=1e-5)
    assert (got < 0).all()


def test_conversational_dataset(models, tmp_path):
    ref, _ = models
    rows = [
        {
            "prompt": [{"role": "user", "content": f"hi {i}"}],
            "chosen": [{"role": "assistant", "content": "hello" * (i + 1)}],
            "rejected": [{"role": "assistant", "content": "go"}],
        }
        for i in range(3)
    ]
    (tmp_path / "c.json").write_text(json.dumps(rows))
    precompute_logps(tmp_path / "c.json", ref, tmp_path / "out", batch_size=2)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ds = load_preference_dataset(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(ref)
    expected = completion_logps(
        model, AutoTokenizer.from_pretrained(ref), ds["prompt"], ds["chosen"]
    )
    torch.testing.assert_close(torch.tensor(ds["ref_chosen_logps"], dtype=torch.float64), expected.double(), atol=1e-5, rtol=0)  # fmt: skip


def test_cli_ref_then_prev_gives_all_four_columns(models, data_file, tmp_path, capsys):
    ref, prev = models
    out_ref, out_all = tmp_path / "ref", tmp_path / "all"
    base = ["precompute", "--batch-size", "3", "--device", "cpu"]
    assert cli_main([*base, str(data_file), "--model", str(ref), "--output", str(out_ref)]) == 0
    longest = json.loads((out_ref / MANIFEST_NAME).read_text())["longest_completion_tokens"]
    assert f"longest completion {longest}: training limits at or above" in capsys.readouterr().out
    limited = [*base, str(data_file), "--model", str(ref), "--max-completion-length", "2"]
    assert cli_main([*limited, "--output", str(tmp_path / "cut")]) == 0
    printed = capsys.readouterr().out
    assert "data.max_prompt_length=null data.max_completion_length=2" in printed
    args = [
        *base,
        str(out_ref),
        "--model",
        str(prev),
        "--output",
        str(out_all),
        "--columns",
        "prev",
    ]
    assert cli_main(args) == 0
    assert "wrote prev_chosen_logps, prev_rejected_logps for 11 pairs" in capsys.readouterr().out

    ds = load_preference_dataset(out_all)
    for name in ("ref_chosen_logps", "ref_rejected_logps", "prev_chosen_logps", "prev_rejected_logps"):  # fmt: skip
        assert name in ds.column_names
    assert ds["row_id"] == list(range(11))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prev)
    for path, column in ((ref, "ref_rejected_logps"), (prev, "prev_rejected_logps")):
        model = AutoModelForCausalLM.from_pretrained(path)
        expected = completion_logps(model, tok, ds["prompt"], ds["rejected"], batch_size=5)
        torch.testing.assert_close(
            torch.tensor(ds[column], dtype=torch.float64), expected.double(), atol=1e-5, rtol=0
        )
    assert ds["ref_chosen_logps"] != ds["prev_chosen_logps"]  # two different models

    manifest = json.loads((out_all / MANIFEST_NAME).read_text())
    assert manifest["columns"] == "prev" and manifest["rows"] == 11
    assert manifest["model_path"] == str(prev.resolve())
    assert manifest["dataset_hash"] == dataset_hash(out_ref)
    assert [h["columns"] for h in manifest["history"]] == ["ref"]
    assert manifest["history"][0]["dataset_hash"] == dataset_hash(data_file)
    assert manifest["seconds_score"] >= 0 and manifest["pairs_per_second"] > 0

    # idempotent: same inputs and settings -> nothing recomputed, nothing rewritten
    before = sorted(p.stat().st_mtime_ns for p in out_all.iterdir())
    assert cli_main(args) == 0
    assert "up to date" in capsys.readouterr().out
    assert sorted(p.stat().st_mtime_ns for p in out_all.iterdir()) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_existing_different_output_needs_overwrite(models, data_file, tmp_path):
    ref, prev = models
    out = tmp_path / "out"
    precompute_logps(data_file, ref, out)
    with pytest.raises(ConfigError, match="exists and holds a different computation"):
        precompute_logps(data_file, prev, out)
    result = precompute_logps(data_file, prev, out, overwrite=True)
    assert result.manifest["model_path"] == str(prev.resolve())
    # in place: the input folder is also the output
    result = precompute_logps(out, ref, out, columns="prev", overwrite=True)
    ds = load_preference_dataset(out)
    assert ds["prev_chosen_logps"] != ds["ref_chosen_logps"]


def test_skip_bad_rows_is_counted(models, tmp_path):
    ref, _ = models
    path = tmp_path / "d.jsonl"
    rows = [*PAIRS[:3], {"prompt": "p", "chosen": "", "rejected": "r"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match="line 4: field 'chosen': empty completion"):
        precompute_logps(path, ref, tmp_path / "out")
    result = precompute_logps(path, ref, tmp_path / "out", skip_bad_rows=True)
    assert result.manifest["rows"] == 3 and result.manifest["skipped_rows"] == 1


def test_bad_arguments_are_one_line_errors(models, data_file, tmp_path, capsys):
    ref, _ = models
    out = str(tmp_path / "o")
    cases = [
        ([str(tmp_path / "nope.jsonl"), "--model", str(ref)], "nope.jsonl: no such file"),
        ([str(data_file), "--model", str(tmp_path)], "not a transformers model folder"),
        ([str(data_file), "--model", str(ref), "--tokenizer", str(tmp_path / "t")], "tokenizer"),
        ([str(data_file), "--model", str(ref), "--device", "gpu7"], "not a torch device"),
    ]
    if not torch.cuda.is_available():
        cases.append(([str(data_file), "--model", str(ref), "--device", "cuda"], "CUDA is not"))
    for argv, message in cases:
        assert cli_main(["precompute", *argv, "--output", out]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(ConfigError, match="columns must be"):
        precompute_logps(data_file, ref, out, columns="both")


def test_help_runs_in_a_fresh_process():
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", "precompute", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for word in ("--columns", "ref_chosen_logps", "prev_rejected_logps", "--max-prompt-length"):
        assert word in proc.stdout


def test_a_resaved_model_is_not_mistaken_for_the_old_one(data_file, tmp_path):
    """An iterate re-saved to the same path (same shapes and sizes) must not count as up to date."""
    tok = char_tokenizer(add_bos=True)
    path = save_tiny_lm(tmp_path / "policy", "llama", tokenizer=tok, seed=0, hidden_size=16)
    out = tmp_path / "out"
    first = precompute_logps(data_file, path, out, columns="prev")
    save_tiny_lm(path, "llama", tokenizer=tok, seed=1, hidden_size=16)
    with pytest.raises(ConfigError, match="holds a different computation"):
        precompute_logps(data_file, path, out, columns="prev")
    second = precompute_logps(data_file, path, out, columns="prev", overwrite=True)
    assert not second.skipped and second.manifest["key"] != first.manifest["key"]


def test_non_finite_log_probs_are_an_error(data_file, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = char_tokenizer(add_bos=True)
    path = save_tiny_lm(tmp_path / "broken", "llama", tokenizer=tok, hidden_size=16)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight[5].fill_(float("nan"))
    model.save_pretrained(path)
    with pytest.raises(DataError, match=r"non-finite log-probs for 11 row\(s\) \(row_id 0, 1, 2"):
        precompute_logps(data_file, path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_users_extra_columns_survive_precompute(models, tmp_path):
    from datasets import load_from_disk

    from inpo.precompute import precompute_logps

    ref, _ = models
    rows = [
        {"prompt": "hello", "chosen": " yes", "rejected": " no", "source": "s1", "score": 1.5},
        {"prompt": "bye", "chosen": " ok", "rejected": " never", "source": "s2", "score": -2.0},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    precompute_logps(src, ref, tmp_path / "a", columns="ref")
    precompute_logps(tmp_path / "a", ref, tmp_path / "b", columns="prev")
    ds = load_from_disk(str(tmp_path / "b"))
    assert ds["source"] == ["s1", "s2"] and ds["score"] == [1.5, -2.0]
    assert {"ref_chosen_logps", "prev_chosen_logps", "row_id"} <= set(ds.column_names)
    # mixed types in a kept column are one error naming it
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "score": "high"}) + "\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=r"column 'score' cannot be kept"):
        precompute_logps(bad, ref, tmp_path / "c", columns="ref")


def test_packing_by_default_on_long_rows_gives_the_padded_values(models, tmp_path):
    """``packing=None`` (the default): batches whose longest sequence has ``MIN_PACK_LENGTH``
    tokens or more are scored packed (on CPU one row, attention one sequence at a time), the
    short ones padded; the values are the padded ones to float rounding, under the same key."""
    from inpo.layout import MIN_PACK_LENGTH

    ref, _ = models
    rows = [
        {"prompt": f"Tell {i}: " + "why " * (2 + 3 * i), "chosen": " yes" * (1 + i), "rejected": " no"}
        for i in range(8)
    ]  # fmt: skip
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = {}
    for packing in (False, None):
        out = tmp_path / f"out-{packing}"
        result = precompute_logps(path, ref, out, batch_size=2, packing=packing)
        got[packing] = load_preference_dataset(out)
        manifest = result.manifest
        if packing is None:
            assert 0 < manifest["packed_batches"] < 4  # the long batches only
        else:
            assert manifest["packed_batches"] == 0
    assert (
        max(len(r["prompt"]) for r in rows) > MIN_PACK_LENGTH > min(len(r["prompt"]) for r in rows)
    )
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(got[None][column]), torch.tensor(got[False][column]), atol=1e-4, rtol=1e-6
        )
    # the default and --no-packing are one computation (a rerun is up to date)
    assert precompute_logps(path, ref, tmp_path / "out-False", batch_size=2).skipped


@pytest.mark.parametrize("packing", [False, None, True], ids=["padded", "default", "packed"])
def test_share_prompt_scores_the_unshared_values(models, tmp_path, packing):
    """``share_prompt=True`` (``--share-prompt``; the logps stage with ``train.data.share_prompt``):
    one row ``prompt + chosen + rejected`` a pair, the prompt computed once, packed or not; the
    log-probs of the unshared padded scoring."""
    ref, _ = models
    rows = [
        {"prompt": f"Tell {i}: " + "why " * (2 + 3 * i), "chosen": " yes" * (1 + i), "rejected": " no" * (3 - i % 3)}
        for i in range(8)
    ]  # fmt: skip
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    lengths = {"max_prompt_length": 48, "max_completion_length": 12}
    want = precompute_logps(path, ref, tmp_path / "plain", batch_size=2, packing=False, **lengths)
    got = precompute_logps(
        path, ref, tmp_path / "shared", batch_size=2, packing=packing, share_prompt=True, **lengths
    )
    assert got.manifest["share_prompt"] is True
    packed = got.manifest["packed_batches"]  # the default: the long batches only
    assert packed == 4 if packing else packed == 0 if packing is False else 0 < packed < 4
    assert got.manifest["truncated_prompts"] == want.manifest["truncated_prompts"] > 0
    a, b = load_preference_dataset(tmp_path / "plain"), load_preference_dataset(tmp_path / "shared")
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(
            torch.tensor(b[column]), torch.tensor(a[column]), atol=1e-4, rtol=1e-6
        )


def test_share_prompt_cli_and_a_pair_with_two_prompts(models, tmp_path, capsys):
    """``inpo precompute --share-prompt`` runs; a pair whose chosen and rejected share no
    prompt (implicit prompts) is an error naming the file and row, not a traceback."""
    ref, _ = models
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(p) for p in PAIRS) + "\n")
    assert cli_main(["precompute", str(good), "--model", str(ref), "--output", str(tmp_path / "o"), "--share-prompt"]) == 0  # fmt: skip
    assert "wrote ref_chosen_logps" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([
        {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
         "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]},
    ]))  # fmt: skip
    code = cli_main(["precompute", str(bad), "--model", str(ref), "--output", str(tmp_path / "b"), "--share-prompt"])  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "bad.json: row 1" in err and "share no prompt" in err, err
