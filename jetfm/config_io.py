"""Reading a jetfm config: YAML files, `key.sub=value` overrides, config names, key listings.

    cfg = load_config("configs/joint.yaml", ["optim.lr=3e-4", "train.max_steps=2000"])

jetfm/config.py holds what a config *is* (the dataclasses, a docstring under every field, and the
typed conversion they check values with); this module holds how one is *read*: the YAML loader
(`1e-3` is a float here, unlike in plain YAML 1.1), override parsing and applying against the
schema, `--config joint` resolved to configs/joint.yaml, `load_config`, and the flattened and
documented key listings (`train.py --keys`, MLflow params). It imports jetfm.config, never the
other way round, so the dataclasses stay readable on their own.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jetfm.config import (
    STAGES,
    Config,
    ConfigError,
    _build,
    _hints,
    _plain,
    _suggest,
    _type_name,
    config_to_dict,
)


# --------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` / `5e4` as floats (YAML 1.1 wants a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """An override value as YAML (`3` int, `3.0`/`1e-3` float, `true`, `null`, `[a, b]`, else string)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of config sections, got {type(data).__name__}")
    return data



def _is_dict_type(tp) -> bool:
    return tp is dict or typing.get_origin(tp) is dict



# --------------------------------------------------------------------------- overrides
def _default_of(cls, name: str):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        value = f.default
    return config_to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)


def apply_override(data: dict, override: str) -> None:
    """Set `a.b.c=value` in the raw config mapping `data`, checking the path against the schema."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    dotted, _, text = override.partition("=")
    dotted = dotted.strip()
    parts = dotted.split(".")
    if not dotted or any(not p for p in parts):
        raise ConfigError(f"override {override!r}: empty key")
    value = parse_value(text)
    cls: Any = Config
    node = data
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i])
        prefix = prefix + "." if prefix else ""
        last = i == len(parts) - 1
        if dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise ConfigError(f"unknown key '{prefix}{part}'{_suggest(prefix + part, names, prefix)} (in override {override!r})")
            child_tp = _hints(cls)[part]
            if last:
                node[part] = value
                return
            if not isinstance(node.get(part), dict):
                # a dict-typed field starts from its default, so `data.features.part_pt.subtract=2`
                # edits the default features instead of replacing them with one entry
                node[part] = {} if dataclasses.is_dataclass(child_tp) else (_default_of(cls, part) or {})
                if not isinstance(node[part], dict):
                    raise ConfigError(f"'{prefix}{part}' is a {_type_name(child_tp)}, not a section: cannot set '{dotted}'")
            node, cls = node[part], _strip_optional(child_tp)
        elif _is_dict_type(cls):
            if last:
                node[part] = value
                return
            args = typing.get_args(cls)
            value_tp = _strip_optional(args[1]) if args else Any
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node, cls = node[part], value_tp
        elif cls is Any:
            if last:
                node[part] = value
                return
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        else:
            raise ConfigError(f"'{prefix.rstrip('.')}' is a {_type_name(cls)}, not a section: cannot set '{dotted}'")


def _strip_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


# --------------------------------------------------------------------------- public API
def config_from_dict(data: dict) -> Config:
    """Build a Config from a plain mapping (as read from YAML), strictly checked."""
    return _build(Config, data)


#: The repository's experiment configs: `--config joint.yaml` means configs/joint.yaml.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """The config file a user means: `path` as given, else configs/<path> (".yaml" optional).

    A missing file's error lists the configs that exist, so `--config joint` or a typo is one
    look away from the right name.
    """
    path = Path(path)
    candidates = [path, path.with_name(path.name + ".yaml")]
    if not path.is_absolute():
        candidates += [CONFIG_DIR / c for c in candidates[:2]]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml")
                   if "accelerate" not in p.parts) if CONFIG_DIR.is_dir() else []
    listing = f"; configs in {CONFIG_DIR}: {', '.join(known)}" if known else ""
    raise ConfigError(f"{path}: config file not found (nor in {CONFIG_DIR}){listing}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Config from a YAML file (or defaults when path is None) plus `key.sub=value` overrides."""
    path = resolve_config_path(path) if path is not None else None
    data = load_yaml(path) if path is not None else {}
    if path is not None and "stage" not in data and not any(o.split("=", 1)[0].strip() == "stage" for o in overrides):
        raise ConfigError(f"{path}: missing key 'stage' (one of {', '.join(STAGES)})")
    for override in overrides:
        apply_override(data, override)
    try:
        return config_from_dict(data)
    except ConfigError as error:
        # blame the override when the bad value came from the command line, not the file
        blamed = [o for o in overrides if re.match(re.escape(o.split("=", 1)[0].strip()) + r"[: ]", str(error))]
        where = f"override {blamed[-1]!r}: " if blamed else f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{error}") from None


# --------------------------------------------------------------------------- flattening and key documentation
def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3} (lists stay values)."""
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def field_docs(cls) -> dict[str, str]:
    """Field name -> the docstring written under it (from the source)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_keys(cls=Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, docstring) for every key: what `train.py --keys` prints."""
    rows = []
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_keys(tp, f"{prefix}{f.name}."))
            continue
        if f.default_factory is not dataclasses.MISSING:
            default = _plain(f.default_factory())
        elif f.default is not dataclasses.MISSING:
            default = _plain(f.default)
        else:
            default = "(required)"
        rows.append((f"{prefix}{f.name}", _type_name(tp), default, docs.get(f.name, "")))
    return rows
