"""`lmkiln data audit CORPUS`: the whole picture of a corpus before training on it.

Documents, bytes and tokens; empty documents; exact and near duplicates (each with the document
it copies); PII and secrets by type with file:line and masked values; the mix of Unicode
scripts (and a language guess per document when py3langid, a small offline model, is
installed); the longest and shortest documents. One streaming pass; the dedup state and a few
examples per finding are all it keeps.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice

from lmkiln.config import DataConfig
from lmkiln.data.cleaning import check_text
from lmkiln.data.corpus import iter_documents
from lmkiln.data.dedup import ExactDeduper, NearDeduper, ShingleSpec, exact_digest
from lmkiln.data.scrub import SCRUB_TYPES, Finding, Scrubber, mask
from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError

EXAMPLES = 5
"""Locations listed per finding type, duplicates and document-length extremes."""
LANGUAGE_SAMPLE = 2000
"""Documents whose language is guessed (the first ones; each from its first 2,000 characters)."""
BATCH_DOCUMENTS = 2048


@dataclass
class Audit:
    corpus: str
    documents: int = 0
    empty_documents: int = 0
    empty_examples: list[str] = field(default_factory=list)
    bytes: int = 0
    tokens: int | None = None
    exact_duplicates: int = 0
    near_duplicates: int = 0
    near_searched: bool = True
    """False when datasketch is not installed (near duplicates were not looked for)."""
    duplicate_examples: list[tuple[str, str, str]] = field(default_factory=list)
    """(kind, location of the copy, location of the first occurrence)."""
    findings: Counter = field(default_factory=Counter)
    secret_kinds: Counter = field(default_factory=Counter)
    finding_examples: dict[str, list[tuple[str, str, str]]] = field(default_factory=dict)
    """type -> [(location, detector name, masked value)]."""
    scripts: Counter = field(default_factory=Counter)
    """Characters per Unicode script (letters only; digits, punctuation and spaces are Common)."""
    languages: Counter | None = None
    longest: list[tuple[int, str]] = field(default_factory=list)
    shortest: list[tuple[int, str]] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "corpus": self.corpus,
            "documents": self.documents,
            "empty_documents": self.empty_documents,
            "bytes": self.bytes,
            "tokens": self.tokens,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates if self.near_searched else None,
            "duplicate_examples": self.duplicate_examples,
            "findings": dict(self.findings),
            "secret_kinds": dict(self.secret_kinds),
            "finding_examples": self.finding_examples,
            "scripts": dict(self.scripts.most_common()),
            "languages": dict(self.languages.most_common()) if self.languages is not None else None,
            "longest": self.longest,
            "shortest": self.shortest,
        }


def location(key: str, text: str, offset: int) -> str:
    """file:line of a character of a document: text documents count the lines inside them."""
    name, _, position = key.rpartition(":")
    lines = text.count("\n", 0, offset)
    if position.isdigit() and name.lower().endswith((".txt", ".md")):
        return f"{name}:{int(position) + lines}"
    if not name:  # a whole file (text_unit=file)
        return f"{key}:{1 + lines}"
    if name == "pydoc":  # the built-in corpus: topic, line inside it
        return f"{key}:{1 + lines}"
    if name.startswith("stdlib:") and position.isdigit():  # a docstring: its file's line
        return f"{name}:{int(position) + lines}"
    return key  # a .jsonl line, .csv line or .parquet row holds the whole document


def _script_of(char: str) -> str:
    from fontTools import unicodedata as fontunicode

    if not char.isalpha():
        return "Common"
    return fontunicode.script_name(fontunicode.script(char))


def _language_guesser():
    try:
        import py3langid
    except ImportError:
        return None
    return py3langid.classify


def audit_corpus(
    data: DataConfig,
    tokenizer: Tokenizer | None = None,
    scrub_types: list[str] | None = None,
    dedup: bool = True,
) -> Audit:
    """Read the corpus once and gather the audit (near duplicates use data.dedup_* settings)."""
    audit = Audit(data.corpus)
    scrubber = Scrubber(list(SCRUB_TYPES) if scrub_types is None else scrub_types)
    exact = ExactDeduper() if dedup else None
    first_of: dict[bytes, str] = {}
    near = _near_deduper(data) if dedup else None
    audit.near_searched = near is not None
    near_keys: list[str] = []
    guess = _language_guesser()
    audit.languages = Counter() if guess else None
    characters: Counter = Counter()
    longest: list[tuple[int, str]] = []
    shortest: list[tuple[int, str]] = []
    documents = iter_documents(data.corpus, data.field, data.text_unit, keep_empty=True)
    while batch := list(islice(documents, BATCH_DOCUMENTS)):
        kept = []
        for doc in batch:
            check_text(doc)
            if not doc.text.strip():
                audit.empty_documents += 1
                if len(audit.empty_examples) < EXAMPLES:
                    audit.empty_examples.append(location(doc.key, doc.text, 0))
                continue
            kept.append(doc)
        for doc in kept:
            size = len(doc.text.encode("utf-8"))
            audit.documents += 1
            audit.bytes += size
            characters.update(doc.text)
            _keep_extremes(longest, shortest, size, location(doc.key, doc.text, 0))
            if guess is not None and audit.documents <= LANGUAGE_SAMPLE:
                audit.languages[guess(doc.text[:2000])[0]] += 1
        if tokenizer is not None:
            audit.tokens = (audit.tokens or 0) + sum(
                len(ids) for ids in tokenizer.encode_batch([d.text for d in kept])
            )
        for doc, found in zip(kept, scrubber.find_many([d.text for d in kept])):
            _record_findings(audit, doc.key, doc.text, found)
        if exact is not None:
            kept = _exact_copies(audit, exact, first_of, kept)
        if near is not None and kept:
            for doc, copy in zip(kept, near.copies([d.text for d in kept])):
                if copy is None:
                    near_keys.append(location(doc.key, doc.text, 0))
                    continue
                audit.near_duplicates += 1
                if len(audit.duplicate_examples) < 2 * EXAMPLES:
                    audit.duplicate_examples.append(("near", location(doc.key, doc.text, 0), near_keys[copy]))
    for char, count in characters.items():
        audit.scripts[_script_of(char)] += count
    audit.longest = sorted(longest, reverse=True)
    audit.shortest = sorted((-n, where) for n, where in shortest)
    return audit


def _near_deduper(data: DataConfig) -> NearDeduper | None:
    try:
        return NearDeduper(
            data.dedup_threshold,
            data.dedup_num_perm,
            ShingleSpec(data.dedup_shingle, data.dedup_shingle_size),
        )
    except LmkilnError:  # datasketch is not installed: report exact duplicates only
        return None


def _exact_copies(audit: Audit, exact: ExactDeduper, first_of: dict[bytes, str], docs: list) -> list:
    kept = []
    for doc in docs:
        where = location(doc.key, doc.text, 0)
        if not exact.is_copy(doc.text):
            if len(first_of) < 100_000:  # where the first copies are, for the examples (bounded)
                first_of[exact_digest(doc.text)] = where
            kept.append(doc)
            continue
        audit.exact_duplicates += 1
        if len(audit.duplicate_examples) < EXAMPLES:
            audit.duplicate_examples.append(("exact", where, first_of.get(exact_digest(doc.text), "?")))
    return kept


def _keep_extremes(longest: list, shortest: list, size: int, where: str) -> None:
    for heap, item in ((longest, (size, where)), (shortest, (-size, where))):
        if len(heap) < EXAMPLES:
            heapq.heappush(heap, item)
        else:
            heapq.heappushpop(heap, item)


def _record_findings(audit: Audit, key: str, text: str, found: list[Finding]) -> None:
    for finding in found:
        audit.findings[finding.kind] += 1
        if finding.kind == "secret":
            audit.secret_kinds[finding.name] += 1
        examples = audit.finding_examples.setdefault(finding.kind, [])
        if len(examples) < EXAMPLES:
            examples.append(
                (location(key, text, finding.start), finding.name, mask(finding.value, finding.kind))
            )


def format_audit(audit: Audit) -> str:
    """The audit as `lmkiln data audit` prints it."""
    tokens = f"{audit.tokens:,} tokens" if audit.tokens is not None else "tokens not counted"
    lines = [
        f"corpus: {audit.corpus}",
        f"documents: {audit.documents:,} ({audit.bytes / 1e6:.2f} MB, {tokens}); "
        f"empty: {audit.empty_documents:,}" + (f" (first: {', '.join(audit.empty_examples)})" if audit.empty_examples else ""),
        f"duplicates: {audit.exact_duplicates:,} exact, "
        + (f"{audit.near_duplicates:,} near" if audit.near_searched else "near not searched (pip install 'lmkiln[quality]')")
        + f" ({(audit.exact_duplicates + audit.near_duplicates) / max(audit.documents, 1):.1%} of documents)",
    ]  # fmt: skip
    lines += [f"  {kind:<5} {copy}  copies  {first}" for kind, copy, first in audit.duplicate_examples]
    total = sum(audit.findings.values())
    lines.append(f"PII and secrets: {total:,}" + ("" if total else " found"))
    for kind in SCRUB_TYPES:
        if not audit.findings[kind]:
            continue
        detail = ""
        if kind == "secret":
            detail = " (" + ", ".join(f"{n} {name}" for name, n in audit.secret_kinds.most_common()) + ")"
        lines.append(f"  {kind:<12} {audit.findings[kind]:>6,}{detail}")
        lines += [f"    {where}  {value}  [{name}]" for where, name, value in audit.finding_examples[kind]]
    characters = sum(audit.scripts.values())
    mix = ", ".join(f"{name} {n / characters:.1%}" for name, n in audit.scripts.most_common(6))
    lines.append(f"scripts: {mix}")
    if audit.languages is not None:
        guessed = sum(audit.languages.values())
        top = ", ".join(f"{lang} {n / guessed:.1%}" for lang, n in audit.languages.most_common(5))
        lines.append(f"languages (py3langid, {guessed:,} documents): {top}")
    else:
        lines.append("languages: not guessed (pip install py3langid for a per-document guess)")
    lines.append("longest: " + ", ".join(f"{where} ({n:,} B)" for n, where in audit.longest))
    lines.append("shortest: " + ", ".join(f"{where} ({n:,} B)" for n, where in audit.shortest))
    return "\n".join(lines)
