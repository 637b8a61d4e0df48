"""Data security and quality: dedup, scrubbing, contamination, canaries and the audit command."""

from __future__ import annotations

import csv
import json
import random
import string

import numpy as np
import pytest
from conftest import run_cli, write

from benchmarks.planted import MAKERS, planted_corpus, recall
from lmkiln.config import DataConfig, load_config
from lmkiln.data.canaries import is_canary, make_canaries, with_canaries
from lmkiln.data.contamination import check_contamination, write_decontaminated
from lmkiln.data.corpus import Document, iter_documents
from lmkiln.data.dedup import ExactDeduper, NearDeduper, ShingleSpec, normalize, shingle_hashes
from lmkiln.data.scrub import SCRUB_TYPES, Scrubber, iban_valid, luhn_valid, mask
from lmkiln.data.shards import prepare_shards
from lmkiln.data.tokenizer import train_char
from lmkiln.errors import LmkilnError


def _pydoc_texts() -> list[str]:
    return [d.text for d in iter_documents("builtin:pydoc")]


def _paragraphs(count: int, seed: int = 0) -> list[str]:
    """Distinct paragraphs of random words (no two share many 5-word shingles)."""
    rng = random.Random(seed)
    vocabulary = [
        "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))) for _ in range(3000)
    ]
    return [" ".join(rng.choice(vocabulary) for _ in range(rng.randint(100, 160))) for _ in range(count)]


# --------------------------------------------------------------------------------------------
# Dedup


def test_exact_dedup_normalizes_unicode_case_and_spacing():
    dedup = ExactDeduper()
    assert normalize("Ｆｕｌｌ  Width\tTEXT\n") == "full width text"
    assert not dedup.is_copy("The café is open.")
    assert dedup.is_copy("  THE CAFÉ\n is   open. ")
    assert dedup.is_copy("The cafe\u0301 is open.")  # combining accent: the same after NFKC
    assert not dedup.is_copy("The café is closed.")


def test_near_dedup_finds_edited_copies_and_keeps_distinct_documents():
    docs = _paragraphs(40)
    words = docs[3].split()
    words[10] = "changed"  # one word of ~90: Jaccard of 5-word shingles ~0.9
    near = NearDeduper(threshold=0.8, num_perm=128)
    copies = near.copies([*docs, " ".join(words)])
    assert copies[:40] == [None] * 40
    assert copies[40] == 3
    # character shingles work on text without spaces, and hashing is deterministic
    spec = ShingleSpec("char", 0)
    assert np.array_equal(
        shingle_hashes(["abcdefghijkl"], spec)[0], shingle_hashes(["abcdefghijkl"], spec)[0]
    )
    assert len(shingle_hashes(["abcdefghijkl"], spec)[0]) == 12 - 9 + 1
    assert len(shingle_hashes(["ab"], spec)[0]) == 1  # shorter than one shingle: one shingle


def test_prepare_dedups_before_the_split_so_no_copy_crosses_it(tmp_path):
    docs = _paragraphs(120)
    rng = random.Random(1)
    rows = list(docs)
    for source in rng.sample(docs, 30):
        words = source.split()
        words[rng.randrange(len(words))] = "edited"
        rows.append(" ".join(words))  # near copies
    rows += [d.upper() for d in rng.sample(docs, 20)]  # exact copies after normalization
    rng.shuffle(rows)
    corpus = write(tmp_path / "c.jsonl", "".join(json.dumps({"text": r}) + "\n" for r in rows))
    tokenizer = train_char(iter(rows))
    data = DataConfig(corpus=str(corpus), dedup="near", val_fraction=0.3)
    report = prepare_shards(data, tokenizer)
    cleaning = report.shards.manifest["cleaning"]
    assert cleaning["exact_duplicates_dropped"] == 20
    assert cleaning["near_duplicates_dropped"] == 30
    kept = {
        split: tokenizer.decode(np.concatenate(report.shards.arrays(split)).tolist()).split("<|endoftext|>")[
            :-1
        ]
        for split in ("train", "val")
    }
    assert len(kept["train"]) + len(kept["val"]) == 120
    near = NearDeduper(0.8)
    assert near.copies(kept["train"]) == [None] * len(kept["train"])
    assert near.copies(kept["val"]) == [None] * len(kept["val"])  # nothing in val copies anything in train
    # the settings are part of the cache key; without them the key stays what it was
    assert not prepare_shards(
        DataConfig(corpus=str(corpus), dedup="exact", val_fraction=0.3), tokenizer
    ).cached
    plain = prepare_shards(DataConfig(corpus=str(corpus), val_fraction=0.3), tokenizer)
    assert "cleaning" not in plain.shards.manifest and "cleaning" not in plain.shards.manifest["settings"]


# --------------------------------------------------------------------------------------------
# Scrubbing


def test_recall_on_planted_items_of_every_type_is_at_least_99_percent():
    documents, planted = planted_corpus(150, seed=3)
    found = Scrubber(list(SCRUB_TYPES)).find_many(documents)
    for kind, row in recall(found, planted).items():
        assert row["planted"] == 150
        assert row["found"] / row["planted"] >= 0.99, (kind, row["missed"][:3])


