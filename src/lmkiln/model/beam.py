"""Beam search for sequence tasks (translation, summarization): the k best continuations of a prompt.

    prompt ─ prefill once ─ cache copied to k rows ─ [ log-softmax ─ best 2k (beam, token) ─ EOS ends
           a hypothesis, the rest become the new beams ─ cache rows reordered ] ─ best normalised hypothesis

A hypothesis ends at EOS (or at max_new_tokens) and is scored by its summed log-probability over
`length ** length_penalty`, its length counting the EOS: 1.0 is the plain mean, 0 the raw sum
(which favours short outputs), and larger values favour longer ones. The search stops only
when no running beam can beat the k-th finished hypothesis — at its current length by default
(transformers' heuristic), or at any reachable length with exhaustive=True, which with enough
beams returns the exact best sequence (tests check both against brute force and transformers).
One beam is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmkiln.errors import LmkilnError
from lmkiln.model.transformer import KVCache


@dataclass
class Hypothesis:
    tokens: list[int]
    """Generated tokens, without the EOS that ended them."""
    logprob: float
    """Summed log-probability, the EOS included."""
    score: float
    """logprob / length ** length_penalty (the ranking key)."""
    ended: bool = True
    """Whether it ended at EOS (False: cut at max_new_tokens)."""


def check_beams(beams: int) -> None:
    if beams < 1:
        raise LmkilnError(f"the beam width must be at least 1, got {beams}")


def _score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / max(length, 1) ** length_penalty


@torch.inference_mode()
def beam_search_ids(
    model: nn.Module,
    prompt: list[int],
    beams: int,
    max_new_tokens: int,
    eos_id: int | None,
    length_penalty: float = 1.0,
    exhaustive: bool = False,
) -> Hypothesis:
    """The best continuation of one prompt under beam search of width `beams`.

    exhaustive=False stops once the best live beam, scored at its current length, cannot beat
    the k-th finished hypothesis (transformers' default, `early_stopping=False`); True waits until
    no live beam could win at any reachable length (`early_stopping="never"`), which with a
    positive length penalty usually means running to max_new_tokens.
    """
    check_beams(beams)
    if not prompt:
        raise LmkilnError("every prompt needs at least one token")
    cfg = model.cfg
    steps = min(max_new_tokens, cfg.block_size - len(prompt))
    if steps <= 0:
        raise LmkilnError(f"prompt of {len(prompt)} tokens leaves no room in the context of {cfg.block_size}")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    cache = KVCache.empty(cfg, 1, len(prompt) + steps, device, dtype)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[:, -1]  # (1, V)
    scores = torch.zeros(1, device=device)  # one live beam at first; the first step fans it out
    sequences: list[list[int]] = [[]]
    finished: list[Hypothesis] = []
    for step in range(steps):
        total = scores[:, None] + torch.log_softmax(logits.float(), dim=-1)  # (k, V)
        best, flat = total.flatten().topk(min(2 * beams, total.numel()))
        rows, tokens, new_scores = [], [], []
        for value, index in zip(best.tolist(), flat.tolist()):
            if value == float("-inf"):
                break
            row, token = divmod(index, total.shape[1])
            if token == eos_id:
                length = step + 1
                finished.append(Hypothesis(sequences[row], value, _score(value, length, length_penalty)))
                continue
            rows.append(row)
            tokens.append(token)
            new_scores.append(value)
            if len(rows) == beams:
                break
        finished = sorted(finished, key=lambda h: h.score, reverse=True)[:beams]
        horizon = steps if exhaustive else step + 1
        if not rows or _done(finished, new_scores[0], beams, step + 1, horizon, length_penalty):
            break
        order = torch.tensor(rows, device=device)  # the cache follows its beams (rows may repeat)
        cache.keys = [k.index_select(0, order) for k in cache.keys]
        cache.values = [v.index_select(0, order) for v in cache.values]
        sequences = [sequences[r] + [t] for r, t in zip(rows, tokens)]
        scores = torch.tensor(new_scores, device=device)  # (k',): k' < k while few tokens are possible
        logits = model(torch.tensor(tokens, device=device)[:, None], cache=cache)[:, -1]
    else:
        return _best(finished, sequences, scores.tolist(), steps, length_penalty)
    return finished[0]


def _done(
    finished: list[Hypothesis], best_running: float, beams: int, length: int, horizon: int, penalty: float
) -> bool:
    """True when no running beam can still enter the top `beams` finished hypotheses.

    A running beam's summed log-probability only falls; its best possible normalised score is that
    sum over the most favourable length up to `horizon` (the longest when penalty > 0).
    """
    if len(finished) < beams:
        return False
    reachable = horizon if penalty > 0 else length + 1
    return _score(best_running, reachable, penalty) <= finished[-1].score


def _best(
    finished: list[Hypothesis], sequences: list[list[int]], scores: list[float], length: int, penalty: float
) -> Hypothesis:
    """At the length limit, the running beams count as hypotheses of their length."""
    running = [Hypothesis(s, v, _score(v, length, penalty), False) for s, v in zip(sequences, scores)]
    return max([*finished, *running], key=lambda h: h.score)
