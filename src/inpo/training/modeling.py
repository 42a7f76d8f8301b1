"""Loading the policy for training (dtype, gradient checkpointing, LoRA) and saving the result.

The saved output folder loads with plain ``AutoModelForCausalLM.from_pretrained(output_dir)``
(safetensors, no remote code); with LoRA the adapter is merged into the weights for that copy and
also saved on its own under ``output_dir/adapter``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from inpo.errors import ConfigError
from inpo.training.config import ModelConfig

__all__ = [
    "check_model_dir",
    "check_shared_prompt_support",
    "load_policy",
    "load_tokenizer",
    "save_policy",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str) -> Path:
    """The model folder (a local folder, or a hub id in the local Hugging Face cache), or a
    ConfigError naming ``model.path`` (checked before loading)."""
    from inpo.hub import resolve_model

    folder = resolve_model(path, "model.path")
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.path '{path}' is not a folder with a config.json (save a model there with "
            "save_pretrained; nothing is downloaded)"
        )
    return folder


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer saved beside the model (``trust_remote_code=False``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_model_dir(cfg.path), trust_remote_code=False)


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant activation (gradient) checkpointing on a transformers model, under the
    name of the installed transformers (``activation_…`` from 5.x; ``gradient_…`` before)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_policy(cfg: ModelConfig) -> torch.nn.Module:
    """Load the policy in train mode, with gradient checkpointing / LoRA as configured."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _DTYPES[cfg.dtype], "trust_remote_code": False}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(cfg.path), **kwargs)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
        model.config.use_cache = False
    if cfg.lora is not None:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:  # pragma: no cover - peft is in the dev extra
            raise ConfigError(
                "model.lora needs the peft package: pip install 'inpo[peft]'"
            ) from err
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, lora)
        except ValueError as err:
            raise ConfigError(f"model.lora.target_modules: {err}") from err
    model.train()
    return model


def check_shared_prompt_support(model: torch.nn.Module) -> None:
    """Raise a ConfigError naming the architecture unless ``data.share_prompt`` is exact for it.

    Prompt sharing passes a prepared 4D attention mask and explicit position ids
    (:func:`inpo.logprobs.shared_prompt_logps`). transformers' ``create_causal_mask`` returns a
    4D mask as is for ``sdpa`` and ``eager`` attention; sliding-window layers would lose their
    window under it, and an architecture could ignore either input. So, besides those static
    checks, one tiny pair is scored both ways (no grad, eval mode) and must agree.
    """
    from inpo.logprobs import (
        SHARED_PROMPT_ATTENTION,
        _unwrap,
        sequence_logps,
        shared_prompt_logps,
        shared_prompt_mask,
    )

    inner = _unwrap(model)
    arch = type(inner).__name__
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else None
    config = config if config is not None else inner.config
    impl = getattr(inner.config, "_attn_implementation", None)
    if impl not in SHARED_PROMPT_ATTENTION:
        raise ConfigError(
            f"data.share_prompt=true: {arch} runs attention '{impl}', which takes no custom 4D "
            f"attention mask; set model.attn_implementation to one of {SHARED_PROMPT_ATTENTION} "
            "or data.share_prompt=false"
        )
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "layer_types", None) is None and getattr(config, "sliding_window", None):
        if getattr(config, "use_sliding_window", True):  # a config without per-layer types
            layer_types.add("sliding_attention")
    if layer_types != {"full_attention"}:
        raise ConfigError(
            f"data.share_prompt=true is not supported for {arch}: its layers "
            f"{sorted(layer_types)} are not all full attention (a 4D mask would drop their "
            "window); set data.share_prompt=false"
        )
    device = next(model.parameters()).device
    vocab = int(inner.get_input_embeddings().weight.shape[0])
    # c > r: pad the rejected row; long enough for flex attention's CPU kernels (>= 16 a block)
    prompt, chosen, rejected = list(range(1, 25)), list(range(25, 45)), list(range(45, 57))
    ids = [t % vocab for t in prompt + chosen + rejected]
    p, c, r = len(prompt), len(chosen), len(rejected)
    one = torch.ones(1, p + c + r, dtype=torch.long, device=device)
    chosen_mask = torch.zeros_like(one)
    chosen_mask[0, p : p + c] = 1
    rejected_mask = torch.zeros_like(one)
    rejected_mask[0, p + c :] = 1
    positions = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])[None].to(device)
    separate = torch.tensor([ids[: p + c], ids[:p] + ids[p + c :] + [0] * (c - r)], device=device)
    attn = torch.tensor([[1] * (p + c), [1] * (p + r) + [0] * (c - r)], device=device)
    comp = torch.tensor([[0] * p + [1] * c, [0] * p + [1] * r + [0] * (c - r)], device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = sequence_logps(model, separate, attn, comp)
            mask = shared_prompt_mask(one, chosen_mask, rejected_mask)
            got = shared_prompt_logps(
                model,
                torch.tensor([ids], device=device),
                mask,
                positions,
                chosen_mask,
                rejected_mask,
                one,
            )
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as err:
        raise ConfigError(f"data.share_prompt=true is not supported for {arch}: {err}") from err
    finally:
        model.train(was_training)
    low = inner.get_input_embeddings().weight.dtype in (torch.bfloat16, torch.float16)
    tol = 0.05 if low else 1e-3
    if not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        raise ConfigError(
            f"data.share_prompt=true is not supported for {arch}: its forward does not honour a "
            f"custom 4D attention mask / position ids (shared {got.tolist()} vs separate "
            f"{want.tolist()}); set data.share_prompt=false"
        )


def save_policy(model: torch.nn.Module, tokenizer: Any, output_dir: str | Path) -> Path:
    """Write weights (safetensors), model config and tokenizer to ``output_dir``.

    A PEFT model: the adapter goes to ``output_dir/adapter``, then the adapter is merged into
    the base weights (in place: call this last) and the merged model is saved at the top.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(output_dir / "adapter")
        model = model.merge_and_unload()
    if getattr(model.config, "use_cache", None) is False:
        model.config.use_cache = True  # turned off only for gradient checkpointing
    for name in ("activation_checkpointing_disable", "gradient_checkpointing_disable"):
        if hasattr(model, name):
            getattr(model, name)()  # a no-op when it was off
            break
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir
