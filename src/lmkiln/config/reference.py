"""The configuration reference of the documentation site, written from the schema itself.

`docs/hooks.py` puts `markdown()` into docs/config-reference.md at build time, so the reference
shows every field's type, default and docstring exactly as `lmkiln train --help` does: one
source of truth (the dataclasses in schema.py), never a copy kept by hand.
"""

from __future__ import annotations

from lmkiln.config.layers import all_keys, field_docs, section_fields, type_name
from lmkiln.config.ranges import FIELD_RANGES
from lmkiln.config.schema import DERIVED_SECTIONS, MODEL_PRESETS, TASK_SECTIONS, Config


def _cell(text: str) -> str:
    # A table cell is one line; a bare | would end it.
    return text.replace("|", "\\|").replace("\n", " ")


def _type(key: str, hint: object) -> str:
    """The field's type, and its declared range when it has one (checked before a run starts)."""
    allowed = FIELD_RANGES.get(key)
    return _cell(type_name(hint) + (f", {allowed.describe()}" if allowed else ""))


def _readers(section: str) -> str:
    tasks = [task for task, sections in TASK_SECTIONS.items() if section in sections]
    filled = [task for task, sections in DERIVED_SECTIONS.items() if section in sections]
    text = ", ".join(f"`{task}`" for task in tasks)
    if filled:
        text += "; filled in from the base model by " + ", ".join(f"`{task}`" for task in filled)
    return text


def markdown(config_cls: type = Config) -> str:
    """Every section and key as Markdown tables: key, type (and range), default, what it does."""
    defaults, docs = config_cls(), field_docs(config_cls)
    lines = ["## Top level", "", "Keys outside any section, set like the others (`task=finetune`).", ""]
    lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
    for key, hint in all_keys(config_cls).items():
        if "." not in key:
            default = _cell(repr(getattr(defaults, key)))
            lines.append(f"| `{key}` | {_type(key, hint)} | `{default}` | {_cell(docs.get(key, ''))} |")
    lines.append("")
    for section, fields in section_fields(config_cls).items():
        lines += [
            f"## `{section}`",
            "",
            f"Read by the task{'s' if ',' in _readers(section) else ''} {_readers(section)}.",
            "",
        ]
        lines += ["| key | type | default | what it does |", "|---|---|---|---|"]
        for info in fields:
            default = _cell(repr(info.default))
            lines.append(f"| `{info.key}` | {_type(info.key, info.hint)} | `{default}` | {_cell(info.doc)} |")
        lines.append("")
    lines += [
        "## Model presets",
        "",
        "`model.preset=NAME` sets these fields; explicit `model.*` values override them.",
        "",
    ]
    lines += ["| preset | fields |", "|---|---|"]
    for name, values in MODEL_PRESETS.items():
        fields = ", ".join(f"`{key}={value!r}`" for key, value in values.items())
        lines.append(f"| `{name}` | {_cell(fields)} |")
    return "\n".join(lines) + "\n"
