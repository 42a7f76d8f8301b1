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

from inpo.errors import ConfigError, DataError
from inpo.hashing import model_fingerprint

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
    import torch

    from inpo.data import PreferenceCollator, load_preference_dataset
    from inpo.hub import resolve_model
    from inpo.logprobs import (
        MIN_PACK_LENGTH,
        check_packing_support,
        packed_sequence_logps,
        packing_pays,
        sequence_logps,
    )

    dataset_path, output_dir = Path(dataset_path), Path(output_dir)
    model_path = resolve_model(model_path, "--model")  # a folder, or a cached hub id
    tokenizer_path = (
        resolve_model(tokenizer_path, "--tokenizer") if tokenizer_path is not None else model_path
    )
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
    device_arg = device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ConfigError(
            f"device '{device}' is not a torch device (auto, cpu, cuda, cuda:N)"
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{device}': CUDA is not available on this machine")
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output '{output_dir}' exists and is not a folder")
    names = (f"{columns}_chosen_logps", f"{columns}_rejected_logps")

    settings = {
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
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
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
    skipped_rows = getattr(ds, "skipped_rows", 0)
    tokenizer = _load_tokenizer(tokenizer_path)
    collator = PreferenceCollator(
        tokenizer,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
        padding_side=padding_side,
        share_prompt=share_prompt,
    )

    # ---- one model in memory: load, score every pair, free ------------------------------------
    # Under torchrun / accelerate launch every rank scores its share of the rows (on its own
    # device) and rank 0 writes the whole dataset: the values do not depend on the world size.
    from inpo.distributed import get_dist, shard

    dist = get_dist()
    if dist.world > 1 and device_arg == "auto":
        device = str(dist.device)
    model = _load_model(model_path, dtype, device)
    if share_prompt:
        from inpo.training.loop import bucketed_shared_logps, packed_shared_logps
        from inpo.training.modeling import check_shared_prompt_support

        check_shared_prompt_support(model)  # a ConfigError naming the architecture
    elif packing:
        try:
            check_packing_support(model)
        except ValueError as err:
            raise ConfigError(f"--packing: {err}") from None
    # packing=None: probed at the first batch long enough to pack (short data never pays for it)
    auto = None if packing is None and not (share_prompt and kind != "cpu") else False
    packed_batches = 0
    loaded = time.perf_counter()
    rows = ds.to_list()
    mine = set(shard(rows, dist.rank, dist.world))
    # Sort by a length proxy so batches pad little; results go back to their rows by index.
    order = sorted(
        (i for i in range(len(rows)) if i in mine),
        key=lambda i: len(json.dumps([rows[i]["prompt"], rows[i]["chosen"], rows[i]["rejected"]])),
    )
    chosen = [0.0] * len(rows)
    rejected = [0.0] * len(rows)
    from inpo.console import progress

    bar = progress(len(order), f"log-probs ({columns})", enabled=dist.is_main, unit=" pairs")
    with torch.no_grad(), bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            try:
                batch = collator([rows[i] for i in idx])
            except ValueError as err:  # share_prompt: a pair whose two prompts differ
                ids = ", ".join(str(rows[i]["row_id"]) for i in idx)
                raise DataError(f"{dataset_path}: rows (row_id {ids}): {err}") from None
            pack = bool(packing)
            if auto is not False and batch["input_ids"].shape[1] >= MIN_PACK_LENGTH:
                auto = packing_pays(model) if auto is None else auto
                pack = auto
            packed_batches += pack
            if share_prompt:
                batch = {k: v.to(device) for k, v in batch.items() if hasattr(v, "to")}
                logps = (
                    packed_shared_logps(model, batch)
                    if pack
                    else bucketed_shared_logps(model, batch, buckets=1)
                ).cpu()
            else:
                logps = (packed_sequence_logps if pack else sequence_logps)(
                    model,
                    batch["input_ids"].to(device),
                    batch["attention_mask"].to(device),
                    batch["completion_mask"].to(device),
                    chunk_size=chunk_size,
                ).cpu()
            b = len(idx)
            for j, i in enumerate(idx):
                chosen[i] = float(logps[j])
                rejected[i] = float(logps[b + j])
            bar.update(b)
    if dist.world > 1:
        counts = (collator.truncated_prompts, collator.truncated_completions, packed_batches)
        longest = (collator.longest_prompt, collator.longest_completion)
        parts = dist.gather(
            (order, [chosen[i] for i in order], [rejected[i] for i in order], counts, longest)
        )
        tp = tc = packed_batches = 0
        for idx, c, r, (p_trunc, c_trunc, n_packed), (lp, lc) in parts:
            for j, i in enumerate(idx):
                chosen[i], rejected[i] = c[j], r[j]
            tp, tc, packed_batches = tp + p_trunc, tc + c_trunc, packed_batches + n_packed
            collator.longest_prompt = max(collator.longest_prompt, lp)
            collator.longest_completion = max(collator.longest_completion, lc)
        collator.truncated_prompts, collator.truncated_completions = tp, tc
    scored = time.perf_counter()
    bad = [rows[i]["row_id"] for i in range(len(rows)) if not _finite(chosen[i], rejected[i])]
    if bad:
        raise DataError(
            f"{dataset_path}: model '{model_path}' gives non-finite log-probs for "
            f"{len(bad)} row(s) (row_id {', '.join(map(str, bad[:10]))})"
        )
    del model
    if device.startswith("cuda"):  # give the cached blocks back to the next stage's model
        gc.collect()  # (a full collection costs ~0.2 s of Python with transformers imported)
        torch.cuda.empty_cache()

    # ---- write to a temporary folder, then rename (rank 0; the others wait for it) ------------
    if not dist.is_main:
        dist.barrier()
        return PrecomputeResult(
            output_dir, _read_manifest(output_dir) or {}, skipped=False, columns=names
        )
    ds = ds.remove_columns([n for n in names if n in ds.column_names])
    ds = ds.add_column(names[0], chosen).add_column(names[1], rejected)
    previous = _read_manifest(dataset_path) if dataset_path.is_dir() else None
    manifest = {
        "key": key,
        **settings,
        "rows": len(rows),
        "skipped_rows": skipped_rows,
        "truncated_prompts": collator.truncated_prompts,
        "truncated_completions": collator.truncated_completions,
        # before truncation: lets `inpo train` tell whether other limits change any pair
        "longest_prompt_tokens": collator.longest_prompt,
        "longest_completion_tokens": collator.longest_completion,
        "batch_size": batch_size,
        "packed_batches": packed_batches,
        "device": device,
        "seconds_load": round(loaded - started, 3),
        "seconds_score": round(scored - loaded, 3),
        "pairs_per_second": round(len(rows) / max(scored - loaded, 1e-9), 3),
        "created_unix": int(time.time()),
        "history": [
            *(previous.get("history", []) if previous else []),
            *([previous] if previous else []),
        ],
    }
    for entry in manifest["history"]:
        entry.pop("history", None)
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
    log.info("wrote %s: %d pairs, %s in %.1fs", output_dir, len(rows), columns, scored - loaded)
    dist.barrier()
    return PrecomputeResult(output_dir, manifest, skipped=False, columns=names)
