"""Checkpoints that resume a run exactly: weights, optimizer, scheduler, RNG and data position.

Layout: ``output_dir/checkpoints/step_XXXXXX/`` with

* ``model.safetensors``: the unwrapped module's *full* state (gathered from the shards of an
  FSDP run), so a checkpoint resumes on any number of processes; for a plain model also
  ``config.json``, so the folder loads with ``from_pretrained``;
* ``optimizer.pt``, ``scheduler.pt``: their full state dicts (tensors and numbers only, read
  back with ``torch.load(weights_only=True)``; an FSDP run's optimizer state is keyed by
  parameter name, a replicated run's by index — ``trainer_state.json`` says which);
* ``rng_state.pt``: Python, NumPy, torch CPU (and CUDA) generator states;
* ``zero/`` (a DeepSpeed run only): every rank's optimizer partition, in DeepSpeed's format
  (``optimizer.pt`` is then empty; :mod:`inpo.training.zero`);
* ``trainer_state.json``: the optimizer step, the data position (epoch, step within the epoch,
  the shuffling seed), the identity of its inputs (the training data's and the starting
  weights' fingerprints) and the resolved config;
* ``checksums.json``, written last: the SHA-256 of every other file.

A checkpoint is written under a temporary name and renamed when complete, so any
``step_XXXXXX`` folder is complete; a crash mid-write leaves only a ``.tmp`` folder, which is
ignored (and removed by the next save). :func:`verify_checkpoint` checks the checksums before a
resume: a truncated or altered checkpoint is never loaded (:func:`find_latest_checkpoint` moves
it aside as ``step_XXXXXX.corrupt`` and falls back to the previous one).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from inpo.config import config_to_dict
from inpo.errors import ConfigError
from inpo.hashing import file_sha256, folder_sha256
from inpo.training import zero

__all__ = [
    "CHECKSUMS",
    "capture_rng_state",
    "find_latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
CHECKSUMS = "checksums.json"
log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot every generator the loop may draw from (plain lists and tensors only)."""
    np_state = np.random.get_state()  # noqa: NPY002 - the global state other code draws from
    state: dict[str, Any] = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(_to_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(obj: Any) -> Any:
    return [_to_lists(x) for x in obj] if isinstance(obj, tuple | list) else obj


def _to_tuples(obj: Any) -> Any:
    return tuple(_to_tuples(x) for x in obj) if isinstance(obj, list) else obj


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with tensors that share memory (tied embeddings) copied apart, contiguous
    (safetensors refuses shared or strided tensors); both keys load back into the tie."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for name, tensor in state.items():
        t = tensor.detach()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (0, id(t))
        out[name] = t.clone().contiguous() if key in seen or not t.is_contiguous() else t
        seen.add(key)
    return out


def save_checkpoint(
    checkpoint_root: str | Path,
    *,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    trainer_state: dict[str, Any],
    model_config: Any = None,
    rng_state: dict[str, Any] | None = None,
    keep: int | None = None,
    extra_dirs: dict[str, Path] | None = None,
) -> Path:
    """Write ``checkpoint_root/step_{step:06d}`` atomically; return its path (rank 0 calls it).

    Args:
        model_state: the *full* (gathered) state dict of the unwrapped module — a PEFT model's
            base weights and adapters alike — so the checkpoint resumes on any number of
            processes.
        optimizer_state: the optimizer's full state dict (see :mod:`inpo.training.loop`).
        model_config: a transformers config to write as ``config.json`` (plain models), so the
            folder loads with ``from_pretrained``.
        trainer_state: JSON-able; ``step`` is added.
        rng_state: the generators to store (default: their state now). The divergence guard
            passes the state captured *before* the failed step, so a resume replays it.
        keep: keep only the newest ``keep`` checkpoints (older ones are deleted).
        extra_dirs: folders written beside (e.g. DeepSpeed's optimizer partitions, by every
            rank), moved in under the given names before the checksums are taken.
    """
    from safetensors.torch import save_file

    root = Path(checkpoint_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    extra_dirs = extra_dirs or {}
    keep_parts = {Path(d).resolve() for d in extra_dirs.values()}
    for stale in [*root.glob("*.tmp"), *root.glob("*.zero-parts")]:
        if stale.resolve() not in keep_parts:
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    for name, folder in extra_dirs.items():
        os.replace(folder, tmp / name)
    save_file(_own_storage(model_state), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if model_config is not None:
        model_config.save_pretrained(tmp)
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state if rng_state is not None else capture_rng_state(), tmp / "rng_state.pt")
    (tmp / "trainer_state.json").write_text(
        json.dumps({**trainer_state, "step": step}, indent=2, default=str)
    )
    _write_checksums(tmp)
    if final.exists():  # re-saving the same step (e.g. a finished run re-run): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep is not None:
        for old in _checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoints(root: Path) -> list[Path]:
    found = (
        [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
        if root.is_dir()
        else []
    )
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def _write_checksums(folder: Path) -> None:
    """``checksums.json`` (every other file's SHA-256), fsync'd: the last file of a checkpoint."""

    sums = folder_sha256(folder, exclude=CHECKSUMS)
    with open(folder / CHECKSUMS, "w") as fh:
        json.dump(sums, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def verify_checkpoint(path: str | Path) -> str | None:
    """Why the checkpoint folder ``path`` must not be loaded, or ``None`` if its files are the
    ones written (every file's SHA-256 against ``checksums.json``)."""

    path = Path(path)
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError):
        return f"no readable {CHECKSUMS}"
    if not isinstance(sums, dict) or "trainer_state.json" not in sums:
        return f"{CHECKSUMS} is malformed"
    for rel, digest in sums.items():
        f = path / rel
        if not f.is_file():
            return f"'{rel}' is missing"
        if file_sha256(f) != digest:
            return f"'{rel}' does not match its checksum (truncated or altered)"
    return None


def find_latest_checkpoint(checkpoint_root: str | Path, *, verify: bool = True) -> Path | None:
    """The newest complete ``step_XXXXXX`` folder under ``checkpoint_root``, or ``None``.

    With ``verify``, a checkpoint whose files fail :func:`verify_checkpoint` is renamed
    ``step_XXXXXX.corrupt`` (kept for inspection, never picked again), with a warning, and the
    previous one is tried. Every process may call it: the rename is done once.
    """
    for path in reversed(_checkpoints(Path(checkpoint_root))):
        if not verify:
            return path
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        log.warning(
            "checkpoint %s is not usable (%s): set aside, trying the previous one", path, reason
        )
        try:
            os.replace(path, path.with_name(path.name + ".corrupt"))
        except OSError:  # another process moved it first, or a read-only folder
            pass
    return None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (every rank reads it whole):
    ``{"model": state dict, "optimizer": state dict, "scheduler": state dict, "rng": …,
    "trainer_state": {… "step" …}}``. The caller applies them (:mod:`inpo.training.loop`)."""
    from safetensors.torch import load_file

    path = Path(path)
    return {
        "model": load_file(str(path / "model.safetensors")),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "scheduler": torch.load(path / "scheduler.pt", weights_only=True),
        "rng": torch.load(path / "rng_state.pt", weights_only=True),
        "trainer_state": json.loads((path / "trainer_state.json").read_text()),
    }


# ---- a training's whole state, through its engine ------------------------------------------


def save_state(
    engine: Any,
    cfg: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    checkpoint_root: Path,
    step: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
    inputs: dict[str, str],
    rng_state: dict[str, Any] | None = None,
) -> Path | None:
    """A checkpoint of a training's full state after ``step`` optimizer steps: every process
    takes part in gathering (and, under DeepSpeed, writes its optimizer partition); rank 0
    writes the folder (its path; ``None`` on other ranks)."""
    model_state = engine.full_model_state(model)
    optimizer_state = engine.full_optimizer_state(model, optimizer)
    extra = {}
    if zero.is_engine(model):  # every rank writes its optimizer partition, then rank 0 files it
        parts = checkpoint_root / f"step_{step:06d}.zero-parts"
        if engine.is_main:
            if parts.exists():
                shutil.rmtree(parts)
            parts.mkdir(parents=True)
        engine.wait()
        zero.save_state(model, parts)
        engine.wait()
        extra["zero"] = parts
    path = None
    if engine.is_main:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        inner = engine.unwrap(model)
        plain = hasattr(inner, "config") and not hasattr(inner, "peft_config")
        path = save_checkpoint(
            checkpoint_root,
            step=step,
            model_state=model_state,
            optimizer_state=optimizer_state,
            scheduler=scheduler,
            model_config=inner.config if plain else None,
            trainer_state={
                "epoch": epoch,
                "step_in_epoch": in_epoch,
                "total_steps": total_steps,
                "shuffle_seed": cfg.seed,
                "num_processes": engine.world,
                "optimizer_format": engine.optimizer_format(model),
                "inputs": inputs,
                "config": config_to_dict(cfg),
            },
            rng_state=rng_state,
            keep=cfg.keep_checkpoints,
            extra_dirs=extra,
        )
    engine.wait()
    return path


def restore_state(
    engine: Any, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any], path: Path
) -> int:
    """Apply a loaded checkpoint's optimizer, schedule and RNG state (the weights are loaded
    before the engine wraps the model); return its step."""
    trainer = state["trainer_state"]
    kind = engine.optimizer_format(model)
    written = trainer.get("optimizer_format", "replicated")
    if written != kind:
        engines = {"fsdp": "train.fsdp", "replicated": "DDP", "deepspeed": "DeepSpeed"}
        raise ConfigError(
            f"checkpoint {path} was written under {engines.get(written, written)} and this run "
            f"uses {engines[kind]}; resume it with the same engine (or resume=never to start "
            "over)"
        )
    if kind == "deepspeed":
        zero.load_state(model, path / "zero")
    else:
        engine.restore_optimizer(model, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng_state(state["rng"])
    return int(trainer["step"])


class Checkpointer:
    """One training's checkpoints: :meth:`save` the whole state after a step (what the training
    skeleton calls), :meth:`finish` the last one, so that re-running a finished training is a
    no-op. Both trainers use it; the arguments are :func:`save_state`'s."""

    def __init__(
        self,
        engine: Any,
        cfg: Any,
        model: Any,
        optimizer: Any,
        scheduler: Any,
        root: Path,
        *,
        steps_per_epoch: int,
        total_steps: int,
        inputs: dict[str, str],
    ):
        self.engine, self.cfg, self.root, self.inputs = engine, cfg, root, inputs
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps

    def save(self, step: int, rng_state: dict[str, Any] | None = None) -> Path | None:
        return save_state(
            self.engine, self.cfg, self.model, self.optimizer, self.scheduler, self.root, step,
            steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
            inputs=self.inputs, rng_state=rng_state,
        )  # fmt: skip

    def finish(self, start: int) -> None:
        """The checkpoint after the last step, when this launch trained (``start`` below the
        end) or none is on disk yet."""
        if start < self.total_steps or find_latest_checkpoint(self.root) is None:
            self.save(self.total_steps)
