"""Check a GGUF export with its real consumer: llama.cpp, through llama-cpp-python.

`verify_gguf` loads the file in llama.cpp and compares it with the lmkiln model it came from:

- token ids of a mixed text (ASCII, accents, CJK, emoji, whitespace runs, special tokens written
  as text) and of a rendered chat prompt, where special tokens are control tokens;
- logits over a fixed token stream: max |Δlogits|, top-1 agreement, perplexity of both;
- greedy continuations of a few prompts, token for token;
- for a model with a chat template and an end-of-turn token: llama.cpp's chat completion with
  the embedded template gives lmkiln's greedy reply and stops where lmkiln stops.

The pass marks per file type are in THRESHOLDS: f32 must match exactly (ids, greedy text), f16 and
q8_0 round the weights, so they are held to top-1 agreement and perplexity bounds instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.interop.gguf_export import end_of_turn_id
from lmkiln.model.transformer import KVCache, Transformer

MIXED_TEXT = (
    "Plain ASCII, accents: café, naïve, Ærøskøbing, señor; CJK: 日本語のテキスト, 中文字符; "
    "emoji 🙂🚀👩‍💻; whitespace   runs\t\ttabs\n\n\n   and lines  \n; digits 1234567 3.14; "
    "special tokens as text: <|endoftext|> <|im_start|>user<|im_end|> it's we'll I'D"
)
PROMPTS = ("The", "Once upon a time, there", "def main():\n    ", "1, 2, 3,")
STREAM_TEXT = (
    "The history of computing is a story of machines that learned to follow longer and longer "
    "lists of instructions. Early calculators added and multiplied; later machines stored their "
    "programs in memory and could change them while running. Languages grew from numeric codes "
    "into words, and words into libraries that anyone could reuse. Today a model that predicts "
    "the next word of a sentence runs on a laptop, reading text one token at a time, keeping "
    "what it has seen in a cache, and writing its answer back one token after another. "
    "Whether it is useful depends on what it was trained on, how it is asked, and how its "
    "answers are checked."
)
CHAT_PROBE = [{"role": "user", "content": "Hello! Who are you?"}]


@dataclass(frozen=True)
class Thresholds:
    top1: float
    """Least share of positions where llama.cpp's most likely next token is lmkiln's."""
    perplexity: float
    """Largest relative perplexity difference over the token stream."""
    greedy: bool
    """Greedy continuations must be identical token for token."""


THRESHOLDS: dict[str, Thresholds] = {
    "f32": Thresholds(top1=0.99, perplexity=0.001, greedy=True),
    "f16": Thresholds(top1=0.99, perplexity=0.01, greedy=False),
    "q8_0": Thresholds(top1=0.95, perplexity=0.03, greedy=False),
}


@dataclass
class ChatCheck:
    reply: str
    """llama.cpp's chat completion with the template embedded in the file (greedy)."""
    expected: str
    """lmkiln's greedy reply to the same rendered prompt."""
    stopped: bool
    """llama.cpp ended the reply at an end-of-turn/end-of-text token (finish_reason "stop")."""
    expected_stop: bool
    """lmkiln's reply ended there too (not at the token limit)."""


