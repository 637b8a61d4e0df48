"""Preference objectives (DPO, ORPO) and their evaluator, for batches of `data.preference`.

A batch holds 2B rows: B chosen replies, then their B rejected replies. Per pair:

    DPO   Δ = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))      (summed log-probs)
          loss = −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)        (Rafailov et al. 2023; ε: conservative DPO)
    ORPO  p̄ = mean per-token log-prob of a reply;  odds(y) = p̄ − log(1 − e^p̄)
          loss = −p̄(y_c) − β·log σ(odds(y_c) − odds(y_r))                    (Hong et al. 2024)

The rewards are β·(log π − log π_ref) for DPO and β·p̄ for ORPO, as TRL reports them; a pair is
"won" when the chosen reward is higher (a tie is half a win). The objective returns the sum of per-pair losses and
counts pairs, so gradient accumulation stays exact (`lmkiln.train.step`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lmkiln.data.loader import IGNORE_INDEX
from lmkiln.model.loss import upcast
from lmkiln.train.evaluate import Evaluator
from lmkiln.train.objectives import Batch
from lmkiln.train.runtime import Runtime

Reference = Callable[[nn.Module, Batch], torch.Tensor]
"""Reference log-probabilities (2B,) of a batch's rows, computed during the step (no grad)."""


def sequence_logps(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, their number), both (N,)."""
    inputs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    logits = upcast(model(batch["input_ids"], **inputs))  # (N, T, V)
    labels = batch["labels"]  # (N, T)
    trained = labels != IGNORE_INDEX
    picked = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (N, T)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * trained
    return token_logps.sum(dim=-1), trained.sum(dim=-1)


def dpo_losses(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair from summed log-probs, all (B,)."""
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    logits = chosen_rewards - rejected_rewards  # βΔ
    loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return loss, chosen_rewards.detach(), rejected_rewards.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, accurate at both ends (Mächler 2012)."""
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(
    chosen_mean: torch.Tensor, rejected_mean: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen reward, rejected reward) per pair from mean per-token log-probs, all (B,)."""
    log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
    loss = -chosen_mean - beta * F.logsigmoid(log_odds)
    return loss, beta * chosen_mean.detach(), beta * rejected_mean.detach()


@dataclass
class PairTerms:
    """Per-pair results of one batch, all (B,)."""

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def stats(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weighted sums of the figures the loop logs (weight 0: a padding slot)."""
        margin = self.chosen_rewards - self.rejected_rewards
        return {
            "reward_margin": (margin * weight).sum(),
            # A tie (the untrained policy IS the DPO reference: every margin is 0) counts as half
            # a win, so accuracy starts at 0.5 rather than 0.
            "reward_accuracy": (((margin > 0).float() + 0.5 * (margin == 0).float()) * weight).sum(),
            "logps_chosen": (self.chosen_logps.detach() * weight).sum(),
            "logps_rejected": (self.rejected_logps.detach() * weight).sum(),
        }


@dataclass
class PreferenceLoss:
    """DPO or ORPO over a batch of pairs (see the module docstring); counts pairs."""

    kind: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference: Reference | None = None
    """DPO without precomputed `ref_logps` in the batch: how to compute them during the step."""
    _sums: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    """Weighted sums since the last log, on the device ("pairs": their weight)."""

    def count(self, batch: Batch) -> torch.Tensor:
        return batch["pair_weight"].sum()

    def __call__(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        terms = self.pair_terms(model, batch)
        weight = batch["pair_weight"].to(terms.loss.dtype)
        for name, value in {**terms.stats(weight), "pairs": weight.sum()}.items():
            self._sums[name] = self._sums.get(name, 0.0) + value  # on the device: no host sync
        return (terms.loss * weight).sum()

    def pair_terms(self, model: nn.Module, batch: Batch) -> PairTerms:
        sums, counts = sequence_logps(model, batch)  # (2B,) chosen rows, then rejected rows
        chosen, rejected = sums.chunk(2)
        if self.kind == "orpo":
            # A padding slot scores no token (mean 0, where log(1 − e⁰) = −inf): keep every mean
            # just below 0 so its zero-weighted loss stays finite (and its gradient 0, not NaN).
            means = (sums / counts.clamp(min=1)).clamp(max=-1e-6)
            chosen_mean, rejected_mean = means.chunk(2)
            loss, good, bad = orpo_losses(chosen_mean, rejected_mean, self.beta)
            return PairTerms(loss, chosen, rejected, good, bad)
        reference = batch.get("ref_logps")
        if reference is None:
            if self.reference is None:
                raise ValueError("DPO needs ref_logps in the batch or a reference function")
            reference = self.reference(model, batch)
        ref_chosen, ref_rejected = reference.to(sums.dtype).chunk(2)
        loss, good, bad = dpo_losses(
            chosen, rejected, ref_chosen, ref_rejected, self.beta, self.label_smoothing
        )
        return PairTerms(loss, chosen, rejected, good, bad)

    def logged_metrics(self) -> dict[str, float]:
        """Means over the pairs trained since the last call (this process's share), then reset."""
        sums, self._sums = self._sums, {}
        pairs = max(float(sums.pop("pairs", 0.0)), 1.0)
        return {name: float(value) / pairs for name, value in sums.items()}


def preference_evaluator(batches: Sequence[Batch], loss: PreferenceLoss) -> Evaluator:
    """val_loss, val_accuracy (chosen reward above rejected), val_margin and the mean log-probs of
    the chosen and rejected replies over the held-out pairs (every process scores all of them)."""

    def evaluate(model: nn.Module, runtime: Runtime) -> dict[str, float]:
        totals: dict[str, float] = {"loss": 0.0}
        pairs = 0.0
        for batch in batches:
            batch = {k: v.to(runtime.device) for k, v in batch.items()}
            terms = loss.pair_terms(model, batch)
            weight = batch["pair_weight"].to(terms.loss.dtype)
            totals["loss"] += float((terms.loss * weight).sum())
            for name, value in terms.stats(weight).items():
                totals[name] = totals.get(name, 0.0) + float(value)
            pairs += float(weight.sum())
        names = {"reward_accuracy": "accuracy", "reward_margin": "margin"}
        return {f"val_{names.get(k, k)}": v / max(pairs, 1.0) for k, v in totals.items()}

    return evaluate