def test_no_false_positives_on_clean_text():
    texts = _pydoc_texts() + _paragraphs(300)
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    found = [f for fs in Scrubber(list(SCRUB_TYPES)).find_many(texts) for f in fs]
    assert len(found) / megabytes <= 1.0, [(f.kind, f.value) for f in found[:10]]


def test_checksums_decide_cards_and_ibans():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert iban_valid("DE89370400440532013000") and not iban_valid("DE89370400440532013001")
    scrubber = Scrubber(["credit_card", "iban"])
    text = "card 4111 1111 1111 1111, not 4111 1111 1111 1112; iban DE89 3704 0044 0532 0130 00."
    scrubbed, findings = scrubber.scrub(text)
    assert scrubbed == "card <|credit_card|>, not 4111 1111 1111 1112; iban <|iban|>."
    assert [f.kind for f in findings] == ["credit_card", "iban"]


def test_secret_formats_and_assignments():
    scrubber = Scrubber(["secret"])
    text = (
        "aws AKIAIOSFODNN7EXAMPLE and token ghp_" + "a1B2" * 9 + "\n"
        "password = getpass.getpass()\n"  # code, not a secret
        'db_password: "hunter2hunter2x9"\n'
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----"
    )
    scrubbed, findings = scrubber.scrub(text)
    assert [f.name for f in findings] == ["aws_access_key", "github_token", "assigned_secret", "private_key"]
    assert "getpass.getpass()" in scrubbed and 'db_password: "<|secret|>"' in scrubbed
    assert mask("jane.doe@example.com", "email") == "j***@e***.com"


def test_placeholders_are_text_never_control_tokens(tmp_path):
    """A placeholder is plain text even for a tokenizer that has it as a special token."""
    from tokenizers import AddedToken

    from lmkiln.data.tokenizer import Tokenizer

    corpus = write(
        tmp_path / "c.txt", "Mail jane@example.com or call +1 415 555 2671 today.\n\nA second paragraph."
    )
    base = train_char(iter(["Mail <|email|> or call <|phone|> today. A second paragraph."]))
    hf = base._special
    hf.add_special_tokens([AddedToken("<|email|>", special=True, normalized=False)])
    tokenizer = Tokenizer(hf)
    special = tokenizer.token_id("<|email|>")
    report = prepare_shards(
        DataConfig(corpus=str(corpus), scrub=["email", "phone"], val_fraction=0.0), tokenizer
    )
    ids = np.concatenate(report.shards.arrays("train")).tolist()
    assert special not in ids
    assert tokenizer.decode(ids).startswith("Mail <|email|> or call <|phone|> today.")
    assert report.shards.manifest["cleaning"]["scrubbed"] == {"email": 1, "phone": 1}


# --------------------------------------------------------------------------------------------
# Bad input


