"""Where an architecture keeps its parts: the causal LM inside PEFT/DDP wrappers, its backbone,
LM head and logit post-processing, and the backbone's final hidden states.

What :mod:`inpo.logprobs`, :mod:`inpo.varlen` and :mod:`inpo.layout` all need to know about a
transformers ``*ForCausalLM``, in one place below them (no module here imports those).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "attn_implementation",
    "default_position_ids",
    "final_hidden",
    "keeps_logits",
    "logit_transform",
    "parts",
    "postprocess",
    "unwrap",
]


def unwrap(model: Any) -> Any:
    """The transformers ``*ForCausalLM`` inside a PEFT / DDP wrapper (or the model itself)."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        active = getattr(model, "active_peft_config", None)
        if active is not None and getattr(active, "is_prompt_learning", False):
            raise NotImplementedError(
                "sequence_logps: prompt-learning PEFT adapters (prompt/prefix tuning) add virtual "
                "tokens in PeftModel.forward and are not supported; use LoRA-style adapters"
            )
        model = model.get_base_model()
    while hasattr(model, "module") and not hasattr(model, "get_output_embeddings"):
        model = model.module  # DistributedDataParallel and similar wrappers
    return model


def parts(model: Any) -> tuple[Any, Any, Any]:
    """Return ``(backbone, lm_head, config)`` of a causal LM (PEFT-wrapped or not)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    backbone = getattr(inner, "base_model", None)
    if head is None or backbone is None or backbone is inner:
        raise NotImplementedError(
            f"sequence_logps: cannot find the backbone and LM head of {type(inner).__name__}; "
            "expected a transformers *ForCausalLM with get_output_embeddings() and a base model "
            "(e.g. `model.model` for Llama, `model.transformer` for GPT-2)"
        )
    return backbone, head, getattr(inner, "config", None)


def logit_transform(config: Any) -> tuple[float | None, float | None]:
    """``(scale, softcap)`` such that the architecture's logits are ``cap·tanh(scale·z / cap)``.

    ``z`` is the raw LM-head output. Handles Cohere's ``logit_scale`` (multiply), Granite's
    ``logits_scaling`` (divide) and Gemma 2/3's ``final_logit_softcapping``; ``None`` = absent.
    """
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text_config, "logit_scale", None)
    divide = getattr(text_config, "logits_scaling", None)
    softcap = getattr(text_config, "final_logit_softcapping", None)
    if divide is not None:
        scale = (scale if scale is not None else 1.0) / divide
    if scale is not None and float(scale) == 1.0:
        scale = None
    return (
        float(scale) if scale is not None else None,
        float(softcap) if softcap is not None else None,
    )


def postprocess(config: Any):
    """A function applied to raw head outputs (fp32) that reproduces the architecture's logits."""
    scale, softcap = logit_transform(config)

    def apply(logits: Tensor) -> Tensor:
        if scale is not None:
            logits = logits * scale
        if softcap is not None:
            import torch

            logits = torch.tanh(logits / softcap) * softcap
        return logits

    return apply


def keeps_logits(model: Any) -> bool:
    """Whether the causal LM's ``forward`` takes ``logits_to_keep`` (transformers >= 4.50)."""
    import inspect

    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


def final_hidden(
    model: Any,
    backbone: Any,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None = None,
) -> Tensor:
    """The backbone's final hidden states ``[N, L, H]`` (after the final norm).

    The call goes through the *outer* model's ``forward`` (so ``DistributedDataParallel`` and
    PEFT wrappers see it: DDP only synchronises gradients after its own forward ran) with
    ``logits_to_keep=1``, so the model itself computes logits for one position per row only; a
    forward hook on the backbone captures its output. A model without ``logits_to_keep`` gets
    its backbone called directly instead. ``attention_mask`` is ``[N, L]`` (padding; position
    ids then default to ``cumsum - 1``) or a prepared 4D mask ``[N, 1, L, L]`` with explicit
    ``position_ids``.
    """
    kwargs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,  # None: packed rows (position_ids restart per sequence)
        "position_ids": position_ids
        if position_ids is not None
        else default_position_ids(attention_mask),
        "use_cache": False,
    }
    if not keeps_logits(model):
        out = backbone(**kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    captured: list[Tensor] = []

    def hook(module: Any, args: Any, output: Any) -> None:
        captured.append(
            output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        )

    handle = backbone.register_forward_hook(hook)
    try:
        model(**kwargs, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"expected one backbone call in the model's forward, saw {len(captured)}"
        )
    return captured[0]


def default_position_ids(attention_mask: Tensor) -> Tensor:
    """``[N, L]`` positions counting only real tokens (0 on left padding), as generation does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attn_implementation(model: Any) -> str | None:
    """The attention implementation transformers runs for ``model`` (``sdpa``, ``eager``, ...)."""
    config = getattr(unwrap(model), "config", None)
    return getattr(config, "_attn_implementation", None)
