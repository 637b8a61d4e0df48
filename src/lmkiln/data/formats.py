"""Task formats for fine-tuning: reading rows, checking fields, and each task's prompt template.

A task file is .jsonl, .csv or .parquet with one example per row. Each format names canonical
fields (renamed with `finetune.fields`, e.g. `output=completion`):

    instruction     instruction, [input], output
    chat            messages: [{role, content}, ...]   (roles system/user/assistant)
    translation     source, target, [source_language], [target_language]
    summarization   document, summary
    qa              [context], question, answer (a string or a list of accepted answers)
    classification  text, label
    preference      prompt, chosen, rejected   (DPO/ORPO: two replies to one prompt, the first preferred;
                    or messages (a conversation ending with a user turn) instead of prompt, and
                    chosen/rejected as strings or as [{role: assistant, content}], TRL's format)

Every problem names the file and line (`data.jsonl:12: missing field 'output'`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkiln.config import FinetuneConfig
from lmkiln.data.rows import open_rows
from lmkiln.errors import LmkilnError


@dataclass(frozen=True)
class FormatSpec:
    required: tuple[str, ...]
    """Prompt fields every row must have."""
    optional: tuple[str, ...]
    target: str
    """The field the model learns to produce (or the class label)."""
    body: str | None
    """The long input field that overlong=truncate shortens."""
    template: str
    """Built-in jinja prompt template; the target follows it."""


FORMATS: dict[str, FormatSpec] = {
    "instruction": FormatSpec(
        ("instruction",),
        ("input",),
        "output",
        "input",
        "### Instruction:\n{{ instruction }}\n\n{% if input %}### Input:\n{{ input }}\n\n{% endif %}"
        "### Response:\n",
    ),
    "chat": FormatSpec(("messages",), (), "messages", None, ""),
    "translation": FormatSpec(
        ("source",),
        ("source_language", "target_language"),
        "target",
        "source",
        "Translate from {{ source_language }} to {{ target_language }}.\n\n### {{ source_language }}:\n"
        "{{ source }}\n\n### {{ target_language }}:\n",
    ),
    "summarization": FormatSpec(
        ("document",), (), "summary", "document", "### Document:\n{{ document }}\n\n### Summary:\n"
    ),
    "qa": FormatSpec(
        ("question",),
        ("context",),
        "answer",
        "context",
        "{% if context %}### Context:\n{{ context }}\n\n{% endif %}### Question:\n{{ question }}\n\n"
        "### Answer:\n",
    ),
    "classification": FormatSpec(("text",), (), "label", "text", "### Text:\n{{ text }}\n\n### Label:\n"),
    # The prompt is used as written (finetune.prompt may wrap it); both replies follow it.
    "preference": FormatSpec(("prompt",), (), "chosen", "prompt", "{{ prompt }}"),
}
REJECTED = "rejected"
"""The second target field of the preference format (the dispreferred reply)."""

CHAT_KEYS = ("role", "content")  # keys inside each message, renamable like fields


@dataclass
class Record:
    """One validated row in canonical field names."""

    location: str
    """`path:line` (or `path:row N` for parquet), for error messages."""
    values: dict[str, str] = field(default_factory=dict)
    """Prompt fields (strings; absent optional fields are empty)."""
    targets: list[str] = field(default_factory=list)
    """Accepted target texts (the first is trained); for classification the label."""
    messages: list[dict[str, str]] = field(default_factory=list)
    """Chat: the conversation, keys role/content."""


def field_names(cfg: FinetuneConfig) -> dict[str, str]:
    """canonical → actual column names, from `finetune.fields` (canonical=actual pairs)."""
    spec = FORMATS[cfg.format]
    known = {*spec.required, *spec.optional, spec.target, *(CHAT_KEYS if cfg.format == "chat" else ())}
    if cfg.format == "preference":
        known |= {REJECTED, "messages", *CHAT_KEYS}
    names = {name: name for name in known}
    for pair in cfg.fields:
        canonical, eq, actual = pair.partition("=")
        canonical, actual = canonical.strip(), actual.strip()
        if not eq or not actual:
            raise LmkilnError(f"finetune.fields: {pair!r} is not canonical=actual (e.g. output=completion)")
        if canonical not in known:
            raise LmkilnError(
                f"finetune.fields: {canonical!r} is not a field of the {cfg.format} format "
                f"(fields: {', '.join(sorted(known))})"
            )
        names[canonical] = actual
    return names


# --------------------------------------------------------------------------------------------
# Reading rows


def iter_rows(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location, row) for every row of a .jsonl/.csv/.parquet file."""
    table = open_rows(path)
    for number, row in table.rows:
        yield table.where(number), row


