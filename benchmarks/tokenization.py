"""Tokenization + shard preparation throughput: lmkiln's `prepare_shards` vs `tokenizers.encode_batch`.

Both encode the same documents with the same tokenizer.json (a byte-level BPE of 4096 tokens
trained by lmkiln on the corpus). lmkiln's figure is the whole `prepare_shards` call into a fresh
cache directory each round: read the corpus, split documents, encode, split train/validation,
write the shard files and the manifest. The `tokenizers` figure is `encode_batch` alone on texts
already in memory (its own thread pool, every core), so it omits the reading and writing lmkiln
pays for. MB = UTF-8 bytes of the documents. The shards lmkiln wrote are checked against the
reference ids: every document's ids followed by EOS, in order, in its split.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import load_average, median, ratio, spread

log = logging.getLogger("lmkiln.bench")


def _reference_streams(tok, hf, docs, data) -> dict[str, np.ndarray]:
    from lmkiln.data.shards import is_validation

    ids = [e.ids for e in hf.encode_batch([d.text for d in docs], add_special_tokens=False)]
    streams: dict[str, list[int]] = {"train": [], "val": []}
    for doc, doc_ids in zip(docs, ids):
        split = "val" if is_validation(doc.key, data.seed, data.val_fraction) else "train"
        streams[split] += [*doc_ids, tok.eos_id]
    return {k: np.array(v, dtype=np.int64) for k, v in streams.items()}


def _shards_equal(report, reference: dict[str, np.ndarray]) -> bool:
    if report.shards.manifest["split_used"] == "tail":  # no document fell into validation
        reference = {"all": np.concatenate([reference["train"], reference["val"]])}
        got = np.concatenate([a for s in ("train", "val") for a in report.shards.arrays(s)])
        return np.array_equal(got.astype(np.int64), reference["all"])
    for split, expected in reference.items():
        arrays = report.shards.arrays(split)
        got = np.concatenate(arrays).astype(np.int64) if arrays else np.zeros(0, np.int64)
        if not np.array_equal(got, expected):
            return False
    return True


def measure_corpus(corpus: str, rounds: int, text_unit: str = "paragraph") -> dict:
    from tokenizers import Tokenizer as HFTokenizer

    from lmkiln.config import load_config
    from lmkiln.data.corpus import iter_documents
    from lmkiln.data.shards import prepare_shards
    from lmkiln.data.tokenizer import train_bpe

    docs = list(iter_documents(corpus, "text", text_unit))
    texts = [d.text for d in docs]
    megabytes = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    tok = train_bpe(iter(texts), vocab_size=4096)
    hf = HFTokenizer.from_str(tok.json)
    hf.encode_special_tokens = True  # lmkiln encodes raw text ordinarily; same ids either way here
    timings: dict[str, list[float]] = {
        "lmkiln_prepare_shards": [],
        "tokenizers_encode_batch": [],
        "lmkiln_encode_batch": [],
    }
    identical = shards_ok = None
    loads = []
    for index in range(rounds):
        cache = tempfile.mkdtemp(prefix="lmkiln-bench-shards-")
        try:
            cfg = load_config(
                overrides=[f"data.corpus={corpus}", f"data.text_unit={text_unit}", f"data.cache_dir={cache}"]
            )
            start = time.perf_counter()
            report = prepare_shards(cfg.data, tok)
            timings["lmkiln_prepare_shards"].append(time.perf_counter() - start)
            if index == 0:
                shards_ok = _shards_equal(report, _reference_streams(tok, hf, docs, cfg.data))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        start = time.perf_counter()
        reference = hf.encode_batch(texts, add_special_tokens=False)
        timings["tokenizers_encode_batch"].append(time.perf_counter() - start)
        start = time.perf_counter()
        ours = tok.encode_batch(texts)
        timings["lmkiln_encode_batch"].append(time.perf_counter() - start)
        if index == 0:
            identical = [e.ids for e in reference] == ours
        loads.append(load_average()[0])
    rows = {
        name: {
            "mb_per_s": round(megabytes / median(times), 2),
            "mb_per_s_round_spread": [round(megabytes / t, 2) for t in spread(times)[::-1]],
        }
        for name, times in timings.items()
    }
    return {
        "corpus": corpus,
        "text_unit": text_unit,
        "documents": len(docs),
        "megabytes": round(megabytes, 3),
        "encoder": tok.fast_path,
        "rows": rows,
        "ids_identical_to_tokenizers": identical,
        "shards_equal_reference_ids": shards_ok,
        "speedup_prepare_vs_tokenizers": round(
            ratio(rows["lmkiln_prepare_shards"]["mb_per_s"], rows["tokenizers_encode_batch"]["mb_per_s"]), 3
        ),
        "load_average_per_round": loads,
        "rounds": rounds,
    }
