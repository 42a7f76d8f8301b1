"""Stage artifacts: one folder per iteration and stage, complete or absent, with a manifest.

A stage writes into ``<run>/iter_XXX/<stage>.partial/`` (which survives a crash, so a stage may
resume its own work from it), then writes ``manifest.json`` there and renames the folder to
``<run>/iter_XXX/<stage>/``. The manifest records the stage's config hash, the hashes of its
inputs (the manifests of the stages it reads), a SHA-256 of every output file, counts and
timings. :func:`check_stage` says whether a finished folder can be reused:

* absent → run it;
* its config hash or input hashes differ → stale: it and every stage after it are redone
  (their input hashes change in turn), and the reason is reported;
* an output file is missing or its SHA-256 differs (a corrupt or half-written artifact) →
  redone, never silently used.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inpo.hashing import file_sha256, folder_sha256

__all__ = [
    "IDENTITY",
    "MANIFEST",
    "StageStatus",
    "check_stage",
    "file_sha256",
    "finish_stage",
    "manifest_hash",
    "read_manifest",
    "start_stage",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("complete") else None


def manifest_hash(folder: Path) -> str:
    """The identity of a finished stage, used as an input hash by the stages that read it."""
    return file_sha256(folder / MANIFEST)[:16]


@dataclass
class StageStatus:
    """Whether a stage's folder can be reused, and if not, why."""

    reusable: bool
    reason: str
    manifest: dict[str, Any] | None = None


def check_stage(
    folder: Path, config_hash: str, input_hashes: dict[str, str], *, verify: bool = True
) -> StageStatus:
    """Can ``folder`` (a finished stage) be reused for this config and these inputs?"""
    if not folder.exists():
        return StageStatus(False, "not run yet")
    manifest = read_manifest(folder)
    if manifest is None:
        return StageStatus(False, f"{folder} has no valid manifest (incomplete or corrupt)")
    if manifest.get("config_hash") != config_hash:
        return StageStatus(False, "its configuration changed", manifest)
    if manifest.get("input_hashes") != input_hashes:
        changed = sorted(
            k
            for k in set(input_hashes) | set(manifest.get("input_hashes", {}))
            if input_hashes.get(k) != manifest.get("input_hashes", {}).get(k)
        )
        return StageStatus(False, f"its inputs changed ({', '.join(changed)})", manifest)
    if verify:
        files = manifest.get("files", {})
        for rel, digest in files.items():
            path = folder / rel
            if not path.is_file():
                return StageStatus(False, f"output '{rel}' is missing", manifest)
            if file_sha256(path) != digest:
                return StageStatus(
                    False, f"output '{rel}' is corrupt (checksum mismatch)", manifest
                )
    return StageStatus(True, "complete", manifest)


IDENTITY = ".identity.json"


def start_stage(
    folder: Path,
    config_hash: str,
    input_hashes: dict[str, str] | None = None,
    *,
    resume: bool = True,
) -> tuple[Path, str | None]:
    """Return the work folder ``<folder>.partial`` for a stage about to run, and why a leftover
    one was discarded (``None`` when none was, or it is resumed).

    A stale finished folder is removed. A leftover ``.partial`` folder from a killed run is
    kept only when it was started for the same identity — the stage's config hash *and* the
    hashes of its inputs (``resume``) — so the stage continues its own work (e.g. training
    checkpoints) and never work built on other inputs; otherwise it is cleared.
    """
    if folder.exists():
        shutil.rmtree(folder)
    work = folder.with_name(folder.name + ".partial")
    marker = work / IDENTITY
    identity = {"config_hash": config_hash, "input_hashes": dict(input_hashes or {})}
    discarded = None
    if work.exists():
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            discarded = "its partial work has no identity record"
        elif old.get("config_hash") != config_hash:
            discarded = "its configuration changed since the partial work began"
        elif old.get("input_hashes") != identity["input_hashes"]:
            before = old.get("input_hashes") or {}
            changed = sorted(
                k
                for k in set(before) | set(identity["input_hashes"])
                if before.get(k) != identity["input_hashes"].get(k)
            )
            discarded = f"its inputs changed since the partial work began ({', '.join(changed)})"
        elif not resume:
            discarded = "resume is off"
        if discarded is not None:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(identity, sort_keys=True))
    os.replace(tmp, marker)
    return work, discarded


def finish_stage(
    work: Path,
    folder: Path,
    *,
    stage: str,
    iteration: int,
    config_hash: str,
    input_hashes: dict[str, str],
    summary: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Write the manifest into ``work`` (fsync'd) and atomically rename it to ``folder``."""
    (work / IDENTITY).unlink(missing_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "iteration": iteration,
        "config_hash": config_hash,
        "input_hashes": input_hashes,
        "files": folder_sha256(work, exclude=MANIFEST),
        "summary": summary,
        "seconds": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "complete": True,
    }
    tmp = work / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(manifest, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, work / MANIFEST)
    os.replace(work, folder)
    return manifest
