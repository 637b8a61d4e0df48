"""Resolving a config: layers of dotted values, type coercion, recipes, YAML and help text.

Resolution order, lowest first: dataclass defaults → recipe YAML → `--config FILE` → command-line
overrides; a model size preset (`model.preset`) applies at the layer that names it. Every value is
coerced to its field's type and checked; an unknown key names the closest valid one.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import sys
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from lmkiln.config.schema import (
    DERIVED_SECTIONS,
    MODEL_PRESETS,
    TASK_SECTIONS,
    Config,
    saved_sections,
    section_owner,
    validate,
)
from lmkiln.errors import LmkilnError

# --------------------------------------------------------------------------------------------
# Field docs, keys and types


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal under each field)."""
    tree = ast.parse(inspect.getsource(cls))
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(sys.modules[cls.__module__]))


def all_keys(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Every dotted leaf key of a config class, mapped to its type."""
    keys: dict[str, Any] = {}
    for name, hint in _hints(cls).items():
        if dataclasses.is_dataclass(hint):
            keys.update(all_keys(hint, f"{prefix}{name}."))
        else:
            keys[f"{prefix}{name}"] = hint
    return keys


def type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else type_name(a) for a in get_args(hint))
    if origin in (list, tuple):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in get_args(hint) if a is not ...)}]"
    return getattr(hint, "__name__", str(hint))


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the type `hint`, or explain why not."""

    def fail() -> LmkilnError:
        return LmkilnError(f"config key '{key}' ({source}): expected {type_name(hint)}, got {value!r}")

    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f" — did you mean {close[0]!r}?" if close else ""
        raise LmkilnError(
            f"config key '{key}' ({source}): {value!r} is not one of "
            f"{', '.join(repr(c) for c in choices)}{hint_text}"
        )
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, source)
            except LmkilnError:
                pass
        raise fail()
    if origin in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = get_args(hint)
        if origin is tuple and args and args[-1] is not ...:
            if len(value) != len(args):
                raise fail()
            return tuple(coerce(v, a, key, source) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [coerce(v, item, key, source) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise fail()
    if hint is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise fail() from None
            if number.is_integer():
                return int(number)
        raise fail()
    if hint is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    raise fail()


def unknown_key_error(key: str, valid: list[str], source: str) -> LmkilnError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:  # a misspelt section still deserves a suggestion for the leaf
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1]
    suggestion = f" — did you mean '{close[0]}'?" if close else ""
    return LmkilnError(
        f"unknown config key '{key}' ({source}){suggestion} (`lmkiln train --help` lists every key)"
    )


# --------------------------------------------------------------------------------------------
# Building a config from layers of dotted values


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; a non-dict value is a leaf."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def _set(cfg: Config, key: str, value: Any) -> None:
    *path, leaf = key.split(".")
    target: Any = cfg
    for part in path:
        target = getattr(target, part)
    setattr(target, leaf, value)


Layer = tuple[str, dict[str, Any]]  # (where the values came from, dotted key -> raw value)


STRICT_SOURCES = ("command line",)

RECIPE_SOURCE_PREFIX = "recipe "
"""How a built-in recipe's layer is named (`recipe sft-qa`): its values are shipped defaults, which
method-aware resolution may adapt; values from --config, the command line or a saved run are the
user's and never are (`lmkiln.config.resolve`)."""

_SOURCES_ATTRIBUTE = "_value_sources"


def record_sources(cfg: Any, sources: dict[str, str]) -> None:
    """Remember where each dotted value of `cfg` came from (kept through copy.deepcopy).

    Stored beside the dataclass fields, not as one: it is not configuration, is never saved, and a
    Config built in Python simply has none.
    """
    object.__setattr__(cfg, _SOURCES_ATTRIBUTE, dict(sources))


def value_sources(cfg: Any) -> dict[str, str] | None:
    """Dotted key -> the layer that set it (keys left at the defaults are absent); None when the
    config was not built from layers (made in Python), so nothing is known about who set what."""
    sources = getattr(cfg, _SOURCES_ATTRIBUTE, None)
    return dict(sources) if sources is not None else None


def set_by_user(cfg: Any, key: str) -> bool:
    """Whether `key` was set by the user: by --config, the command line, a saved run or in Python.

    A default or a built-in recipe's value is not; a config without provenance counts every
    value as the user's (nothing may be adapted behind the back of a caller who built it).
    """
    sources = value_sources(cfg)
    if sources is None:
        return True
    source = sources.get(key)
    return source is not None and not source.startswith(RECIPE_SOURCE_PREFIX)


"""Layers where any key of another task's section is an error; elsewhere (recipes, config files,
a Config object given to the Trainer) such a key is ignored when it holds the default value, as
the full configs lmkiln 0.1 saved do."""


def build_config(layers: list[Layer], config_cls: type = Config, check_sections: bool = True) -> Config:
    """Apply layers of dotted values over the defaults.

    A model preset applies at the layer that names it: it replaces the model fields of earlier
    layers (a recipe's shape), and explicit model fields of its own and later layers override it.
    With check_sections, a key of a section the config's task does not read is refused, naming
    the task that owns it (`TASK_SECTIONS`).
    """
    keys = all_keys(config_cls)
    resolved: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, values in layers:
        checked = {}
        for key, raw in values.items():
            if key not in keys:
                raise unknown_key_error(key, sorted(keys), source)
            checked[key] = coerce(raw, keys[key], key, source)
        preset = checked.get("model.preset")
        if preset:
            if preset not in MODEL_PRESETS:
                raise LmkilnError(
                    f"unknown model preset {preset!r} ({source}); valid presets: {', '.join(MODEL_PRESETS)}"
                )
            resolved.update({f"model.{k}": v for k, v in MODEL_PRESETS[preset].items()})
            sources.update({f"model.{k}": source for k in MODEL_PRESETS[preset]})
        resolved.update(checked)
        sources.update(dict.fromkeys(checked, source))
    cfg = config_cls()
    if check_sections and config_cls is Config:
        resolved = _task_keys(resolved, sources, resolved.get("task", cfg.task))
    for key, value in resolved.items():
        _set(cfg, key, value)
    validate(cfg)
    record_sources(cfg, {key: sources[key] for key in resolved})
    return cfg


def _task_keys(resolved: dict[str, Any], sources: dict[str, str], task: str) -> dict[str, Any]:
    """The keys the task reads; another task's key is an error (or, in a file, ignored if default)."""
    defaults = flatten(to_dict(Config(), every_section=True))
    kept = {}
    for key, value in resolved.items():
        section = key.split(".", 1)[0] if "." in key else None
        if section is None or section in TASK_SECTIONS[task]:
            kept[key] = value
            continue
        lenient = sources[key] not in STRICT_SOURCES
        if lenient and (section in DERIVED_SECTIONS.get(task, ()) or value == defaults.get(key)):
            continue
        why = (
            " (a fine-tuned model's shape comes from its base)"
            if section in DERIVED_SECTIONS.get(task, ())
            else ""
        )
        raise LmkilnError(
            f"config key '{key}' ({sources[key]}) belongs to task '{section_owner(section)}', not "
            f"'{task}'{why}"
        )
    return kept


# --------------------------------------------------------------------------------------------
# Recipes, files and the command line


def recipe_names() -> list[str]:
    return sorted(
        p.name[:-5] for p in resources.files("lmkiln.recipes").iterdir() if p.name.endswith(".yaml")
    )


def recipe_text(name: str) -> str:
    path = resources.files("lmkiln.recipes") / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, recipe_names(), n=1)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise LmkilnError(f"unknown recipe {name!r}{hint} (`lmkiln recipes` lists them)")
    return path.read_text(encoding="utf-8")


