"""Metrics of generated text against references, computed over a whole evaluation set.

- exact match and token F1 with SQuAD's normalisation (lower case, no punctuation, no articles
  a/an/the, single spaces), the best over each example's accepted answers; 0..1.
- BLEU and chrF from sacrebleu (corpus level, its default tokenisation); 0..100 as sacrebleu reports.
- ROUGE-1/2/L F-measure from rouge-score (with stemming), averaged over examples; 0..1.

sacrebleu and rouge-score are the optional `eval` extra and are imported only when used.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

from lmkiln.errors import LmkilnError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation (the official evaluation script's)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)  # both empty counts as a match, one empty as none
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match_f1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean exact match and token F1, each the best over the example's references."""
    n = max(len(predictions), 1)
    em = sum(
        max(float(normalize_answer(p) == normalize_answer(r)) for r in refs)
        for p, refs in zip(predictions, references)
    )
    f1 = sum(max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references))
    return {"exact_match": em / n, "f1": f1 / n}


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise LmkilnError(f"this metric needs {package}: pip install 'lmkiln[eval]'") from None


def bleu_chrf(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF (sacrebleu); several references per example are allowed."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    width = max(len(refs) for refs in references)
    # sacrebleu wants one stream per reference position; missing references are None
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
    return {
        "bleu": sacrebleu.corpus_bleu(list(predictions), streams).score,
        "chrf": sacrebleu.corpus_chrf(list(predictions), streams).score,
    }


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure, the best over each example's references (rouge-score)."""
    scorer_module = _need("rouge_score.rouge_scorer", "rouge-score")
    scorer = scorer_module.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, refs in zip(predictions, references):
        scores = [scorer.score(r, prediction) for r in refs]
        for key in totals:
            totals[key] += max(s[key].fmeasure for s in scores)
    n = max(len(predictions), 1)
    return {key: value / n for key, value in totals.items()}
