"""The console's one progress display: a rich bar on a terminal, plain lines elsewhere, off
with -q / TQDM_DISABLE and on other ranks."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from inpo import console


def test_not_a_terminal_gets_plain_lines_with_count_rate_and_eta(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setenv("INPO_PROGRESS_SECONDS", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("INPO_VERBOSITY", raising=False)
    with console.progress(4, "generate", unit=" prompts") as bar:
        for _ in range(4):
            bar.set_postfix(loss="1.5")
            bar.update(1)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("  generate: 1/4 prompts (25%)") and "eta" in lines[0]
    assert "loss 1.5" in lines[0]
    assert len(lines) == 3  # no line for the finished count: the stage's own line follows


def test_quiet_tqdm_disable_and_other_ranks_show_nothing(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setenv("INPO_PROGRESS_SECONDS", "0")
    monkeypatch.setenv("INPO_VERBOSITY", "-1")
    console.progress(3, "x").update(3)
    monkeypatch.setenv("INPO_VERBOSITY", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    console.progress(3, "x").update(3)
    monkeypatch.delenv("TQDM_DISABLE")
    console.progress(3, "x", enabled=False).update(3)
    assert out.getvalue() == ""


def test_a_terminal_gets_a_rich_bar_with_eta():
    """In a real pseudo-terminal: the bar (rich's) with its count and ETA is drawn."""
    import pty

    code = (
        "import time\n"
        "from inpo.console import progress\n"
        "bar = progress(5, 'train inpo', unit=' steps')\n"
        "for _ in range(5):\n"
        "    time.sleep(0.15); bar.set_postfix(loss='0.5'); bar.update(1)\n"
        "bar.close()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "INPO_VERBOSITY")}
    env["TERM"] = "xterm-256color"
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=follower, stdout=follower, stderr=follower, env=env
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=60)
    os.close(leader)
    import re

    raw = b"".join(chunks).decode("utf-8", "replace")
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)  # colours and cursor moves
    assert proc.returncode == 0, screen
    assert "train inpo" in screen and "━" in screen and "eta" in screen
    assert "/5 steps" in screen and "loss 0.5" in screen


def test_tracker_values_split_every_interval_into_low_and_high():
    from inpo.pipeline.tracking import iteration_values

    row = {
        "iteration": 2,
        "win_rate_vs_ref": 0.6,
        "win_rate_ci": [0.5, 0.7],
        "lc_win_rate_ci": [0.4, 0.8],
        "kl_to_ref": -0.01,
        "kl_to_ref_ci": [-0.05, 0.03],
    }
    values = iteration_values(row)
    for key, (lo, hi) in (("win_rate_ci", (0.5, 0.7)), ("kl_to_ref_ci", (-0.05, 0.03))):
        assert values[f"eval/{key}_low"] == lo and values[f"eval/{key}_high"] == hi
    assert values["eval/lc_win_rate_ci_low"] == 0.4
    assert not any(isinstance(v, list) for v in values.values())


def test_report_intervals_are_rounded_and_plotted_as_error_bars(tmp_path, monkeypatch):
    """The report's table prints a 95% interval as rounded numbers (not raw floats), and the
    per-iteration plot draws it as error bars around the estimate."""
    import matplotlib.axes

    from inpo.pipeline.report import plot_metrics, table

    rows = [
        {"iteration": 0, "algorithm": "inpo", "win_rate_vs_ref": 0.5,
         "win_rate_ci": [0.4123456789, 0.5876543211]},
        {"iteration": 1, "algorithm": "inpo", "win_rate_vs_ref": 0.61,
         "win_rate_ci": [0.5123456789, 0.7012345678], "kl_to_ref": 0.2},
    ]  # fmt: skip
    text = table(rows, ["iteration", "win_rate_vs_ref", "win_rate_ci"])
    assert "[0.4123, 0.5877]" in text and "0.4123456789" not in text
    drawn = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        drawn.append((list(x), list(y), kwargs.get("yerr")))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    assert "win_rate_vs_ref" in plot_metrics(rows, tmp_path / "m.png", "t")
    assert (tmp_path / "m.png").is_file()
    ((xs, ys, (low, high)),) = drawn  # one series with intervals; KL has none here
    assert xs == [0, 1] and ys == [0.5, 0.61]
    assert low == pytest.approx([0.5 - 0.4123456789, 0.61 - 0.5123456789])
    assert high == pytest.approx([0.5876543211 - 0.5, 0.7012345678 - 0.61])


def test_a_batch_reports_its_tokens_while_it_is_generated(monkeypatch):
    """Within one generation batch (one ``progress`` unit) plain lines report the tokens
    generated so far, counting only rows that have not ended; none once the batch is done."""
    from inpo.generation import GenerationSettings, sample_responses
    from inpo.tiny import char_tokenizer, tiny_causal_lm

    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setenv("INPO_PROGRESS_SECONDS", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("INPO_VERBOSITY", raising=False)
    tok = char_tokenizer()
    model = tiny_causal_lm("llama", tok, hidden_size=32, num_hidden_layers=2).eval()
    cut: list = []
    with console.progress(2, "generate", unit=" prompts") as bar:
        answers = sample_responses(model, tok, ["say red", "a"], 3, GenerationSettings(
            1.0, 1.0, 5, 8), seed=0, progress=bar.update, truncated=cut)  # fmt: skip
    lines = out.getvalue().splitlines()
    counts = [int(x.split("in this batch: ")[1].split()[0]) for x in lines if "in this batch" in x]
    assert counts == sorted(counts) and counts[0] == 6  # 2 prompts × 3 samples, first step
    ended = sum(len(tok(a, add_special_tokens=False)["input_ids"]) for r in answers for a in r)
    # every token generated, the end tokens included: one a sample that ended
    assert counts[-1] == ended + sum(not c for r in cut for c in r)
    assert len(lines) == len(counts)  # the finished batch: no line of its own
    console.pulse(tokens=1)  # no display open: nothing
    assert out.getvalue().splitlines() == lines
