"""Loading the policy for training (dtype, gradient checkpointing, LoRA) and saving the result.

The saved output folder loads with plain ``AutoModelForCausalLM.from_pretrained(output_dir)``
(safetensors, no remote code); with LoRA the adapter is merged into the weights for that copy and
also saved on its own under ``output_dir/adapter``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from inpo.errors import ConfigError
from inpo.hub import resolve_model
from inpo.training.config import ModelConfig

__all__ = [
    "check_model_dir",
    "load_policy",
    "load_tokenizer",
    "read_prompt_format",
    "save_policy",
    "with_adapter",
    "write_prompt_format",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_model_dir(path: str) -> Path:
    """The model folder (a local folder, or a hub id in the local Hugging Face cache), or a
    ConfigError naming ``model.path`` (checked before loading)."""

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
        model = with_adapter(model, lora, get_peft_model)
    model.train()
    return model


def with_adapter(model: Any, lora: Any, get_peft_model: Any) -> Any:
    """``get_peft_model(model, lora)`` (both trainers' LoRA): a bad ``target_modules`` is a
    :class:`ConfigError`, and PEFT's read of transformers' deprecated
    ``is_gradient_checkpointing`` (a FutureWarning no user of inpo can act on) is not shown."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*is deprecated", category=FutureWarning
        )
        try:
            return get_peft_model(model, lora)
        except ValueError as err:
            raise ConfigError(f"model.lora.target_modules: {err}") from err


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


#: The file beside a trained model saying how it was prompted: ``{"prompt_format": "chat"}``
#: (the chat template) or ``"text"`` (plain text, the template unused).
PROMPT_FORMAT_FILE = "inpo.json"


def write_prompt_format(model_dir: Path, prompt_format: str) -> None:
    (Path(model_dir) / PROMPT_FORMAT_FILE).write_text(
        json.dumps({"prompt_format": prompt_format}) + "\n"
    )


def read_prompt_format(model_dir: Path) -> str | None:
    """``chat`` or ``text`` if inpo trained the model in ``model_dir`` (else ``None``)."""
    path = Path(model_dir) / PROMPT_FORMAT_FILE
    try:
        value = json.loads(path.read_text()).get("prompt_format")
    except (OSError, ValueError, AttributeError):
        return None
    return value if value in ("chat", "text") else None
