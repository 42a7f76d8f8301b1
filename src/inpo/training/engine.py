"""The one object that owns accelerate: prepare (DDP, FSDP2 or DeepSpeed ZeRO), backward and
the optimizer step, gather and reduce, the full state for saving, unwrap.

``inpo train`` and ``inpo train-oracle`` build one :class:`Engine` and never touch accelerate's
``Accelerator`` directly; the DeepSpeed differences live in :mod:`inpo.training.zero`, called
from here only.
"""

from __future__ import annotations

import logging
import math
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from inpo.errors import ConfigError
from inpo.training import zero

__all__ = ["Engine", "load_model_state", "resolve_bf16"]

log = logging.getLogger(__name__)


def resolve_bf16(setting: Any) -> bool:
    """``bf16: auto`` → on where CUDA supports it; ``true``/``false`` as given."""
    if setting == "auto":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(setting)


class Engine:
    """accelerate for one training launch (run in every process of it).

    Build it with :meth:`create`; hand it the model and optimizer once (:meth:`prepare`); the
    training skeleton then calls :meth:`backward`, :meth:`clip_and_step_norm`, :meth:`reduce`,
    and the checkpoint writer :meth:`full_model_state` / :meth:`full_optimizer_state`.
    """

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator

    # ---- construction ----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        *,
        bf16: bool,
        fsdp: str = "none",
        fsdp_cpu_offload: bool = False,
        fsdp_activation_checkpointing: bool = False,
        trackers: list[str] | None = None,
        tracker_dir: Path | None = None,
        zero_config: Any = None,
    ) -> Engine:
        """DDP, or FSDP2 through accelerate's FSDP plugin when ``fsdp`` asks, or DeepSpeed ZeRO
        when the launch's accelerate config selects it (``zero_config``: the training config
        whose settings ZeRO takes; ``None``: DeepSpeed is not offered).

        accelerate selects FSDP only on accelerators (on CPU it falls back to DDP); torch's
        FSDP2 itself runs on CPU with gloo, so there the plugin is installed on the state by
        hand and ``prepare`` takes accelerate's own FSDP2 path — the same code as on GPUs,
        testable on CPU.
        """
        from accelerate import Accelerator
        from accelerate.utils import (
            DistributedType,
            FullyShardedDataParallelPlugin,
        )

        kwargs: dict[str, Any] = {
            "mixed_precision": "bf16" if bf16 else "no",
            "cpu": not torch.cuda.is_available(),
        }
        deepspeed = zero_config is not None and zero.requested()
        if deepspeed:  # the launch's accelerate config selects DeepSpeed ZeRO
            kwargs.update(zero.accelerator_kwargs(zero_config))
        if trackers:
            kwargs["log_with"] = trackers
            kwargs["project_dir"] = str(tracker_dir)
        # DDP broadcasts the model's buffers from rank 0 in every forward, a collective: ranks
        # would then have to run as many forwards, but a micro-batch runs as length buckets (or
        # packed) by its own rows' lengths. A causal LM's buffers are constants (rotary
        # frequencies), so there is nothing to broadcast: off, as transformers' Trainer offers.
        kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), _no_buffer_sync()]
        plugin = None
        if fsdp != "none":
            plugin = FullyShardedDataParallelPlugin(
                fsdp_version=2,
                reshard_after_forward=fsdp == "full_shard",
                cpu_offload=fsdp_cpu_offload,
                activation_checkpointing=fsdp_activation_checkpointing,
                auto_wrap_policy="transformer_based_wrap",
                state_dict_type="FULL_STATE_DICT",
            )
            kwargs["fsdp_plugin"] = plugin
        accelerator = Accelerator(**kwargs)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            zero.configure(accelerator, zero_config)
        if plugin is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
            from accelerate.state import PartialState

            # AcceleratorState copies PartialState's fields each time it is built (prepare
            # builds one), so the engine type goes on both, or prepare's later steps would see
            # MULTI_CPU.
            PartialState().distributed_type = DistributedType.FSDP
            accelerator.state.distributed_type = DistributedType.FSDP
            accelerator.state.fsdp_plugin = plugin
        if plugin is not None and accelerator.num_processes == 1:
            log.warning(
                "fsdp=%s in a single process does nothing; launch with torchrun or accelerate "
                "launch (--nproc_per_node 1 shards over one device)",
                fsdp,
            )
        engine = cls(accelerator)
        engine._deepspeed = deepspeed
        return engine

    _deepspeed = False

    # ---- where this process is -------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def shards(self) -> bool:
        """Whether :meth:`prepare` will shard the model (FSDP2 or DeepSpeed ZeRO): its weights
        are whole only inside its own forward, and gathered to save."""
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP or self._deepspeed

    @property
    def fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    # ---- the model -------------------------------------------------------------------------

    def prepare(self, model: Any, optimizer: Any) -> tuple[Any, Any]:
        """The model on this process's device (unless FSDP places it), wrapped for the launch,
        with its optimizer."""
        if self._deepspeed:
            zero.size_buckets(self.accelerator, model)
        return self.accelerator.prepare(model, optimizer)

    def place(self, model: Any) -> Any:
        """The model on this process's device before :meth:`prepare` (FSDP places it itself)."""
        return model if self.fsdp else model.to(self.device)

    def unwrap(self, model: Any) -> Any:
        return self.accelerator.unwrap_model(model)

    @staticmethod
    def is_fsdp(model: Any) -> bool:
        """Whether ``model`` (as :meth:`prepare` returned it) is sharded by FSDP2."""
        from torch.distributed.fsdp import FSDPModule

        return isinstance(model, FSDPModule)

    def sharded(self, model: Any) -> bool:
        """Whether the prepared ``model``'s weights are sharded (FSDP2 or a ZeRO engine)."""
        return self.is_fsdp(model) or zero.is_engine(model)

    def optimizer_format(self, model: Any) -> str:
        """How a checkpoint holds the optimizer: full and keyed by name (``fsdp``), full and
        keyed by index (``replicated``), or DeepSpeed's partitions (``deepspeed``)."""
        if self.is_fsdp(model):
            return "fsdp"
        return "deepspeed" if zero.is_engine(model) else "replicated"

    # ---- one step --------------------------------------------------------------------------

    def autocast(self) -> AbstractContextManager:
        return self.accelerator.autocast()

    def no_sync(self, model: Any, last: bool) -> AbstractContextManager:
        """Gradient synchronisation only on a step's last micro-batch (ZeRO handles its own)."""
        if last or zero.is_engine(model):
            return nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, model: Any, loss: torch.Tensor, last: bool) -> None:
        if zero.is_engine(model):
            zero.backward(model, loss, last)
        else:
            self.accelerator.backward(loss)

    def clip_and_norm(self, model: Any, max_norm: float | None) -> float:
        """Clip the step's gradients to ``max_norm`` (``None``/0: no clipping) and return their
        norm. A ZeRO engine clips and steps at once, skipping a non-finite update."""
        if zero.is_engine(model):
            return zero.step(model)
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm or math.inf)
        if hasattr(norm, "full_tensor"):  # FSDP2's norm is a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over all processes (on the CPU)."""
        if self.world == 1:
            return values
        return self.accelerator.reduce(values.to(self.device), "sum").cpu()

    def reduce_max(self, values: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return values
        return self.accelerator.gather(values.to(self.device)).max().cpu().reshape(values.shape)

    # ---- state -----------------------------------------------------------------------------

    def full_model_state(self, model: Any) -> dict[str, torch.Tensor] | None:
        """The full state dict of the (sharded) model on rank 0 (``None`` elsewhere); a
        collective."""
        if zero.is_engine(model):
            return zero.full_model_state(self.accelerator, model)
        if self.is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            state = get_model_state_dict(
                model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            return state if self.is_main else None
        if not self.is_main:
            return None
        return {k: v.detach().cpu() for k, v in self.unwrap(model).state_dict().items()}

    def full_optimizer_state(self, model: Any, optimizer: Any) -> dict[str, Any] | None:
        if zero.is_engine(model):  # partitioned: every rank saves its part (zero.save_state)
            return None
        if self.is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_optimizer_state_dict,
            )

            state = get_optimizer_state_dict(
                model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
            )
            return state if self.is_main else None
        return optimizer.state_dict() if self.is_main else None

    def restore_optimizer(self, model: Any, optimizer: Any, state: dict) -> None:
        if self.is_fsdp(model):
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
            )

            set_optimizer_state_dict(
                model,
                optimizer,
                optim_state_dict=state,
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            optimizer.load_state_dict(state)

    def release(self, model: Any) -> None:
        """Free what DeepSpeed holds process-wide (after the last use of ``model``)."""
        if zero.is_engine(model):
            zero.release()


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load a checkpoint's weights into ``model``; one clear line when they do not fit."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes differ: e.g. LoRA r=8 weights into an r=16 model
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), "")
        raise ConfigError(
            f"checkpoint {path} does not fit the model ({first or 'shapes differ'}); was it "
            "written with another model.path or LoRA setting? Use the same settings, another "
            "output_dir, or resume=never"
        ) from None
    tied = {k for k in missing if k.endswith("lm_head.weight")}  # written once when tied
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ConfigError(
            f"checkpoint {path} does not match the model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); was it written for another model.path or "
            "LoRA setting?"
        )


def _no_buffer_sync() -> Any:
    """accelerate's DDP settings that turn off the buffers' broadcast in every forward: torch
    2.13 names it ``forward_sync_buffers`` (its ``broadcast_buffers`` is deprecated and warns
    once a rank); an older torch knows only ``broadcast_buffers``. accelerate's handler has no
    field for the new name and knows its handlers by exact class, so this one instance hands
    DDP the new argument itself (its other fields stay at their defaults)."""
    import inspect

    from accelerate.utils import DistributedDataParallelKwargs
    from torch.nn.parallel import DistributedDataParallel

    if "forward_sync_buffers" not in inspect.signature(DistributedDataParallel).parameters:
        return DistributedDataParallelKwargs(broadcast_buffers=False)
    handler = DistributedDataParallelKwargs()
    handler.to_kwargs = lambda: {"forward_sync_buffers": False}
    return handler
