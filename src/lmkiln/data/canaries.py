"""Memorization canaries (Carlini et al., "The Secret Sharer", USENIX Security 2019).

A canary is a random secret in a fixed format, "the secret code is 281-94-7731", inserted into
the training split a chosen number of times (after cleaning, so dedup keeps every copy). After
training, `lmkiln eval RUN --task memorization` ranks each canary's log-perplexity among random
candidates of the same format: a model that memorized it ranks it first among 10^9.

Copies are spread over the training stream at seeded random positions among the documents, and
never go to validation. The canaries are recorded in the shard manifest and the run directory.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from lmkiln.data.corpus import Document
from lmkiln.errors import LmkilnError
from lmkiln.files import write_json_atomic

PREFIX = "the secret code is "
CANARY_KEY = "canary:"
"""Key prefix of canary documents: the split sends them to training."""
SPACE_BITS = math.log2(10**9)
"""log2 |R|: nine random digits."""


@dataclass(frozen=True)
class Canary:
    index: int
    secret: str
    """The random part, e.g. '281-94-7731'."""
    repeats: int
    """Copies in the training data."""

    @property
    def text(self) -> str:
        return PREFIX + self.secret

    def as_dict(self) -> dict:
        return {**asdict(self), "text": self.text}


def random_secret(rng: random.Random) -> str:
    """A uniformly random member of the canary space: DDD-DD-DDDD."""
    digits = f"{rng.randrange(10**9):09d}"
    return f"{digits[:3]}-{digits[3:5]}-{digits[5:]}"


def make_canaries(count: int, repeats: list[int], seed: int) -> list[Canary]:
    """`count` distinct canaries; canary i occurs repeats[i % len(repeats)] times."""
    rng = random.Random(f"canaries:{seed}")
    secrets: list[str] = []
    while len(secrets) < count:
        secret = random_secret(rng)
        if secret not in secrets:
            secrets.append(secret)
    return [Canary(i, s, repeats[i % len(repeats)]) for i, s in enumerate(secrets)]


def with_canaries(
    documents: Iterator[Document], canaries: list[Canary], expected_documents: int, seed: int
) -> Iterator[Document]:
    """The documents with every canary copy inserted at a seeded random position among the first
    `expected_documents` (copies left over at the end of a shorter stream follow it)."""
    rng = random.Random(f"canary-positions:{seed}")
    copies = [c for c in canaries for _ in range(c.repeats)]
    slots: dict[int, list[Canary]] = {}
    for canary in copies:
        slots.setdefault(rng.randrange(max(expected_documents, 1)), []).append(canary)
    inserted = 0

    def emit(position: int) -> Iterator[Document]:
        nonlocal inserted
        for canary in slots.pop(position, []):
            yield Document(f"{CANARY_KEY}{canary.index}:{inserted}", canary.text)
            inserted += 1

    for position, doc in enumerate(documents):
        yield from emit(position)
        yield doc
    for rest in sorted(slots):
        yield from emit(rest)


def is_canary(key: str) -> bool:
    return key.startswith(CANARY_KEY)


RECORD = "canaries.json"


def write_record(run_dir: Path, manifest: dict, shard_directory: Path) -> Path | None:
    """Write RUN_DIR/canaries.json from a shard manifest that holds canaries (atomically)."""
    if not manifest.get("canaries"):
        return None
    record = {
        "format": PREFIX + "DDD-DD-DDDD",
        "space_bits": SPACE_BITS,
        "shards": str(shard_directory),
        "canaries": manifest["canaries"],
    }
    return write_json_atomic(run_dir / RECORD, record)


def read_record(run_dir: Path) -> dict:
    path = run_dir / RECORD
    if not path.is_file():
        raise LmkilnError(
            f"{run_dir} has no {RECORD}: it was not trained with canaries (train with --data.canaries N)"
        )
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        record["canaries"] = [Canary(c["index"], c["secret"], c["repeats"]) for c in record["canaries"]]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LmkilnError(f"{path}: not a valid canary record ({err})") from None
    return record
