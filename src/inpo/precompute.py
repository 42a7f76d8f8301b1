"""The log-prob precompute stage: write ``log π_ref`` or ``log π_t`` of every chosen/rejected response.

INPO's loss (SPEC.md, eq. 8) needs ``Δ_ref`` and ``Δ_t`` for every pair; they are computed once per
iteration, before training, so that no second model is in memory while training. This stage loads
one model, scores the dataset with the *same* collator and :func:`inpo.logprobs.sequence_logps` that
training uses (so the numbers agree with a training step's to float precision), frees the model,
and saves a new dataset with two more columns:

* ``columns="ref"``: ``ref_chosen_logps``, ``ref_rejected_logps`` (the reference policy ``π_ref``);
* ``columns="prev"``: ``prev_chosen_logps``, ``prev_rejected_logps`` (the previous iterate ``π_t``).

Running ``ref`` and then ``prev`` on its output gives all four. The output folder is a
``datasets.save_to_disk`` folder plus ``manifest.json`` (model, dataset hash, lengths, counts,
timing); it is written under a temporary name and renamed, so a crash never leaves a half-written
output. A folder whose manifest has the same ``key`` is up to date and is not recomputed.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from inpo.console import progress
from inpo.data import PreferenceCollator, load_preference_dataset
from inpo.distributed import check_shared_folder, get_dist, shard
from inpo.errors import ConfigError, DataError
from inpo.hashing import model_fingerprint
from inpo.hub import resolve_model
from inpo.layout import Layout

__all__ = ["MANIFEST_NAME", "PrecomputeResult", "dataset_hash", "precompute_logps"]

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass
class PrecomputeResult:
    """What :func:`precompute_logps` did: the output folder, its manifest, whether it was skipped."""

    output: Path
    manifest: dict[str, Any]
    skipped: bool = False
    columns: tuple[str, str] = field(default=("", ""))


def dataset_hash(path: str | Path) -> str:
    """SHA-256 over a file's bytes, or over a folder's files (relative names and bytes, sorted).

    A folder's ``manifest.json`` is left out, so the hash names the data, not its bookkeeping.
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = (
        sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
        if path.is_dir()
        else [path]
    )
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _load_model(model_path: Path, dtype: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_path), trust_remote_code=False, dtype=getattr(torch, dtype)
        )
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model '{model_path}': cannot load a causal LM ({first})") from err
    return model.to(device).eval()


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"tokenizer '{path}': cannot load ({first})") from err


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def precompute_logps(
    dataset_path: str | Path,
    model_path: str | Path,
    output_dir: str | Path,
    *,
    columns: Literal["ref", "prev"] = "ref",
    tokenizer_path: str | Path | None = None,
    split: str | None = None,
    skip_bad_rows: bool = False,
    batch_size: int = 8,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    padding_side: str = "right",
    chunk_size: int = 1024,
    dtype: str = "float32",
    device: str = "auto",
    overwrite: bool = False,
    packing: bool | None = None,
    share_prompt: bool = False,
) -> PrecomputeResult:
    """Score every pair of a preference dataset with one model and save the log-prob columns.

    Args:
        dataset_path: anything :func:`inpo.data.load_preference_dataset` reads.
        model_path: a local transformers causal-LM folder (``trust_remote_code=False``).
        output_dir: the folder to write (``save_to_disk`` + ``manifest.json``).
        columns: ``"ref"`` writes ``ref_{chosen,rejected}_logps``, ``"prev"`` writes
            ``prev_{chosen,rejected}_logps``; existing columns of that name are replaced.
        tokenizer_path: defaults to ``model_path``.
        max_prompt_length, max_completion_length, padding_side: the collator's settings; use the
            training run's, or the stored log-probs will not match the policy's.
        batch_size: pairs per forward (``2 * batch_size`` sequences).
        chunk_size: LM-head chunk of :func:`inpo.logprobs.sequence_logps`.
        dtype: the model's dtype for scoring (``float32`` default).
        device: ``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        overwrite: replace an existing ``output_dir`` whose manifest does not match.
        packing: score each batch as padding-free rows
            (:func:`inpo.logprobs.packed_sequence_logps`): the same log-probs up to float
            rounding, no padding computed. ``None`` (default): the batches whose longest
            sequence has :data:`~inpo.logprobs.MIN_PACK_LENGTH` tokens or more, where packing
            measured faster on the device and is exact for the model
            (:func:`inpo.logprobs.packing_pays`; 1.80× padded on CPU,
            ``benchmarks/results/packing_forward.md``); ``False``: never.
        share_prompt: score each pair as one row ``prompt + chosen + rejected``, so its
            prompt is computed once (``data.share_prompt`` of training; the same log-probs up
            to float rounding). Packed rows under the same ``packing`` rule, except that on a
            GPU ``None`` keeps them padded (packed shared rows are unmeasured there).

    Returns:
        A :class:`PrecomputeResult`; ``skipped=True`` when ``output_dir`` already holds this exact
        computation (same manifest ``key``: dataset hash, model fingerprint, settings).

    Raises:
        DataError: a missing/malformed dataset; ConfigError: bad settings, an unloadable model or
            tokenizer, or an existing different ``output_dir`` without ``overwrite``.
    """

    dataset_path, output_dir = Path(dataset_path), Path(output_dir)
    model_path = resolve_model(model_path, "--model")  # a folder, or a cached hub id
    tokenizer_path = (
        resolve_model(tokenizer_path, "--tokenizer") if tokenizer_path is not None else model_path
    )
    _check_arguments(
        dataset_path,
        model_path,
        tokenizer_path,
        output_dir,
        columns=columns,
        dtype=dtype,
        batch_size=batch_size,
        padding_side=padding_side,
    )
    # Under torchrun / accelerate launch every rank scores its share of the rows (on its own
    # device) and rank 0 writes the whole dataset: the values do not depend on the world size.
    dist = get_dist()
    device = str(dist.device) if dist.world > 1 and device == "auto" else _resolve_device(device)
    names = (f"{columns}_chosen_logps", f"{columns}_rejected_logps")

    # ---- the computation's identity: an output with the same key is up to date ----------------
    settings = _identity(
        columns, model_path, tokenizer_path, dataset_path, split, skip_bad_rows,
        max_prompt_length, max_completion_length, padding_side, dtype, packing, share_prompt,
    )  # fmt: skip
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    # every rank decides from the same files: several machines must share the output's folder
    check_shared_folder(output_dir.parent, "--output")
    existing = _read_manifest(output_dir) if output_dir.is_dir() else None
    if existing is not None and existing.get("key") == key:
        log.info("%s is up to date (manifest key %s); nothing to do", output_dir, key)
        return PrecomputeResult(output_dir, existing, skipped=True, columns=names)
    if output_dir.exists() and not overwrite:
        raise ConfigError(
            f"output '{output_dir}' exists and holds a different computation; "
            "pass overwrite=True (--overwrite) to replace it"
        )

    started = time.perf_counter()
    ds = load_preference_dataset(
        dataset_path, split=split, skip_bad_rows=skip_bad_rows, keep_columns=True
    )
    skipped_rows = getattr(ds, "skipped_rows", 0)  # (the loader's count; not kept by a copy)
    collator = PreferenceCollator(
        _load_tokenizer(tokenizer_path),
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        padding_side=padding_side,
        share_prompt=share_prompt,
    )

    # ---- one model in memory: load, score this rank's pairs, gather, free ---------------------
    rows = ds.to_list()
    layout = Layout(
        share_prompt=share_prompt, packing=packing, chunk_size=chunk_size, setting="--packing"
    )
    chosen, rejected, tally, loaded, scored = _score_all(
        model_path, dtype, device, rows, collator, layout, dist, batch_size, dataset_path, columns
    )

    # ---- write to a temporary folder, then rename (rank 0; the others wait for it) ------------
    if not dist.is_main:
        dist.barrier()
        return PrecomputeResult(
            output_dir, _read_manifest(output_dir) or {}, skipped=False, columns=names
        )
    ds = ds.remove_columns([n for n in names if n in ds.column_names])
    ds = ds.add_column(names[0], chosen).add_column(names[1], rejected)
    previous = _read_manifest(dataset_path) if dataset_path.is_dir() else None
    timing = {
        "seconds_load": round(loaded - started, 3),
        "seconds_score": round(scored - loaded, 3),
        "pairs_per_second": round(len(rows) / max(scored - loaded, 1e-9), 3),
    }
    manifest = _manifest(
        key, settings, len(rows), skipped_rows, tally, batch_size, device, timing, previous
    )
    _write_folder(ds, manifest, output_dir)
    # debug: `inpo precompute` prints its own result line (at info it showed twice)
    log.debug("wrote %s: %d pairs, %s in %.1fs", output_dir, len(rows), columns, scored - loaded)
    dist.barrier()
    return PrecomputeResult(output_dir, manifest, skipped=False, columns=names)


