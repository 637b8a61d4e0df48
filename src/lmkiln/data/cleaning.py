"""The cleaning stage of `data prepare`: scrub, then drop duplicates, before the split.

Documents stream through in batches (the scrubber and near dedup are vectorized per batch);
only the dedup state grows with the corpus. Scrubbing runs first, so two documents that differ
only in an address count as copies. Both the tokenizer's texts and the shards come from here,
so a scrubbed secret never reaches a vocabulary either. Counts go to the shard manifest.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

from lmkiln.config import DataConfig
from lmkiln.data.canaries import Canary, make_canaries, with_canaries
from lmkiln.data.corpus import Document, iter_documents
from lmkiln.data.dedup import ExactDeduper, NearDeduper, ShingleSpec
from lmkiln.data.scrub import Scrubber
from lmkiln.errors import LmkilnError

BATCH_DOCUMENTS = 2048


def cleaning_active(data: DataConfig) -> bool:
    return data.dedup != "none" or bool(data.scrub)


def cleaning_settings(data: DataConfig) -> dict:
    """The settings that change the cleaned text (part of the tokenizer and shard cache keys)."""
    settings: dict = {"dedup": data.dedup, "scrub": sorted(data.scrub)}
    if data.dedup == "near":
        settings.update(
            threshold=data.dedup_threshold,
            shingle=[data.dedup_shingle, data.dedup_shingle_size],
            num_perm=data.dedup_num_perm,
        )
    return settings


@dataclass
class CleaningCounts:
    documents: int = 0
    """Documents read."""
    exact_duplicates: int = 0
    near_duplicates: int = 0
    scrubbed: Counter = field(default_factory=Counter)
    """Replacements by scrub type."""
    secret_kinds: Counter = field(default_factory=Counter)
    """Replacements of type secret by what they were (aws_access_key, private_key, ...)."""

    def as_dict(self) -> dict:
        return {
            "documents_read": self.documents,
            "exact_duplicates_dropped": self.exact_duplicates,
            "near_duplicates_dropped": self.near_duplicates,
            "scrubbed": dict(sorted(self.scrubbed.items())),
            "secret_kinds": dict(sorted(self.secret_kinds.items())),
        }


def check_text(doc: Document) -> None:
    """Binary data has no place in a text corpus (NUL never occurs in text)."""
    if "\x00" in doc.text:
        raise LmkilnError(
            f"{doc.key}: binary data (a NUL byte) in a text document; remove the file or convert it to text"
        )


def clean_documents(data: DataConfig, counts: CleaningCounts | None = None) -> Iterator[Document]:
    """The corpus' documents, scrubbed and without duplicates, in order (the corpus as it is when
    no cleaning is configured)."""
    counts = counts if counts is not None else CleaningCounts()
    documents = iter_documents(data.corpus, data.field, data.text_unit)
    scrubber = Scrubber(data.scrub) if data.scrub else None
    exact = ExactDeduper() if data.dedup != "none" else None
    near = (
        NearDeduper(
            data.dedup_threshold,
            data.dedup_num_perm,
            ShingleSpec(data.dedup_shingle, data.dedup_shingle_size),
        )
        if data.dedup == "near"
        else None
    )
    while batch := list(islice(documents, BATCH_DOCUMENTS)):
        for doc in batch:
            check_text(doc)
        counts.documents += len(batch)
        if scrubber is not None:
            texts, found = scrubber.scrub_many([d.text for d in batch])
            for findings in found:
                counts.scrubbed.update(f.kind for f in findings)
                counts.secret_kinds.update(f.name for f in findings if f.kind == "secret")
            batch = [doc._replace(text=text) for doc, text in zip(batch, texts)]
        if exact is not None:
            kept = [doc for doc in batch if not exact.is_copy(doc.text)]
            counts.exact_duplicates += len(batch) - len(kept)
            batch = kept
        if near is not None and batch:
            kept = [doc for doc, copy in zip(batch, near.copies([d.text for d in batch])) if copy is None]
            counts.near_duplicates += len(batch) - len(kept)
            batch = kept
        yield from batch


def shard_canaries(data: DataConfig) -> list[Canary]:
    return make_canaries(data.canaries, data.canary_repeats, data.seed) if data.canaries else []


def shard_documents(data: DataConfig, counts: CleaningCounts, canaries: list[Canary]) -> Iterator[Document]:
    """What the shards hold: the cleaned documents, with the canaries' copies spread among them."""
    documents = clean_documents(data, counts)
    if not canaries:
        return documents
    expected = sum(1 for _ in iter_documents(data.corpus, data.field, data.text_unit))
    return with_canaries(documents, canaries, expected, data.seed)


def describe_cleaning(manifest: dict) -> str:
    """One line of a shard manifest's cleaning counts and canaries ('' when it has none)."""
    parts = []
    cleaning = manifest.get("cleaning")
    if cleaning:
        parts.append(
            f"{cleaning['exact_duplicates_dropped']:,} exact and {cleaning['near_duplicates_dropped']:,} near "
            f"duplicates dropped of {cleaning['documents_read']:,} documents"
        )
        scrubbed = ", ".join(f"{n:,} {kind}" for kind, n in cleaning["scrubbed"].items())
        parts.append(f"scrubbed {scrubbed or 'nothing'}")
    if manifest.get("canaries"):
        repeats = sorted({c["repeats"] for c in manifest["canaries"]})
        parts.append(f"{len(manifest['canaries'])} canaries (repeated {'/'.join(map(str, repeats))}x)")
    return "; ".join(parts)
