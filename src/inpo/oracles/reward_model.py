"""A Bradley–Terry reward model as a preference oracle: ``P(a ≻ b) = σ(r(x, a) − r(x, b))``.

The reward model is a transformers sequence-classification model with one label (e.g. an
``*ForSequenceClassification`` checkpoint such as FsfairX-LLaMA3-RM or Skywork-Reward), loaded
with ``trust_remote_code=False`` together with its OWN tokenizer and chat template — never the
policy's. A (prompt, response) pair is rendered as the conversation
``[user: prompt, assistant: response]`` with the RM tokenizer's chat template; a tokenizer
without a chat template gets the plain concatenation ``prompt + "\\n\\n" + response`` (plus the
tokenizer's own special tokens). Sequences longer than ``max_length`` keep their *last*
``max_length`` tokens (the end of the response is what the model pools) and are counted in
``stats.extra["truncated"]``.

A BT model has no position bias, so one reward per response suffices; rewards are cached in
memory per (prompt, response): ``K`` samples of a prompt cost ``K`` forward passes however many
pairs are compared (``stats.extra["sequences_scored"]``; ``stats.backend_calls`` counts batches).

The helpers :func:`resolve_device` and :func:`resolve_dtype` (and :func:`inpo.hashing.model_fingerprint`) are shared
with :mod:`inpo.oracles.pairwise`.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from inpo.console import pulse
from inpo.data import prompt_text
from inpo.errors import ConfigError, OracleError
from inpo.hashing import model_fingerprint
from inpo.oracles.base import OracleStats, check_lengths

log = logging.getLogger(__name__)

__all__ = [
    "Rendered",
    "RewardModelOracle",
    "length_batches",
    "model_fingerprint",
    "render_response",
    "resolve_device",
    "resolve_dtype",
    "sigmoid",
]


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function in float64."""
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def length_batches(
    lengths: Sequence[int],
    batch_size: int,
    max_padding: float = 0.25,
    tiebreak: Callable[[int], Any] | None = None,
) -> list[list[int]]:
    """Group sequence indices into batches of similar length (padding waste bounded).

    Indices are sorted by length (then ``tiebreak(i)``, default ``i``, so batches are
    deterministic); a batch closes when it holds ``batch_size`` sequences or when adding the next
    one would make the padded size exceed ``(1 + max_padding)`` × the real token count.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak(i) if tiebreak else i))
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in order:
        n = lengths[i]
        if current and (
            len(current) == batch_size or n * (len(current) + 1) > (1 + max_padding) * (tokens + n)
        ):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        batches.append(current)
    return batches


class Rendered(NamedTuple):
    """A (prompt, response) as a scoring model reads it: ``ids``; ``prompt_index``, the
    position of the prompt's last token in ``ids`` (``0`` if truncation cut the prompt away);
    whether ``truncated``."""

    ids: list[int]
    prompt_index: int
    truncated: bool


#: A share of unknown tokens above which an oracle is warned it cannot read the text.
UNKNOWN_SHARE_WARN = 0.25
# tokenizers already checked (each once); weak, since an id() is reused once its object is freed
_UNKNOWN_CHECKED: weakref.WeakSet[Any] = weakref.WeakSet()


def check_unknown_share(tokenizer: Any, ids: Sequence[int], who: str) -> None:
    """Warn once a tokenizer when most of what an oracle reads is its unknown token (a
    word-level toy tokenizer reading a real chat model's text): naming the share, since such an
    oracle judges text it cannot see."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or tokenizer in _UNKNOWN_CHECKED or not ids:
        return
    _UNKNOWN_CHECKED.add(tokenizer)
    unknown = sum(1 for t in ids if t == unk)
    if unknown / len(ids) > UNKNOWN_SHARE_WARN:
        log.warning(
            "%s reads %d of %d tokens of a query as its unknown token %r (%.0f%%): it cannot "
            "see most of the text it judges; use an oracle whose tokenizer knows the policy's "
            "language",
            who,
            unknown,
            len(ids),
            tokenizer.unk_token,
            100 * unknown / len(ids),
        )


def render_response(
    tokenizer: Any, prompt: Any, response: str, max_length: int, *, prompt_index: bool = False
) -> Rendered:
    """The conversation ``prompt`` + the assistant turn ``response`` in a scoring model's own
    format (reward models, GPMs): its tokenizer's chat template (a text prompt is one user
    turn), or, without one, ``prompt\n\nresponse`` (a conversation as plain text,
    :func:`inpo.data.prompt_text`). Longer than ``max_length``: the last ``max_length`` tokens
    (the end of the response is what the model pools). ``prompt_index``: also find the prompt's
    last token (a GPM's scale gate reads it; it costs a second tokenisation, of the prompt
    alone), else it is ``0``."""

    tok = tokenizer
    if getattr(tok, "chat_template", None):
        turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        text = tok.apply_chat_template(
            [*turns, {"role": "assistant", "content": response}], tokenize=False
        )
        # The template writes its own BOS when it wants one; never add a second.
        bos = tok.bos_token
        add_special = not (bos and text.startswith(bos))
        ids = tok(text, add_special_tokens=add_special)["input_ids"]
        if prompt_index:
            head = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
            head_ids = tok(head, add_special_tokens=add_special)["input_ids"]
    else:
        ids = tok(f"{prompt_text(prompt)}\n\n{response}")["input_ids"]
        if prompt_index:
            head_ids = tok(f"{prompt_text(prompt)}\n\n")["input_ids"]
    check_unknown_share(tok, ids, f"the oracle's tokenizer ({type(tok).__name__})")
    cut = max(0, len(ids) - max_length)
    if not prompt_index:
        return Rendered(list(ids[cut:]), 0, cut > 0)
    common = 0
    for x, y in zip(ids, head_ids):
        if x != y:
            break
        common += 1
    return Rendered(list(ids[cut:]), max(0, common - 1 - cut), cut > 0)


def resolve_device(device: str | None) -> str:
    """``"auto"``/``None`` → ``"cuda"`` when available, else ``"cpu"``; other strings pass."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def resolve_dtype(dtype: Any, device: str):
    """``"auto"``/``None`` → bfloat16 on a GPU that supports it, else float32; names → dtypes."""
    import torch

    if dtype in (None, "auto"):
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise ConfigError(f"unknown dtype '{dtype}' (auto, {', '.join(names)})")
    return names[dtype]


def _check_local(path: str | Path, what: str) -> None:
    p = Path(path)
    looks_local = p.is_absolute() or str(path).startswith((".", "~")) or p.exists()
    if looks_local and not (p / "config.json").is_file():
        raise ConfigError(f"{what} '{path}' is not a model folder (no config.json)")


class RewardModelOracle:
    """Bradley–Terry preference oracle on a scalar reward model.

    Args:
        path: a local folder (or hub id) of a sequence-classification model with ``num_labels=1``.
        batch_size: sequences per forward pass.
        max_length: longest tokenised conversation; longer ones keep their last tokens.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``.
        max_padding: a batch closes before its padding exceeds this fraction of its real tokens
            (sequences are batched by length; see :func:`length_batches`).
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
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if batch_size < 1 or max_length < 2:
            raise ConfigError(f"batch_size ({batch_size}) and max_length ({max_length}) too small")
        _check_local(path, "reward model")
        self.path = str(path)
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_padding = max_padding
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        model = AutoModelForSequenceClassification.from_pretrained(
            self.path, dtype=self.dtype, trust_remote_code=False
        )
        if model.config.num_labels != 1:
            raise ConfigError(
                f"reward model '{path}' has {model.config.num_labels} labels; a Bradley–Terry "
                "reward model needs exactly one"
            )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if model.config.pad_token_id is None:  # the classifier pools the last non-pad token
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.model = model.to(self.device).eval()
        self._torch = torch
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.stats = OracleStats(extra={"sequences_scored": 0, "truncated": 0})
        self._cache: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        rendering = "chat" if self.has_chat_template else "concat"
        self.oracle_id = (
            f"reward-model:{Path(self.path).name}@{model_fingerprint(self.path)}"
            f":{rendering}:L{max_length}"
        )

    def __repr__(self) -> str:
        return f"RewardModelOracle({self.path!r}, device={self.device!r}, dtype={self.dtype})"

    # ---- rendering ----
    def render(self, prompt: Any, response: str) -> list[int]:
        """Token ids of the conversation ``prompt`` + the assistant turn ``response`` in the
        RM's own format: its tokenizer's chat template (a text prompt is one user turn), or,
        without one, ``prompt\n\nresponse`` (a conversation as plain text,
        :func:`inpo.data.prompt_text`)."""
        rendered = render_response(self.tokenizer, prompt, response, self.max_length)
        self.stats.extra["truncated"] += rendered.truncated
        return rendered.ids

    # ---- scoring ----
    def _score(self, items: list[tuple[Any, str]]) -> list[float]:
        torch = self._torch
        encoded = [self.render(p, r) for p, r in items]
        out = [0.0] * len(items)
        pad = self.model.config.pad_token_id  # the id the classifier pools around
        done = 0
        for idx in length_batches([len(e) for e in encoded], self.batch_size, self.max_padding):
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[row, : len(encoded[i])] = 1
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
            values = logits[:, 0].float().cpu().tolist()
            if not all(np.isfinite(values)):
                raise OracleError(f"reward model '{self.path}' returned a non-finite reward")
            for row, i in enumerate(idx):
                out[i] = float(values[row])
            self.stats.backend_calls += 1
            self.stats.extra["sequences_scored"] += len(idx)
            done += len(idx)
            pulse(**{"answers scored": f"{done}/{len(out)}"})
        return out

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Scalar rewards ``r(x_i, y_i)``, float64 ``[n]``; cached per (prompt, response)."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        # a conversation is keyed by its JSON (lists are not hashable)
        keys = [
            (p if isinstance(p, str) else json.dumps(p), str(r)) for p, r in zip(prompts, responses)
        ]
        items = dict(zip(keys, zip(prompts, responses)))
        with self._lock:
            missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
            self.stats.cache_hits += sum(1 for k in keys if k in self._cache)
            if missing:
                for key, value in zip(missing, self._score([items[k] for k in missing])):
                    self._cache[key] = value
            return np.array([self._cache[k] for k in keys], dtype=np.float64)

    def prob_prefers(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray:
        """``P(a_i ≻ b_i) = σ(r(x_i, a_i) − r(x_i, b_i))`` (Bradley–Terry), float64 ``[n]``."""
        n = check_lengths(prompts, responses_a, responses_b)
        r = self.rewards([*prompts, *prompts], [*responses_a, *responses_b])
        self.stats.queries += n
        return sigmoid(r[:n] - r[n:])

    def clear_cache(self) -> None:
        """Forget cached rewards (e.g. to free memory between iterations)."""
        with self._lock:
            self._cache.clear()

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description (no secrets) for run manifests."""
        return {
            "kind": "reward-model",
            "oracle_id": self.oracle_id,
            "path": self.path,
            "max_length": self.max_length,
            "chat_template": self.has_chat_template,
        }
