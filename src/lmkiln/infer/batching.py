"""Continuous batching: many generation requests share one model, joining and leaving between steps.

Requests that arrive together are prefilled together (their prompts left-padded in a cache of
their own, as `generate_ids` runs a batch of prompts) and then join the running batch. The batch keeps every row's keys and values
right-aligned in one cache per layer, (rows, K, capacity, D): all rows end at column `end`, a row
of n tokens holds columns end-n .. end-1, and an attention mask hides the columns before them. A
decode step feeds each row the token it sampled last at the row's own position, so a row computes
what it would compute alone. A finished row leaves (the last row moves into its place); when `end`
reaches the capacity, or rows that left made the batch much shorter, every row shifts left at once.

`ContinuousBatcher` is single-threaded and is stepped by its owner: `lmkiln chat` steps it inline,
`BatchScheduler` runs it on a thread of its own for the HTTP server.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.infer.generate import TextStream
from lmkiln.model.generate import Sampling, sample_next
from lmkiln.model.transformer import KVCache

log = logging.getLogger("lmkiln")


@dataclass(frozen=True)
class Update:
    """What a request produced since its last update; the last update carries `finish_reason`."""

    text: str
    """New text (may be empty: a partial UTF-8 character or a possible stop-string start is held back)."""
    tokens: int
    """Tokens generated so far, the one that ended generation (EOS, end of turn) included."""
    finish_reason: str | None = None
    """'stop' (EOS, end of turn or a stop string), 'length' (max tokens or the context is full),
    'cancelled' (the client went away) or 'error'."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: Sampling
    stop_ids: frozenset[int]
    """Tokens that end the answer (EOS, the chat template's end of turn); never shown as text."""
    on_update: Callable[[Update], None]
    """Called on the batcher's thread after every token with new text and once at the end."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    """Set by any thread to drop the request at the next step (its row is freed)."""


@dataclass
class _Row:
    """A request in the running batch."""

    request: GenerationRequest
    stream: TextStream
    generator: torch.Generator | None
    pending: int = -1
    """The token sampled last, fed at the next step."""
    generated: int = 0


class BatchCache:
    """Keys and values of the running rows, right-aligned at column `end` of one tensor per layer."""

    def __init__(self, cache: KVCache) -> None:
        self.kv = cache  # (max_rows, K, capacity, D) per layer; KVCache.length is unused here
        self.end = 0
        self.lengths: list[int] = []
        """Tokens in the cache of each row, in row order."""

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.kv.capacity

    def view(self) -> KVCache:
        """The running rows as a KVCache the model writes the next token into (at column `end`)."""
        n = self.rows
        return KVCache([k[:n] for k in self.kv.keys], [v[:n] for v in self.kv.values], self.end)

    def attention_mask(self, device: torch.device) -> torch.Tensor | None:
        """(rows, end+1) with 1 on each row's own keys and the new one; None when every row fills the cache."""
        if all(length == self.end for length in self.lengths):
            return None
        columns = torch.arange(self.end + 1, device=device)  # (end+1,)
        first = torch.tensor([self.end - n for n in self.lengths], device=device)  # (rows,)
        return (columns[None, :] >= first[:, None]).long()

    def add(self, prefilled: KVCache, index: int, length: int) -> None:
        """Append row `index` of a prefill cache (B, K, P, D) per layer, whose prompt of `length`
        tokens is right-aligned (left-padded) in it."""
        if length > self.end:
            self.shift(length)
        row, start, width = self.rows, self.end - length, prefilled.length
        for layer, (keys, values) in enumerate(zip(self.kv.keys, self.kv.values)):
            keys[row, :, start : self.end] = prefilled.keys[layer][index, :, width - length : width]
            values[row, :, start : self.end] = prefilled.values[layer][index, :, width - length : width]
        self.lengths.append(length)

    def remove(self, row: int) -> None:
        """Drop a row; the last row takes its place (callers reorder their rows the same way)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            for keys, values in zip(self.kv.keys, self.kv.values):
                keys[row, :, self.end - n : self.end] = keys[last, :, self.end - n : self.end]
                values[row, :, self.end - n : self.end] = values[last, :, self.end - n : self.end]
            self.lengths[row] = n
        self.lengths.pop()
        longest = max(self.lengths, default=0)
        if self.end - longest > 8:  # columns no row needs would still be attended over every step
            self.shift(longest)

    def advance(self) -> None:
        """Every row gained the token the model just wrote at column `end`."""
        self.end += 1
        self.lengths = [n + 1 for n in self.lengths]

    def make_room(self) -> None:
        """Make column `end` free for the next token (shift left when the cache is full)."""
        if self.end >= self.capacity:
            self.shift(max(self.lengths))

    def shift(self, new_end: int) -> None:
        """Move every row so that it ends at `new_end` (≥ the longest row)."""
        longest = max(self.lengths, default=0)
        n = self.rows
        if n and longest and new_end != self.end:
            for keys, values in zip(self.kv.keys, self.kv.values):
                keys[:n, :, new_end - longest : new_end] = keys[:n, :, self.end - longest : self.end].clone()
                values[:n, :, new_end - longest : new_end] = values[
                    :n, :, self.end - longest : self.end
                ].clone()
        self.end = new_end


class ContinuousBatcher:
    """Generates for many requests at once; `step()` admits waiting requests and decodes one token."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_rows: int = 8) -> None:
        if max_rows < 1:
            raise LmkilnError(f"the batch needs at least one row, got max_rows={max_rows}")
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.context = model.cfg.block_size
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        # A quarter of a context of slack: the batch shifts left at most every context/4 steps.
        capacity = self.context + max(16, self.context // 4)
        self.cache = BatchCache(KVCache.empty(model.cfg, max_rows, capacity, self.device, self.dtype))
        self.rows: list[_Row] = []
        self.waiting: deque[GenerationRequest] = deque()
        self.finished: Counter[str] = Counter()
        """Requests ended so far, by finish reason."""

    @property
    def busy(self) -> bool:
        return bool(self.rows or self.waiting)

    def add(self, request: GenerationRequest) -> None:
        """Queue a request; it joins the batch at the next step with a free row."""
        if not request.prompt_ids:
            raise LmkilnError("the prompt needs at least one token")
        if len(request.prompt_ids) >= self.context:
            raise LmkilnError(
                f"prompt of {len(request.prompt_ids)} tokens leaves no room in the model's context "
                f"of {self.context}"
            )
        self.waiting.append(request)

    @torch.inference_mode()
    def step(self) -> None:
        """Drop cancelled requests, prefill waiting ones into free rows, then decode one token per row."""
        for index in reversed(range(len(self.rows))):
            if self.rows[index].request.cancelled.is_set():
                self._finish(self.rows[index], "cancelled")
                self._remove(index)
        joining = []
        while self.waiting and len(self.rows) + len(joining) < self.max_rows:
            request = self.waiting.popleft()
            if request.cancelled.is_set():
                self.finished["cancelled"] += 1
                request.on_update(Update("", 0, "cancelled"))
            else:
                joining.append(request)
        if joining:
            self._prefill(joining)
        if self.rows:
            self._decode()

    def cancel_all(self, reason: str = "cancelled") -> None:
        """End every request now (the batcher is shutting down or hit an error)."""
        for row in self.rows:
            self._finish(row, reason)
        while self.waiting:
            self.finished[reason] += 1
            self.waiting.popleft().on_update(Update("", 0, reason))
        self.rows.clear()
        self.cache.lengths.clear()
        self.cache.end = 0

    # -- internals -----------------------------------------------------------------------------
    def _prefill(self, requests: list[GenerationRequest]) -> None:
        """Run the prompts of joining requests in one forward pass; each takes its first token and
        (unless that ends it) a row of the batch."""
        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        ids = torch.zeros((len(requests), width), dtype=torch.long, device=self.device)  # (B, P)
        mask = torch.zeros_like(ids)
        for index, request in enumerate(requests):  # left-padded: every prompt ends at column P-1
            ids[index, width - lengths[index] :] = torch.tensor(request.prompt_ids, device=self.device)
            mask[index, width - lengths[index] :] = 1
        inputs = {}
        if min(lengths) != width:  # padding to hide; positions count real tokens only
            inputs = {"attention_mask": mask, "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)}
        prefill = KVCache.empty(self.model.cfg, len(requests), width, self.device, self.dtype)
        logits = self.model(ids, cache=prefill, **inputs)[:, -1]  # (B, V)
        rows = [self._new_row(request) for request in requests]
        for index, (row, token) in enumerate(zip(rows, self._sample(logits, rows))):
            if self._accept(row, token, lengths[index]):
                self.cache.add(prefill, index, lengths[index])
                self.rows.append(row)

    def _new_row(self, request: GenerationRequest) -> _Row:
        sampling = request.sampling
        generator = None
        if sampling.seed is not None and sampling.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed)
        return _Row(request, TextStream(self.tokenizer, sampling.stop), generator)

    def _decode(self) -> None:
        self.cache.make_room()
        tokens = torch.tensor([[row.pending] for row in self.rows], device=self.device)  # (n, 1)
        positions = torch.tensor([[n] for n in self.cache.lengths], device=self.device)  # (n, 1)
        mask = self.cache.attention_mask(self.device)
        inputs = {"position_ids": positions}
        if mask is not None:
            inputs["attention_mask"] = mask
        logits = self.model(tokens, cache=self.cache.view(), **inputs)[:, -1]  # (n, V)
        self.cache.advance()
        sampled = self._sample(logits, self.rows)
        done = [
            index
            for index, (row, token, length) in enumerate(zip(self.rows, sampled, self.cache.lengths))
            if not self._accept(row, token, length)
        ]
        for index in reversed(done):  # from the back: a row moved into a hole is never one that ended
            self._remove(index)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        """(n, V) logits -> a token per row, each row with its own sampling settings and generator."""
        greedy = logits.argmax(dim=-1).tolist()
        return [
            greedy[i]
            if row.request.sampling.temperature <= 0
            # one row at a time: a seeded request draws the same numbers whatever else is batched
            else int(sample_next(logits[i : i + 1], row.request.sampling, row.generator)[0])
            for i, row in enumerate(rows)
        ]

    def _accept(self, row: _Row, token: int, length: int) -> bool:
        """Take a row's new token (its cache holds `length` tokens); False when the row is done."""
        row.generated += 1
        if token in row.request.stop_ids:
            self._finish(row, "stop")
            return False
        delta = row.stream.push(token)
        if row.stream.stopped:
            self._finish(row, "stop", delta)
            return False
        # prompt and answer together fill at most the context (as in generate_ids)
        if row.generated >= row.request.sampling.max_new_tokens or length + 1 >= self.context:
            self._finish(row, "length", delta)
            return False
        if delta:
            row.request.on_update(Update(delta, row.generated))
        row.pending = token
        return True

    def _finish(self, row: _Row, reason: str, delta: str = "") -> None:
        text = row.stream.text()  # held-back text is output now that nothing can follow it
        rest = text[len(row.stream.emitted) :] if text.startswith(row.stream.emitted) else ""
        self.finished[reason] += 1
        row.request.on_update(Update(delta + rest, row.generated, reason))

    def _remove(self, index: int) -> None:
        self.cache.remove(index)
        last = self.rows.pop()
        if index < len(self.rows):
            self.rows[index] = last


def run_to_completion(batcher: ContinuousBatcher, request: GenerationRequest) -> None:
    """Generate for one request on the calling thread (the batch may hold others too)."""
    batcher.add(request)
    while batcher.busy:
        batcher.step()


# --------------------------------------------------------------------------------------------
# The scheduler thread of the server


class QueueFull(Exception):
    """More requests are waiting than the scheduler accepts (HTTP 429)."""


class ShuttingDown(Exception):
    """The scheduler is draining its requests before the process exits (HTTP 503)."""


class BatchScheduler:
    """Runs a ContinuousBatcher on a thread of its own, the only thread that touches the model.

    Requests wait in a bounded queue; between decoding steps the thread moves waiting requests
    into free rows of the batch. `close()` stops accepting, finishes (drains) what was accepted
    and ends the thread.
    """

    def __init__(
        self,
        batcher: ContinuousBatcher,
        max_waiting: int = 64,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        self.batcher, self.max_waiting = batcher, max_waiting
        self.after_step = after_step
        """Called on the thread after every step, e.g. to hand the step's updates on in one go."""
        self._incoming: deque[GenerationRequest] = deque()
        self._condition = threading.Condition()
        self._accepting = True
        self._stopping = False
        self._waiting = 0  # requests the batcher has not yet admitted (read by other threads)
        self._running = 0
        self._finished: dict[str, int] = {}
        self._thread = threading.Thread(target=self._loop, name="lmkiln-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stats(self) -> dict[str, object]:
        with self._condition:
            return {
                "running": self._running,
                "waiting": self._waiting + len(self._incoming),
                "finished": dict(self._finished),
            }

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; raises QueueFull or ShuttingDown instead of waiting."""
        with self._condition:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down")
            if self._waiting + len(self._incoming) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            self._incoming.append(request)
            self._condition.notify()

    def stop_accepting(self) -> None:
        with self._condition:
            self._accepting = False

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting, finish every accepted request, end the thread."""
        with self._condition:
            self._accepting = False
            self._stopping = True
            self._condition.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        batcher = self.batcher
        while True:
            with self._condition:
                while not self._incoming and not batcher.busy and not self._stopping:
                    self._condition.wait()
                if self._stopping and not self._incoming and not batcher.busy:
                    return
                while self._incoming:
                    request = self._incoming.popleft()
                    try:
                        batcher.add(request)
                    except LmkilnError:  # checked before submit; a request that slips through fails alone
                        batcher.finished["error"] += 1
                        request.on_update(Update("", 0, "error"))
            try:
                batcher.step()
            except Exception:  # a bug or out of memory: fail the batch, keep serving
                log.exception("generation step failed; ending the requests of the batch")
                batcher.cancel_all("error")
            if self.after_step is not None:
                self.after_step()
            with self._condition:
                self._running, self._waiting = len(batcher.rows), len(batcher.waiting)
                self._finished = dict(batcher.finished)
