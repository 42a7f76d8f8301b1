"""DeepSpeed ZeRO under ``inpo train``: the few places the loop differs from DDP/FSDP.

A launch whose accelerate config selects DeepSpeed (``accelerate launch --config_file ds.yaml``,
which sets ``ACCELERATE_USE_DEEPSPEED`` and the ZeRO stage, offload, ... as environment
variables) gets accelerate's ``DeepSpeedPlugin``; ``accelerator.prepare`` wraps the model in a
``DeepSpeedEngine``. The loop keeps its own story, with three differences:

* **the step.** accelerate's ``backward`` would also take the optimizer step at a step's last
  micro-batch, past the loop's checks. Here each micro-batch runs ``engine.backward`` with the
  accumulation boundary set on the last one, then :func:`step` runs ``engine.step()``, which
  clips to ``optim.max_grad_norm`` and *skips* an update whose gradient norm is not finite
  (DeepSpeed's overflow rule, in every precision); the loop then saves the last good state and
  stops, as it does under DDP. A non-finite loss stops the loop before ``engine.step()``.
* **the log-probs.** ZeRO-3 gathers a layer's weights only inside its ``forward``, so the LM
  head runs inside the model's own forward (full logits), one forward a micro-batch (every rank
  must run as many: they are collectives), as under FSDP. ``data.share_prompt`` and
  ``data.packing`` compute the head outside the forward and are refused.
* **checkpoints.** ``model.safetensors`` holds the gathered full weights (so a checkpoint folder
  still loads with ``from_pretrained`` and the final model is plain safetensors). The optimizer
  state stays partitioned: every rank writes its part with ``engine.save_checkpoint`` into the
  checkpoint's ``zero/`` folder (DeepSpeed's format, covered by the checkpoint's checksums), and
  a resume needs the same number of processes (DeepSpeed's rule; said before anything loads).

On a machine without CUDA accelerate would silently fall back to one process per launch rank; the
process group is then set up with gloo (DeepSpeed's CPU accelerator), so the same code runs and is
tested on CPU.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from inpo.errors import ConfigError

__all__ = [
    "accelerator_kwargs",
    "configure",
    "full_model_state",
    "is_engine",
    "load_state",
    "release",
    "requested",
    "save_state",
    "size_buckets",
    "step",
    "unpartitioned",
]

#: The tag of the one DeepSpeed checkpoint in a checkpoint's ``zero/`` folder.
TAG = "state"

#: ZeRO's buffer sizes that accelerate derives from the model's hidden size when set to
#: ``auto`` (``reduce_bucket_size`` = h², ``stage3_prefetch_bucket_size`` = 0.9 h²,
#: ``stage3_param_persistence_threshold`` = 10 h).
HIDDEN_SIZE_KEYS = (
    "reduce_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold",
)


def requested() -> bool:
    """Whether this launch's accelerate config selects DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true", "yes")


def accelerator_kwargs(cfg: Any) -> dict[str, Any]:
    """``Accelerator`` arguments for a DeepSpeed launch, after checking it can run."""
    if cfg.fsdp != "none":
        raise ConfigError(
            f"train.fsdp={cfg.fsdp} and an accelerate config that selects DeepSpeed: choose one "
            "engine (train.fsdp=none to use DeepSpeed ZeRO)"
        )
    for key, on in (
        ("data.share_prompt", cfg.data.share_prompt),
        ("data.packing", cfg.data.packing),
    ):
        if on:
            raise ConfigError(
                f"{key}=true is not supported with DeepSpeed (it runs the LM head outside the "
                "model's forward, where ZeRO-3 has not gathered its weights); set it to false"
            )
    try:
        import deepspeed
    except ImportError:
        raise ConfigError(
            "the accelerate config of this launch selects DeepSpeed, which is not installed "
            "(pip install deepspeed), or use train.fsdp=full_shard"
        ) from None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # DeepSpeed's own view of the process group (it sizes its batch and partitions by it):
        # accelerate sets it up only when it starts the group itself, which `inpo run` has
        # already done for its earlier stages; it adopts a group that exists
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if torch.cuda.is_available():
        return {}
    from accelerate.utils import InitProcessGroupKwargs

    # accelerate sets DeepSpeed up only when not told cpu=True, and then finds no backend on a
    # CPU machine unless one is named: gloo, as DeepSpeed's CPU accelerator uses
    return {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}


