"""Tokenizers: training, exact round-trips, special tokens as plain text, and the fast encoders."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkiln.data.corpus import iter_documents
from lmkiln.data.fast_encode import PROBE_TEXT, FastPathMismatch
from lmkiln.data.tokenizer import EOS, SPECIAL_TOKENS, Tokenizer, bytes_per_token, train_bpe, train_char
from lmkiln.errors import LmkilnError

PYDOC = [d.text for d in iter_documents("builtin:pydoc")]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_bpe(iter(PYDOC), vocab_size=2048)


@pytest.fixture(scope="module")
def char() -> Tokenizer:
    return train_char(iter(PYDOC[:20]))


def test_bpe_vocabulary_special_ids_and_compression(bpe):
    assert bpe.vocab_size == 2048
    assert [bpe.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert bpe.eos_id == 0 and bpe.pad_id == 1
    # BPE compresses English/Python prose far beyond one byte per token
    assert bytes_per_token(bpe, PYDOC[-5:]) > 3.0


def test_vocabulary_smaller_than_bytes_plus_specials_is_refused():
    with pytest.raises(
        LmkilnError, match=r"smaller than the byte alphabet \(256\) plus 9 special tokens; use at least 265"
    ):
        train_bpe(iter(["abc"]), vocab_size=200)


def test_special_tokens_in_raw_text_are_plain_text(bpe, char):
    for tok in (bpe, char):
        ids = tok.encode(f"a{EOS}b<|im_start|>")
        assert tok.eos_id not in ids and tok.token_id("<|im_start|>") not in ids
        assert tok.decode(ids) == f"a{EOS}b<|im_start|>"
        # ...while templates may insert control tokens on purpose
        assert tok.eos_id in tok.encode_template(f"a{EOS}b")


TRICKY = [
    "",
    " ",
    "\n\n\t",
    "日本語",
    "😀👍🏽👨‍👩‍👧",
    "e\u0301\u0302",
    "\x00\x01\x1b[0m",
    "a\r\nb",
    "\ufeffBOM",
    "﷽",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "  leading and trailing  ",
    PROBE_TEXT,
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_exact_on_tricky_text(bpe, char, text):
    for tok in (bpe, char):
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=200))
def test_round_trip_exact_on_arbitrary_unicode(text):
    for tok in (_BPE, _CHAR):
        assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=120), min_size=1, max_size=6))
def test_fast_encoders_give_identical_ids(texts):
    for tok in (_BPE, _CHAR):
        assert tok.fast_path != "tokenizers"
        reference = tok.encode_batch_reference(texts)
        assert tok.encode_batch(texts) == reference
        ids, lengths = tok.encode_flat(texts)  # the shards' path: one array, one length per text
        assert ids.tolist() == [i for row in reference for i in row]
        assert lengths.tolist() == [len(row) for row in reference]


def test_fast_encoder_identical_on_a_whole_corpus(bpe):
    reference = bpe.encode_batch_reference(PYDOC)
    assert bpe.encode_batch(PYDOC) == reference
    ids, lengths = bpe.encode_flat(PYDOC)  # cut into runs over both threads, then joined
    assert ids.tolist() == [i for row in reference for i in row]
    assert lengths.tolist() == [len(row) for row in reference]


def test_save_load_round_trip_keeps_ids_and_template(tmp_path, bpe):
    bpe.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.encode(PROBE_TEXT) == bpe.encode(PROBE_TEXT)
    assert loaded.chat_template == bpe.chat_template
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == EOS


def test_loading_a_bad_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(LmkilnError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(LmkilnError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_char_tokenizer_falls_back_to_bytes_for_unseen_characters(char):
    ids = char.encode("€")  # not in the training characters
    assert len(ids) == 3  # its three UTF-8 bytes
    assert char.decode(ids) == "€"


_BPE = train_bpe(iter(PYDOC[:30]), vocab_size=1024)
_CHAR = train_char(iter(PYDOC[:10]))


# Whitespace runs are where the fast encoder's look-ahead-free pattern needs its cuts: texts made
# mostly of every White_Space character, characters Python calls space but Unicode does not
# (\x1c-\x1f), apostrophes (contractions), letters, digits and punctuation.
SPACEY = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u200a\u2028\u2029\u202f\u205f\u3000\x1c\x1f'sdtlvexA1.,é日😀"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=SPACEY, max_size=40), min_size=1, max_size=8))
def test_fast_bpe_encoder_matches_the_reference_around_whitespace_runs(texts):
    assert _BPE.encode_batch(texts) == _BPE.encode_batch_reference(texts)
    assert _BPE.encode_batch(["".join(texts)]) == _BPE.encode_batch_reference(["".join(texts)])


def test_lookahead_cuts_mark_the_last_character_of_runs_before_text():
    from lmkiln.data.fast_encode import lookahead_cuts

    texts = ["a  b", "  ", "x \n", "a \n\tb  c", "", "\u3000\u3000z", "a\x1c\x1cb", "end  "]
    assert [c.tolist() for c in lookahead_cuts(texts)] == [[2], [], [], [3, 6], [], [1], [], []]


# -- the byte-level fast path (tiktoken built from the same merges) ----------------------------


def test_tiktoken_is_the_byte_level_fast_path_and_matches_on_probe_variations():
    assert _BPE.fast_path == "tiktoken"
    texts = [PROBE_TEXT, PROBE_TEXT[::-1], PROBE_TEXT.upper(), PROBE_TEXT.lower(), " ".join(PROBE_TEXT)]
    texts += [PROBE_TEXT * 3, PROBE_TEXT.replace(" ", "  "), PROBE_TEXT.replace("\n", " \n ")]
    assert _BPE.encode_batch(texts) == _BPE.encode_batch_reference(texts)


# Everything GPT-2's pattern distinguishes: each kind of white space, contractions (and their
# upper-case and space-led look-alikes), letters, digits and punctuation in and outside ASCII,
# combining marks, emoji with modifiers and joiners, control characters and NUL.
PRETOKENIZER_ALPHABET = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2028\u2029\u202f\u3000\x1c"
    "'''sdtmlvreSLVE"
    "aZéßЖ日本한ⅫⅩ"
    "0189٣৪½²"
    '.,-_!?"#(\u2014\u201c'
    "\u0301\u0302😀👍🏽\u200d\u200b\x00\x7f\ufeff"
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=PRETOKENIZER_ALPHABET, max_size=60), min_size=1, max_size=8))
def test_fast_encoder_matches_the_reference_on_pretokenizer_edge_cases(texts):
    assert _BPE.encode_batch(texts) == _BPE.encode_batch_reference(texts)


@pytest.mark.parametrize(
    "text",
    [
        "'s 't 'm 'd 're 've 'll x's it'll ''s '''re",  # contractions, lower-case only
        "'S 'T 'M 'D 'RE 'VE 'LL 'Re 'lL 'r 'v 'l",  # look-alikes that are no contraction
        " 'x  'll ' s",  # a space before an apostrophe joins the punctuation run
        "a  b   c\t\td \n\ne\u3000\u3000f \u3000g\u3000 h\xa0i",  # white-space runs before text
        "end  ",
        "x\u2028 \u2029y 1 2  3 !! ??",
        "a" * 5000,
        " " * 5000,
    ],
)
def test_fast_encoder_on_each_rule_of_the_pattern(text):
    assert _BPE.encode_batch([text, text + "!"]) == _BPE.encode_batch_reference([text, text + "!"])


def _hand_made_bpe(merges: list[tuple[str, str]], vocab: dict[str, int], ignore_merges: bool = False):
    """A byte-level BPE tokenizer from an explicit vocabulary (bytes as GPT-2's characters)."""
    from tokenizers import AddedToken, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return Tokenizer(hf)


def _byte_vocab() -> dict[str, int]:
    from lmkiln.data.fast_encode import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def test_a_merge_order_tiktoken_cannot_follow_is_caught_and_the_reference_takes_over():
    vocab = {**_byte_vocab(), "bc": 256, "ab": 257}  # "bc" has the lower id...
    tok = _hand_made_bpe([("a", "b"), ("b", "c")], vocab)  # ...but "a b" is the first merge
    # tokenizers merges by rule rank: (ab)c; tiktoken by token rank (= id) would give a(bc)
    texts = ["abc", "xabcab"]
    expected = [[257, ord("c")], [ord("x"), 257, ord("c"), 257]]
    assert tok.encode_batch_reference(texts) == expected
    if tok.fast_path != "tokenizers":  # the probe text has no "abc": the per-batch check must see it
        with pytest.raises(FastPathMismatch):
            tok.encode_flat_verified(texts)
    assert tok.fast_path == "tokenizers"
    ids, lengths = tok.encode_flat_verified(texts)
    assert (ids.tolist(), lengths.tolist()) == ([i for r in expected for i in r], [2, 4])


def test_random_merge_tables_give_the_reference_ids_through_the_verified_path():
    """Random rules in random rank order, ids shuffled, repeated pairs: whatever tiktoken makes of
    them, the verified path (what shards use) gives the reference's ids on the texts it samples
    (here every text: a batch of one)."""
    import random

    rng = random.Random(0)
    byte_vocab = _byte_vocab()
    for _ in range(12):
        tokens = ["a", "b", "c", "Ġ"]
        merges: list[tuple[str, str]] = []
        for _ in range(40):
            left, right = rng.choice(tokens), rng.choice(tokens)
            merges.append((left, right))
            if left + right not in tokens:
                tokens.append(left + right)
        new = tokens[4:]
        ids = rng.sample(range(256, 256 + len(new)), len(new))
        tok = _hand_made_bpe(merges, {**byte_vocab, **dict(zip(new, ids))}, ignore_merges=rng.random() < 0.3)
        texts = ["".join(rng.choice("aaabbc  ") for _ in range(rng.randint(0, 40))) for _ in range(50)]
        for text, reference in zip(texts, tok.encode_batch_reference(texts)):
            try:
                flat, _ = tok.encode_flat_verified([text])
            except FastPathMismatch:
                flat, _ = tok.encode_flat_verified([text])  # the reference from now on
            assert flat.tolist() == reference


def test_a_vocabulary_without_every_byte_has_no_fast_path():
    vocab = _byte_vocab()
    del vocab["é"]  # byte 0xE9: tokenizers silently drops it, which no fast encoder imitates
    tok = _hand_made_bpe([], vocab)
    assert tok.fast_path == "tokenizers"


def test_without_tiktoken_tokenizers_takes_over(monkeypatch):
    import sys

    from lmkiln.data.fast_encode import build_fast_encoder

    texts = PYDOC[:20] + [PROBE_TEXT]
    encoder = build_fast_encoder(_BPE.json, _BPE.encode_batch_reference)
    assert encoder.name == "tiktoken"
    assert encoder.encode_batch(texts) == _BPE.encode_batch_reference(texts)
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # importing it raises ImportError
    assert build_fast_encoder(_BPE.json, _BPE.encode_batch_reference) is None


def test_fast_encoder_is_safe_from_several_threads():
    from concurrent.futures import ThreadPoolExecutor

    batches = [PYDOC[i::4] for i in range(4)] * 2
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(_BPE.encode_batch, batches))
    assert results == [_BPE.encode_batch_reference(b) for b in batches]
