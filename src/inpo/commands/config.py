"""``inpo config``: discover the settings of ``inpo run`` and ``inpo train``.

    inpo config keys run                      every key of `inpo run`, its type and default
    inpo config show run [CONFIG.yaml] [k=v]  the resolved config, as `inpo run` would use it
    inpo config show train CONFIG.yaml [k=v]  the same for `inpo train`

``show`` prints YAML that ``inpo run``/``inpo train`` accept as CONFIG.yaml (secrets left out).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from pathlib import Path
from typing import Any

from inpo.config import _merge, config_to_dict, from_dict, load_config, parse_overrides, read_yaml
from inpo.config import parse_config_args as parse_args
from inpo.errors import ConfigError, InpoError

__all__ = ["key_table", "main"]

USAGE = __doc__.strip().splitlines()[0] + "\n\n" + "\n".join(__doc__.strip().splitlines()[2:])


def _config_class(kind: str) -> type:
    if kind == "run":
        from inpo.pipeline.config import RunConfig  # deferred: loads numpy, torch, yaml

        return RunConfig
    if kind == "train":
        from inpo.training.config import TrainConfig  # deferred: loads numpy, torch, yaml

        return TrainConfig
    if kind == "train-oracle":
        # deferred: loads numpy, torch, yaml
        from inpo.training.oracle_config import (
            OracleTrainConfig,
        )

        return OracleTrainConfig
    raise ConfigError(f"expected 'run', 'train' or 'train-oracle', got '{kind}'")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return " or ".join(_type_name(a) for a in args) + " or null"
    return getattr(tp, "__name__", str(tp))


def field_docs(cls: type) -> dict[str, str]:
    """Each field's ``#:`` comment (the lines just above it in the class body), joined."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in lines[1:]:
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        name = text.split(":", 1)[0]
        if pending and name.isidentifier() and ":" in text and not text.startswith("def "):
            docs[name] = " ".join(pending)
        pending = []
    return docs


def _one_line(doc: str) -> str:
    """``doc`` whole, as plain text (reST's double backquotes dropped), on one line; the table
    wraps it (:func:`key_table`)."""
    return " ".join(doc.replace("``", "").split())


def _rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) of every settable key of ``cls``, nested sections flattened
    (an optional section such as ``model.lora`` lists its keys with their defaults)."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("secret"):
            continue
        tp = hints[f.name]
        default: Any = dataclasses.MISSING
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        section = _section_class(tp, default)
        if section is not None:
            if default is None:  # optional: null turns it off; any key below turns it on
                doc = docs.get(f.name, "")
                out.append((prefix + f.name, "section or null", "null", _one_line(doc)))
            out += _rows(section, f"{prefix}{f.name}.")
            continue
        shown = "(required)" if default is dataclasses.MISSING else json.dumps(default, default=str)
        out.append((prefix + f.name, _type_name(tp), shown, _one_line(docs.get(f.name, ""))))
    return out


def _section_class(tp: Any, default: Any) -> type | None:
    """The dataclass a field holds (``X`` or ``X | None``), else ``None``."""
    if dataclasses.is_dataclass(default):
        return type(default)
    for candidate in (tp, *typing.get_args(tp)):
        if isinstance(candidate, type) and dataclasses.is_dataclass(candidate):
            return candidate
    return None


def key_table(kind: str) -> str:
    """Every key of ``inpo run``/``inpo train``'s config: ``key  type = default`` and its whole
    doc beneath, wrapped (``--help`` and ``inpo config keys`` show it)."""
    import shutil
    import textwrap

    width = max(60, min(shutil.get_terminal_size((100, 24)).columns, 120))
    lines = []
    for key, tp, default, doc in _rows(_config_class(kind)):
        lines.append(f"  {key}  {tp} = {default}")
        if doc:  # the whole doc, wrapped to the terminal (never cut)
            lines += textwrap.wrap(doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def config_help(kind: str, usage: str, description: str, examples: str) -> str:
    """The ``--help`` of ``inpo run``/``inpo train``: one style for both."""
    return (
        f"{usage}\n\n{description.strip()}\n\nexamples:\n{examples.rstrip()}\n\n"
        "Later settings win: defaults < CONFIG.yaml < key=value. The resolved config:\n"
        f"  inpo config show {kind} [CONFIG.yaml] [key=value ...]\n\n"
        f"keys (section.key=value), type = default:\n{key_table(kind)}"
    )


def main(argv: list[str]) -> int:
    import yaml

    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    action, rest = argv[0], argv[1:]
    if action not in ("keys", "show") or not rest:
        raise ConfigError("usage: inpo config keys run|train  |  inpo config show run|train ...")
    kind, rest = rest[0], rest[1:]
    cls = _config_class(kind)
    if action == "keys":
        print(f"keys of `inpo {kind}` (dotted: section.key=value):")
        print(key_table(kind))
        return 0
    if kind == "run":
        from inpo.pipeline.preflight import load_run_config  # deferred: loads numpy, torch, yaml

        path, overrides = parse_args(rest)
        cfg = load_run_config(path, overrides)
        note = ""
    else:
        path = next((Path(a) for a in rest if a.endswith((".yaml", ".yml"))), None)
        overrides = [a for a in rest if "=" in a]
        try:
            cfg = load_config(cls, path, overrides)
            note = ""
        except InpoError as err:  # show what is set, and say what is still missing
            data = _merge(read_yaml(path) if path else {}, parse_overrides(overrides))
            cfg = from_dict(cls, data)
            note = f"# not yet valid: {err}\n"
    sys.stdout.write(note + yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return 0
