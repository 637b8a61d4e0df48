"""Document deduplication: exact (normalized hash) and near (MinHash + LSH), keeping the first.

Both work on a stream, one document at a time, and hold only per-document state:

    exact   a set of 16-byte BLAKE2b digests of the normalized text
    near    datasketch's MinHashLSH index: per document, one band hash per LSH band

Normalization (NFKC, case folding, whitespace collapsed to single spaces) makes copies that
differ only in Unicode form, case or layout count as the same text. Near dedup shingles the
normalized text into runs of words or characters and asks the LSH index for documents whose
estimated Jaccard similarity reaches the threshold; the minhash of each document is computed by
datasketch from shingle hashes made here with numpy (one vectorized pass instead of one Python
hash call per shingle, the step that dominated the time).
"""

from __future__ import annotations

import hashlib
import unicodedata
from dataclasses import dataclass

import numpy as np

from lmkiln.errors import LmkilnError

DEFAULT_SHINGLE_SIZE = {"word": 5, "char": 9}
# Odd 64-bit multipliers that mix a shingle's items into one hash (wrapping uint64 arithmetic)
_MIX = np.array([0x9E3779B97F4A7C15 * (2 * i + 1) % 2**64 for i in range(64)], dtype=np.uint64)


def normalize(text: str) -> str:
    """The text two copies share: NFKC form, case folded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def exact_digest(text: str) -> bytes:
    """16-byte BLAKE2b digest of the normalized text."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


class ExactDeduper:
    """Remembers the digest of every document seen; a document whose digest is known is a copy."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def is_copy(self, text: str) -> bool:
        """True if an earlier document had the same normalized text; otherwise remember this one."""
        digest = exact_digest(text)
        if digest in self.seen:
            return True
        self.seen.add(digest)
        return False


@dataclass(frozen=True)
class ShingleSpec:
    unit: str = "word"
    """'word' or 'char'."""
    size: int = 0
    """Items per shingle; 0 = the unit's default (5 words, 9 characters)."""

    @property
    def width(self) -> int:
        return self.size or DEFAULT_SHINGLE_SIZE[self.unit]


def _fmix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer, element-wise: makes the linear sums below a proper hash."""
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xFF51AFD7ED558CCD)
    values = values ^ (values >> np.uint64(33))
    values = values * np.uint64(0xC4CEB9FE1A85EC53)
    return values ^ (values >> np.uint64(33))


def _word_hashes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the words of UTF-8 bytes (words end at a space or a newline) and each word's start.

    Returns ((n_words,) uint64 hashes, (n_words,) byte offsets), in one numpy pass over the bytes.
    """
    separator = (data == 32) | (data == 10)
    starts = np.flatnonzero(np.concatenate(([True], separator[:-1])))  # (n_words,) first byte of each word
    word_of = np.cumsum(separator) - separator  # (n_bytes,) the word a byte belongs to (a separator ends it)
    position = np.arange(data.size) - starts[word_of]  # (n_bytes,) offset inside the word
    weights = (data.astype(np.uint64) + np.uint64(1)) * _MIX[position % len(_MIX)]
    weights[separator] = 0
    return _fmix64(np.add.reduceat(weights, starts)), starts


def _items(normalized: list[str], unit: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_items,) uint64 hashes of every document's words or characters, and the document of each."""
    if unit == "word":
        data = np.frombuffer("\n".join(normalized).encode("utf-8"), dtype=np.uint8)
        hashes, starts = _word_hashes(data)
        newlines_before = np.cumsum(data == 10) - (data == 10)
        return hashes, newlines_before[starts]
    codes = np.frombuffer("".join(normalized).encode("utf-32-le"), dtype="<u4").astype(np.uint64)
    lengths = np.fromiter(map(len, normalized), dtype=np.int64, count=len(normalized))
    return _fmix64(codes), np.repeat(np.arange(len(normalized)), lengths)


def shingle_hashes(normalized: list[str], spec: ShingleSpec) -> list[np.ndarray]:
    """Per normalized document, (n_shingles,) uint32 hashes of its overlapping shingles.

    Words are hashed from their bytes and characters by code point, each mixed with MurmurHash3's
    finalizer; each window of `width` items inside one document is combined into one 64-bit value
    and folded to 32 bits (a document shorter than a shingle is one shingle). Deterministic across
    processes (unlike Python's salted `hash`), so a corpus dedups the same way every time. All
    documents of a batch go through numpy at once: per-document calls cost more than the hashing.
    """
    items, document = _items(normalized, spec.unit)  # (n_items,), (n_items,)
    counts = np.bincount(document, minlength=len(normalized))  # (n_docs,) items per document
    shingles = []
    for width in sorted({min(spec.width, max(int(c), 1)) for c in counts}):
        n = max(len(items) - width + 1, 0)
        mixed = np.zeros(n, dtype=np.uint64)  # (n_windows,)
        for offset in range(width):
            mixed += items[offset : offset + n] * _MIX[offset % len(_MIX)]
        folded = ((mixed ^ (mixed >> np.uint64(32))) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        inside = document[:n] == document[width - 1 : width - 1 + n]  # windows within one document
        shingles.append((width, folded[inside], document[:n][inside]))
    out = []
    for index, count in enumerate(counts):
        width = min(spec.width, max(int(count), 1))
        for shingle_width, folded, owner in shingles:
            if shingle_width == width:
                out.append(folded[np.searchsorted(owner, index) : np.searchsorted(owner, index, "right")])
    return out


class NearDeduper:
    """MinHash signatures in a datasketch MinHashLSH index; a document close to an indexed one is a copy.

    LSH returns candidates whose band hashes collide; each is confirmed by the Jaccard estimate
    of the two signatures, so a copy means estimated similarity >= threshold. Signatures of
    kept documents are held in one array to confirm later candidates (num_perm x 4 bytes each).
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, shingle: ShingleSpec | None = None):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise LmkilnError(
                "near-duplicate detection needs datasketch: pip install 'lmkiln[quality]' (or use data.dedup=exact)"
            ) from None

        self.threshold, self.num_perm = threshold, num_perm
        self.shingle = shingle or ShingleSpec()
        # one MinHash reused for every document: the index keeps band hashes, not the object
        self._minhash = MinHash(num_perm=num_perm, seed=1, hashfunc=int, scheme="affine32")
        # Candidates are confirmed below, so the bands are tuned to miss few copies rather than to
        # avoid false candidates: weights (0.1, 0.9) give 14 bands of 9 rows at 0.8 (the default
        # 9 x 13 misses a third of pairs whose signatures agree on 85%).
        self.index = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
        self.signatures = np.empty((1024, num_perm), dtype=np.uint32)  # (capacity, num_perm), grows x2
        self.kept = 0

    def copies(self, texts: list[str]) -> list[int | None]:
        """For each text in order: the index of an earlier kept document it nearly copies, or None
        (then it is kept and indexed, so later texts of the same batch can copy it)."""
        hashes = shingle_hashes([normalize(t) for t in texts], self.shingle)
        return [self._copy_of(shingles) for shingles in hashes]

    def _copy_of(self, shingles: np.ndarray) -> int | None:
        minhash = self._minhash
        minhash.clear()
        minhash.update_batch(shingles.tolist())
        values = minhash.hashvalues
        for candidate in self.index.query(minhash):
            if np.mean(self.signatures[candidate] == values) >= self.threshold:
                return candidate
        if self.kept == len(self.signatures):
            self.signatures = np.concatenate([self.signatures, np.empty_like(self.signatures)])
        self.signatures[self.kept] = values
        self.index.insert(self.kept, minhash, check_duplication=False)
        self.kept += 1
        return None
