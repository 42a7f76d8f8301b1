"""`inpo game`: the command a person runs on the exact testbed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from inpo.cli import main
from inpo.game import matrices as G


def run_cli(args, capsys):
    code = main(["game", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_output_schema(tmp_path, capsys):
    code, out, _ = run_cli(
        [
            "--game",
            "cyclic3",
            "--algorithms",
            "inpo,nash_md,dpo",
            "--eta",
            "1",
            "--tau",
            "0.1",
            "--iterations",
            "7",
            "--json",
            "--plot",
            str(tmp_path / "p.png"),
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out)
    assert set(data["results"]) == {"inpo", "nash_md", "dpo"}
    for res in data["results"].values():
        assert len(res["gap"]) == 7 and len(res["exploitability"]) == 7
        assert all(g >= 0 for g in res["gap"])
    assert data["results"]["inpo"]["gap"][-1] < data["results"]["inpo"]["initial_gap"]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table_output(tmp_path, capsys):
    code, out, _ = run_cli(["--iterations", "30", "--plot", str(tmp_path / "c.png")], capsys)
    assert code == 0
    assert "duality gap" in out and "exploitability" in out and "inpo" in out
    assert "    30" in out  # the last iteration is always printed


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_matrix_and_reference_files(tmp_path, capsys, suffix):
    p = G.random_intransitive(4, 1, seed=3)[0]
    path = tmp_path / f"m{suffix}"
    ref = np.array([0.4, 0.3, 0.2, 0.1])
    ref_path = tmp_path / f"ref{suffix}"
    if suffix == ".npy":
        np.save(path, p)
        np.save(ref_path, ref)
    else:
        np.savetxt(path, p, delimiter=",")
        np.savetxt(ref_path, ref, delimiter=",")
    code, out, _ = run_cli(
        [
            "--matrix",
            str(path),
            "--reference",
            str(ref_path),
            "--algorithms",
            "inpo",
            "--iterations",
            "400",
            "--json",
            "--plot",
            "none",
        ],
        capsys,
    )
    assert code == 0
    from inpo.game import regularized_nash

    res = json.loads(out)["results"]["inpo"]
    assert np.allclose(res["final_policy"], regularized_nash(p, ref, 0.1), atol=1e-6)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--tau", "2"], "--tau must be in [0, eta] = [0, 1.0], got 2.0"),
        (["--eta", "0"], "--eta must be a number > 0, got 0.0"),
        (["--eta", "-1", "--tau", "0"], "--eta must be a number > 0"),
        (["--game", "rsp"], "unknown game 'rsp'"),
        (["--algorithms", "inpo,nashmd"], "did you mean 'nash_md'"),
        (["--tau", "0", "--algorithms", "dpo"], "algorithm 'dpo' needs --tau > 0"),
        (["--iterations", "0"], "--iterations must be >= 1"),
        (["--every", "-1"], "argument --every: expected an integer >= 0, got -1"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_arguments_one_line_exit_2(args, needle, capsys):
    code, out, err = run_cli([*args, "--plot", "none"], capsys)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and out == ""


def test_bad_matrix_names_first_offending_entry(tmp_path, capsys):
    p = G.cyclic3()[0]
    p[2, 1] = 0.95  # P[1, 2] = 0.1 → sum 1.05
    path = tmp_path / "bad.npy"
    np.save(path, p)
    code, _, err = run_cli(["--matrix", str(path), "--plot", "none"], capsys)
    assert code == 2 and "[1, 2]" in err and "P + Pᵀ = 1" in err
    bad = tmp_path / "range.csv"
    bad.write_text("0.5,1.5\n-0.5,0.5\n")
    code, _, err = run_cli(["--matrix", str(bad), "--plot", "none"], capsys)
    assert code == 2 and "[0, 1] = 1.5 is not in [0, 1]" in err
    code, _, err = run_cli(["--matrix", str(tmp_path / "missing.npy"), "--plot", "none"], capsys)
    assert code == 2 and "does not exist" in err


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "inpo", "game", "--tau", "5", "--plot", "none"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("inpo game: error: --tau must be in [0, eta]")
