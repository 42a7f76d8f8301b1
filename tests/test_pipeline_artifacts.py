"""Stage folders: atomic completion, manifests that detect stale and corrupt artifacts."""

from __future__ import annotations

import json

from inpo.pipeline.artifacts import (
    IDENTITY,
    check_stage,
    finish_stage,
    manifest_hash,
    start_stage,
)


def _run_stage(root, cfg="c1", inputs=None, payload="hello"):
    folder = root / "iter_000" / "generate"
    work, _ = start_stage(folder, cfg)
    (work / "samples.jsonl").write_text(payload)
    return finish_stage(
        work,
        folder,
        stage="generate",
        iteration=0,
        config_hash=cfg,
        input_hashes=inputs or {},
        summary={"n": 1},
        started=0.0,
    )


def test_complete_stage_is_reused(tmp_path):
    m = _run_stage(tmp_path)
    folder = tmp_path / "iter_000" / "generate"
    assert not (tmp_path / "iter_000" / "generate.partial").exists()
    st = check_stage(folder, "c1", {})
    assert st.reusable and st.manifest["files"] == m["files"]
    assert len(manifest_hash(folder)) == 16


def test_config_or_input_change_invalidates(tmp_path):
    _run_stage(tmp_path, inputs={"policy": "abc"})
    folder = tmp_path / "iter_000" / "generate"
    st = check_stage(folder, "c2", {"policy": "abc"})
    assert not st.reusable and "configuration changed" in st.reason
    st = check_stage(folder, "c1", {"policy": "xyz"})
    assert not st.reusable and "inputs changed (policy)" in st.reason


def test_corrupt_or_missing_output_is_detected(tmp_path):
    _run_stage(tmp_path)
    folder = tmp_path / "iter_000" / "generate"
    (folder / "samples.jsonl").write_text("hellO")
    st = check_stage(folder, "c1", {})
    assert not st.reusable and "corrupt" in st.reason
    (folder / "samples.jsonl").unlink()
    assert "missing" in check_stage(folder, "c1", {}).reason
    (folder / "manifest.json").write_text("{not json")
    assert "no valid manifest" in check_stage(folder, "c1", {}).reason


def test_partial_work_survives_for_same_identity_only(tmp_path):
    folder = tmp_path / "iter_000" / "train"
    work, why = start_stage(folder, "c1", {"logps": "aaa"})
    assert why is None
    (work / "checkpoint.bin").write_text("step 3")
    # A crash here leaves train.partial/; the same config and inputs resume from it.
    work2, why = start_stage(folder, "c1", {"logps": "aaa"})
    assert why is None and (work2 / "checkpoint.bin").read_text() == "step 3"
    # An upstream stage was redone: the partial work was built on other inputs.
    work3, why = start_stage(folder, "c1", {"logps": "bbb"})
    assert not (work3 / "checkpoint.bin").exists()
    assert "inputs changed" in why and "logps" in why
    (work3 / "checkpoint.bin").write_text("step 1")
    # A different config starts over too, and says so.
    work4, why = start_stage(folder, "c2", {"logps": "bbb"})
    assert not (work4 / "checkpoint.bin").exists() and "configuration changed" in why
    # A partial folder without an identity record (or a corrupt one) is not trusted.
    (work4 / IDENTITY).write_text("{oops")
    (work4 / "checkpoint.bin").write_text("step 2")
    work5, why = start_stage(folder, "c2", {"logps": "bbb"})
    assert not (work5 / "checkpoint.bin").exists() and "no identity record" in why


def test_manifest_content(tmp_path):
    _run_stage(tmp_path)
    data = json.loads((tmp_path / "iter_000" / "generate" / "manifest.json").read_text())
    assert data["complete"] and data["stage"] == "generate" and data["summary"] == {"n": 1}
    assert set(data["files"]) == {"samples.jsonl"}