def recipe_summary(name: str) -> str:
    """The recipe's first comment line: its one-line description."""
    for line in recipe_text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _yaml_layer(text: str, source: str) -> Layer:
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise LmkilnError(f"{source}: not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise LmkilnError(f"{source}: expected a mapping of config sections, got {type(tree).__name__}")
    return source, flatten(tree)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--a.b v`, `--a.b=v` and `a.b=v` -> {'a.b': 'v'}; a bare `--flag` means true."""
    values: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value, i = args[i + 1], i + 1
                else:
                    value = "true"
        elif "=" in arg:
            key, _, value = arg.partition("=")
        else:
            raise LmkilnError(
                f"unexpected argument {arg!r}: config overrides look like "
                f"--section.key VALUE or section.key=VALUE"
            )
        values[key.replace("-", "_")] = value
        i += 1
    return values


def load_config(
    recipe: str | None = None,
    config_file: str | None = None,
    overrides: list[str] | None = None,
    config_cls: type = Config,
) -> Config:
    """Resolve a full config from a recipe name, a YAML file and command-line overrides."""
    layers: list[Layer] = []
    if recipe:
        source, values = _yaml_layer(recipe_text(recipe), f"{RECIPE_SOURCE_PREFIX}{recipe}")
        values.setdefault("name", recipe)
        layers.append((source, values))
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise LmkilnError(f"config file not found: {path}")
        layers.append(_yaml_layer(path.read_text(encoding="utf-8"), str(path)))
    if overrides:
        layers.append(("command line", parse_overrides(overrides)))
    return build_config(layers, config_cls)


def to_dict(cfg: Any, every_section: bool = False, derived: bool = True) -> dict[str, Any]:
    """A config as plain values; a whole `Config` keeps only the sections its task reads, plus
    (with `derived`) those it fills in itself and saves (`saved_sections`), unless every_section."""
    out = _tuples_to_lists(dataclasses.asdict(cfg))
    if isinstance(cfg, Config) and not every_section:
        keep = saved_sections(cfg.task) if derived else TASK_SECTIONS[cfg.task]
        out = {k: v for k, v in out.items() if not isinstance(v, dict) or k in keep}
    return out


def _tuples_to_lists(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _tuples_to_lists(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_tuples_to_lists(v) for v in tree]
    return tree


def to_yaml(cfg: Any, derived: bool = True) -> str:
    return yaml.safe_dump(to_dict(cfg, derived=derived), sort_keys=False, default_flow_style=None)


def from_dict(tree: dict[str, Any], source: str, config_cls: type = Config) -> Config:
    """Rebuild a saved, fully resolved config (every field is explicit, so the preset changes nothing).

    Sections its task does not save are dropped: lmkiln 0.1 saved every section with every run.
    """
    if config_cls is Config:
        keep = saved_sections(tree.get("task", Config().task))
        tree = {k: v for k, v in tree.items() if not isinstance(v, dict) or k in keep}
    return build_config([(source, flatten(tree))], config_cls, check_sections=False)


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One config key as the help text and the documentation's reference show it."""

    section: str
    name: str
    hint: Any
    default: Any
    doc: str

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


def section_fields(config_cls: type = Config, task: str | None = None) -> dict[str, list[FieldInfo]]:
    """Every section of the schema (only `task`'s when given) → its fields, in schema order.

    The one walk over the schema that `--help` and the configuration reference of the docs share,
    so both always say what the dataclasses say.
    """
    defaults = config_cls()
    sections: dict[str, list[FieldInfo]] = {}
    for name, hint in _hints(config_cls).items():
        if not dataclasses.is_dataclass(hint) or (task is not None and name not in TASK_SECTIONS[task]):
            continue
        docs = field_docs(hint)
        section = getattr(defaults, name)
        sections[name] = [
            FieldInfo(name, key, sub, getattr(section, key), docs.get(key, ""))
            for key, sub in _hints(hint).items()
        ]
    return sections


def help_text(config_cls: type = Config, task: str | None = None) -> str:
    """Every key with its type, default and docstring, grouped by section (only `task`'s sections)."""
    lines: list[str] = []
    for name, fields in section_fields(config_cls, task).items():
        lines.append(f"\n{name}:")
        for info in fields:
            lines.append(f"  --{info.key} ({type_name(info.hint)}, default {info.default!r})")
            if info.doc:
                lines.append(f"      {info.doc}")
    return "\n".join(lines)
