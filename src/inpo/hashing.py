"""The one way to hash a file and to fingerprint a model folder.

* :func:`file_sha256`: SHA-256 of a file's bytes (stage manifests, data identity).
* :func:`folder_sha256`: that of every file in a folder (stage, checkpoint and cache manifests).
* :func:`model_fingerprint`: a short, content-based identity of a local checkpoint folder
  (config, tokenizer and weight files). Files up to 64 MiB are hashed whole; larger ones by
  size plus 16 evenly spaced 1 MiB samples, which catches any fine-tuning in practice without
  reading tens of GB. A name that is not a local folder (a hub id) is fingerprinted by its name.

Used by the pipeline (stage input hashes), ``inpo precompute`` (its manifest key) and the
model oracles (their ``oracle_id``, hence every query-cache key). Only the standard library.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["file_sha256", "folder_sha256", "model_fingerprint"]

_FULL_HASH_LIMIT = 64 * 2**20
_SAMPLE = 2**20
#: The files that make a checkpoint what it is (top level of the folder).
_MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".jinja")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """SHA-256 (hex) of the whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def folder_sha256(folder: str | Path, *, exclude: str) -> dict[str, str]:
    """``{relative posix path: SHA-256}`` of every file under ``folder`` but the one named
    ``exclude`` (the manifest that will hold these sums)."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): file_sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != exclude
    }


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as fh:
        if size <= _FULL_HASH_LIMIT:
            h.update(fh.read())
        else:  # 16 evenly spaced 1 MiB samples (first and last included)
            for k in range(16):
                fh.seek(min(size - _SAMPLE, k * (size - _SAMPLE) // 15))
                h.update(fh.read(_SAMPLE))
    return h.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """A short stable hash (12 hex digits) of a local checkpoint folder's top-level files."""
    folder = Path(path)
    if not folder.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()[:12]
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix in _MODEL_SUFFIXES:
            h.update(_file_digest(f).encode())
    return h.hexdigest()[:12]