def _identity(
    columns: str,
    model_path: Path,
    tokenizer_path: Path,
    dataset_path: Path,
    split: str | None,
    skip_bad_rows: bool,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    padding_side: str,
    dtype: str,
    packing: bool | None,
    share_prompt: bool,
) -> dict[str, Any]:
    """What the computation is (its manifest key hashes this): an output with the same key is
    up to date."""
    return {
        "columns": columns,
        "model_path": str(model_path.resolve()),
        "model_fingerprint": model_fingerprint(model_path),
        "tokenizer_path": str(tokenizer_path.resolve()),
        "dataset_path": str(dataset_path.resolve()),
        "dataset_hash": dataset_hash(dataset_path),
        "split": split,
        "skip_bad_rows": skip_bad_rows,
        "max_prompt_length": max_prompt_length,
        "max_completion_length": max_completion_length,
        "padding_side": padding_side,
        "dtype": dtype,
        # absent unless forced: earlier keys stay valid (the layout changes float rounding
        # only, as the device does; `packed_batches` in the manifest says what ran)
        **({"packing": True} if packing else {}),
        **({"share_prompt": True} if share_prompt else {}),
    }


def _manifest(
    key: str,
    settings: dict[str, Any],
    rows: int,
    skipped_rows: int,
    tally: _Tally,
    batch_size: int,
    device: str,
    timing: dict[str, float],
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    """``manifest.json``: the key and settings, what scoring counted and took, and the input
    folder's own manifests before it (``history``, one level deep)."""
    manifest = {
        "key": key,
        **settings,
        "rows": rows,
        "skipped_rows": skipped_rows,
        "truncated_prompts": tally.truncated_prompts,
        "truncated_completions": tally.truncated_completions,
        # before truncation: lets `inpo train` tell whether other limits change any pair
        "longest_prompt_tokens": tally.longest_prompt,
        "longest_completion_tokens": tally.longest_completion,
        "batch_size": batch_size,
        "packed_batches": tally.packed_batches,
        "device": device,
        **timing,
        "created_unix": int(time.time()),
        "history": [
            *(previous.get("history", []) if previous else []),
            *([previous] if previous else []),
        ],
    }
    for entry in manifest["history"]:
        entry.pop("history", None)
    return manifest


def _check_arguments(
    dataset_path: Path,
    model_path: Path,
    tokenizer_path: Path,
    output_dir: Path,
    *,
    columns: str,
    dtype: str,
    batch_size: int,
    padding_side: str,
) -> None:
    """Every setting checked before anything loads, each in one line naming it."""
    if columns not in ("ref", "prev"):
        raise ConfigError(f"columns must be 'ref' or 'prev', got '{columns}'")
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if padding_side not in ("left", "right"):
        raise ConfigError(f"padding_side must be 'left' or 'right', got '{padding_side}'")
    if not dataset_path.exists():
        raise DataError(f"{dataset_path}: no such file or folder")
    if not (model_path / "config.json").is_file():
        raise ConfigError(f"model '{model_path}': not a transformers model folder (no config.json)")
    if not tokenizer_path.is_dir():
        raise ConfigError(f"tokenizer '{tokenizer_path}': not a folder")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output '{output_dir}' exists and is not a folder")


def _resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where available, else ``cpu``; anything else checked as a device."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(
            f"device '{device}' is not a torch device (auto, cpu, cuda, cuda:N)"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}': CUDA is not available on this machine")
    return device