@dataclass
class Parity:
    dtype: str
    tokens_equal: bool
    max_abs_logits_diff: float
    top1_agreement: float
    positions: int
    perplexity_lmkiln: float
    perplexity_llama_cpp: float
    greedy_equal: int
    """Prompts whose greedy continuation llama.cpp reproduced token for token."""
    greedy_total: int
    greedy_tokens: int
    """Tokens generated per prompt."""
    chat: ChatCheck | None = None
    problems: list[str] = field(default_factory=list)
    """Every check that fell short of THRESHOLDS[dtype]; empty means the export passed."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def perplexity_gap(self) -> float:
        return abs(self.perplexity_llama_cpp - self.perplexity_lmkiln) / self.perplexity_lmkiln

    def lines(self) -> list[str]:
        out = [
            f"token ids (mixed text, chat prompt): {'identical' if self.tokens_equal else 'DIFFER'}",
            f"logits over {self.positions} tokens: max |Δ| {self.max_abs_logits_diff:.2e}, top-1 agreement "
            f"{self.top1_agreement:.1%}, perplexity {self.perplexity_llama_cpp:.3f} vs lmkiln "
            f"{self.perplexity_lmkiln:.3f} ({self.perplexity_gap:+.2%})",
            f"greedy continuations: {self.greedy_equal}/{self.greedy_total} prompts identical over "
            f"{self.greedy_tokens} tokens",
        ]
        if self.chat is not None:
            same = (
                "same reply as lmkiln"
                if self.chat.reply == self.chat.expected
                else "reply DIFFERS from lmkiln"
            )
            stop = "stopped at end of turn" if self.chat.stopped else "did not stop"
            out.append(f"chat completion with the embedded template: {stop}, {same}")
        return out


def require_llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LmkilnError(
            "checking a GGUF file needs llama-cpp-python: pip install 'lmkiln[llama]' (it builds llama.cpp)"
        ) from None
    return llama_cpp


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def open_gguf(path: str | Path, context: int, threads: int | None = None):
    """A llama_cpp.Llama over `path` that keeps the logits of every position.

    The KV cache is f32 (llama.cpp's default is f16) so that the comparison measures the file's
    weights, not the cache's rounding.
    """
    llama_cpp = require_llama_cpp()
    threads = threads or len(os.sched_getaffinity(0))
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=context,
        n_batch=context,
        n_ubatch=context,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        seed=0,
        verbose=False,
    )


def _nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] under logits[:-1] (T, V)."""
    logp = torch.log_softmax(torch.from_numpy(logits[:-1]).double(), dim=-1)
    return -logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()


def _compare_tokens(llm, tokenizer: Tokenizer, text: str) -> list[str]:
    problems = []
    ours = tokenizer.encode(text)
    theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    if ours != theirs:
        at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        problems.append(
            f"ids of the mixed text differ from token {at}: lmkiln {ours[at : at + 4]}, llama.cpp {theirs[at : at + 4]}"
        )
    if tokenizer.chat_template:
        from lmkiln.data.templates import render_chat

        rendered = render_chat(tokenizer.chat_template, CHAT_PROBE, add_generation_prompt=True)
        if tokenizer.encode_template(rendered) != llm.tokenize(
            rendered.encode("utf-8"), add_bos=False, special=True
        ):
            problems.append("ids of the rendered chat prompt differ")
    return problems


@torch.inference_mode()
def lmkiln_greedy(model: Transformer, prompt: list[int], steps: int, stop: tuple[int, ...] = ()) -> list[int]:
    """lmkiln's greedy continuation (KV cache, one token per step), up to a token in `stop` included."""
    cache = KVCache.empty(model.cfg, 1, len(prompt) + steps, torch.device("cpu"), torch.float32)
    inputs, out = torch.tensor([prompt]), []
    for _ in range(steps):
        token = int(model(inputs, cache=cache)[0, -1].argmax())
        out.append(token)
        if token in stop:
            break
        inputs = torch.tensor([[token]])
    return out


def _greedy(model: Transformer, llm, prompt: list[int], steps: int) -> tuple[list[int], list[int]]:
    ours = lmkiln_greedy(model, prompt, steps)
    theirs: list[int] = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == steps:
            break
    return ours, theirs


def _chat(
    model: Transformer, tokenizer: Tokenizer, llm, messages: list[dict], max_tokens: int
) -> ChatCheck | None:
    eot = end_of_turn_id(tokenizer)
    if eot is None:
        return None
    from lmkiln.data.templates import render_chat

    prompt = tokenizer.encode_template(
        render_chat(tokenizer.chat_template, messages, add_generation_prompt=True)
    )
    steps = min(max_tokens, model.cfg.block_size - len(prompt) - 1)
    ours = lmkiln_greedy(model, prompt, steps, stop=(eot, tokenizer.eos_id))
    stopped = bool(ours) and ours[-1] in (eot, tokenizer.eos_id)
    expected = tokenizer.decode(ours[:-1] if stopped else ours, skip_special=True)
    reply = llm.create_chat_completion(
        messages=messages, temperature=0.0, repeat_penalty=1.0, max_tokens=steps, seed=0
    )["choices"][0]
    return ChatCheck(reply["message"]["content"] or "", expected, reply["finish_reason"] == "stop", stopped)


def verify_gguf(
    model: Transformer,
    tokenizer: Tokenizer,
    path: str | Path,
    dtype: str,
    *,
    stream_text: str = STREAM_TEXT,
    prompts: tuple[str, ...] = PROMPTS,
    chat: list[dict] | None = None,
    new_tokens: int = 16,
    max_context: int = 512,
    threads: int | None = None,
) -> Parity:
    """Compare the GGUF file at `path` in llama.cpp with `model` in lmkiln (fp32, eval mode)."""
    model = model.float().eval()
    context = min(model.cfg.block_size, max_context)
    llm = open_gguf(path, context, threads)
    problems = _compare_tokens(llm, tokenizer, MIXED_TEXT)
    stream = tokenizer.encode(stream_text)[:context]
    if len(stream) < 2:
        raise LmkilnError("the verification text gives fewer than 2 tokens")
    with torch.inference_mode():
        ours = model(torch.tensor([stream]))[0].float().numpy()  # (T, V)
    llm.reset()
    llm.eval(stream)
    # llm.scores is llama.cpp's own buffer, which generating below overwrites: copy it.
    theirs = np.array(llm.scores[: len(stream)], dtype=np.float32)[:, : ours.shape[1]]  # (T, V)
    greedy_equal = 0
    steps = min(new_tokens, context - max(len(tokenizer.encode(p)) for p in prompts) - 1)
    for prompt in prompts:
        a, b = _greedy(model, llm, tokenizer.encode(prompt) or [tokenizer.eos_id], steps)
        greedy_equal += a == b
    parity = Parity(
        dtype,
        tokens_equal=not problems,
        max_abs_logits_diff=float(np.abs(ours - theirs).max()),
        top1_agreement=float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        positions=len(stream),
        perplexity_lmkiln=math.exp(_nll(ours, stream)),
        perplexity_llama_cpp=math.exp(_nll(theirs, stream)),
        greedy_equal=greedy_equal,
        greedy_total=len(prompts),
        greedy_tokens=steps,
        chat=_chat(model, tokenizer, llm, chat or CHAT_PROBE, 2 * new_tokens),
        problems=problems,
    )
    _judge(parity, THRESHOLDS[dtype])
    return parity


def _judge(parity: Parity, limits: Thresholds) -> None:
    if parity.top1_agreement < limits.top1:
        parity.problems.append(f"top-1 agreement {parity.top1_agreement:.1%} < {limits.top1:.0%}")
    if parity.perplexity_gap > limits.perplexity:
        parity.problems.append(f"perplexity differs by {parity.perplexity_gap:.2%} > {limits.perplexity:.1%}")
    if limits.greedy and parity.greedy_equal < parity.greedy_total:
        parity.problems.append(f"{parity.greedy_total - parity.greedy_equal} greedy continuations differ")
    chat = parity.chat
    if (
        chat is not None
        and limits.greedy
        and (chat.reply != chat.expected or chat.stopped != chat.expected_stop)
    ):
        parity.problems.append(
            f"chat reply {chat.reply!r} (stop={chat.stopped}) ≠ lmkiln's {chat.expected!r}"
        )
