"""Preference data in: loading, validation, tokenisation and collation of (prompt, chosen, rejected).

Formats follow TRL's preference datasets:

* **standard text**: ``prompt``, ``chosen``, ``rejected`` are strings;
* **conversational**: they are lists of ``{"role", "content"}`` messages (the completions are the
  assistant turn(s));
* **explicit prompt** (a ``prompt`` column) or **implicit prompt** (only ``chosen`` / ``rejected``,
  each a full text or conversation; their longest common prefix becomes the prompt).

Optional columns, kept when present: ``tie`` (bool), SPPO win-rate estimates ``chosen_winrate`` /
``rejected_winrate`` (floats in [0, 1]), and precomputed summed log-probs ``ref_chosen_logps``,
``ref_rejected_logps``, ``prev_chosen_logps``, ``prev_rejected_logps``. Other columns are dropped.
Every loaded dataset has a ``row_id`` column: the row's index in the source file.

Log-probs are **sums** over completion tokens (SPEC.md, "Notation"). Tokenisation mirrors what the
model sees at generation time: the prompt's own ids (with its special tokens, e.g. BOS, once) and then
the completion's ids, tokenised separately so that no token merges across the boundary.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inpo.errors import DataError
from inpo.hub import looks_like_hub_id, resolve_dataset

if TYPE_CHECKING:
    import datasets
    import torch

__all__ = [
    "CUT_COLUMNS",
    "LOGP_COLUMNS",
    "OPTIONAL_COLUMNS",
    "EncodedPair",
    "PreferenceCollator",
    "Records",
    "as_completion",
    "check_prompt",
    "completion_text",
    "encode_completion",
    "encode_pair",
    "encode_prompt",
    "load_preference_dataset",
    "prompt_text",
    "read_text",
    "row_place",
    "tokenize_pair",
]

log = logging.getLogger(__name__)

#: Precomputed summed log-prob columns (reference policy and previous iterate), floats.
LOGP_COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "prev_chosen_logps",
    "prev_rejected_logps",
)
#: SPPO win-rate estimates ``P̂(y ≻ π_t)``, floats in [0, 1].
WINRATE_COLUMNS = ("chosen_winrate", "rejected_winrate")
#: A sampled completion cut at ``max_new_tokens`` (no end token generated), bools: its ids are
#: scored as sampled, without the end-of-turn the template would write (:func:`encode_completion`).
CUT_COLUMNS = ("chosen_truncated", "rejected_truncated")
#: Bool-valued optional columns.
BOOL_COLUMNS = ("tie", *CUT_COLUMNS)
#: Every optional column that loading keeps (``tie`` and the cut flags are bools, the rest floats).
OPTIONAL_COLUMNS = ("tie", *CUT_COLUMNS, *WINRATE_COLUMNS, *LOGP_COLUMNS)

Text = str | list[dict[str, str]]


# ----------------------------------------------------------------------------------------------
# Loading and validation
# ----------------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    """A text file's content as UTF-8; a file in another encoding is a :class:`DataError`
    naming the file and the line of the first byte that is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path}: line {line} is not UTF-8 (byte 0x{raw[err.start]:02x}); save the file as "
            "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
        ) from None


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by ``datasets``' ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def load_dataset_rows(
    source: str | Path, *, config: str | None = None, split: str | None = None, key: str = "data"
) -> list[dict[str, Any]]:
    """The rows of a dataset that ``datasets.load_dataset`` reads: a folder of data files
    (Parquet/JSON/CSV, with or without a dataset card), or a hub id already in the local
    Hugging Face cache (resolved offline: nothing is downloaded). ``split`` defaults to
    ``train`` (or the only split); ``key`` names the setting in errors."""

    name = str(source)
    folder = resolve_dataset(name, key) if looks_like_hub_id(name) else Path(source)
    where = name if key == name else f"{key} '{name}'"
    suffixes = (".parquet", ".jsonl", ".json", ".csv", ".arrow", ".txt")
    if not any(p.suffix in suffixes for p in folder.rglob("*") if p.is_file()):
        raise DataError(
            f"{where}: neither a `datasets.save_to_disk` folder nor a folder of data files "
            f"({', '.join(suffixes)})"
        )
    import datasets

    try:
        loaded = datasets.load_dataset(str(folder), name=config)
    except Exception as err:  # datasets' own errors: a bad config name, no data files, …
        while err.__cause__ is not None or err.__context__ is not None:  # the root cause says why
            err = err.__cause__ or err.__context__
        text = str(err).strip()
        first = (
            f"{type(err).__name__}: {text.splitlines()[0][:300]}" if text else type(err).__name__
        )
        raise DataError(f"{where}: datasets.load_dataset cannot read it ({first})") from None
    return loaded[_pick_split(list(loaded), split, where, "a split key")].to_list()