def _rows_by_length(rows: list[dict[str, Any]], rank: int, world: int) -> list[int]:
    """This rank's row indices, sorted by a length proxy so that batches pad little (the
    scores go back to their rows by index)."""

    mine = set(shard(rows, rank, world))
    return sorted(
        (i for i in range(len(rows)) if i in mine),
        key=lambda i: len(json.dumps([rows[i]["prompt"], rows[i]["chosen"], rows[i]["rejected"]])),
    )


def _score_all(
    model_path: Path,
    dtype: str,
    device: str,
    rows: list[dict[str, Any]],
    collator: Any,
    layout: Layout,
    dist: Any,
    batch_size: int,
    where: Path,
    columns: str,
) -> tuple[list[float], list[float], _Tally, float, float]:
    """Load the model, score this rank's pairs in ``layout`` (checked on it), gather every
    rank's, refuse non-finite log-probs naming their rows, free the model. Returns the chosen
    and rejected log-probs of every row, the tally, and when loading and scoring ended."""
    model = _load_model(model_path, dtype, device)
    layout.check(model)
    loaded = time.perf_counter()
    order = _rows_by_length(rows, dist.rank, dist.world)
    chosen, rejected, packed_batches = _score(
        model,
        rows,
        order,
        collator,
        layout,
        device=device,
        batch_size=batch_size,
        where=where,
        label=f"log-probs ({columns})",
        show=dist.is_main,
    )
    tally = _Tally.of(collator, packed_batches)
    if dist.world > 1:
        tally = _gather(dist, order, chosen, rejected, tally)
    scored = time.perf_counter()
    bad = [rows[i]["row_id"] for i in range(len(rows)) if not _finite(chosen[i], rejected[i])]
    if bad:
        raise DataError(
            f"{where}: model '{model_path}' gives non-finite log-probs for "
            f"{len(bad)} row(s) (row_id {', '.join(map(str, bad[:10]))})"
        )
    del model
    _free_device_memory(device)
    return chosen, rejected, tally, loaded, scored


