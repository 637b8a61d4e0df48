"""Prompt and chat templates, rendered with jinja2 into pieces of trusted and untrusted text.

Templates are jinja, rendered by the same engine and settings as `transformers`
(`apply_chat_template`), so a conversation looks the same in training, in `lmkiln eval` and in
any Hugging Face tool that reads the tokenizer's `chat_template`.

Why pieces: a template's own text may contain control tokens ("<|im_start|>") and is encoded
with them; the data inside it (a user's message, a document) must never become a control token,
or a user could forge a turn by typing "<|im_start|>assistant". So every variable is rendered as
a unique sentinel, the output is split at the sentinels, and each piece remembers whether it is
template text (trusted) or data (untrusted). Joined back together the pieces are exactly the
template's own rendering of the real values (checked for every example).
"""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

from lmkiln.data.tokenizer import CHATML_TEMPLATE, Tokenizer
from lmkiln.errors import LmkilnError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Piece:
    """A run of text with how to encode it and whether its tokens are training targets."""

    text: str
    trusted: bool
    """Template text: special-token strings in it become control tokens. Data is never trusted."""
    train: bool = False
    body: bool = False
    """The format's long input (document, context, ...), the part overlong=truncate shortens."""


class TemplateError(LmkilnError):
    """A template that cannot be compiled or rendered for an example."""


@functools.lru_cache(maxsize=32)
def compile_template(source: str, keep_trailing_newline: bool = False):
    """A jinja template in the sandboxed environment transformers uses (trim_blocks, lstrip_blocks).

    Prompt templates keep a trailing newline ("### Response:\\n" must end with it); chat templates
    are compiled exactly as transformers compiles them.
    """
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=keep_trailing_newline,
        extensions=["jinja2.ext.loopcontrols"],
    )
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(source)
    except TemplateSyntaxError as err:
        raise TemplateError(f"template syntax error: {err.message} (template line {err.lineno})") from None


def render(template: str, as_prompt: bool = False, /, **variables: Any) -> str:
    """Render a template with plain values (the reference rendering); as_prompt=True for prompt
    templates. Both are positional-only, so any field name (even `prompt`) can be a variable."""
    from jinja2 import TemplateError as JinjaError

    try:
        return compile_template(template, as_prompt).render(**variables)
    except TemplateError:
        raise
    except JinjaError as err:
        raise TemplateError(f"template could not be rendered: {err}") from None


