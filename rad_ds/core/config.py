"""Typed configs for every stage: a dataclass tree of simple types, loaded from YAML/JSON, overridden with
dotted names (``--train.steps=200``, ``--num-prompts 4``), documented from field help, validated up front.

A stage config is a ``@dataclass`` subclassing ``Config``; nested dataclass fields are sections. Every
field holds a simple type (str, int, float, bool, a list of those, a ``dict[str, str]``, or None) so the
tree round-trips through JSON. ``setting(default, help)`` declares a field with its ``--help`` text.
Errors are ``ConfigError`` (a ValueError: launchers print it as one line) naming the file or flag, the
setting, what was found and what to do. A renamed setting stays readable under its old name for one release:
``RENAMED`` maps the old dotted name to the new one, with a deprecation warning naming both (a stage config
nested in another, such as the pipeline's ``distill``, keeps its renames there too).

A section may name a primary field (``PRIMARY = "path"`` on its class): setting the section itself to a value
sets that field, from the command line, a file or the constructor, so ``--model DIR``, ``model: DIR`` and
``DiagnoseConfig(model=DIR)`` all set ``model.path``, and ``--wandb`` / ``--no-wandb`` set ``wandb.enabled``.
``section(cls, **defaults)`` declares a section whose defaults (and help texts) differ per stage.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import types
import typing
import warnings
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from .io import write_json_atomic
from .layers import parse_int_list

REPO_ROOT = Path(__file__).resolve().parents[2]
logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config that cannot run; the message names the field (or file) and what to do."""


def setting(default, help: str, **kw):
    """A dataclass field with a default and the help text that ``--help`` shows."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def section(cls, help: dict[str, str] | None = None, **defaults):
    """A section field of type ``cls`` with this stage's ``defaults`` and, in ``help``, this stage's help texts of
    some of its settings (``section(ModelRef, path="embedded:smollm2", help={"path": "the teacher"})``)."""
    return field(default_factory=lambda: cls(**defaults), metadata={"help_fields": dict(help or {})})


class Config:
    """Mixin of a dataclass config tree: (de)serialisation, access by dotted name, overrides, help."""

    # old dotted name -> new dotted name: a file or command line that still uses the old name sets the new
    # setting, with a warning (kept for one release, then the entry goes)
    RENAMED: ClassVar[dict[str, str]] = {}

    def __post_init__(self):
        """A value given for a section with a primary field sets that field (``DiagnoseConfig(model="m")``)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default_factory is dataclasses.MISSING or dataclasses.is_dataclass(value):
                continue
            default = f.default_factory()
            primary = getattr(type(default), "PRIMARY", None)
            if dataclasses.is_dataclass(default) and primary:
                setattr(default, primary, value)
                setattr(self, f.name, default)

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config", base=None):
        """``data`` (nested sections or dotted keys) applied over ``base`` (default: the defaults)."""
        cfg = base if base is not None else cls()
        for key, value in flatten(cls, data).items():
            cfg.set(key, value, source=source)
        return cfg

    @classmethod
    def load(cls, path: str | Path, what: str = "--config"):
        return cls.from_dict(load_file(resolve_shipped(path), what=what), source=str(path))

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_dict())

    # -- access by dotted name -------------------------------------------------------------------
    def set(self, key: str, value: Any, source: str = "override") -> None:
        """Set ``a.b`` to ``value`` (a string from the command line is parsed by the field's type)."""
        key = _primary_key(self, self.current_name(key, source))
        obj, name, tp = _resolve(self, key, source)
        setattr(obj, name, coerce(value, tp, f"{source}: {key}"))

    def get(self, key: str) -> Any:
        """The setting (or the section) at ``a.b``."""
        obj = _node(self, key)
        if obj is _MISSING:
            _resolve(self, key, "config")  # raises, naming the unknown setting and the close ones
        return obj

    def apply_overrides(self, overrides: list[str], source: str = "command line"):
        """``["--train.steps=10", "--loss.kd", "jsd", "--num-prompts", "4"]`` -> set each; unknown names fail."""
        for key, value in parse_overrides(overrides):
            self.set(*_negated(self, key, value), source=source)
        return self

    @classmethod
    def current_name(cls, key: str, source: str = "config") -> str:
        """``key``, or the name it was renamed to (``RENAMED``), warning that the old name is deprecated."""
        new = _renamed(cls, key)
        if new is None:
            return key
        msg = f"{source}: {key} is deprecated and will be removed in the next release; it sets {new}, write that"
        warnings.warn(msg, DeprecationWarning, stacklevel=3)
        logger.warning(msg)  # DeprecationWarning is hidden outside __main__; a command-line user sees this line
        return new

    @classmethod
    def keys(cls) -> list[str]:
        return [k for k, _, _ in cls.field_help()]

    @classmethod
    def field_help(cls) -> list[tuple[str, str, Any]]:
        """(dotted name, help, default) of every setting, for ``--help``."""
        rows = []

        def walk(obj, prefix, helps):
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if dataclasses.is_dataclass(v):
                    walk(v, f"{prefix}{f.name}.", f.metadata.get("help_fields", {}))
                else:
                    rows.append((f"{prefix}{f.name}", helps.get(f.name) or f.metadata.get("help", ""), v))

        walk(cls(), "", {})
        return rows

    @classmethod
    def primaries(cls) -> dict[str, str]:
        """dotted name of each primary field -> its section's name (``{"model.path": "model"}``)."""
        out = {}

        def walk(obj, prefix):
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if dataclasses.is_dataclass(v):
                    if getattr(type(v), "PRIMARY", None):
                        out[f"{prefix}{f.name}.{type(v).PRIMARY}"] = f"{prefix}{f.name}"
                    walk(v, f"{prefix}{f.name}.")

        walk(cls(), "")
        return out

    def validate(self):
        """Fail early, naming the field and the fix, on anything that cannot run (subclasses add checks)."""
        return self


