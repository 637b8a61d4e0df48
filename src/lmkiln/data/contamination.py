"""Train/test contamination: which evaluation examples share a long n-gram with the training corpus.

The method of the GPT-3 paper (Brown et al. 2020, appendix C): an example is contaminated when
any of its 13-grams also occurs in the training data. Tokens are normalized words (NFKC, case
folded, runs of letters and digits; punctuation and spacing ignored), so the result does not
depend on a tokenizer and matches text that only differs in layout. An example shorter than n
words is matched as a whole (one gram of its own length, if it has at least MIN_WORDS words;
shorter ones are reported as not checked).

It streams: the hashes of every evaluation gram are held in memory (8 bytes each), the training
corpus is read once, document by document, and each batch of its words is hashed with numpy
(prefix sums of a polynomial hash modulo 2^64 give every window of every length at once).
"""

from __future__ import annotations

import csv
import json
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from lmkiln.data.corpus import iter_documents
from lmkiln.data.textfile import decoded_lines, jsonl_rows
from lmkiln.errors import LmkilnError
from lmkiln.files import atomic_path

NGRAM = 13
MIN_WORDS = 3
BATCH_DOCUMENTS = 4096
WORD = re.compile(r"\w+")
_BASE = np.uint64(0x100000001B3)  # odd, so invertible modulo 2^64


def words(text: str) -> list[str]:
    return WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _word_ids(tokens: list[str]) -> np.ndarray:
    # Python's str hash: salted per process, which is fine, both sides are hashed in this process
    return np.fromiter(map(hash, tokens), dtype=np.int64, count=len(tokens)).view(np.uint64)


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """(n + 1,) base^i modulo 2^64."""
    out = np.ones(n + 1, dtype=np.uint64)
    if n:
        np.multiply.accumulate(np.full(n, base, dtype=np.uint64), out=out[1:])
    return out


class _Windows:
    """Hashes of every window of a word-id array: hash(i, L) = (P[i+L] - P[i]) * B^-i (mod 2^64)."""

    def __init__(self, ids: np.ndarray) -> None:
        n = len(ids)
        products = ids * _powers(_BASE, n)[:n]  # (n,) w_i B^i
        self.prefix = np.concatenate(([np.uint64(0)], np.cumsum(products, dtype=np.uint64)))  # (n + 1,)
        self.inverse_powers = _powers(np.uint64(pow(int(_BASE), -1, 2**64)), n)

    def hashes(self, length: int) -> np.ndarray:
        """(n - length + 1,) hash of the window starting at each position."""
        count = len(self.prefix) - length
        if count <= 0:
            return np.zeros(0, dtype=np.uint64)
        return (self.prefix[length : length + count] - self.prefix[:count]) * self.inverse_powers[:count]


def gram_hashes(tokens: list[str], length: int) -> np.ndarray:
    return _Windows(_word_ids(tokens)).hashes(length)


@dataclass
class Example:
    location: str
    """file:line (or row) of the example."""
    text: str
    length: int = 0
    """Gram length it is checked with (0 = not checked: too short)."""
    grams: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    hits: int = 0
    """Its grams found in the training corpus."""
    match: str = ""
    """Where a matching gram is in the training corpus, and the gram."""

    @property
    def overlap(self) -> float:
        return self.hits / len(self.grams) if len(self.grams) else 0.0