# --------------------------------------------------------------------------------------------
# Checking rows


def read_records(path: str | Path, cfg: FinetuneConfig) -> list[Record]:
    """Every row of a task file, validated for the configured format."""
    names = field_names(cfg)
    records = [to_record(location, row, cfg, names) for location, row in iter_rows(path)]
    if not records:
        raise LmkilnError(f"{path}: no examples")
    return records


def _text(value: Any, location: str, name: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise LmkilnError(f"{location}: field {name!r} must be a string, got {type(value).__name__}")
    return value


def _missing(row: dict[str, Any], canonical: str, names: dict[str, str], location: str) -> LmkilnError:
    name = names[canonical]
    rename = f"; set finetune.fields {canonical}=COLUMN" if name == canonical else ""
    present = "missing" if name not in row else "empty"
    return LmkilnError(
        f"{location}: {present} field {name!r} (fields: {', '.join(map(str, row)) or 'none'}){rename}"
    )


def _get(row: dict[str, Any], canonical: str, names: dict[str, str], location: str, required: bool) -> Any:
    value = row.get(names[canonical])
    if value is None or value == "":
        if required:
            raise _missing(row, canonical, names, location)
        return ""
    return value


def to_record(location: str, row: dict[str, Any], cfg: FinetuneConfig, names: dict[str, str]) -> Record:
    spec = FORMATS[cfg.format]
    if cfg.format == "chat":
        return Record(location, messages=_messages(row, names, location))
    if cfg.format == "preference" and names["prompt"] not in row and names["messages"] in row:
        return _chat_pair(row, names, location)
    values = {
        name: _text(_get(row, name, names, location, True), location, names[name]) for name in spec.required
    }
    for name in spec.optional:
        values[name] = _text(_get(row, name, names, location, False), location, names[name])
    if cfg.format == "translation":
        _languages(values, cfg, location)
    target_name = names[spec.target]
    if target_name not in row:
        raise _missing(row, spec.target, names, location)
    raw_target = row[target_name]
    if raw_target is None or (isinstance(raw_target, str) and not raw_target.strip()):
        raise LmkilnError(
            f"{location}: empty target {target_name!r}: every example needs a non-empty "
            f"{'label' if cfg.format == 'classification' else 'target text'}"
        )
    targets = _targets(raw_target, location, target_name)
    if cfg.format == "preference":
        targets = [targets[0], _rejected(row, names, location, targets[0])]
    if cfg.format == "classification" and cfg.labels and targets[0] not in cfg.labels:
        raise LmkilnError(
            f"{location}: label {targets[0]!r} is not in the declared label set "
            f"({', '.join(cfg.labels)}); fix the row or finetune.labels"
        )
    return Record(location, values, targets)


def _targets(value: Any, location: str, name: str) -> list[str]:
    if isinstance(value, bool):
        return [str(value).lower()]
    if isinstance(value, list):  # several accepted answers (SQuAD style); the first is trained
        texts = [_text(v, location, name) for v in value]
        if not texts or not all(t.strip() for t in texts):
            raise LmkilnError(f"{location}: empty target {name!r}: every accepted answer must be non-empty")
        return texts
    return [_text(value, location, name)]


def _chat_pair(row: dict[str, Any], names: dict[str, str], location: str) -> Record:
    """A preference row whose prompt is a conversation; each reply is its final assistant turn."""
    replies = []
    for canonical in ("chosen", REJECTED):
        raw = _get(row, canonical, names, location, True)
        if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], dict):
            raw = raw[0]  # TRL's conversational format: [{"role": "assistant", "content": ...}]
        if isinstance(raw, dict):
            if raw.get(names["role"], "assistant") != "assistant":
                raise LmkilnError(f"{location}: {names[canonical]!r} must be an assistant message")
            raw = raw.get(names["content"], "")
        reply = _text(raw, location, names[canonical])
        if not reply.strip():
            raise _missing(row, canonical, names, location)
        replies.append(reply)
    raw = _raw_messages(row, names)
    if not isinstance(raw, list):
        _messages(row, names, location)  # raises the chat format's own error
    closing = {names["role"]: "assistant", names["content"]: "."}  # the roles must lead to a reply
    messages = _messages({**row, names["messages"]: [*raw, closing]}, names, location)[:-1]
    if replies[0].strip() == replies[1].strip():
        raise LmkilnError(
            f"{location}: {names['chosen']!r} and {names[REJECTED]!r} are identical; a preference pair needs "
            f"two different replies (drop the row)"
        )
    return Record(location, {"prompt": ""}, replies, messages)


