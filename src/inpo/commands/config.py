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

__all__ = ["key_table", "main"]

USAGE = __doc__.strip().splitlines()[0] + "\n\n" + "\n".join(__doc__.strip().splitlines()[2:])


def _config_class(kind: str) -> type:
    from inpo.errors import ConfigError

    if kind == "run":
        from inpo.pipeline.config import RunConfig

        return RunConfig
    if kind == "train":
        from inpo.training.config import TrainConfig

        return TrainConfig
    raise ConfigError(f"inpo config: expected 'run' or 'train', got '{kind}'")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return " or ".join(_type_name(a) for a in args) + " or null"
    return getattr(tp, "__name__", str(tp))


def _rows(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    hints = typing.get_type_hints(cls)
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
        if dataclasses.is_dataclass(default) or (
            isinstance(tp, type) and dataclasses.is_dataclass(tp)
        ):
            out += _rows(
                type(default) if default is not dataclasses.MISSING else tp, f"{prefix}{f.name}."
            )
            continue
        shown = "(required)" if default is dataclasses.MISSING else json.dumps(default, default=str)
        out.append((prefix + f.name, _type_name(tp), shown))
    return out


def key_table(kind: str) -> str:
    """Every key of ``inpo run``/``inpo train``'s config: type and default (``--help`` shows it)."""
    rows = _rows(_config_class(kind))
    w1 = max(len(r[0]) for r in rows)
    w2 = min(40, max(len(r[1]) for r in rows))
    return "\n".join(f"  {k:{w1}}  {t:{w2}}  {d}" for k, t, d in rows)


def main(argv: list[str]) -> int:
    import yaml

    from inpo.config import (
        _merge,
        config_to_dict,
        from_dict,
        load_config,
        parse_overrides,
        read_yaml,
    )
    from inpo.errors import ConfigError, InpoError

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
        from inpo.commands.run import load_run_config, parse_args

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