def _strings(value: object) -> Iterator[str]:
    """Every string inside a row value (messages lists, nested objects): all fields count."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def read_examples(path: Path) -> list[Example]:
    """The examples of an evaluation file: rows of .jsonl/.csv/.parquet (all string fields joined)
    or paragraphs of a .txt/.md file."""
    if not path.is_file():
        raise LmkilnError(f"evaluation file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return [Example(f"{path}:{n}", "\n".join(_strings(row))) for n, row in jsonl_rows(path)]
    if suffix in (".csv", ".parquet"):
        from lmkiln.data.tables import read_table

        table = read_table(str(path))
        names = list(table.columns)
        return [
            Example(table.where(i), "\n".join(s for name in names for s in _strings(table.columns[name][i])))
            for i in range(table.n_rows)
        ]
    if suffix in (".txt", ".md"):
        return [Example(f"{path.parent / doc.key}", doc.text) for doc in iter_documents(str(path))]
    raise LmkilnError(f"{path}: unsupported evaluation file {suffix!r}; use .jsonl, .csv, .parquet or .txt")


@dataclass
class FileReport:
    path: Path
    examples: list[Example]
    ngram: int

    @property
    def checked(self) -> int:
        return sum(e.length > 0 for e in self.examples)

    @property
    def contaminated(self) -> list[Example]:
        return [e for e in self.examples if e.hits]

    def share(self) -> float:
        return len(self.contaminated) / max(self.checked, 1)

    def worst(self, count: int = 5) -> list[Example]:
        return sorted(self.contaminated, key=lambda e: -e.overlap)[:count]

    def as_dict(self, count: int = 5) -> dict:
        return {
            "file": str(self.path),
            "examples": len(self.examples),
            "checked": self.checked,
            "contaminated": len(self.contaminated),
            "share": self.share(),
            "worst": [
                {"location": e.location, "overlap": round(e.overlap, 4), "match": e.match}
                for e in self.worst(count)
            ],
        }


def check_contamination(train: str, eval_files: list[str], ngram: int = NGRAM, field_name: str = "text",
                        text_unit: str = "paragraph") -> list[FileReport]:  # fmt: skip
    """Mark every example of the evaluation files that shares an n-gram with the training corpus."""
    if ngram < 1:
        raise LmkilnError(f"--ngram must be positive, got {ngram}")
    reports = []
    wanted: dict[int, dict[int, list[Example]]] = {}  # gram length -> gram hash -> examples
    for name in eval_files:
        examples = read_examples(Path(name))
        for example in examples:
            tokens = words(example.text)
            example.length = (
                ngram if len(tokens) >= ngram else (len(tokens) if len(tokens) >= MIN_WORDS else 0)
            )
            if example.length:
                example.grams = np.unique(gram_hashes(tokens, example.length))
                table = wanted.setdefault(example.length, {})
                for gram in example.grams.tolist():
                    table.setdefault(gram, []).append(example)
        reports.append(FileReport(Path(name), examples, ngram))
    if wanted:
        _scan(train, field_name, text_unit, wanted)
    return reports


def _scan(train: str, field_name: str, text_unit: str, wanted: dict[int, dict[int, list[Example]]]) -> None:
    """Read the training corpus once and count, per example, its grams that occur in it."""
    lookup = {length: np.array(sorted(table), dtype=np.uint64) for length, table in wanted.items()}
    found: set[tuple[int, int]] = set()
    documents = iter_documents(train, field_name, text_unit)
    while batch := list(islice(documents, BATCH_DOCUMENTS)):
        tokens_per_doc = [words(doc.text) for doc in batch]
        lengths = np.fromiter(map(len, tokens_per_doc), dtype=np.int64, count=len(batch))
        owner = np.repeat(np.arange(len(batch)), lengths)  # (n_words,) document of each word
        windows = _Windows(_word_ids([t for tokens in tokens_per_doc for t in tokens]))
        for length, hashes in lookup.items():
            grams = windows.hashes(length)
            inside = owner[: len(grams)] == owner[length - 1 : length - 1 + len(grams)]
            hit = np.flatnonzero(inside & np.isin(grams, hashes))
            for position in hit.tolist():
                gram = int(grams[position])
                if (length, gram) in found:
                    continue
                found.add((length, gram))
                doc = int(owner[position])
                text = " ".join(_gram_words(tokens_per_doc, lengths, doc, position, length))
                for example in wanted[length][gram]:
                    example.hits += 1
                    example.match = example.match or f"{batch[doc].key}: {text!r}"


def _gram_words(
    tokens_per_doc: list[list[str]], lengths: np.ndarray, doc: int, position: int, length: int
) -> list[str]:
    first = position - int(lengths[:doc].sum())
    return tokens_per_doc[doc][first : first + length]


def write_decontaminated(report: FileReport, out_dir: Path) -> Path:
    """A copy of the evaluation file without its contaminated examples, in its own format."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / report.path.name
    if target.resolve() == report.path.resolve():
        raise LmkilnError(
            f"--decontaminate {out_dir} would overwrite {report.path}; choose another directory"
        )
    dirty = {e.location for e in report.contaminated}
    keep = [e.location not in dirty for e in report.examples]
    with atomic_path(target) as tmp:  # a failed write leaves no half file
        suffix = report.path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            clean_lines = {int(e.location.rsplit(":", 1)[1]) for e, k in zip(report.examples, keep) if k}
            with open(tmp, "w", encoding="utf-8") as fh:
                for number, line in decoded_lines(report.path):
                    if number in clean_lines:
                        fh.write(line if line.endswith("\n") else line + "\n")
        elif suffix == ".csv":
            from lmkiln.data.tables import read_table

            table = read_table(str(report.path))
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(list(table.columns))
                for i in range(table.n_rows):
                    if keep[i]:
                        writer.writerow([table.columns[name][i] for name in table.columns])
        elif suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pq.read_table(report.path).filter(pa.array(keep)), tmp)
        else:
            tmp.write_text(
                "\n\n".join(e.text for e, k in zip(report.examples, keep) if k) + "\n", encoding="utf-8"
            )
    return target


def report_json(reports: list[FileReport]) -> str:
    return json.dumps([r.as_dict() for r in reports], indent=1, ensure_ascii=False)
