"""Data security and quality figures: scrub recall and false positives, scrub and dedup throughput,
dedup memory per million documents, and `prepare_shards` MB/s with cleaning off and on.

    python -m benchmarks.data_audit [--quick] [--shakespeare PATH]   # prints one JSON object

Recall: a generated corpus with planted items of every scrub type (benchmarks/planted.py).
False positives: every finding on clean text (the built-in corpus; Shakespeare when the file is
there, by default ../shared/data/tinyshakespeare.txt), per MB. Throughput is the median of
alternating rounds; detect-secrets (its own engine, scanning a file with its default plugins)
runs beside lmkiln's `secret` type on the same text. Memory: tracemalloc's count of what the
dedup state holds after N synthetic documents (exact: 1M documents measured; near: measured at
N and scaled linearly to 1M, as the index holds the same per document).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def _texts(shakespeare: Path) -> dict[str, list[str]]:
    from lmkiln.data.corpus import iter_documents

    corpora = {"pydoc": [d.text for d in iter_documents("builtin:pydoc")]}
    if shakespeare.is_file():
        corpora["shakespeare"] = [d.text for d in iter_documents(str(shakespeare))]
    return corpora


def _megabytes(texts: list[str]) -> float:
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def _median_rate(megabytes: float, seconds: list[float]) -> float:
    return round(megabytes / statistics.median(seconds), 2)


def scrub_quality(items_per_type: int, corpora: dict[str, list[str]]) -> dict:
    from benchmarks.planted import planted_corpus, recall
    from lmkiln.data.scrub import SCRUB_TYPES, Scrubber

    scrubber = Scrubber(list(SCRUB_TYPES))
    documents, planted = planted_corpus(items_per_type, seed=11)
    found = scrubber.find_many(documents)
    rows = recall(found, planted)
    spans: dict[int, list] = {}
    for item in planted:
        spans.setdefault(item.document, []).append(item)
    outside = sum(
        1
        for index, findings in enumerate(found)
        for f in findings
        if not any(f.start < p.end and p.start < f.end for p in spans.get(index, []))
    )
    clean = {}
    for name, texts in corpora.items():
        hits = [f for fs in scrubber.find_many(texts) for f in fs]
        clean[name] = {
            "megabytes": round(_megabytes(texts), 3),
            "findings": len(hits),
            "per_mb": round(len(hits) / _megabytes(texts), 3),
            "examples": [[f.kind, f.value] for f in hits[:5]],
        }
    return {
        "recall": {k: {"planted": r["planted"], "found": r["found"], "recall": r["found"] / r["planted"]} for k, r in rows.items()},
        "planted_corpus_findings_outside_items": outside,
        "false_positives_clean": clean,
    }  # fmt: skip


def _detect_secrets_seconds(path: Path) -> float:
    from detect_secrets import SecretsCollection
    from detect_secrets.settings import default_settings

    collection = SecretsCollection()
    with default_settings():
        start = time.perf_counter()
        collection.scan_file(str(path))
        return time.perf_counter() - start


def scrub_speed(corpora: dict[str, list[str]], rounds: int) -> dict:
    from lmkiln.data.scrub import SCRUB_TYPES, Scrubber

    everything, secrets = Scrubber(list(SCRUB_TYPES)), Scrubber(["secret"])
    out = {}
    for name, texts in corpora.items():
        megabytes = _megabytes(texts)
        timings: dict[str, list[float]] = {"lmkiln_all_types": [], "lmkiln_secret": [], "detect_secrets": []}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.txt"
            path.write_text("\n".join(texts), encoding="utf-8")
            for _ in range(rounds):
                for label, scrubber in (("lmkiln_all_types", everything), ("lmkiln_secret", secrets)):
                    start = time.perf_counter()
                    for batch in range(0, len(texts), 2048):
                        scrubber.scrub_many(texts[batch : batch + 2048])
                    timings[label].append(time.perf_counter() - start)
                if name == "pydoc" or rounds == 1:  # detect-secrets is slow: one corpus is enough
                    timings["detect_secrets"].append(_detect_secrets_seconds(path))
        row = {label: _median_rate(megabytes, seconds) for label, seconds in timings.items() if seconds}
        if "detect_secrets" in row:
            row["lmkiln_secret_vs_detect_secrets"] = round(row["lmkiln_secret"] / row["detect_secrets"], 1)
        out[name] = {"megabytes": round(megabytes, 3), "mb_per_s": row}
    return out


def _synthetic_documents(count: int, words: int, seed: int) -> list[str]:
    from lmkiln.data.corpus import iter_documents

    vocabulary = sorted({w for d in iter_documents("builtin:pydoc") for w in d.text.split()})
    rng = random.Random(seed)
    return [" ".join(rng.choices(vocabulary, k=words)) for _ in range(count)]


def dedup_speed(documents: int, rounds: int) -> dict:
    from lmkiln.data.dedup import ExactDeduper, NearDeduper

    texts = _synthetic_documents(documents, 100, seed=1)
    megabytes = _megabytes(texts)
    timings: dict[str, list[float]] = {"exact": [], "near": []}
    for _ in range(rounds):
        exact = ExactDeduper()
        start = time.perf_counter()
        for text in texts:
            exact.is_copy(text)
        timings["exact"].append(time.perf_counter() - start)
        near = NearDeduper()
        start = time.perf_counter()
        for batch in range(0, len(texts), 2048):
            near.copies(texts[batch : batch + 2048])
        timings["near"].append(time.perf_counter() - start)
    return {
        "documents": documents,
        "bytes_per_document": round(megabytes * 1e6 / documents),
        "mb_per_s": {k: _median_rate(megabytes, v) for k, v in timings.items()},
        "documents_per_s": {k: round(documents / statistics.median(v)) for k, v in timings.items()},
    }


def _held_bytes(build) -> int:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    state = build()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del state
    return held


def dedup_memory(exact_documents: int, near_documents: int) -> dict:
    from lmkiln.data.dedup import ExactDeduper, NearDeduper

    def exact_state():
        dedup = ExactDeduper()
        for index in range(exact_documents):
            dedup.is_copy(f"document number {index} with some words in it")
        return dedup

    texts = _synthetic_documents(near_documents, 60, seed=2)

    def near_state():
        dedup = NearDeduper()
        for batch in range(0, len(texts), 2048):
            dedup.copies(texts[batch : batch + 2048])
        return dedup

    exact_bytes = _held_bytes(exact_state)
    near_bytes = _held_bytes(near_state)
    return {
        "exact": {
            "documents_measured": exact_documents,
            "bytes_per_document": round(exact_bytes / exact_documents, 1),
            "mb_per_million": round(exact_bytes / exact_documents * 1e6 / 1e6, 1),
        },
        "near": {
            "documents_measured": near_documents,
            "extrapolated_to_1m": near_documents < 1_000_000,
            "bytes_per_document": round(near_bytes / near_documents, 1),
            "mb_per_million": round(near_bytes / near_documents * 1e6 / 1e6, 1),
            "settings": "threshold 0.8, 128 permutations, 14 bands x 9 rows, signatures kept",
        },
    }


def prepare_speed(corpus: str, rounds: int) -> dict:
    from lmkiln.config import DataConfig
    from lmkiln.data.corpus import iter_documents
    from lmkiln.data.shards import prepare_shards
    from lmkiln.data.tokenizer import train_bpe

    tokenizer = train_bpe((d.text for d in iter_documents(corpus)), 4096)
    variants = {
        "off": {},
        "scrub_all": {"scrub": ["email", "phone", "ip", "credit_card", "iban", "secret"]},
        "dedup_exact": {"dedup": "exact"},
        "dedup_near": {"dedup": "near"},
        "dedup_near_scrub_all": {
            "dedup": "near",
            "scrub": ["email", "phone", "ip", "credit_card", "iban", "secret"],
        },
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    megabytes = 0.0
    for _ in range(rounds):
        for name, settings in variants.items():
            cache = tempfile.mkdtemp(prefix="lmkiln-bench-")
            try:
                report = prepare_shards(DataConfig(corpus=corpus, cache_dir=cache, **settings), tokenizer)
                timings[name].append(report.seconds)
                megabytes = max(megabytes, _megabytes([d.text for d in iter_documents(corpus)]))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
    rates = {name: _median_rate(megabytes, seconds) for name, seconds in timings.items()}
    return {
        "corpus": corpus,
        "megabytes": round(megabytes, 3),
        "mb_per_s": rates,
        "ratio_to_off": {name: round(rate / rates["off"], 2) for name, rate in rates.items()},
    }


def measure(quick: bool, shakespeare: Path) -> dict:
    corpora = _texts(shakespeare)
    return {
        "scrub_quality": scrub_quality(100 if quick else 3000, corpora),
        "scrub_speed": scrub_speed(corpora, 1 if quick else 3),
        "dedup_speed": dedup_speed(2_000 if quick else 50_000, 1 if quick else 3),
        "dedup_memory": dedup_memory(20_000 if quick else 1_000_000, 2_000 if quick else 100_000),
        "prepare": prepare_speed(
            str(shakespeare) if shakespeare.is_file() else "builtin:pydoc", 1 if quick else 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one round (a smoke test)")
    parser.add_argument("--shakespeare", default=str(SHAKESPEARE), help="clean text file for false positives")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.quick, Path(args.shakespeare)), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