def _raw_messages(row: dict[str, Any], names: dict[str, str]) -> Any:
    raw = row.get(names["messages"])
    if isinstance(raw, str):  # CSV cells hold the conversation as JSON text
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw


def _rejected(row: dict[str, Any], names: dict[str, str], location: str, chosen: str) -> str:
    """The dispreferred reply: present, non-empty and different from the chosen one."""
    raw = _get(row, REJECTED, names, location, True)
    if isinstance(raw, str) and not raw.strip():
        raise _missing(row, REJECTED, names, location)
    rejected = _text(raw, location, names[REJECTED])
    if rejected.strip() == chosen.strip():
        raise LmkilnError(
            f"{location}: {names['chosen']!r} and {names[REJECTED]!r} are identical; a preference pair needs "
            f"two different replies (drop the row)"
        )
    return rejected


def _languages(values: dict[str, str], cfg: FinetuneConfig, location: str) -> None:
    for key, default in (("source_language", cfg.source_language), ("target_language", cfg.target_language)):
        values[key] = values[key] or default
        if not values[key]:
            raise LmkilnError(
                f"{location}: no {key.replace('_', ' ')}: add a {key!r} field to the rows or set "
                f"finetune.{key}"
            )


def _messages(row: dict[str, Any], names: dict[str, str], location: str) -> list[dict[str, str]]:
    from lmkiln.data.templates import TemplateError, check_roles

    raw = _get(row, "messages", names, location, True)
    if isinstance(raw, str):  # CSV cells hold the conversation as JSON text
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as err:
            raise LmkilnError(f"{location}: {names['messages']!r} is not valid JSON ({err.msg})") from None
    if not isinstance(raw, list) or not all(isinstance(m, dict) for m in raw):
        raise LmkilnError(f"{location}: {names['messages']!r} must be a list of {{role, content}} objects")
    role_key, content_key = names["role"], names["content"]
    messages = []
    for index, message in enumerate(raw):
        if role_key not in message or content_key not in message:
            raise LmkilnError(
                f"{location}: message {index} needs {role_key!r} and {content_key!r} "
                f"(has {', '.join(message) or 'nothing'})"
            )
        content = _text(message[content_key], location, f"{names['messages']}[{index}].{content_key}")
        messages.append({"role": str(message[role_key]), "content": content})
    try:
        check_roles(messages)
    except TemplateError as err:
        raise LmkilnError(f"{location}: {err}") from None
    for index, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise LmkilnError(f"{location}: empty target: assistant message {index} has no content")
    return messages