def configure(accelerator: Any, cfg: Any) -> None:
    """The DeepSpeed config entries the loop owns, before ``prepare``: one micro-batch of
    ``per_device_batch_size`` pairs a backward (the loop divides the loss itself, so DeepSpeed's
    accumulation is 1), clipping at ``optim.max_grad_norm``, and the loop's optimizer
    (SGD included)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    micro = cfg.optim.per_device_batch_size
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro * accelerator.num_processes
    ds["gradient_clipping"] = float(cfg.optim.max_grad_norm or 0.0)
    ds["zero_allow_untested_optimizer"] = True
    # registered with transformers (again: a later train stage of `inpo run` in this process
    # reuses accelerate's state), so the policy is partitioned as it loads under ZeRO-3
    accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def size_buckets(accelerator: Any, model: Any) -> None:
    """ZeRO's buffers sized by the model, not DeepSpeed's fixed defaults, where the config sets
    none (before ``prepare``). An accelerate config without a DeepSpeed JSON sets none, and
    ZeRO-3 then allocates a 5e8-element gradient bucket on every rank (2 GB in fp32; measured
    on CPU at 155M parameters, ZeRO-3 used more memory per process than DDP). ``auto`` is what
    HF's recommended config writes: ``prepare`` fills it from the model's hidden size. A model
    whose config has none keeps DeepSpeed's defaults (accelerate would refuse ``auto``)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    config = getattr(model, "config", None)
    if plugin is None or not (hasattr(config, "hidden_size") or hasattr(config, "hidden_sizes")):
        return
    zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
    for key in HIDDEN_SIZE_KEYS:
        zero.setdefault(key, "auto")


def release() -> None:
    """Unregister the DeepSpeed config from transformers after training, so the stages that
    follow in the same process (``inpo run``'s evaluation, the next generation) load ordinary
    models."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


@contextmanager
def unpartitioned(accelerator: Any) -> Iterator[None]:
    """A context in which transformers builds and saves ordinary, whole models. Under ZeRO-3
    accelerate registers the DeepSpeed config with transformers, whose ``from_pretrained`` then
    partitions every model it builds (a collective: rank 0 alone loading the final model to
    write it would wait for the other ranks forever)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def is_engine(model: Any) -> bool:
    """Whether ``model`` (as ``prepare`` returned it) is a DeepSpeed engine."""
    if "deepspeed" not in sys.modules:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def backward(model: Any, loss: torch.Tensor, last: bool) -> None:
    """``loss.backward()`` through the engine; ``last``: the step's last micro-batch (ZeRO
    reduces the accumulated gradients there)."""
    model.set_gradient_accumulation_boundary(last)
    model.backward(loss)


def step(model: Any) -> float:
    """Clip, step and zero the gradients; the gradient norm before clipping (``inf`` or ``nan``
    when DeepSpeed skipped the update because it was not finite)."""
    model.step()
    norm = model.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def full_model_state(accelerator: Any, model: Any) -> dict[str, torch.Tensor] | None:
    """The full weights on rank 0 (``None`` elsewhere); a collective, one parameter at a time.

    Trained parameters come from the optimizer's fp32 master copies (with DeepSpeed's bf16 the
    module's own weights are bf16 roundings of them), frozen ones (a LoRA base) gathered from
    the module; persistent buffers as they are. A tied weight appears once (the loader ties it).
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module, main = model.module, accelerator.is_main_process
    keys = set(module.state_dict().keys())
    state: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.detach().clone()
        if main:
            state[name] = full.detach().cpu().clone()
    for name, buffer in module.named_buffers():
        if main and name in keys:
            state[name] = buffer.detach().cpu().clone()
    return state if main else None


def save_state(model: Any, folder: Path) -> None:
    """Every rank writes its partition of the optimizer (and ZeRO's weights) into ``folder``."""
    model.save_checkpoint(str(folder), tag=TAG, save_latest=False)


def load_state(model: Any, folder: Path) -> None:
    """Read back what :func:`save_state` wrote (the same number of processes)."""
    path, _ = model.load_checkpoint(
        str(folder),
        tag=TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_strict=True,
    )
    if path is None:
        raise ConfigError(f"{folder}: no DeepSpeed state to resume from")