# -- files ---------------------------------------------------------------------------------------


def resolve_shipped(path: str | Path) -> Path:
    """A path as given, or else relative to the rad-ds checkout (``ds_configs/...``, ``configs/...``), so
    the shipped configs are found from any working directory."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def load_file(path: str | Path, what: str = "--config", hint: str = "") -> dict:
    """A YAML or JSON file holding a mapping -> dict, with a one-line error naming ``what`` and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p}: file not found{hint}")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text)
    except Exception as e:  # noqa: BLE001 - json / yaml parse errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what} {p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'} ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {p}: the top level must be a mapping, got {type(data).__name__}")
    return data


# -- dotted names --------------------------------------------------------------------------------


def flatten(root: type, data: dict, prefix: str = "") -> dict:
    """Nested sections -> dotted keys (a mapping under a value field, e.g. ``dict[str, str]``, stays)."""
    out = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and _is_section(root, key):
            out.update(flatten(root, v, key + "."))
        else:
            out[key] = v
    return out


def _is_section(root: type, key: str) -> bool:
    obj: Any = root
    for part in key.split("."):
        hints = typing.get_type_hints(obj) if isinstance(obj, type) else {}
        if part not in hints:
            return False
        obj = hints[part]
    return dataclasses.is_dataclass(obj)


def _renamed(cls: type, key: str) -> str | None:
    """The new name of ``key`` in ``cls.RENAMED``, or in that of a stage config nested in ``cls``."""
    if key in cls.RENAMED:
        return cls.RENAMED[key]
    head, _, rest = key.partition(".")
    sub = typing.get_type_hints(cls).get(head) if rest else None
    if isinstance(sub, type) and issubclass(sub, Config):
        new = _renamed(sub, rest)
        return None if new is None else f"{head}.{new}"
    return None


_MISSING = object()


def _node(cfg, key: str):
    """The value or section at dotted ``key`` of a config tree, or ``_MISSING`` where ``key`` names nothing."""
    obj = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return _MISSING
        obj = getattr(obj, part)
    return obj


def _primary_key(cfg, key: str) -> str:
    """``key``, or ``key.<primary>`` when ``key`` names a section with a primary field (``model`` -> ``model.path``)."""
    obj = _node(cfg, key)
    primary = getattr(type(obj), "PRIMARY", None) if dataclasses.is_dataclass(obj) else None
    return f"{key}.{primary}" if primary else key


def _negated(cfg, key: str, value: str) -> tuple[str, str]:
    """``--no-x`` / ``--a.no-x`` (a flag) -> ``(x, "false")`` when ``x`` is a true/false setting or a section whose
    primary field is one (``--no-wandb``, ``--distill.no-wandb``); any other key as it is."""
    head, dot, tail = key.rpartition(".")
    if not tail.startswith("no_") or value != "true":
        return key, value
    try:
        _resolve(cfg, key, "")
        return key, value  # a setting of that name
    except ConfigError:
        pass
    base = _primary_key(cfg, head + dot + tail[3:])
    try:
        _, _, tp = _resolve(cfg, base, "")
    except ConfigError:
        return key, value
    return (base, "false") if tp is bool else (key, value)


