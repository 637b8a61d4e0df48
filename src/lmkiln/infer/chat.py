"""Conversations with a model: messages rendered into a prompt, history fitted to the context, and
the terminal loop of `lmkiln chat`.

A model trained for chat is prompted with its tokenizer's chat template (the one fine-tuning used
and transformers' `apply_chat_template` reads), its messages encoded as data so that a user cannot
forge a turn by typing "<|im_start|>"; generation stops at EOS or the template's end-of-turn token.
A base model has no notion of turns: the conversation is one running text that the model continues
(plain completion). The HTTP server (`lmkiln.serve`) renders its chat requests with the same
`ChatFormat`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from lmkiln.data.templates import ROLES, ChatTemplate, TemplateError, chat_template_of
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.infer.batching import ContinuousBatcher, GenerationRequest, Update, run_to_completion
from lmkiln.model.generate import Sampling

# TemplateError is re-exported: the server catches it from here (one import site of the templates).
__all__ = [
    "ChatFormat",
    "ChatModel",
    "ChatSession",
    "TemplateError",
    "chat_loop",
    "check_messages",
    "fit_history",
]


@dataclass
class ChatModel:
    """A model loaded for conversation (an lmkiln run or a Hugging Face directory)."""

    model: nn.Module
    tokenizer: Tokenizer
    name: str
    """What the model is called in messages and in the API's `model` field."""
    trained_for_chat: bool
    """Fine-tuned on conversations (an lmkiln run of format chat) or shipped with a chat template (HF)."""
    source: str = ""
    """Where it was loaded from (checkpoint and step), for the start message."""


