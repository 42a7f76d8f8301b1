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

__all__ = ["check_model_dir", "load_policy", "load_tokenizer", "save_policy"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str) -> Path:
    """The model folder, or a ConfigError naming ``model.path`` (checked before loading)."""
    folder = Path(path)
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


def load_policy(cfg: ModelConfig) -> torch.nn.Module:
    """Load the policy in train mode, with gradient checkpointing / LoRA as configured."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": _DTYPES[cfg.dtype], "trust_remote_code": False}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(check_model_dir(cfg.path), **kwargs)
    if cfg.gradient_checkpointing:
        ckpt_kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
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
