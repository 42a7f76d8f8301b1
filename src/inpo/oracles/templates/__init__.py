"""Versioned LLM-judge prompt templates, shared by the HTTP judge client and the oracle server.

A template is a ``.txt`` file in this folder (``judge_v1.txt``, ...) or any path given by the
user. It has a ``### system`` and a ``### user`` section; lines before the first section are a
comment. Four placeholders are substituted, in ONE pass (so data that happens to contain
``{boundary}`` is never substituted again):

- ``{prompt}``, ``{response_a}``, ``{response_b}``: the data under judgement, verbatim;
- ``{boundary}``: a random 128-bit hex code drawn per request and checked to occur in none of the
  three texts, so only markers carrying it delimit the data.

Injection defence: the data is copied verbatim between markers that carry the boundary. A
response cannot close its block early without knowing the code (drawn after the response was
written), and the instructions say that block contents are data. Since no escaping is needed,
:meth:`JudgeTemplate.parse` recovers the three texts *exactly* from a rendered request (what the
server relies on), in one linear scan: the text after each data block begins with a marker
carrying the boundary, which the data cannot contain, so its first occurrence ends the block.
(No regular expression runs on request data: lazy groups with a back-referenced boundary
backtrack cubically on a crafted request.)

:attr:`JudgeTemplate.template_id` is ``name#sha256[:12]`` of the file's text: editing a template
changes the id, hence the oracle id and every cache key built from it.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from inpo.errors import ConfigError

__all__ = [
    "VERDICT_A",
    "VERDICT_B",
    "JudgeTemplate",
    "TemplateMismatchError",
    "available_templates",
    "load_template",
]

VERDICT_A = "A"
VERDICT_B = "B"
_DATA_FIELDS = ("prompt", "response_a", "response_b")
_PLACEHOLDER = re.compile(r"\{(prompt|response_a|response_b|boundary)\}")
_ANY_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_SECTIONS = ("system", "user")


class TemplateMismatchError(ValueError):
    """A chat request that does not follow the judge template (raised by ``parse``)."""


def available_templates() -> list[str]:
    """Names of the templates shipped with inpo (``judge_v1``, ...)."""
    folder = resources.files(__name__)
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def _split_sections(text: str, source: str) -> dict[str, str]:
    sections: dict[str, list[str]] = {}
    current: str | None = None
    for line in text.split("\n"):
        if line.startswith("### "):
            name = line[4:].strip()
            if name not in _SECTIONS:
                raise ConfigError(f"judge template {source}: unknown section '### {name}'")
            if name in sections:
                raise ConfigError(f"judge template {source}: section '### {name}' appears twice")
            sections[name] = []
            current = name
        elif current is not None:
            sections[current].append(line)
    if "user" not in sections:
        raise ConfigError(f"judge template {source}: no '### user' section")
    return {name: "\n".join(lines).strip("\n") for name, lines in sections.items()}


def _check_placeholders(sections: dict[str, str], source: str) -> None:
    for name, body in sections.items():
        for match in _ANY_PLACEHOLDER.finditer(body):
            if not _PLACEHOLDER.fullmatch(match.group(0)):
                close = difflib.get_close_matches(match.group(1), [*_DATA_FIELDS, "boundary"], n=1)
                hint = f"; did you mean '{{{close[0]}}}'?" if close else ""
                raise ConfigError(
                    f"judge template {source}, section {name}: unknown placeholder "
                    f"'{match.group(0)}'{hint}"
                )
    if any(f"{{{f}}}" in sections.get("system", "") for f in _DATA_FIELDS):
        raise ConfigError(f"judge template {source}: data placeholders belong in '### user'")
    user = sections["user"]
    for f in _DATA_FIELDS:
        if user.count(f"{{{f}}}") != 1:
            raise ConfigError(f"judge template {source}: '{{{f}}}' must appear exactly once")
    # Every data block must be *closed* by text carrying the boundary, or parsing is ambiguous.
    pieces = re.split(r"\{(?:prompt|response_a|response_b)\}", user)
    for i, piece in enumerate(pieces[1:], start=1):
        if "{boundary}" not in piece:
            raise ConfigError(
                f"judge template {source}: the text after data placeholder #{i} must contain a "
                "closing marker with '{boundary}'"
            )


@dataclass(frozen=True)
class JudgeTemplate:
    """A parsed judge template: render a comparison as chat messages, or parse one back."""

    name: str
    text: str
    system: str | None
    user: str
    _patterns: dict[str, list[tuple[str, str]]] = field(
        repr=False, compare=False, default_factory=dict
    )

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    @property
    def template_id(self) -> str:
        """``name#sha12``: part of the oracle id, so cache keys change with the template."""
        return f"{self.name}#{self.sha}"

    @classmethod
    def from_text(cls, name: str, text: str, *, source: str | None = None) -> JudgeTemplate:
        source = source or name
        sections = _split_sections(text, source)
        _check_placeholders(sections, source)
        tmpl = cls(name=name, text=text, system=sections.get("system"), user=sections["user"])
        for section in ("system", "user"):
            body = getattr(tmpl, section)
            if body is not None:
                tmpl._patterns[section] = _compile(body)
        return tmpl

    # ---- rendering (client side) ----
    def render(
        self, prompt: str, response_a: str, response_b: str, *, boundary: str | None = None
    ) -> list[dict[str, str]]:
        """Chat messages ``[system?, user]`` comparing ``response_a`` (A) with ``response_b`` (B).

        ``boundary`` defaults to a fresh random code that occurs in none of the three texts.
        """
        texts = (prompt, response_a, response_b)
        if boundary is None:
            boundary = _new_boundary(texts)
        elif any(boundary in t for t in texts):
            raise ValueError("the boundary code occurs inside the data; pick another")
        values = {"prompt": prompt, "response_a": response_a, "response_b": response_b}
        values["boundary"] = boundary

        def fill(body: str) -> str:
            return _PLACEHOLDER.sub(lambda m: values[m.group(1)], body)

        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": fill(self.system)})
        messages.append({"role": "user", "content": fill(self.user)})
        return messages

    # ---- parsing (server side) ----
    def parse(self, messages: Sequence[dict]) -> tuple[str, str, str]:
        """Recover ``(prompt, response_a, response_b)`` exactly from rendered ``messages``.

        Raises :class:`TemplateMismatchError` when the messages do not follow this template.
        """
        roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
        expected = ["system", "user"] if self.system is not None else ["user"]
        if roles != expected:
            raise TemplateMismatchError(
                f"expected messages with roles {expected} (template {self.template_id}), "
                f"got {roles}"
            )
        found: dict[str, str] = {}
        for message, role in zip(messages, expected):
            content = message.get("content")
            if not isinstance(content, str):
                raise TemplateMismatchError(f"the {role} message's content is not a string")
            values = _match(self._patterns[role], content, found.get("boundary"))
            if values is None:
                raise TemplateMismatchError(
                    f"the {role} message does not follow judge template {self.template_id}"
                )
            for key, value in values.items():
                if key in found and found[key] != value:
                    raise TemplateMismatchError(f"inconsistent '{key}' across messages")
                found[key] = value
        if any(found["boundary"] in found[k] for k in _DATA_FIELDS):
            raise TemplateMismatchError("the boundary code occurs inside the data")
        return found["prompt"], found["response_a"], found["response_b"]