def _resolve(cfg, key: str, source: str):
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            path = ".".join(parts[:i])
            known = [f"{path}.{n}" if path else n for n in names]
            close = difflib.get_close_matches(part, names, n=1)  # among the names at this level
            hint = f"; did you mean {known[names.index(close[0])]}?" if close else f"; known: {', '.join(known)}"
            raise ConfigError(f"{source}: unknown setting {key!r}{hint}")
        if i == len(parts) - 1:
            value = getattr(obj, part)
            if dataclasses.is_dataclass(value):
                first = dataclasses.fields(value)[0].name
                raise ConfigError(f"{source}: {key!r} is a section; set one of its fields, e.g. {key}.{first}")
            return obj, part, typing.get_type_hints(type(obj))[part]
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{source}: {'.'.join(parts[:i + 1])!r} is a value, not a section")
    raise ConfigError(f"{source}: empty setting name")


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``--a.b=v``, ``--a.b v`` and ``--a.b`` (a flag = true) -> [(key, value), ...]; dashes in names are
    underscores (``--num-prompts`` = ``num_prompts``)."""
    out = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) < 3:
            raise ConfigError(f"command line: unexpected argument {a!r}; settings look like --train.steps=100")
        body = a[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, value = body, args[i + 1]
            i += 2
        else:
            key, value = body, "true"
            i += 1
        out.append((key.replace("-", "_"), value))
    return out


# -- values --------------------------------------------------------------------------------------

_NONE = {"none", "null", "~", ""}


def coerce(value: Any, tp, where: str):
    """Parse ``value`` (from YAML/JSON or a command-line string) as type ``tp``; one-line error."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        return coerce(value, inner[0], where)
    if value is None:
        raise ConfigError(f"{where}: must not be empty (null); give a {getattr(tp, '__name__', tp)}")
    if origin is list:
        return _coerce_list(value, args[0] if args else str, where)
    if origin is dict:
        return _coerce_mapping(value, where)
    if tp is bool:
        return _coerce_bool(value, where)
    if tp in (int, float):
        return _coerce_number(value, tp, where)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported type {tp}")  # pragma: no cover


def _coerce_list(value, elem, where: str) -> list:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = yaml.safe_load(text)
        elif elem is int:
            try:
                return parse_int_list(text, where, ValueError)
            except ValueError:
                raise ConfigError(f"{where}: {value!r} is not a list of integers (e.g. 3,7 or 4-6)") from None
        else:
            value = [v for v in text.split(",") if v.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    return [coerce(v, elem, where) for v in value]


def _coerce_mapping(value, where: str) -> dict:
    """A mapping, or ``KEY=VALUE`` strings (a list of them, or comma-separated)."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    out = {}
    for item in items:
        if isinstance(item, dict):
            out.update({str(k): str(v) for k, v in item.items()})
            continue
        key, sep, val = str(item).partition("=")
        if not sep or not key.strip() or not val.strip():
            raise ConfigError(f"{where}: {item!r} is not KEY=VALUE")
        out[key.strip()] = val.strip()
    return out


def _coerce_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{where}: expected true or false, got {value!r}")


def _coerce_number(value, tp, where: str):
    kind = "an integer" if tp is int else "a number"
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected {kind}, got {value!r}")
    try:
        f = float(value)
        if tp is int and f != int(f):
            raise ValueError
        return int(f) if tp is int else f
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None


def choice(key: str, value, choices) -> None:
    """Raise a ConfigError naming ``key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"{key} = {value!r}: use one of {', '.join(map(str, choices))}")


def at_least(cfg: Config, keys: tuple[str, ...], low, optional: bool = False) -> None:
    """Each ``key`` of ``cfg`` must be >= ``low`` (``optional``: or None)."""
    for key in keys:
        v = cfg.get(key)
        if v is None and optional:
            continue
        if v is None or v < low:
            raise ConfigError(f"{key} = {v} must be >= {low}" + (" (or unset)" if optional else ""))


__all__ = [
    "Config", "ConfigError", "at_least", "choice", "coerce", "flatten", "load_file", "parse_overrides",
    "resolve_shipped", "section", "setting",
]
