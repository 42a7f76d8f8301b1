"""Typed configuration: nested dataclasses filled from YAML plus dotted ``key=value`` overrides.

Every stage's config is a dataclass. :func:`load_config` reads a YAML file (optional), applies
overrides such as ``train.optim.learning_rate=1e-6``, rejects unknown keys with a "did you mean",
checks each value against the field's type, and then calls each dataclass's ``validate()``
(if it has one) — all before any model is loaded. :func:`config_hash` gives the stable hash that
resumable stages compare; :func:`save_config` writes the resolved config (fields marked
``metadata={"secret": True}`` are never written).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from inpo.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "config_hash",
    "config_to_dict",
    "flat_config",
    "from_dict",
    "load_config",
    "parse_config_args",
    "parse_overrides",
    "save_config",
    "validate_config",
]


def parse_config_args(argv: list[str]) -> tuple[Path | None, list[str]]:
    """A command line of ``[CONFIG.yaml | --config CONFIG.yaml] [key=value ...]`` as the config
    file (or ``None``) and the overrides; anything else is a :class:`ConfigError`."""
    path = None
    overrides = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--config", "-c"):  # as TRL and torchtune users type it
            if not args:
                raise ConfigError(f"{arg} needs a CONFIG.yaml after it")
            arg = args.pop(0)
            if path is not None:
                raise ConfigError("two config files given; pass one (and key=value overrides)")
            path = Path(arg)
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        elif "=" in arg:
            overrides.append(arg)
        elif path is None and arg.endswith((".yaml", ".yml")):
            path = Path(arg)
        else:
            raise ConfigError(f"unexpected argument '{arg}' (expected CONFIG.yaml or key=value)")
    return path, overrides


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"override '{item}' conflicts with an earlier override of '{part}'"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _yaml_name(value: Any) -> str:
    """A literal as YAML (and a ``key=value`` override) spells it."""
    if value is None:
        return "null"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _coerce(value: Any, tp: Any, key: str, source: str = "") -> Any:
    """Check ``value`` against type ``tp`` (converting int→float, str→Path); raise naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"'{key}' must be {_type_name(tp)}, got {_shown(value)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            names = [_yaml_name(a) for a in allowed]  # true/false/null, as a user writes them
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"'{key}' must be one of {', '.join(names)}; got {_shown(value)}{hint}"
            )
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"'{key}' must be a list, got {_shown(value)}")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}' must be a mapping, got {_shown(value)}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(
                f"'{key}' must be a mapping of {tp.__name__} fields, got {_shown(value)}"
            )
        return from_dict(tp, value, prefix=f"{key}.", source=source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"'{key}' must be true or false, got {_shown(value)}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' must be a number, got {_shown(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"'{key}' must be an integer, got {_shown(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"'{key}' must be a string, got {_shown(value)}")
    if tp is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"'{key}' must be a path, got {_shown(value)}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, prefix: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping at '{prefix or 'top level'}'")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    where = f" in {source}" if source else ""
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"config key {key!r}{where} at '{prefix or 'top level'}' is not a name"
            )
        if key not in fields:
            moved = getattr(cls, "MOVED", {}).get(key)
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            if moved:
                hint = f"; it is '{prefix}{moved}' now"
            raise ConfigError(f"unknown config key '{prefix}{key}'{where}{hint}")
        try:
            kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
        except ConfigError as err:  # a wrong type: say which file (or the overrides) set it
            if prefix or not source or f" in {source}" in str(err):
                raise
            raise ConfigError(f"{err} (in {source})") from None
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{prefix or 'config'}{where}: {err}") from err


def _validate(obj: Any, prefix: str = "") -> None:
    if not dataclasses.is_dataclass(obj):
        return
    tree = getattr(obj, "validate_tree", None)
    if callable(tree):  # a section that validates its own fields (as another config's)
        tree()
        return
    for f in dataclasses.fields(obj):
        _validate(getattr(obj, f.name), f"{prefix}{f.name}.")
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            raise ConfigError(f"{err}") from err
        except ValueError as err:
            raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