_HEX = frozenset("0123456789abcdef")


def _compile(body: str) -> list[tuple[str, str]]:
    """The template body as tokens: ``("lit", text)``, ``("boundary", "")``, ``("field", name)``."""
    tokens: list[tuple[str, str]] = []
    pos = 0
    for match in _PLACEHOLDER.finditer(body):
        if match.start() > pos:
            tokens.append(("lit", body[pos : match.start()]))
        name = match.group(1)
        tokens.append(("boundary", "") if name == "boundary" else ("field", name))
        pos = match.end()
    if pos < len(body):
        tokens.append(("lit", body[pos:]))
    return tokens


def _match(
    tokens: list[tuple[str, str]], content: str, boundary: str | None
) -> dict[str, str] | None:
    """The values of ``tokens``' placeholders in ``content`` (all of it), or ``None``.

    One left-to-right scan. A data field ends at the first occurrence of the literal text that
    follows it in the template, boundary substituted (the template check guarantees it holds
    the boundary, which the data cannot contain): the exact split of a rendered message.
    """
    values: dict[str, str] = {}
    pos = 0
    for k, (kind, text) in enumerate(tokens):
        if kind == "lit":
            if not content.startswith(text, pos):
                return None
            pos += len(text)
        elif kind == "boundary":
            if boundary is None:
                code = content[pos : pos + 32]
                if len(code) != 32 or not set(code) <= _HEX:
                    return None
                boundary = values["boundary"] = code
            elif not content.startswith(boundary, pos):
                return None
            else:
                values["boundary"] = boundary
            pos += 32
        else:
            if boundary is None:
                return None  # a data block before any boundary: not one of our templates
            tail = []
            for kind2, text2 in tokens[k + 1 :]:
                if kind2 == "field":
                    break
                tail.append(boundary if kind2 == "boundary" else text2)
            end_marker = "".join(tail)
            end = content.find(end_marker, pos) if end_marker else len(content)
            if end < 0:
                return None
            values[text] = content[pos:end]
            pos = end
    return values if pos == len(content) else None


def _new_boundary(texts: Sequence[str]) -> str:
    while True:
        boundary = secrets.token_hex(16)
        if not any(boundary in t for t in texts):
            return boundary


def load_template(name_or_path: str | Path) -> JudgeTemplate:
    """A shipped template by name (``"judge_v1"``) or a ``.txt`` file by path."""
    text_name = str(name_or_path)
    path = Path(text_name)
    if text_name.endswith(".txt") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"judge template file '{path}' does not exist")
        return JudgeTemplate.from_text(path.stem, path.read_text(), source=str(path))
    names = available_templates()
    if text_name not in names:
        close = difflib.get_close_matches(text_name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown judge template '{text_name}'{hint} (shipped: {', '.join(names)}; "
            "or give a path to a .txt file)"
        )
    text = resources.files(__name__).joinpath(f"{text_name}.txt").read_text()
    return JudgeTemplate.from_text(text_name, text)
