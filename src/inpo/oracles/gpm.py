"""The General Preference Model (GPM): every response embedded once, preferences from a
skew-symmetric form between embeddings.

Zhang, Zhang, Wu, Xu and Gu 2024, "Beyond Bradley–Terry Models: A General Preference Model for
Language Model Alignment" (arXiv 2410.02197), §3–4 (SPEC "Preference models"):

- a *preference embedding* ``v(x, y) ∈ R^{2k}``, unit norm: a linear value head on the backbone's
  hidden state at the last token of ``prompt + response``, L2-normalised;
- the block-diagonal skew-symmetric operator ``R^>(x) = diag(λ_1(x) J, …, λ_k(x) J)`` with
  ``J = [[0, −1], [1, 0]]`` and *eigenvalue scale gates* ``λ_l(x) ≥ 0`` from the prompt
  (softplus of a linear head on the hidden state at the prompt's last token, which a causal model
  computes from the prompt alone; ``prompt_scales=false`` fixes ``λ = 1``);
- the score ``s(y ≻ y' | x) = ⟨R^>(x) v(x, y), v(x, y')⟩ = Σ_l λ_l (v_{2l} v'_{2l+1} −
  v_{2l+1} v'_{2l})``, so ``s(y ≻ y') = −s(y' ≻ y)`` exactly, and ``P(y ≻ y' | x) = σ(s / β)``.

``K`` responses to a prompt cost ``K`` forward passes for all ``K²`` preferences (a pairwise
model needs a pass per ordered pair), and for ``k ≥ 1`` the form represents cycles (three
embeddings 120° apart on one plane), which no Bradley–Terry reward can.

A saved GPM is a folder: the backbone (``AutoModel``, safetensors, ``config.json``), its
tokenizer, ``gpm.json`` (``dim``, ``prompt_scales``, ``beta``) and ``gpm_head.safetensors``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inpo.console import pulse
from inpo.errors import ConfigError, OracleError
from inpo.hashing import model_fingerprint
from inpo.oracles.base import OracleStats, check_lengths
from inpo.oracles.reward_model import (
    _check_local,
    length_batches,
    render_response,
    resolve_device,
    resolve_dtype,
    sigmoid,
)

__all__ = [
    "GPM_CONFIG",
    "GPMOracle",
    "build_gpm",
    "gpm_class",
    "gpm_score",
    "is_gpm_folder",
    "load_gpm",
]

#: The file that marks a folder as a GPM and holds its head's settings.
GPM_CONFIG = "gpm.json"
GPM_HEAD = "gpm_head.safetensors"


def is_gpm_folder(path: str | Path) -> bool:
    return (Path(path) / GPM_CONFIG).is_file()


def gpm_score(v_a, v_b, scales):
    """``s(a ≻ b) = Σ_l λ_l (a_{2l} b_{2l+1} − a_{2l+1} b_{2l})`` (torch or NumPy).

    ``v_a, v_b``: ``[..., 2k]`` embeddings; ``scales``: ``[..., k]`` (``λ ≥ 0``). Swapping
    ``a`` and ``b`` negates the score bit for bit (each term is an exact negation).
    """
    a0, a1 = v_a[..., 0::2], v_a[..., 1::2]
    b0, b1 = v_b[..., 0::2], v_b[..., 1::2]
    return (scales * (a0 * b1 - a1 * b0)).sum(-1)


def _torch_module():
    import torch

    class GeneralPreferenceModel(torch.nn.Module):
        """A backbone (``AutoModel``) with GPM's value head (``2k``) and scale gate (``k``).

        ``forward(input_ids, attention_mask, prompt_index) -> (v [B, 2k], λ [B, k])``: ``v``
        from the hidden state at each row's last real token (right padding), unit norm; ``λ``
        from the hidden state at ``prompt_index`` (the prompt's last token), softplus.
        """

        def __init__(self, backbone: Any, dim: int, prompt_scales: bool, beta: float):
            super().__init__()
            if dim < 2 or dim % 2:
                raise ConfigError(f"gpm.dim must be an even number >= 2, got {dim}")
            if not beta > 0:
                raise ConfigError(f"gpm.beta must be > 0, got {beta}")
            hidden = backbone.config.hidden_size
            self.backbone = backbone
            self.dim, self.prompt_scales, self.beta = dim, prompt_scales, float(beta)
            self.value_head = torch.nn.Linear(hidden, dim, bias=False)
            self.scale_head = torch.nn.Linear(hidden, dim // 2) if prompt_scales else None
            torch.nn.init.normal_(self.value_head.weight, std=1.0 / hidden**0.5)
            if self.scale_head is not None:
                torch.nn.init.zeros_(self.scale_head.weight)
                torch.nn.init.constant_(self.scale_head.bias, 0.5413)  # softplus(.) = 1

        @property
        def config(self):  # what the training loop's checkpoint code asks of a model
            return self.backbone.config

        def forward(self, input_ids, attention_mask, prompt_index):
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
            h = out.last_hidden_state
            rows = torch.arange(h.shape[0], device=h.device)
            last = attention_mask.sum(-1) - 1
            v = self.value_head(h[rows, last].to(self.value_head.weight.dtype))
            v = torch.nn.functional.normalize(v.float(), dim=-1)
            if self.scale_head is None:
                scales = torch.ones(v.shape[0], self.dim // 2, device=v.device)
            else:
                hp = h[rows, prompt_index.clamp(min=0)]
                gate = self.scale_head(hp.to(self.scale_head.weight.dtype))
                scales = torch.nn.functional.softplus(gate.float())
            return v, scales

        def head_state(self) -> dict[str, Any]:
            return {
                k: v.detach().cpu().contiguous()
                for k, v in self.state_dict().items()
                if not k.startswith("backbone.")
            }

        def save(self, folder: str | Path, tokenizer: Any = None) -> Path:
            """The backbone (safetensors), tokenizer, ``gpm.json`` and the head's weights."""
            from safetensors.torch import save_file

            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            self.backbone.save_pretrained(folder, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            save_file(self.head_state(), str(folder / GPM_HEAD))
            settings = {"dim": self.dim, "prompt_scales": self.prompt_scales, "beta": self.beta}
            (folder / GPM_CONFIG).write_text(json.dumps(settings, indent=1) + "\n")
            return folder

    return GeneralPreferenceModel


_CLASS: Any = None


def gpm_class():
    """The ``GeneralPreferenceModel`` class (built on first use: importing this module does
    not import torch)."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _torch_module()
    return _CLASS


def build_gpm(
    backbone_path: str | Path,
    *,
    dim: int,
    prompt_scales: bool,
    beta: float,
    dtype: Any = None,
    attn_implementation: str | None = None,
):
    """A fresh GPM head on the backbone of ``backbone_path`` (a causal LM or encoder folder)."""
    from transformers import AutoModel

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    backbone = AutoModel.from_pretrained(str(backbone_path), **kwargs)
    return gpm_class()(backbone, dim, prompt_scales, beta)


def load_gpm(path: str | Path, *, dtype: Any = None):
    """A saved GPM (:meth:`GeneralPreferenceModel.save`)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        settings = json.loads((path / GPM_CONFIG).read_text())
        dim, scales, beta = int(settings["dim"]), bool(settings["prompt_scales"]), settings["beta"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"'{path}' is not a GPM folder ({GPM_CONFIG}: {err})") from None
    model = build_gpm(path, dim=dim, prompt_scales=scales, beta=float(beta), dtype=dtype)
    head = load_file(str(path / GPM_HEAD))
    missing, unexpected = model.load_state_dict(head, strict=False)
    missing = [k for k in missing if not k.startswith("backbone.")]
    if missing or unexpected:
        raise ConfigError(f"GPM '{path}': head weights do not match ({missing or unexpected})")
    return model


class GPMOracle:
    """Preference oracle on a General Preference Model: one forward pass per (prompt, response).

    Embeddings and scale gates are cached per (prompt, response), so the ``K(K−1)/2`` pairs of
    SPPO's win rates, or the tournament's ``3K/2 − 1``, cost ``K`` forward passes a prompt
    (``stats.extra["sequences_scored"]``; ``stats.queries`` counts the pairwise answers).
    Rendering is the reward model's (:func:`inpo.oracles.reward_model.render_response`).

    Args:
        path: a folder written by ``inpo train-oracle kind=gpm``.
        batch_size, max_length, device, dtype, max_padding: as for
            :class:`inpo.oracles.reward_model.RewardModelOracle`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 16,
        max_length: int = 2048,
        device: str | None = "auto",
        dtype: Any = "auto",
        max_padding: float = 0.25,
    ) -> None:
        import torch
        from transformers import AutoTokenizer

        _check_local(path, "GPM")
        if not is_gpm_folder(path):
            raise ConfigError(
                f"'{path}' is not a GPM folder (no {GPM_CONFIG}); train one with "
                "`inpo train-oracle kind=gpm`"
            )
        self.path = str(path)
        self.batch_size, self.max_length, self.max_padding = batch_size, max_length, max_padding
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_gpm(self.path, dtype=self.dtype).to(self.device).eval()
        self.beta = self.model.beta
        self._torch = torch
        self.stats = OracleStats(extra={"sequences_scored": 0, "truncated": 0})
        self._cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()
        self.oracle_id = f"gpm:{Path(self.path).name}@{model_fingerprint(self.path)}:L{max_length}"

    def __repr__(self) -> str:
        return f"GPMOracle({self.path!r}, device={self.device!r})"

    def _embed(self, items: list[tuple[Any, str]]) -> list[tuple[np.ndarray, np.ndarray]]:
        torch = self._torch
        encoded = [
            render_response(self.tokenizer, p, r, self.max_length, prompt_index=True)
            for p, r in items
        ]
        self.stats.extra["truncated"] += sum(e.truncated for e in encoded)
        out: list[Any] = [None] * len(items)
        pad = self.tokenizer.pad_token_id
        done = 0
        for idx in length_batches([len(e.ids) for e in encoded], self.batch_size, self.max_padding):
            width = max(len(encoded[i].ids) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i].ids)] = torch.tensor(encoded[i].ids)
                mask[row, : len(encoded[i].ids)] = 1
            prompt_index = torch.tensor([encoded[i].prompt_index for i in idx])
            with torch.no_grad():
                v, scales = self.model(
                    ids.to(self.device), mask.to(self.device), prompt_index.to(self.device)
                )
            v64, s64 = v.double().cpu().numpy(), scales.double().cpu().numpy()
            if not (np.all(np.isfinite(v64)) and np.all(np.isfinite(s64))):
                raise OracleError(f"GPM '{self.path}' returned a non-finite embedding")
            for row, i in enumerate(idx):
                out[i] = (v64[row], s64[row])
            self.stats.backend_calls += 1
            self.stats.extra["sequences_scored"] += len(idx)
            done += len(idx)
            pulse(**{"answers embedded": f"{done}/{len(out)}"})
        return out

    def embeddings(
        self, prompts: Sequence[Any], responses: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """``v [n, 2k]`` and ``λ [n, k]`` of each (prompt, response); cached."""
        keys = [
            (p if isinstance(p, str) else json.dumps(p), str(r)) for p, r in zip(prompts, responses)
        ]
        items = dict(zip(keys, zip(prompts, responses)))
        with self._lock:
            missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
            self.stats.cache_hits += len(keys) - len(missing)
            if missing:
                for key, value in zip(missing, self._embed([items[k] for k in missing])):
                    self._cache[key] = value
            got = [self._cache[k] for k in keys]
        return np.stack([g[0] for g in got]), np.stack([g[1] for g in got])

    def prob_prefers(
        self,
        prompts: Sequence[Any],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray:
        """``P(a_i ≻ b_i) = σ(s(a_i ≻ b_i) / β)``, float64 ``[n]``; the gate ``λ(x)`` is the
        mean of the two rows' (equal up to rounding: both come from the prompt alone)."""
        n = check_lengths(prompts, responses_a, responses_b)
        v, scales = self.embeddings([*prompts, *prompts], [*responses_a, *responses_b])
        lam = 0.5 * (scales[:n] + scales[n:])
        self.stats.queries += n
        return sigmoid(gpm_score(v[:n], v[n:], lam) / self.beta)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def describe(self) -> dict[str, Any]:
        return {"kind": "gpm", "oracle_id": self.oracle_id, "path": self.path, "beta": self.beta}
