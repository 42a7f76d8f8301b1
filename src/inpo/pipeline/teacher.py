"""DNO's teacher responses: one reference (gold) response per training prompt.

DNO-Prct (Rosset et al. 2024, Algorithm 2) ranks the ``K`` on-policy samples of a prompt
together with a stronger model's response ``y_gold`` (GPT-4's in the paper), so a pair can be
(teacher, worst sample) when the teacher wins. ``teacher=FILE`` gives those responses in TRL's
prompt-completion format: a ``prompt`` (text or messages) and a ``completion`` (text, or a
list with one assistant message). Every training prompt of every iteration must have one: the
config check says which are missing before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from inpo.data import Records, _RowError, check_prompt, row_place
from inpo.errors import ConfigError, DataError

__all__ = ["check_teacher", "load_teacher", "prompt_key"]


def prompt_key(prompt: Any) -> str:
    """A prompt (text or a message list) as a dictionary key."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def load_teacher(path: str | Path) -> dict[str, str]:
    """``{prompt key: response text}`` from a JSONL/JSON file of ``prompt``/``completion`` rows.

    A row without either field, a completion that is not text or one assistant message, an
    empty response, or one prompt given two different responses: a :class:`DataError` naming
    the file and row.
    """

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"teacher: file '{path}' does not exist")
    if path.suffix not in (".jsonl", ".json"):
        raise DataError(f"{path}: teacher responses must be .jsonl or .json")
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
    else:
        rows = Records()
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as err:
                raise DataError(f"{path}: line {number}: not valid JSON ({err})") from None
            rows.lines.append(number)
    out: dict[str, str] = {}
    for i, row in enumerate(rows):
        at = row_place(rows, i)
        for key in ("prompt", "completion"):
            if not isinstance(row, dict) or key not in row:
                raise DataError(f"{path}: {at}: missing field '{key}'")
        try:
            prompt = check_prompt(row["prompt"], "prompt")
        except _RowError as err:
            raise DataError(f"{path}: {at}: field '{err.field}': {err.message}") from None
        response = _response_text(row["completion"])
        if response is None or not response.strip():
            raise DataError(
                f"{path}: {at}: field 'completion': expected a non-empty text or one "
                "assistant message"
            )
        key = prompt_key(prompt)
        if out.get(key, response) != response:
            raise DataError(f"{path}: {at}: a second, different response for this prompt")
        out[key] = response
    if not out:
        raise DataError(f"{path}: no teacher responses")
    return out


def _response_text(completion: Any) -> str | None:
    if isinstance(completion, str):
        return completion
    if (
        isinstance(completion, list)
        and len(completion) == 1
        and isinstance(completion[0], dict)
        and completion[0].get("role") == "assistant"
        and isinstance(completion[0].get("content"), str)
    ):
        return completion[0]["content"]
    return None


def check_teacher(cfg: Any) -> None:
    """Every training prompt of every iteration has a teacher response (else a
    :class:`ConfigError` saying how many are missing, with an example)."""
    from inpo.pipeline.workloads import get_workload  # deferred: loads numpy, torch, yaml

    responses = load_teacher(cfg.teacher)
    workload = get_workload(cfg)
    seen: set[str] = set()
    missing: list[str] = []
    for t in range(cfg.iterations):
        if hasattr(workload, "train_prompts_for"):
            prompts = workload.train_prompts_for(t)
        else:
            prompts = workload.train_prompts()
        for prompt in prompts[: cfg.max_prompts]:
            key = prompt_key(prompt)
            if key not in seen:
                seen.add(key)
                if key not in responses:
                    missing.append(key)
    if missing:
        raise ConfigError(
            f"teacher '{cfg.teacher}' has no response for {len(missing)} of the {len(seen)} "
            f"training prompts (e.g. {missing[0][:80]!r}); give every training prompt one"
        )