def _pick_split(names: list[str], split: str | None, where: str, how: str, kind: str = "splits"):
    """``split``, else ``train``, else the only one; a :class:`DataError` naming the ``names``
    there are (``how``: the setting that chooses one)."""
    chosen = split if split is not None else ("train" if "train" in names else None)
    if chosen is None and len(names) == 1:
        chosen = names[0]
    if chosen not in names:
        raise DataError(
            f"{where}: split '{split}' not found ({kind}: {', '.join(names)})"
            if split is not None
            else f"{where}: several splits ({', '.join(names)}); choose one with {how}"
        )
    return chosen


class Records(list):
    """A JSONL file's rows, with ``lines[i]``: the (1-based) line row ``i`` was read from."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[int] = []


def row_place(records: Any, index: int) -> str:
    """Where row ``index`` (0-based) of ``records`` is, as a person finds it: ``line N`` of a
    JSONL file (1-based, as editors count), else ``row N`` (1-based). ``records``: the rows
    (:class:`Records` know their lines) or a dataset loaded by
    :func:`load_preference_dataset` (``source_lines``, indexed by ``row_id``)."""
    lines = getattr(records, "lines", None) or getattr(records, "source_lines", None)
    return f"line {lines[index]}" if lines else f"row {index + 1}"


def _read_records(path: Path, split: str | None, config: str | None = None) -> list[Any]:
    """Return the raw rows of ``path`` (one entry per source row, in file order): a file, a
    ``save_to_disk`` folder, a folder of data files or a cached hub dataset id."""

    if looks_like_hub_id(path) or (path.is_dir() and not _is_saved_dataset(path)):
        return load_dataset_rows(path, config=config, split=split, key=str(path))
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as err:  # datasets raises FileNotFoundError / ValueError variants
            raise DataError(f"{path}: not a `datasets.save_to_disk` folder ({err})") from err
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[_pick_split(list(ds), split, str(path), "split=")]
        return ds.to_list()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = Records()
        with path.open("rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(
                        f"{path}: line {line_no}: not UTF-8 text (byte "
                        f"{err.start} of the line is {raw[err.start : err.start + 1]!r})"
                    ) from None
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except (json.JSONDecodeError, RecursionError) as err:
                    msg = getattr(err, "msg", "nested too deeply")
                    raise DataError(f"{path}: line {line_no}: invalid JSON ({msg})") from None
                rows.lines.append(line_no)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text (at byte {err.start})") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from err
        except RecursionError:
            raise DataError(f"{path}: invalid JSON (nested too deeply)") from None
        is_splits = isinstance(data, Mapping) and all(
            isinstance(v, list) and v and all(isinstance(r, Mapping) for r in v)
            for v in data.values()
        )
        if isinstance(data, Mapping) and (split is not None or is_splits):
            data = data[_pick_split(list(data), split, str(path), "split=", kind="keys")]
        if isinstance(data, Mapping) and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) > 1:
                raise DataError(f"{path}: columns have different lengths {sorted(lengths)}")
            n = lengths.pop() if lengths else 0
            return [{k: v[i] for k, v in data.items()} for i in range(n)]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of rows or a dict of columns")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(str(path)).to_pylist()
        except Exception as err:
            raise DataError(f"{path}: cannot read Parquet ({err})") from err
    raise DataError(
        f"{path}: unsupported file type '{suffix}' (.jsonl, .json, .parquet or a folder)"
    )


class _RowError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def _check_messages(value: Any, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise _RowError(field, "expected a non-empty list of {role, content} messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping):
            raise _RowError(f"{field}[{i}]", f"expected a message dict, got {type(msg).__name__}")
        for key in ("role", "content"):
            if key not in msg or msg[key] is None:
                raise _RowError(f"{field}[{i}].{key}", "missing")
            if not isinstance(msg[key], str):
                raise _RowError(
                    f"{field}[{i}].{key}", f"expected a string, got {type(msg[key]).__name__}"
                )
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _check_completion(value: Any, field: str, conversational: bool) -> Text:
    if conversational:
        msgs = _check_messages(value, field)
        if not any(m["role"] == "assistant" for m in msgs):
            raise _RowError(field, "conversation has no assistant turn")
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                raise _RowError(
                    f"{field}[{i}].role",
                    f"completion turns must be 'assistant', got '{m['role']}'",
                )
            if not m["content"].strip():
                raise _RowError(f"{field}[{i}].content", "empty completion")
        return msgs
    if not isinstance(value, str):
        raise _RowError(field, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _RowError(field, "empty completion")
    return value


def _split_implicit(chosen: Any, rejected: Any, conversational: bool) -> tuple[Text, Text, Text]:
    """Split two full texts/conversations into (common prompt, chosen rest, rejected rest)."""
    if chosen == rejected:
        raise _RowError("rejected", "identical to chosen: no completion to compare")
    if conversational:
        c = _check_messages(chosen, "chosen")
        r = _check_messages(rejected, "rejected")
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        if k == 0:
            raise _RowError("chosen", "chosen and rejected share no prompt turns")
        return c[:k], c[k:], r[k:]
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise _RowError(field, f"expected a string, got {type(value).__name__}")
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    # Back off to a whitespace boundary so the completions start with a whole word (and its
    # leading space), as TRL's extract_prompt does for the last space.
    cut = k
    while cut > 0 and not chosen[cut - 1].isspace() and cut < len(chosen):
        cut -= 1
    while cut > 0 and chosen[cut - 1].isspace():
        cut -= 1
    if cut == 0:
        raise _RowError("chosen", "chosen and rejected share no prompt prefix")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _check_optional(name: str, value: Any) -> bool | float:
    if value is None:
        raise _RowError(name, "missing (the column is present in other rows)")
    if name in BOOL_COLUMNS:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise _RowError(name, f"expected a bool, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _RowError(name, f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise _RowError(name, f"expected a finite number, got {value}")
    if name in WINRATE_COLUMNS and not 0.0 <= value <= 1.0:
        raise _RowError(name, f"expected a win-rate in [0, 1], got {value}")
    if name in LOGP_COLUMNS and value > 1e-4:
        raise _RowError(name, f"a summed log-prob must be <= 0, got {value}")
    return value


def _normalise_row(
    raw: Any, *, explicit: bool, conversational: bool, optional: Sequence[str]
) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise _RowError("<row>", f"expected an object, got {type(raw).__name__}")
    for field in ("prompt", "chosen", "rejected") if explicit else ("chosen", "rejected"):
        if field not in raw or raw[field] is None:
            raise _RowError(field, "missing")
    if explicit:
        if conversational:
            if not isinstance(raw["prompt"], list):
                raise _RowError("prompt", "expected a list of messages (as the first row has)")
            prompt: Text = check_prompt(raw["prompt"], "prompt")
        else:
            if not isinstance(raw["prompt"], str):
                raise _RowError("prompt", f"expected a string, got {type(raw['prompt']).__name__}")
            if not raw["prompt"]:
                raise _RowError("prompt", "empty prompt")
            prompt = raw["prompt"]
        chosen, rejected = raw["chosen"], raw["rejected"]
    else:
        if "prompt" in raw and raw["prompt"] is not None:
            raise _RowError("prompt", "unexpected: the first row has no prompt (implicit format)")
        prompt, chosen, rejected = _split_implicit(raw["chosen"], raw["rejected"], conversational)
    row: dict[str, Any] = {
        "prompt": prompt,
        "chosen": _check_completion(chosen, "chosen", conversational),
        "rejected": _check_completion(rejected, "rejected", conversational),
    }
    for name in optional:
        row[name] = _check_optional(name, raw.get(name))
    return row


def load_preference_dataset(
    path: str | Path,
    *,
    split: str | None = None,
    skip_bad_rows: bool = False,
    keep_columns: bool = False,
    config: str | None = None,
) -> datasets.Dataset:
    """Load and validate a preference dataset into a ``datasets.Dataset``.

    Args:
        path: a ``.jsonl`` / ``.json`` (a list of rows, a dict of columns, or a dict of splits) /
            ``.parquet`` file, or a folder written by ``datasets.save_to_disk`` (a ``Dataset`` or a
            ``DatasetDict``; ``split`` picks one, default ``"train"`` or the only split).
        split: the split to read (folders with a ``DatasetDict``, JSON dicts of splits, hub
            datasets; default ``train`` or the only split).
        config: a hub dataset's configuration (``datasets.load_dataset``'s ``name``).
        skip_bad_rows: skip malformed rows instead of raising; they are counted.
        keep_columns: carry the source's other columns (``source``, ``score``, …) through
            unchanged (``inpo precompute`` does, so a user's columns survive it).

    Returns:
        A dataset with columns ``prompt``, ``chosen``, ``rejected`` (all strings, or all message
        lists), the optional columns present in the source (``tie``, ``chosen_winrate``,
        ``rejected_winrate``, ``ref_*_logps``, ``prev_*_logps``) and ``row_id`` (int64, the index
        of the row in the source; a source that already has an integer ``row_id`` column, e.g. the
        output of ``inpo precompute``, keeps it). The format (text or conversational, explicit or
        implicit prompt) is decided by the first row; an implicit prompt is split off as the
        longest common prefix (whole messages; for text, up to the last whitespace).

        With ``skip_bad_rows=True`` the returned dataset carries two plain attributes, read them
        right after loading (``datasets`` transformations do not copy them):
        ``skipped_rows`` (int) and ``skip_reasons`` (list of the first 20 messages). The count is
        also logged at WARNING level.

    Raises:
        DataError: an unreadable file, or (without ``skip_bad_rows``) a malformed row: a missing
            field, a wrong type, an empty completion or prompt, a conversation without an
            assistant turn, an optional column missing or out of range in some rows. The message
            names the file, the row index and the field.
    """
    import datasets

    path = Path(path)
    records = _read_records(path, split, config)
    if not records:
        raise DataError(f"{path}: no rows")
    first = records[0] if isinstance(records[0], Mapping) else {}
    explicit = first.get("prompt") is not None
    probe = first.get("prompt") if explicit else first.get("chosen")
    conversational = isinstance(probe, list)
    present = {key for rec in records if isinstance(rec, Mapping) for key in rec}
    optional = [name for name in OPTIONAL_COLUMNS if name in present]
    keep_ids = "row_id" in present and all(
        isinstance(rec, Mapping)
        and isinstance(rec.get("row_id"), int)
        and not isinstance(rec.get("row_id"), bool)
        for rec in records
    )

    known = {"prompt", "chosen", "rejected", "row_id", *OPTIONAL_COLUMNS}
    extra = sorted(k for k in present if isinstance(k, str) and k not in known)
    rows: list[dict[str, Any]] = []
    reasons: list[str] = []
    for index, raw in enumerate(records):
        try:
            row = _normalise_row(
                raw, explicit=explicit, conversational=conversational, optional=optional
            )
        except _RowError as err:
            message = f"{path}: {row_place(records, index)}: field '{err.field}': {err.message}"
            if not skip_bad_rows:
                raise DataError(message) from None
            reasons.append(message)
            continue
        row["row_id"] = int(raw["row_id"]) if keep_ids else index
        if keep_columns:
            for key in extra:
                row[key] = raw.get(key)
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: every row is malformed ({len(reasons)}); first: {reasons[0]}")
    if reasons:
        log.warning("%s: skipped %d malformed row(s); first: %s", path, len(reasons), reasons[0])

    extras = extra if keep_columns else []
    columns: dict[str, list[Any]] = {
        key: [r[key] for r in rows] for key in rows[0] if key not in extras
    }
    features = _features(conversational, optional)
    ds = datasets.Dataset.from_dict(columns, features=features)
    for key in extras:  # their types inferred by datasets, as it would for the file alone
        try:
            ds = ds.add_column(key, [r[key] for r in rows])
        except (TypeError, ValueError) as err:
            kind = type(err).__name__
            raise DataError(
                f"{path}: column '{key}' cannot be kept: its values are not of one type ({kind})"
            ) from None
    ds.source_lines = getattr(records, "lines", None)  # row_id → line of a JSONL file
    ds.skipped_rows = len(reasons)
    ds.skip_reasons = reasons[:20]
    return ds


def _features(conversational: bool, optional: Sequence[str]):
    import datasets

    text: Any
    if conversational:
        text = datasets.List(
            {"role": datasets.Value("string"), "content": datasets.Value("string")}
        )
    else:
        text = datasets.Value("string")
    spec: dict[str, Any] = {"prompt": text, "chosen": text, "rejected": text}
    for name in optional:
        spec[name] = datasets.Value("bool" if name in BOOL_COLUMNS else "float64")
    spec["row_id"] = datasets.Value("int64")
    return datasets.Features(spec)


# ----------------------------------------------------------------------------------------------
# Tokenisation
# ----------------------------------------------------------------------------------------------


#: Token-id lists a collator remembers (prompts and completions) before it starts afresh.
_MEMO_SIZE = 1 << 16


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of one (prompt, completion), after truncation, with truncation flags."""

    prompt_ids: list[int]
    completion_ids: list[int]
    prompt_truncated: bool
    completion_truncated: bool


def _ids(encoded: Any) -> list[int]:
    """``input_ids`` out of a tokenizer / ``apply_chat_template`` result (dict or list)."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def encode_prompt(tokenizer: Any, prompt: Text) -> list[int]:
    """The prompt's token ids: the one place a prompt becomes ids, for generation (both
    backends), log-probs, training, evaluation and export.

    * Text: ``tokenizer(prompt)`` (the tokenizer's own special tokens, e.g. Llama's BOS). A text
      that already starts with the BOS string (a prompt templated by hand) keeps that one BOS:
      the tokenizer's is not added on top.
    * A conversation (message list): the chat template with the generation prompt, tokenised
      without adding special tokens (the template writes its own BOS when it has one).
    """
    if isinstance(prompt, str):
        ids = _ids(tokenizer(prompt))
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:
            ids = ids[1:]  # "<s>text" plus the tokenizer's own "<s>": one is the prompt's
        return ids
    _require_template(tokenizer)
    return _ids(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True))


def as_completion(prompt: Text, text: str) -> Text:
    """A sampled response in its prompt's format: the assistant turn ``[{"role": "assistant",
    "content": text}]`` after a conversation (TRL's conversational preference format), the text
    itself after a text prompt."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def completion_text(completion: Text) -> str:
    """The text of a completion (an assistant turn's content, or the text itself)."""
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


def prompt_text(prompt: Text) -> str:
    """A prompt as plain text, for oracles with no format of their own (a single user turn is
    its content; a longer conversation is ``User: …`` / ``Assistant: …`` paragraphs)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0]["content"])
    return "\n\n".join(f"{str(m['role']).capitalize()}: {m['content']}" for m in prompt)


#: Roles a prompt's messages may have.
PROMPT_ROLES = ("system", "user", "assistant")


def check_prompt(value: Any, field: str = "prompt") -> Text:
    """A prompt as the pipeline accepts it: non-empty text, or a conversation that a chat
    template can answer — an optional first ``system`` turn, then ``user`` and ``assistant``
    turns alternating from ``user`` and ending with ``user``, none empty. Raises ``_RowError``
    naming the message and field (the loaders add the file and row)."""
    if isinstance(value, str):
        if not value.strip():
            raise _RowError(field, "empty prompt")
        return value
    msgs = _check_messages(value, field)
    expected = "user"
    for i, m in enumerate(msgs):
        role = m["role"]
        where = f"{field}[{i}]"
        if role not in PROMPT_ROLES:
            raise _RowError(f"{where}.role", f"unknown role '{role}' (system, user, assistant)")
        if not m["content"].strip():
            raise _RowError(f"{where}.content", f"empty {role} turn")
        if role == "system":
            if i:
                raise _RowError(f"{where}.role", "a system turn must come first")
            continue
        if role != expected:
            raise _RowError(
                f"{where}.role",
                f"expected a '{expected}' turn here: turns alternate user/assistant, "
                "starting with user",
            )
        expected = "assistant" if role == "user" else "user"
    if msgs[-1]["role"] != "user":
        raise _RowError(
            f"{field}[{len(msgs) - 1}].role",
            f"a prompt must end with a user turn (the model answers it), not '{msgs[-1]['role']}'",
        )
    return msgs


def _require_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            f"conversational data needs a tokenizer with a chat template; "
            f"{type(tokenizer).__name__} has none (set tokenizer.chat_template)"
        )


def encode_completion(
    tokenizer: Any, prompt: Text, completion: Text, *, ended: bool = True
) -> list[int]:
    """The completion's ids as the model produces them after the prompt.

    Text: ``tokenizer(completion, add_special_tokens=False)`` then EOS (as TRL does).
    Conversational (a text completion after a conversation is its assistant turn,
    :func:`as_completion`): the template renders prompt + completion; the prompt's render (with the
    generation prompt) must be a prefix of it, and the remainder (the assistant turn, including
    whatever end-of-turn marker the template writes) is tokenised without special tokens.

    ``ended=False`` (a sample cut at ``max_new_tokens``): the completion as it was sampled, with
    no end token — text: no EOS; conversational: the assistant turn's render up to the end of its
    content, without the end-of-turn marker and what the template writes after it. So a cut
    sample's log-probs and gradients never include an end the policy did not produce.
    """
    if isinstance(completion, str) and isinstance(prompt, list):
        completion = as_completion(prompt, completion)  # the assistant turn it is
    if isinstance(completion, str):
        ids = _ids(tokenizer(completion, add_special_tokens=False))
        eos = tokenizer.eos_token_id
        return [*ids, int(eos)] if eos is not None and ended else ids
    if not isinstance(prompt, list):
        raise DataError("completion is a conversation but the prompt is a string")
    _require_template(tokenizer)
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*prompt, *completion], tokenize=False)
    if not full.startswith(head):
        raise DataError(
            "the chat template's render of the prompt (with add_generation_prompt=True) is not a "
            "prefix of its render of prompt + completion; this template cannot be split into "
            f"prompt and completion tokens (prompt render ends with {head[-40:]!r})"
        )
    turn = full[len(head) :]
    if not ended:
        content = completion_text(completion)
        at = turn.find(content) if content else -1
        turn = turn[: at + len(content)] if at >= 0 else content
    return _ids(tokenizer(turn, add_special_tokens=False))


def _truncate(
    prompt_ids: list[int],
    completion_ids: list[int],
    max_prompt_length: int | None,
    max_completion_length: int | None,
) -> EncodedPair:
    p_cut = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    c_cut = max_completion_length is not None and len(completion_ids) > max_completion_length
    if p_cut:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]  # keep the END
    if c_cut:
        completion_ids = completion_ids[:max_completion_length]  # keep the START
    return EncodedPair(prompt_ids, completion_ids, p_cut, c_cut)


def _check_lengths(max_prompt_length: int | None, max_completion_length: int | None) -> None:
    for name, value in (
        ("max_prompt_length", max_prompt_length),
        ("max_completion_length", max_completion_length),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 or None, got {value}")


def encode_pair(
    tokenizer: Any,
    prompt: Text,
    completion: Text,
    *,
    max_prompt_length: int | None,
    max_completion_length: int | None,
    ended: bool = True,
) -> EncodedPair:
    """:func:`tokenize_pair` with truncation flags (see there); ``ended=False``: a sample cut at
    ``max_new_tokens``, scored without an end token (:func:`encode_completion`)."""
    _check_lengths(max_prompt_length, max_completion_length)
    return _truncate(
        encode_prompt(tokenizer, prompt),
        encode_completion(tokenizer, prompt, completion, ended=ended),
        max_prompt_length,
        max_completion_length,
    )


def tokenize_pair(
    tokenizer: Any,
    prompt: Text,
    completion: Text,
    *,
    max_prompt_length: int | None,
    max_completion_length: int | None,
) -> tuple[list[int], list[int]]:
    """Tokenise one (prompt, completion) into ``(prompt_ids, completion_ids)``.

    Standard text: ``prompt_ids = tokenizer(prompt)["input_ids"]`` (with the tokenizer's own
    special tokens, e.g. a BOS), ``completion_ids = tokenizer(completion,
    add_special_tokens=False)["input_ids"] + [eos_token_id]``.
    Conversational (message lists): ``prompt_ids`` from ``apply_chat_template(prompt,
    add_generation_prompt=True, tokenize=True)``, the completion as the template renders the
    assistant turn after it (see :func:`encode_completion`). Either way no BOS is doubled and no
    token merges across the prompt/completion boundary.

    Truncation keeps the prompt's last ``max_prompt_length`` tokens and the completion's first
    ``max_completion_length`` tokens (``None``: no limit).
    """
    enc = encode_pair(
        tokenizer,
        prompt,
        completion,
        max_prompt_length=max_prompt_length,
        max_completion_length=max_completion_length,
    )
    return enc.prompt_ids, enc.completion_ids


# ----------------------------------------------------------------------------------------------
# Collation
# ----------------------------------------------------------------------------------------------


class PreferenceCollator:
    """Turn rows ``{"prompt", "chosen", "rejected", ...}`` into one padded batch of ``2B`` sequences.

    ``__call__(rows)`` returns a dict of tensors for ``B = len(rows)`` pairs:

    * ``input_ids``, ``attention_mask``, ``completion_mask``: int64 ``[2B, L]``; rows ``0..B-1``
      are the chosen sequences (prompt + chosen), rows ``B..2B-1`` the rejected ones, in the same
      order. ``completion_mask`` is 1 exactly on completion tokens (never on prompt or padding).
    * ``chosen_lengths``, ``rejected_lengths``: int64 ``[B]``, completion token counts.
    * ``row_id``: int64 ``[B]`` (when rows have it).
    * each optional column present in the rows: ``tie`` bool ``[B]``; ``chosen_winrate``,
      ``rejected_winrate``, ``ref_chosen_logps``, ``ref_rejected_logps``, ``prev_chosen_logps``,
      ``prev_rejected_logps`` float32 ``[B]``.
    * ``num_truncated_prompts``, ``num_truncated_completions``: int64 scalars for this batch
      (so a loop can log them even when collation runs in DataLoader workers).

    The collator also keeps running totals, ``truncated_prompts``, ``truncated_completions`` and
    ``pairs_seen``, and the longest prompt and completion before truncation, ``longest_prompt``
    and ``longest_completion`` in tokens (valid in the process that calls it; see
    :meth:`reset_counters`).

    Args:
        tokenizer: a transformers tokenizer (with a chat template for conversational rows).
        max_prompt_length: keep the prompt's last tokens (``None``: no limit).
        max_completion_length: keep the completion's first tokens (``None``: no limit).
        padding_side: ``"right"`` or ``"left"``.
        pad_to_multiple_of: round ``L`` up to a multiple of this.
        share_prompt: return ``B`` rows ``prompt + chosen + rejected`` instead (see below).

    With ``share_prompt=True`` the batch holds one row per pair, for
    :func:`inpo.logprobs.shared_prompt_logps`: ``input_ids``, ``attention_mask`` (1 on real
    tokens), ``position_ids`` (prompt ``0..p-1``, chosen ``p..p+c-1``, rejected ``p..p+r-1``; 0
    on padding), ``chosen_mask``, ``rejected_mask``, all int64 ``[B, L]``, and ``prompt_lengths``
    ``[B]``; the other keys are as above. The attention mask that keeps rejected tokens from
    seeing chosen ones is built from these by :func:`inpo.logprobs.shared_prompt_mask`.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_prompt_length: int | None = None,
        max_completion_length: int | None = None,
        padding_side: str = "right",
        pad_to_multiple_of: int | None = None,
        share_prompt: bool = False,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        _check_lengths(max_prompt_length, max_completion_length)
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.max_completion_length = max_completion_length
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of
        self.share_prompt = share_prompt
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self._memo: dict[Any, tuple[int, ...]] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the running totals and maxima (see the class docstring)."""
        self.truncated_prompts = 0
        self.truncated_completions = 0
        self.pairs_seen = 0
        self.longest_prompt = 0
        self.longest_completion = 0

    def _encoded(self, key: Any, encode: Any) -> list[int]:
        """``encode()``'s ids, remembered under ``key``: a run's pairs repeat their prompt (K
        samples a prompt) and often their completions, and the tokenizer call is most of the
        collator's time. A copy is returned; the memory is bounded."""
        ids = self._memo.get(key)
        if ids is None:
            if len(self._memo) >= _MEMO_SIZE:
                self._memo.clear()
            ids = self._memo[key] = tuple(encode())
        return list(ids)

    def encode_row(self, row: Mapping[str, Any]) -> tuple[EncodedPair, EncodedPair]:
        """Encode one row into its (chosen, rejected) pairs; the prompt is tokenised once."""
        tok, prompt = self.tokenizer, row["prompt"]
        # the keys are the texts (a conversation as canonical JSON); a text completion's ids
        # do not depend on its prompt, a conversational one's do
        pkey = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)
        prompt_ids = self._encoded(("p", pkey), lambda: encode_prompt(tok, prompt))
        self.longest_prompt = max(self.longest_prompt, len(prompt_ids))
        out = []
        for key in ("chosen", "rejected"):
            completion = row[key]
            ended = not row.get(f"{key}_truncated", False)
            ckey = (
                ("c", completion, ended)
                if isinstance(completion, str) and isinstance(prompt, str)
                else ("cc", pkey, json.dumps(completion, sort_keys=True), ended)
            )
            completion_ids = self._encoded(
                ckey, lambda c=completion, e=ended: encode_completion(tok, prompt, c, ended=e)
            )
            self.longest_completion = max(self.longest_completion, len(completion_ids))
            out.append(
                _truncate(
                    prompt_ids, completion_ids, self.max_prompt_length, self.max_completion_length
                )
            )
        return out[0], out[1]

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        if not rows:
            raise ValueError("PreferenceCollator: empty batch")
        encoded = [self.encode_row(row) for row in rows]
        seqs = [pair[0] for pair in encoded] + [pair[1] for pair in encoded]
        n_prompt_cut = sum(int(c.prompt_truncated) for c, _ in encoded)
        n_completion_cut = sum(int(s.completion_truncated) for s in seqs)
        self.truncated_prompts += n_prompt_cut
        self.truncated_completions += n_completion_cut
        self.pairs_seen += len(rows)
        if self.share_prompt:
            batch = self._shared_rows(encoded)
        else:
            batch = self._separate_rows(seqs)
        b = len(rows)
        lengths = torch.tensor([len(s.completion_ids) for s in seqs], dtype=torch.long)
        batch["chosen_lengths"] = lengths[:b].clone()
        batch["rejected_lengths"] = lengths[b:].clone()
        batch["num_truncated_prompts"] = torch.tensor(n_prompt_cut, dtype=torch.long)
        batch["num_truncated_completions"] = torch.tensor(n_completion_cut, dtype=torch.long)
        if all("row_id" in row and row["row_id"] is not None for row in rows):
            batch["row_id"] = torch.tensor([int(row["row_id"]) for row in rows], dtype=torch.long)
        for name in OPTIONAL_COLUMNS:
            values = [row.get(name) for row in rows]
            if all(v is None for v in values):
                continue
            if any(v is None for v in values):
                missing = next(i for i, v in enumerate(values) if v is None)
                rid = rows[missing].get("row_id", missing)
                raise DataError(f"row {rid}: field '{name}' missing (present in other rows)")
            dtype = torch.bool if name in BOOL_COLUMNS else torch.float32
            batch[name] = torch.tensor(values, dtype=dtype)
        return batch

    def _padded_length(self, length: int) -> int:
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = -(-length // m) * m
        return length

    def _separate_rows(self, seqs: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        """``2B`` rows ``prompt + completion``: chosen rows first, then rejected rows."""
        import torch

        length = self._padded_length(max(len(s.prompt_ids) + len(s.completion_ids) for s in seqs))
        n = len(seqs)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        completion_mask = torch.zeros((n, length), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids = s.prompt_ids + s.completion_ids
            start = 0 if self.padding_side == "right" else length - len(ids)
            end = start + len(ids)
            input_ids[i, start:end] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, start:end] = 1
            completion_mask[i, start + len(s.prompt_ids) : end] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
        }

    def _shared_rows(
        self, encoded: Sequence[tuple[EncodedPair, EncodedPair]]
    ) -> dict[str, torch.Tensor]:
        """``B`` rows ``prompt + chosen + rejected`` with restarting position ids."""
        import torch

        for chosen, rejected in encoded:
            if chosen.prompt_ids != rejected.prompt_ids:  # same prompt, same truncation
                raise ValueError("share_prompt: chosen and rejected prompts differ")
            if not chosen.prompt_ids:
                raise DataError("share_prompt: a prompt tokenises to no tokens")
        sizes = [
            (len(c.prompt_ids), len(c.completion_ids), len(r.completion_ids)) for c, r in encoded
        ]
        length = self._padded_length(max(p + c + r for p, c, r in sizes))
        n = len(encoded)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        position_ids = torch.zeros((n, length), dtype=torch.long)
        chosen_mask = torch.zeros((n, length), dtype=torch.long)
        rejected_mask = torch.zeros((n, length), dtype=torch.long)
        for i, ((chosen, rejected), (p, c, r)) in enumerate(zip(encoded, sizes, strict=True)):
            ids = chosen.prompt_ids + chosen.completion_ids + rejected.completion_ids
            start = 0 if self.padding_side == "right" else length - len(ids)
            end = start + len(ids)
            input_ids[i, start:end] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, start:end] = 1
            position_ids[i, start:end] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
            chosen_mask[i, start + p : start + p + c] = 1
            rejected_mask[i, start + p + c : end] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "chosen_mask": chosen_mask,
            "rejected_mask": rejected_mask,
            "prompt_lengths": torch.tensor([p for p, _, _ in sizes], dtype=torch.long),
        }