class ChatFormat:
    """How a list of messages becomes prompt ids, and which tokens end an answer."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate | None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        """None: plain completion (the messages' text, joined, is continued)."""
        stops = {tokenizer.eos_id}
        self.end_of_turn: str | None = None
        if template is not None:
            names = {tokenizer.decode([i]) for i in tokenizer.special_ids}
            self.end_of_turn = template.end_of_turn(names)
            if self.end_of_turn is not None:
                stops.add(tokenizer.token_id(self.end_of_turn))
        self.stop_ids = frozenset(stops)

    @classmethod
    def for_model(cls, chat_model: ChatModel, mode: str = "auto") -> ChatFormat:
        """mode 'chat' (the chat template), 'completion' (plain text) or 'auto' (chat if trained for it)."""
        if mode not in ("auto", "chat", "completion"):
            raise LmkilnError(f"chat mode must be auto, chat or completion, got {mode!r}")
        chat = chat_model.trained_for_chat if mode == "auto" else mode == "chat"
        return cls(chat_model.tokenizer, chat_template_of(chat_model.tokenizer) if chat else None)

    def describe(self) -> str:
        if self.template is None:
            return "plain completion (a base model: your text is continued as it is, no chat template)"
        stops = " or ".join(
            sorted(self.tokenizer.decode([i]) for i in self.stop_ids)  # e.g. <|endoftext|> or <|im_end|>
        )
        origin = "the tokenizer's chat template" if self.tokenizer.chat_template else "ChatML"
        return f"{origin}, answers end at {stops}"

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of a conversation that the model's answer continues."""
        check_messages(messages)
        if self.template is None:
            text = "".join(m["content"] for m in messages)
            return self.tokenizer.encode(text) or [self.tokenizer.eos_id]  # a fresh document follows EOS
        ids: list[int] = []
        for piece in self.template.pieces(messages, generation_prompt=True):
            encode = self.tokenizer.encode_template if piece.trusted else self.tokenizer.encode
            ids += encode(piece.text)
        return ids


def check_messages(messages: list[dict[str, str]]) -> None:
    """Messages a chat template can render: a non-empty list of {role, content} with known roles."""
    if not messages:
        raise TemplateError("the conversation has no messages")
    for index, message in enumerate(messages):
        if message.get("role") not in ROLES:
            raise TemplateError(
                f"message {index}: unknown role {message.get('role')!r} (roles: {', '.join(ROLES)})"
            )
        if not isinstance(message.get("content"), str):
            raise TemplateError(f"message {index}: content must be a string")


def fit_history(
    chat_format: ChatFormat, messages: list[dict[str, str]], budget: int
) -> tuple[list[int], int]:
    """Prompt ids of the newest turns that fit `budget` tokens, and how many messages were dropped.

    A system message is kept; whole turns (a user message and the answer after it) go from the
    oldest. The newest message must fit on its own.
    """
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    while True:
        ids = chat_format.encode(system + turns)
        if len(ids) <= budget:
            return ids, dropped
        if len(turns) <= 1:
            raise LmkilnError(
                f"the message takes {len(ids)} tokens with the system message and template, more than "
                f"the {budget} the context leaves for it; shorten it (or the system message)"
            )
        cut = 2 if turns[0]["role"] == "user" and turns[1]["role"] == "assistant" else 1
        turns, dropped = turns[cut:], dropped + cut


@dataclass
class Reply:
    text: str
    tokens: int
    finish_reason: str
    seconds: float
    dropped: int = 0
    """Old messages dropped from the history to fit the context."""


@dataclass
class ChatSession:
    """One conversation: its history, its system message and the replies generated in turn."""

    batcher: ContinuousBatcher
    chat_format: ChatFormat
    sampling: Sampling
    system: str = ""
    history: list[dict[str, str]] = field(default_factory=list)
    turns: int = 0

    def reset(self) -> None:
        self.history.clear()

    def messages(self, user_text: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, *self.history, {"role": "user", "content": user_text}]

    def reply(self, user_text: str, on_text: Callable[[str], None]) -> Reply:
        """Generate the answer to `user_text`, streaming its text; the exchange joins the history."""
        context = self.batcher.context
        reserve = min(self.sampling.max_new_tokens, context // 2)  # room kept for the answer
        messages = self.messages(user_text)
        ids, dropped = fit_history(self.chat_format, messages, context - reserve)
        if dropped:
            del self.history[:dropped]
        seed = None if self.sampling.seed is None else self.sampling.seed + self.turns
        finished: list[Update] = []
        parts: list[str] = []

        def on_update(update: Update) -> None:
            if update.text:
                parts.append(update.text)
                on_text(update.text)
            if update.finish_reason is not None:
                finished.append(update)

        started = time.perf_counter()
        request = GenerationRequest(
            ids, replace(self.sampling, seed=seed), self.chat_format.stop_ids, on_update
        )
        run_to_completion(self.batcher, request)
        text = "".join(parts)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": text}]
        self.turns += 1
        end = finished[-1]
        return Reply(text, end.tokens, end.finish_reason or "", time.perf_counter() - started, dropped)


HELP = (
    "commands: /reset clears the conversation, /system TEXT sets the system message, /quit ends (or Ctrl-D)"
)

_ENDINGS = {"stop": "stopped at the end of the answer", "length": "cut at the token limit"}


def chat_loop(
    session: ChatSession,
    read_line: Callable[[], str | None],
    write: Callable[[str], None],
    note: Callable[[str], None],
) -> None:
    """Read lines until /quit or the end of input; answer each with streamed text.

    `write` receives the conversation (answers), `note` everything else (stats, command replies).
    """
    while True:
        line = read_line()
        if line is None:
            return
        text = line.rstrip("\r\n")
        command, _, argument = text.strip().partition(" ")
        if not text.strip():
            continue
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            session.reset()
            note("(conversation cleared)")
            continue
        if command == "/system":
            session.system = argument.strip()
            note(f"(system message {'set' if session.system else 'cleared'})")
            continue
        if command.startswith("/") and command[1:].isalpha():
            note(f"unknown command {command}; {HELP}")
            continue
        _answer(session, text, write, note)


def _answer(
    session: ChatSession, text: str, write: Callable[[str], None], note: Callable[[str], None]
) -> None:
    try:
        reply = session.reply(text, write)
    except LmkilnError as err:  # a message too long for the context: say so and keep chatting
        note(f"error: {err}")
        return
    write("\n")
    if reply.dropped:
        note(f"(dropped the {reply.dropped} oldest messages to fit the context)")
    speed = reply.tokens / reply.seconds if reply.seconds > 0 else 0.0
    ending = _ENDINGS.get(reply.finish_reason, reply.finish_reason)
    note(f"[{reply.tokens} tokens, {speed:.1f} tokens/s, {ending}]")
