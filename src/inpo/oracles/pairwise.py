"""A pairwise preference model (a causal LM that reads two responses and names the better one).

The RLHFlow pair-preference format (Dong et al. 2024, "RLHF Workflow", §2; the model card of
``RLHFlow/pair-preference-model-LLaMA3-8B``, which the INPO authors' annotation code follows):

1. the context (the conversation; a text prompt is one user turn) is rendered with the card's
   plain template (:func:`rlhflow_context`: ``<turn> user\\n {content}`` /
   ``<turn> assistant\\n {content}`` per turn, newlines between);
2. the comparison text
   ``[CONTEXT] {context} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \\n``
   is the user turn of the model's own chat template, rendered as text *without* a generation
   prompt, a leading BOS string that the tokenizer adds as well removed (Llama 3's; never a
   turn marker such as ChatML's ``<|im_start|>``), and tokenised without special tokens;

the model's next-token distribution at the last position then puts mass on ``"A"`` and ``"B"``:

    ``P_A(a, b) = p_A / (p_A + p_B) = σ(logit_A − logit_B)``.

Such a model has a position bias, so both orders are queried and combined
(:func:`combine_orders`): ``P(a ≻ b) = ½[P_A(a, b) + 1 − P_A(b, a)]``, which makes
``P(a ≻ b) + P(b ≻ a) = 1`` hold exactly (bit for bit) and ``P(a ≻ a) = ½``.

Batches are left-padded with explicit ``position_ids``, so a batched query equals a one-by-one
query up to float rounding. A tokenizer without a chat template gets the comparison text alone
(plus its own special tokens). ``format="chat"`` judges with any chat model: ``{prompt}`` is the
prompt as plain text, the comparison is a general judging question (:data:`JUDGE_TEMPLATE`) as
the user turn, followed by the generation prompt; the verdict is the answer's first token.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from inpo.console import pulse
from inpo.data import prompt_text
from inpo.errors import ConfigError, OracleError
from inpo.modelparts import keeps_logits
from inpo.oracles.base import OracleStats, check_lengths
from inpo.oracles.reward_model import (
    _check_local,
    check_unknown_share,
    length_batches,
    model_fingerprint,
    resolve_device,
    resolve_dtype,
    sigmoid,
)

__all__ = [
    "FORMATS",
    "JUDGE_TEMPLATE",
    "RLHFLOW_TEMPLATE",
    "PairwisePreferenceOracle",
    "combine_orders",
    "default_template",
    "render_comparison",
    "rlhflow_context",
    "verdict_tokens",
]

#: The RLHFlow pair-preference comparison text (user turn). Placeholders: prompt, response_a/b.
RLHFLOW_TEMPLATE = "[CONTEXT] {prompt} [RESPONSE A] {response_a} [RESPONSE B] {response_b} \n"

#: The general judging prompt for any chat model (``format="chat"``): the conversation, the two
#: answers and the question, as the user turn of the model's own chat template; the verdict is
#: the first token of the assistant's answer.
JUDGE_TEMPLATE = (
    "You are judging two answers to the same request. Read the conversation and both answers, "
    "then say which answer is more helpful, correct and clear.\n\n"
    "[Conversation]\n{prompt}\n\n[Answer A]\n{response_a}\n\n[Answer B]\n{response_b}\n\n"
    "Which answer is better? Reply with one letter: A or B."
)

#: Comparison formats: RLHFlow's exact rendering (for RLHFlow's pairwise models) and a general
#: judging prompt through the model's own chat template (for any chat model).
FORMATS = ("rlhflow", "chat")


def default_template(format: str) -> str:
    """The comparison text a format uses unless one is given."""
    return RLHFLOW_TEMPLATE if format == "rlhflow" else JUDGE_TEMPLATE


def strip_sequence_bos(tokenizer: Any, text: str) -> str:
    """``text`` without a leading BOS string that the template writes and the tokenizer adds
    too (Llama 3's ``<|begin_of_text|>``, which RLHFlow's card removes). A BOS the tokenizer
    does not add of its own (ChatML's ``<|im_start|>``, which SmolLM2 names its BOS) is the
    template's turn marker and is kept, as is every BOS after the start."""
    bos, bos_id = getattr(tokenizer, "bos_token", None), getattr(tokenizer, "bos_token_id", None)
    if not bos or bos_id is None or not text.startswith(bos):
        return text
    added = list(tokenizer("x")["input_ids"])[:1] == [bos_id]
    return text[len(bos) :] if added else text


#: The model card's plain context template (``tokenizer_plain.chat_template``), for reference
#: and the test that :func:`rlhflow_context` renders what it renders.
RLHFLOW_CONTEXT_TEMPLATE = (
    "\n{% for message in messages %}{% if loop.index0 % 2 == 0 %}\n\n<turn> user\n "
    "{{ message['content'] }}{% else %}\n\n<turn> assistant\n {{ message['content'] }}"
    "{% endif %}{% endfor %}\n\n\n"
)


def rlhflow_context(prompt: Any, tokenizer: Any) -> str:
    """The conversation as the RLHFlow model card renders its context: ``tokenizer``'s
    ``apply_chat_template`` with the card's template (:data:`RLHFLOW_CONTEXT_TEMPLATE`, turns by
    position: even ones the user's, odd ones the assistant's; a text prompt is one user turn),
    so the whitespace is what the card's code gets (jinja's ``trim_blocks`` included)."""
    turns = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    turns = [m for m in turns if m.get("role") != "system"]  # the card's format has no system
    return tokenizer.apply_chat_template(
        turns, chat_template=RLHFLOW_CONTEXT_TEMPLATE, tokenize=False
    )


def verdict_tokens(
    tokenizer: Any, token_a: str = "A", token_b: str = "B", where: str = ""
) -> tuple[int, int]:
    """The ids of the two verdict tokens: each must be one token of ``tokenizer``, and not the
    same one (a tokenizer that maps both to its unknown token could only ever say ½)."""
    ids = []
    for token in (token_a, token_b):
        got = tokenizer.encode(token, add_special_tokens=False)
        if len(got) != 1:
            raise ConfigError(
                f"verdict token '{token}' is {len(got)} tokens for the tokenizer{where}; a "
                "pairwise model needs it to be exactly one"
            )
        ids.append(int(got[0]))
    if ids[0] == ids[1]:
        name = tokenizer.convert_ids_to_tokens(ids[0])
        raise ConfigError(
            f"verdict tokens '{token_a}' and '{token_b}' are the same token ({name!r}, id "
            f"{ids[0]}) for the tokenizer{where}: a pairwise model could only ever answer ½"
        )
    return ids[0], ids[1]


def combine_orders(p_first: np.ndarray, p_swapped: np.ndarray) -> np.ndarray:
    """Debias a positional judge: ``½[P_A(a, b) + 1 − P_A(b, a)]``, float64.

    ``p_first[i] = P_A(a_i, b_i)`` (a shown first), ``p_swapped[i] = P_A(b_i, a_i)``. Computed as
    ``g = ½ + ½|x − y|`` and its exact complement ``1 − g`` (Sterbenz: exact for ``g ∈ [½, 1]``),
    so swapping a and b gives ``1 − P`` bit for bit.
    """
    x = np.asarray(p_first, dtype=np.float64)
    y = np.asarray(p_swapped, dtype=np.float64)
    g = 0.5 + 0.5 * np.abs(x - y)
    return np.where(x >= y, g, 1.0 - g)


def render_comparison(
    tokenizer: Any,
    prompt: Any,
    response_a: str,
    response_b: str,
    template: str | None = None,
    format: str = "rlhflow",
) -> list[int]:
    """Token ids of the comparison prompt (A = ``response_a`` shown first), as the module
    docstring describes; ``inpo train-oracle kind=pairwise`` trains on exactly these.
    ``template``: the comparison text (default: the format's, :func:`default_template`)."""

    template = default_template(format) if template is None else template
    tok = tokenizer
    has_template = bool(getattr(tok, "chat_template", None))
    context = rlhflow_context(prompt, tok) if format == "rlhflow" else prompt_text(prompt)
    # Single-pass substitution: a response that contains "{response_b}" stays as it is.
    values = {"{prompt}": context, "{response_a}": response_a, "{response_b}": response_b}
    text = re.sub(
        r"\{prompt\}|\{response_a\}|\{response_b\}", lambda m: values[m.group(0)], template
    )
    if has_template and format == "rlhflow":
        # the card: apply_chat_template(tokenize=False) without a generation prompt, its
        # leading BOS string removed (never a turn marker), encoded without special tokens
        text = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        return list(tok(strip_sequence_bos(tok, text), add_special_tokens=False)["input_ids"])
    if has_template:
        text = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        bos = tok.bos_token
        return list(tok(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"])
    return list(tok(text)["input_ids"])


class PairwisePreferenceOracle:
    """Preference oracle on a causal LM that answers "A" or "B" (RLHFlow format).

    Args:
        path: local folder (or hub id) of a causal LM whose tokenizer has single tokens for
            ``token_a`` and ``token_b``.
        template: the comparison text with ``{prompt}``, ``{response_a}``, ``{response_b}``
            (default: the format's: :data:`RLHFLOW_TEMPLATE` or :data:`JUDGE_TEMPLATE`).
        format: ``rlhflow`` (the model card's rendering, above; for RLHFlow's models) or ``chat``
            (any chat model: ``{prompt}`` as plain text, the general judging question
            :data:`JUDGE_TEMPLATE` as a user turn of its own template plus the generation prompt).
        token_a, token_b: the verdict tokens.
        batch_size: comparison prompts per forward pass (each pair costs two).
        max_length: longest comparison prompt; longer ones raise :class:`OracleError` (cutting
            a comparison would hide one of the responses).
        device, dtype, max_padding: as for
            :class:`inpo.oracles.reward_model.RewardModelOracle`.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        template: str | None = None,
        format: str = "rlhflow",
        token_a: str = "A",
        token_b: str = "B",
        batch_size: int = 8,
        max_length: int = 4096,
        device: str | None = "auto",
        dtype: Any = "auto",
        max_padding: float = 0.25,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if format not in FORMATS:
            raise ConfigError(f"pairwise format must be rlhflow or chat, got '{format}'")
        template = default_template(format) if template is None else template
        for field in ("{prompt}", "{response_a}", "{response_b}"):
            if template.count(field) != 1:
                raise ConfigError(f"pairwise template must contain '{field}' exactly once")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.format = format
        _check_local(path, "pairwise preference model")
        self.path = str(path)
        self.template = template
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_padding = max_padding
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        self.token_ids = verdict_tokens(self.tokenizer, token_a, token_b, f" of '{self.path}'")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=self.dtype, trust_remote_code=False
        )
        self.model = model.to(self.device).eval()
        # the verdict is read at the last position: the vocabulary head runs there alone
        self._last_logits = {"logits_to_keep": 1} if keeps_logits(self.model) else {}
        self._torch = torch
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.stats = OracleStats(extra={"sequences_scored": 0})
        self._lock = threading.Lock()
        tmpl_sha = hashlib.sha256(f"{template}|{token_a}|{token_b}".encode()).hexdigest()[:8]
        rendering = (
            (self.format if self.format == "rlhflow" else "chat")
            if self.has_chat_template
            else "plain"
        )
        self.oracle_id = (
            f"pairwise:{Path(self.path).name}@{model_fingerprint(self.path)}"
            f":{rendering}:t{tmpl_sha}"
        )

    def __repr__(self) -> str:
        return f"PairwisePreferenceOracle({self.path!r}, device={self.device!r})"

    # ---- rendering ----
    def render(self, prompt: Any, response_a: str, response_b: str) -> list[int]:
        """Token ids of the comparison prompt (A = ``response_a`` shown first)."""

        ids = render_comparison(
            self.tokenizer, prompt, response_a, response_b, self.template, self.format
        )
        check_unknown_share(self.tokenizer, ids, f"pairwise model '{self.path}'")
        if len(ids) > self.max_length:
            raise OracleError(
                f"pairwise comparison prompt of {len(ids)} tokens exceeds max_length "
                f"{self.max_length} (prompt starts {prompt_text(prompt)[:60]!r})"
            )
        return ids

    # ---- scoring ----
    def prob_first(self, texts: list[list[int]]) -> np.ndarray:
        """``P_A = σ(logit_A − logit_B)`` at the last position of each comparison, float64."""
        torch = self._torch
        out = np.zeros(len(texts), dtype=np.float64)
        pad = self.tokenizer.pad_token_id
        id_a, id_b = self.token_ids
        lengths = [len(t) for t in texts]
        batches = length_batches(lengths, self.batch_size, self.max_padding, lambda i: texts[i])
        done = 0
        for idx in batches:
            width = max(len(texts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):  # left padding: the last position is the answer slot
                ids[row, width - len(texts[i]) :] = torch.tensor(texts[i])
                mask[row, width - len(texts[i]) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    **self._last_logits,
                ).logits[:, -1, :]
            diff = (logits[:, id_a].double() - logits[:, id_b].double()).cpu().numpy()
            if not np.all(np.isfinite(diff)):
                raise OracleError(f"pairwise model '{self.path}' returned non-finite logits")
            out[idx] = sigmoid(diff)
            self.stats.backend_calls += 1
            self.stats.extra["sequences_scored"] += len(idx)
            done += len(idx)
            pulse(**{"comparisons scored": f"{done}/{len(out)}"})
        return out

    def position_probs(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray:
        """``P_A(a_i, b_i)``: the model's preference for ``a_i`` *shown first*, one order only
        (``inpo eval`` reads both orders through it to report the position bias), ``[n]``."""
        n = check_lengths(prompts, responses_a, responses_b)
        with self._lock:
            texts = [self.render(p, a, b) for p, a, b in zip(prompts, responses_a, responses_b)]
            self.stats.queries += n
            return self.prob_first(texts)

    def prob_prefers(
        self,
        prompts: Sequence[str],
        responses_a: Sequence[str],
        responses_b: Sequence[str],
    ) -> np.ndarray:
        """``P(a_i ≻ b_i)`` from both presentation orders (:func:`combine_orders`), ``[n]``."""
        n = check_lengths(prompts, responses_a, responses_b)
        with self._lock:
            # Both orders of every pair; identical comparison texts are scored once.
            # a conversation is keyed by its JSON (lists are not hashable)
            hashable = [p if isinstance(p, str) else json.dumps(p) for p in prompts]
            original = dict(zip(hashable, prompts))
            keys = [(p, a, b) for p, a, b in zip(hashable, responses_a, responses_b)]
            keys += [(p, b, a) for p, a, b in zip(hashable, responses_a, responses_b)]
            unique = list(dict.fromkeys(keys))
            self.stats.cache_hits += len(keys) - len(unique)
            probs = self.prob_first([self.render(original[p], a, b) for p, a, b in unique])
            lookup = dict(zip(unique, probs))
            p_all = np.array([lookup[k] for k in keys], dtype=np.float64)
            self.stats.queries += n
        return combine_orders(p_all[:n], p_all[n:])
