"""A user's files are never written over and bad bytes are one line: ``inpo run``'s run folder,
``inpo export``'s answer file, answer and question files that are not UTF-8, Ctrl-C's message."""

from __future__ import annotations

import json

from inpo.cli import main
from inpo.pipeline.run import foreign_run_dir


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    return err


def test_inpo_run_refuses_a_folder_of_the_users_own_files(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my numbers\n")
    (mine / "report.md").write_text("# my report\n")
    assert main(["run", f"run_dir={mine}", "iterations=1"]) == 2
    err = _err(capsys)
    assert "not an inpo run folder" in err and "metrics.jsonl" in err
    assert (mine / "metrics.jsonl").read_text() == "my numbers\n"
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl", "report.md"]


def test_inpo_run_refuses_a_file_and_a_model_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["run", f"run_dir={tmp_path / 'file'}", "iterations=1"]) == 2
    assert "is a file" in _err(capsys)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert "inside the model folder" in foreign_run_dir(model / "runs", [str(model), ""])
    assert "inside the model folder" in foreign_run_dir(model, ["", str(model)])


def test_an_empty_folder_and_an_inpo_run_folder_are_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    assert foreign_run_dir(tmp_path / "empty", []) is None
    assert foreign_run_dir(tmp_path / "new", []) is None
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("")
    (run / "metrics.jsonl").write_text("")
    assert foreign_run_dir(run, []) is None
    copied = tmp_path / "copied"  # a run folder copied without its lock (benchmarks do)
    (copied / "iter_000" / "generate").mkdir(parents=True)
    (copied / "iter_000" / "generate" / "manifest.json").write_text("{}")
    (copied / "metrics.jsonl").write_text("")
    assert foreign_run_dir(copied, []) is None


def test_export_refuses_to_replace_its_questions_or_write_a_folder(tmp_path, capsys):
    q = tmp_path / "q.json"
    q.write_text(json.dumps([{"instruction": "Hi"}]))
    base = ["export", "--model", str(tmp_path), "--format", "alpaca_eval", "--questions", str(q)]
    assert main([*base, "--output", str(q)]) == 2
    assert "is the --questions file" in _err(capsys)
    assert json.loads(q.read_text()) == [{"instruction": "Hi"}]
    assert main([*base, "--output", str(tmp_path)]) == 2
    assert "is a folder" in _err(capsys)


def test_a_latin1_file_is_one_line_naming_it(tmp_path, capsys):
    answers = tmp_path / "answers.json"
    answers.write_bytes('[{"instruction": "Caf\u00e9?", "output": "Oui"}]'.encode("latin-1"))
    base = tmp_path / "base.json"
    base.write_text(json.dumps([{"instruction": "Café?", "output": "Non"}]))
    argv = ["eval", "--answers", str(answers), "--baseline", str(base), "--oracle", "http"]
    argv += ["--url", "http://127.0.0.1:9", "--judge-model", "m", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = _err(capsys)
    assert "answers.json: line 1 is not UTF-8" in err
    questions = tmp_path / "q.json"
    questions.write_bytes('[{"instruction": "Caf\u00e9"}]'.encode("latin-1"))
    out = tmp_path / "out.json"
    ex = ["export", "--model", str(tmp_path), "--format", "alpaca_eval", "--questions"]
    assert main([*ex, str(questions), "--output", str(out)]) == 2
    assert "q.json: line 1 is not UTF-8" in _err(capsys)
