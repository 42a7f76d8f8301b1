"""``inpo convert``'s checks, on small GGUF files written here with the ``gguf`` package: each
bad input is one line naming the file, and nothing is written. (The conversion of a real model,
SmolLM2, is in the real-model tier: ``tests/test_real_model.py``.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")


def _write_gguf(path: Path, arch: str) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "inpo", "convert", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def test_bad_gguf_files_are_one_clear_line_and_write_nothing(tmp_path):
    good = _write_gguf(tmp_path / "odd.gguf", "nosucharch")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 4096])
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    out = tmp_path / "out"
    _one_line_error(_convert(str(good), str(out)), "odd.gguf", "'nosucharch'", "not one")
    _one_line_error(_convert(str(cut), str(out)), "cut.gguf", "truncated")
    _one_line_error(_convert(str(text), str(out)), "notes.gguf", "not a GGUF file")
    _one_line_error(_convert(str(tmp_path / "none.gguf"), str(out)), "no such GGUF file")
    _one_line_error(
        _convert(str(good), str(out), "--sha256", "ab" * 32), "odd.gguf", "SHA-256 mismatch"
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cut.gguf",
        "notes.gguf",
        "odd.gguf",
    ]  # fmt: skip  (no temporary folder left behind)


def test_a_used_output_folder_is_refused_before_reading_the_file(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    _one_line_error(_convert(str(tmp_path / "any.gguf"), str(mine)), "not empty")
    (tmp_path / "file").write_text("x")
    _one_line_error(_convert(str(tmp_path / "any.gguf"), str(tmp_path / "file")), "not a folder")
    assert (mine / "notes.txt").read_text() == "keep"
