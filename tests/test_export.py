"""`inpo export`: answers in the AlpacaEval, MT-Bench and Arena-Hard formats, from a tiny model."""

from __future__ import annotations

import json

import pytest

from inpo.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from inpo.tiny import save_tiny_lm

    return save_tiny_lm(tmp_path_factory.mktemp("m") / "tiny", "llama", hidden_size=32)


def test_alpaca_eval(model_dir, tmp_path, capsys):
    q = tmp_path / "alpaca_eval.json"
    q.write_text(
        json.dumps([{"instruction": "Say hi.", "dataset": "x"}, {"instruction": "Count."}])
    )
    out = tmp_path / "model_outputs.json"
    code = main(
        [
            "export",
            "--model",
            str(model_dir),
            "--format",
            "alpaca_eval",
            "--questions",
            str(q),
            "--output",
            str(out),
            "--max-new-tokens",
            "5",
            "--name",
            "tiny",
        ]
    )
    assert code == 0
    data = json.loads(out.read_text())
    assert [d["instruction"] for d in data] == ["Say hi.", "Count."]
    assert all(d["generator"] == "tiny" and isinstance(d["output"], str) for d in data)
    assert data[0]["dataset"] == "x"


def test_mt_bench_two_turns_and_arena_hard(model_dir, tmp_path, capsys):
    q = tmp_path / "question.jsonl"
    q.write_text(
        json.dumps(
            {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}
        )
        + "\n"
        + json.dumps({"question_id": 82, "category": "math", "turns": ["1+1?"]})
        + "\n"
    )
    out = tmp_path / "model_answer" / "tiny.jsonl"
    assert (
        main(
            [
                "export",
                "--model",
                str(model_dir),
                "--format",
                "mt_bench",
                "--questions",
                str(q),
                "--output",
                str(out),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["question_id"] for x in lines] == [81, 82]
    assert len(lines[0]["choices"][0]["turns"]) == 2 and len(lines[1]["choices"][0]["turns"]) == 1
    assert lines[0]["model_id"] == "tiny"

    qa = tmp_path / "arena.jsonl"
    qa.write_text(json.dumps({"uid": "abc", "turns": [{"content": "Hello?"}]}) + "\n")
    out2 = tmp_path / "arena_answer.jsonl"
    assert (
        main(
            [
                "export",
                "--model",
                str(model_dir),
                "--format",
                "arena_hard",
                "--questions",
                str(qa),
                "--output",
                str(out2),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    line = json.loads(out2.read_text())
    assert line["question_id"] == "abc"
    turn = line["choices"][0]["turns"][0]
    assert set(turn) == {"content", "token_len"}


def test_bad_questions_file(model_dir, tmp_path, capsys):
    q = tmp_path / "q.jsonl"
    q.write_text('{"question_id": 1}\n')
    code = main(
        [
            "export",
            "--model",
            str(model_dir),
            "--format",
            "mt_bench",
            "--questions",
            str(q),
            "--output",
            str(tmp_path / "o.jsonl"),
        ]
    )
    assert code == 2
    assert "q.jsonl: line 1: missing field 'turns'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--max-new-tokens", "-3", "expected an integer >= 1, got -3"),
        ("--temperature", "nan", "expected a finite number, got 'nan'"),
        ("--temperature", "-1", "expected a number >= 0, got -1.0"),
        ("--batch-size", "0", "expected an integer >= 1, got 0"),
        ("--limit", "-1", "expected an integer >= 1, got -1"),
    ],
)
def test_bad_numbers_are_one_line_before_the_model_loads(tmp_path, capsys, flag, value, needle):
    argv = ["export", "--model", str(tmp_path / "nowhere"), "--format", "alpaca_eval"]
    argv += ["--questions", "q.json", "--output", "o.json", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"argument {flag}: {needle}" in err and "\n" not in err


@pytest.mark.slow
def test_the_default_task_model_answers_in_its_own_text_format(tmp_path, capsys):
    """A model inpo trained on text prompts is prompted with text (``inpo.json``), even when its
    tokenizer carries a chat template: its answers are non-empty and named after the run."""
    import shutil

    from inpo.tasks.default import DefaultTask, DefaultTaskConfig
    from inpo.tiny import CHAT_TEMPLATE
    from inpo.training.modeling import read_prompt_format, write_prompt_format

    task = DefaultTask(DefaultTaskConfig())
    model = tmp_path / "run" / "iter_001" / "train" / "model"
    shutil.copytree(task.build_reference(), model)
    write_prompt_format(model, "text")  # what the training loop writes beside its model
    assert read_prompt_format(model) == "text"
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT_TEMPLATE  # an older π_ref cache had one: it must not be used
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"instruction": p} for p in task.prompts_eval[:6]]))
    out = tmp_path / "model_outputs.json"
    args = ["export", "--model", str(model), "--format", "alpaca_eval", "--questions", str(q)]
    assert main([*args, "--output", str(out), "--max-new-tokens", "6"]) == 0
    data = json.loads(out.read_text())
    assert len(data) == 6 and all(d["output"].strip() for d in data), data
    assert {d["generator"] for d in data} == {"run-iter_001"}
    chat = tmp_path / "chat.json"
    assert main([*args, "--output", str(chat), "--prompt-format", "chat", "--name", "x"]) == 0
    assert [d["output"] for d in json.loads(chat.read_text())] != [d["output"] for d in data]