def validate_config(cfg: Any) -> None:
    """Run every nested dataclass's ``validate()`` (for configs built in code, not loaded)."""
    _validate(cfg)


#: A config file's size limit: configs are a few KiB; a larger file is refused before parsing
#: (a file of 300,000 keys took PyYAML over 30 s to read before its first key was checked).
MAX_CONFIG_BYTES = 1 << 20
#: Alias references (``*name``) a config file may hold: a few are handy, thousands are an
#: alias bomb (each level multiplying the one below).
MAX_ALIASES = 64


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses more than :data:`MAX_ALIASES` alias references."""

    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(
                    f"more than {MAX_ALIASES} alias references (*name) at line {mark.line + 1}: "
                    "an alias bomb, or a config to write out plainly"
                )
        return super().compose_node(parent, index)


def _shown(value: Any) -> str:
    """A value as an error message shows it: ``repr``, bounded in depth, items and length
    (a message never formats an unbounded value)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother = 2, 6, 6, 80, 80
    return r.repr(value)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file's top-level mapping; every problem a one-line :class:`ConfigError`
    naming the file (and line). ``safe_load``: a Python tag is refused, nothing executes; the
    file's size and its alias references are bounded (:data:`MAX_CONFIG_BYTES`,
    :data:`MAX_ALIASES`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"config file '{path}' is {size:,} bytes; a config is at most "
            f"{MAX_CONFIG_BYTES:,} (is this the right file?)"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config file '{path}' cannot be read: {err.strerror}") from None
    try:
        loaded = yaml.load(text, Loader=_BoundedLoader) or {}  # a SafeLoader: no Python tags
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file '{path}'{where}: not valid YAML ({problem})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level")
    return loaded


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    base: dict[str, Any] | None = None,
) -> T:
    """Load ``cls`` from ``base`` (defaults), then YAML ``path``, then ``overrides``; validate."""
    data: dict[str, Any] = dict(base or {})
    source = ""
    if path is not None:
        path = Path(path)
        source = str(path)
        data = _merge(data, read_yaml(path))
    if overrides:
        data = _merge(data, parse_overrides(overrides))
        source = f"{source} + overrides" if source else "overrides"
    cfg = from_dict(cls, data, source=source)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Any, *, include_secrets: bool = False) -> Any:
    """A JSON-ready dict of a (nested) dataclass; secret fields dropped unless asked."""
    if dataclasses.is_dataclass(cfg):
        out = {}
        for f in dataclasses.fields(cfg):
            if f.metadata.get("secret") and not include_secrets:
                continue
            out[f.name] = config_to_dict(getattr(cfg, f.name), include_secrets=include_secrets)
        return out
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v, include_secrets=include_secrets) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): config_to_dict(v, include_secrets=include_secrets) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"dotted.key": value}``, values as trackers take them (numbers,
    strings and booleans as they are, anything else as its ``str``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, int | float | str | bool) else str(v)
    return out


def config_hash(obj: Any) -> str:
    """Stable SHA-256 (hex, 16 chars) of a config or any JSON-able object."""
    payload = json.dumps(config_to_dict(obj), sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def with_absolute_paths(cfg: T, keys: tuple[str, ...]) -> T:
    """A copy of ``cfg`` whose dotted ``keys`` naming an existing local file or folder, and its
    ``output_dir``, are absolute: a config saved from it (the model cards' reproduce command)
    means the same from any folder. Hub ids and empty values are left as they are."""
    import copy

    out = copy.deepcopy(cfg)
    for key in keys:
        *sections, name = key.split(".")
        holder = out
        for section in sections:
            holder = getattr(holder, section)
        value = getattr(holder, name)
        if value and Path(value).exists():
            setattr(holder, name, str(Path(value).resolve()))
    out.output_dir = str(Path(out.output_dir).resolve())
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (no secrets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