def _score(
    model: Any,
    rows: list[dict[str, Any]],
    order: list[int],
    collator: Any,
    layout: Layout,
    *,
    device: str,
    batch_size: int,
    where: Path,
    label: str,
    show: bool,
) -> tuple[list[float], list[float], int]:
    """Score the rows ``order`` names, ``batch_size`` pairs a forward, in ``layout``: their
    chosen and rejected log-probs at those indices (0.0 elsewhere) and how many batches ran
    packed."""
    import torch

    chosen, rejected, packed_batches = [0.0] * len(rows), [0.0] * len(rows), 0
    bar = progress(len(order), label, enabled=show, unit=" pairs")
    with torch.no_grad(), bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            try:
                batch = collator([rows[i] for i in idx])
            except ValueError as err:  # share_prompt: a pair whose two prompts differ
                ids = ", ".join(str(rows[i]["row_id"]) for i in idx)
                raise DataError(f"{where}: rows (row_id {ids}): {err}") from None
            packed_batches += layout.packs(model, batch["input_ids"].shape[1])
            batch = {k: v.to(device) for k, v in batch.items() if hasattr(v, "to")}
            logps = layout.logps(model, batch).cpu()
            b = len(idx)
            for j, i in enumerate(idx):
                chosen[i] = float(logps[j])
                rejected[i] = float(logps[b + j])
            bar.update(b)
    return chosen, rejected, packed_batches


@dataclass
class _Tally:
    """What scoring counted: truncations and packed batches summed, the longest prompt and
    completion (tokens, before truncation) maxed, over one rank or all of them."""

    truncated_prompts: int = 0
    truncated_completions: int = 0
    longest_prompt: int = 0
    longest_completion: int = 0
    packed_batches: int = 0

    @classmethod
    def of(cls, collator: Any, packed_batches: int) -> _Tally:
        return cls(
            collator.truncated_prompts,
            collator.truncated_completions,
            collator.longest_prompt,
            collator.longest_completion,
            packed_batches,
        )

    def __add__(self, other: _Tally) -> _Tally:
        return _Tally(
            self.truncated_prompts + other.truncated_prompts,
            self.truncated_completions + other.truncated_completions,
            max(self.longest_prompt, other.longest_prompt),
            max(self.longest_completion, other.longest_completion),
            self.packed_batches + other.packed_batches,
        )


def _gather(
    dist: Any, order: list[int], chosen: list[float], rejected: list[float], tally: _Tally
) -> _Tally:
    """Every rank's scores into ``chosen``/``rejected`` (in place, by row index); the tally of
    all ranks."""
    parts = dist.gather((order, [chosen[i] for i in order], [rejected[i] for i in order], tally))
    total = _Tally()
    for idx, c, r, part in parts:
        for j, i in enumerate(idx):
            chosen[i], rejected[i] = c[j], r[j]
        total = total + part
    return total


def _free_device_memory(device: str) -> None:
    """Give a GPU's cached blocks back to the next stage's model. (On CPU nothing: a full
    collection costs ~0.2 s of Python with transformers imported.)"""
    if device.startswith("cuda"):
        import torch

        gc.collect()
        torch.cuda.empty_cache()


def _write_folder(ds: Any, manifest: dict[str, Any], output_dir: Path) -> None:
    """``ds`` and ``manifest.json`` into a temporary folder beside ``output_dir``, renamed over
    it: a crash never leaves a half-written output."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        ds.save_to_disk(str(tmp))
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}"
        output_dir.rename(old)
        tmp.rename(output_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(output_dir)