def test_bad_settings_and_binary_input_are_one_line_errors(tmp_path):
    for override, needle in (
        ("data.dedup_threshold=0", "(0, 1]"),
        ("data.dedup_threshold=1.5", "(0, 1]"),
        ("data.scrub=[email,ssn]", "'ssn' is not one of"),
    ):
        with pytest.raises(LmkilnError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            load_config(overrides=[override])
    binary = write(tmp_path / "b.txt", "fine text\n\nbad \x00 bytes\n")
    with pytest.raises(LmkilnError, match=r"b.txt:3: binary data"):
        prepare_shards(DataConfig(corpus=str(binary), dedup="exact"), train_char(iter(["fine text"])))
    assert not list((tmp_path.parent).glob("**/*.tmp-*"))
    proc = run_cli("data", "audit", str(write(tmp_path / "latin1.txt", b"caf\xe9\n")))
    assert proc.returncode == 2 and "latin1.txt:1: not valid UTF-8" in proc.stderr


# --------------------------------------------------------------------------------------------
# Contamination and the audit


def test_contamination_flags_shared_13_grams_and_writes_a_clean_copy(tmp_path):
    topics = {d.key: d.text for d in iter_documents("builtin:pydoc")}
    leaked = " ".join(topics["pydoc:assert"].split()[3:40])
    rows = [
        {"question": "What does assert do?", "answer": leaked},
        {
            "question": "What is a quokka?",
            "answer": "A small marsupial found on islands off Western Australia.",
        },
        {"messages": [{"role": "user", "content": leaked.upper()}]},  # case and layout do not hide it
        {"question": "short", "answer": "yes"},
    ]
    eval_file = write(tmp_path / "qa.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    csv_file = tmp_path / "qa.csv"
    with open(csv_file, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["question", "answer"], ["q1", leaked], ["q2", "nothing to see here"]])
    jsonl, table = check_contamination("builtin:pydoc", [str(eval_file), str(csv_file)])
    assert [e.location.rsplit(":", 1)[1] for e in jsonl.contaminated] == ["1", "3"]
    assert jsonl.checked == 3 and jsonl.share() == pytest.approx(2 / 3)
    assert "pydoc:assert" in jsonl.worst()[0].match
    assert len(table.contaminated) == 1
    written = write_decontaminated(jsonl, tmp_path / "clean")
    assert [json.loads(line)["question"] for line in written.read_text().splitlines()] == [
        "What is a quokka?",
        "short",
    ]
    proc = run_cli("data", "audit", "--train", "builtin:pydoc", "--eval", str(eval_file), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["contaminated"] == 2


def test_audit_reports_sizes_duplicates_and_masked_findings(tmp_path):
    docs = _paragraphs(30)
    rows = [
        *docs,
        docs[4].upper(),
        "Write to jane.doe@example.com",
        "key AKIAIOSFODNN7EXAMPLE",
        "",
        "Ελληνικά κείμενα",
    ]
    corpus = write(
        tmp_path / "c.csv", "text\n" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    )
    proc = run_cli("data", "audit", str(corpus), "--json")
    assert proc.returncode == 0, proc.stderr
    audit = json.loads(proc.stdout)
    assert audit["documents"] == 34 and audit["empty_documents"] == 1
    assert audit["exact_duplicates"] == 1 and audit["duplicate_examples"][0][1:] == ["c.csv:32", "c.csv:6"]
    assert audit["findings"] == {"email": 1, "secret": 1}
    assert audit["finding_examples"]["email"] == [["c.csv:33", "email", "j***@e***.com"]]
    assert "jane.doe" not in proc.stdout and "AKIAIOSFODNN7EXAMPLE" not in proc.stdout
    assert set(audit["scripts"]) >= {"Latin", "Greek", "Common"}
    assert audit["longest"][0][0] >= audit["shortest"][-1][0]


# --------------------------------------------------------------------------------------------
# Canaries


def test_canaries_go_to_training_the_stated_number_of_times(tmp_path):
    canaries = make_canaries(4, [1, 10], seed=5)
    assert canaries == make_canaries(4, [1, 10], seed=5) and len({c.secret for c in canaries}) == 4
    stream = list(with_canaries(iter([Document(f"d:{i}", "x") for i in range(50)]), canaries, 50, seed=5))
    assert sum(is_canary(d.key) for d in stream) == 22 and len(stream) == 72
    corpus = write(tmp_path / "c.txt", "\n\n".join(_paragraphs(60)))
    tokenizer = train_char(iter(_paragraphs(60) + [c.text for c in canaries]))
    report = prepare_shards(
        DataConfig(corpus=str(corpus), canaries=4, canary_repeats=[1, 10], val_fraction=0.5), tokenizer
    )
    manifest = report.shards.manifest
    assert [c["repeats"] for c in manifest["canaries"]] == [1, 10, 1, 10]
    text = {s: tokenizer.decode(np.concatenate(report.shards.arrays(s)).tolist()) for s in ("train", "val")}
    for canary in manifest["canaries"]:
        assert text["train"].count(canary["text"]) == canary["repeats"]
        assert canary["text"] not in text["val"]


def test_scrub_choices_match_the_registry_and_the_planted_makers():
    import typing

    from lmkiln.config import all_keys

    (item,) = typing.get_args(all_keys()["data.scrub"])
    assert set(typing.get_args(item)) == set(SCRUB_TYPES) == set(MAKERS)


@pytest.mark.slow
def test_a_canary_seen_often_is_exposed_and_one_seen_once_is_not(tmp_path):
    """A tiny run on ~60 KB: canaries with 200 copies reach high exposure, once-seen ones stay low."""
    from lmkiln.tasks.pretrain import pretrain

    text = "".join(_pydoc_texts())[:60_000]
    corpus = write(tmp_path / "small.txt", text)
    run_dir = tmp_path / "run"
    cfg = load_config(
        overrides=[
            f"data.corpus={corpus}",
            "data.canaries=4",
            "data.canary_repeats=[1,200]",
            "tokenizer.kind=char",
            "model.n_layer=2",
            "model.n_head=4",
            "model.d_model=64",
            "model.block_size=64",
            "train.seq_len=64",
            "train.batch_size=16",
            "train.max_steps=200",
            "train.threads=1",
            "optim.lr=3e-3",
            "schedule.warmup_steps=20",
            "train.eval_every=200",
            "train.save_every=200",
            "train.sample_tokens=0",
            "log.plot=false",
            "log.progress=off",
            f"train.run_dir={run_dir}",
        ]
    )
    result = pretrain(cfg)
    assert result.fit.last_eval["val_loss"] < result.fit.first_eval["val_loss"] - 2.0
    assert (run_dir / "canaries.json").is_file()
    proc = run_cli("eval", str(run_dir), "--task", "memorization", "--candidates", "300", "--limit", "20")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((run_dir / "eval-memorization.json").read_text())["metrics"]
    assert metrics["exposure_x200"] >= 15.0, metrics
    assert metrics["exposure_x1"] <= metrics["exposure_x200"] - 8.0, metrics
    assert (run_dir / "plots" / "exposure.png").stat().st_size > 1000
    assert "train_extraction_exact" in metrics