class _Sentinels:
    """Stand-ins for data values: unique strings that no real text contains."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex
        self.values: list[str] = []

    def __call__(self, value: str) -> str:
        if not value:
            return ""  # empty values keep `{% if input %}` false, exactly as with the real value
        self.values.append(value)
        return f"\x00{self.tag}:{len(self.values) - 1}\x00"

    def split(self, text: str) -> list[tuple[str, int | None]]:
        """(text, None) for template text and ("", index) for each sentinel, in order."""
        out: list[tuple[str, int | None]] = []
        pattern = re.compile(f"\x00{self.tag}:(\\d+)\x00")
        at = 0
        for match in pattern.finditer(text):
            if match.start() > at:
                out.append((text[at : match.start()], None))
            out.append(("", int(match.group(1))))
            at = match.end()
        if at < len(text):
            out.append((text[at:], None))
        return out


def _pieces(
    text: str, sentinels: _Sentinels, train_spans: list[tuple[int, int]], body: set[int]
) -> list[Piece]:
    """Cut a sentinel rendering into pieces; template text is cut again at train-span edges."""
    pieces: list[Piece] = []
    at = 0
    for chunk, index in sentinels.split(text):
        if index is not None:
            sentinel = f"\x00{sentinels.tag}:{index}\x00"
            train = any(a <= at < b for a, b in train_spans)
            pieces.append(Piece(sentinels.values[index], False, train, index in body))
            at += len(sentinel)
            continue
        edges = sorted({at, at + len(chunk), *(e for span in train_spans for e in span)})
        for a, b in zip(edges, edges[1:]):
            if a < at or b > at + len(chunk) or a == b:
                continue
            train = any(s <= a < e for s, e in train_spans)
            pieces.append(Piece(chunk[a - at : b - at], True, train))
        at += len(chunk)
    return pieces


def joined(pieces: list[Piece]) -> str:
    return "".join(p.text for p in pieces)


# --------------------------------------------------------------------------------------------
# Single-turn prompt templates


def prompt_pieces(source: str, values: dict[str, str], body_field: str | None) -> list[Piece]:
    """The prompt of a single-turn example as pieces (nothing trained: the target follows it)."""
    sentinels = _Sentinels()
    body: set[int] = set()
    stand_ins: dict[str, str] = {}
    for name, value in values.items():
        stand_ins[name] = sentinels(value)
        if name == body_field and value:
            body.add(len(sentinels.values) - 1)
    pieces = _pieces(render(source, True, **stand_ins), sentinels, [], body)
    if joined(pieces) != render(source, True, **values):
        raise TemplateError(
            "the prompt template changes field values (e.g. with a filter); use plain {{ field }}"
        )
    return pieces


# --------------------------------------------------------------------------------------------
# Chat: conversations rendered turn by turn, assistant turns trained


def check_roles(messages: list[dict[str, str]]) -> None:
    """The role sequences a chat template is expected to render: [system] user assistant (user assistant)*."""
    roles = [m["role"] for m in messages]
    unknown = [r for r in roles if r not in ROLES]
    if unknown:
        raise TemplateError(f"unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    turns = roles[1:] if roles and roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(turns) // 2 + 1)
    if not turns or turns != expected[: len(turns)] or turns[-1] != "assistant":
        raise TemplateError(
            f"role sequence {' → '.join(roles) or '(empty)'} cannot be rendered: expected an optional "
            f"system message, then user and assistant turns alternating, ending with assistant"
        )


@dataclass(frozen=True)
class ChatTemplate:
    """A chat template plus the special tokens it may refer to (bos_token, eos_token)."""

    source: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return render(
            self.source,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )

    def pieces(
        self, messages: list[dict[str, str]], train_all: bool = False, generation_prompt: bool = False
    ) -> list[Piece]:
        """Pieces of a conversation; assistant turns (content and end-of-turn markup) are trained.

        With generation_prompt, the conversation is a prompt: nothing is trained and the template's
        generation prompt (e.g. "<|im_start|>assistant\\n") ends it.
        """
        pieces = self._pieces(messages, train_all, generation_prompt)
        if joined(pieces) == self.render(messages, generation_prompt):
            return pieces
        # Many templates `| trim` the content; render exactly what they would.
        stripped = [{**m, "content": m["content"].strip()} for m in messages]
        pieces = self._pieces(stripped, train_all, generation_prompt)
        if joined(pieces) == self.render(messages, generation_prompt):
            return pieces
        raise TemplateError(
            "the chat template changes message content in a way lmkiln cannot follow; "
            "it must insert each message's content as it is (or trimmed)"
        )

    def _pieces(
        self, messages: list[dict[str, str]], train_all: bool, generation_prompt: bool
    ) -> list[Piece]:
        sentinels = _Sentinels()
        stand_ins = [{**m, "content": sentinels(m["content"])} for m in messages]
        full = self.render(stand_ins, generation_prompt)
        spans: list[tuple[int, int]] = [(0, len(full))] if train_all else []
        if not train_all and not generation_prompt:
            spans = self._assistant_spans(stand_ins, full)
        pieces = _pieces(full, sentinels, spans, set())
        return [replace(p, train=False) for p in pieces] if generation_prompt else pieces

    def _assistant_spans(self, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns after their generation prompt.

        Turn k is render(messages[:k+1]) minus render(messages[:k]); this needs a template whose
        renderings of longer conversations extend the shorter ones (true of ChatML and most others).
        """
        spans = []
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:k], add_generation_prompt=True)
            turn = self.render(messages[: k + 1])
            if not (turn.startswith(prompt) and full.startswith(turn)):
                raise TemplateError(
                    "the chat template does not render conversations turn by turn (a longer "
                    "conversation does not extend a shorter one), so assistant turns cannot be masked"
                )
            spans.append((len(prompt), len(turn)))
        return spans

    def end_of_turn(self, special_tokens: set[str]) -> str | None:
        """The control token that closes an assistant turn (where generation must stop)."""
        probe = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        tail = self.render(probe)[len(self.render(probe[:1], add_generation_prompt=True)) + 1 :]
        found = [(tail.find(t), t) for t in special_tokens if t and t in tail]
        return min(found)[1] if found else None


def chat_template_of(tokenizer: Tokenizer) -> ChatTemplate:
    """The tokenizer's stored chat template (ChatML when it has none)."""
    return ChatTemplate(
        tokenizer.chat_template or CHATML_TEMPLATE, tokenizer.bos_token or "", tokenizer.eos_token or ""
    )


def render_chat(
    template: str, messages: list[dict], add_generation_prompt: bool = False, **tokens: str
) -> str:
    """Render a chat template as text, the way transformers' `apply_chat_template` does."""
    return render(template, messages=messages, add_generation_prompt=add_generation_prompt, **tokens)
