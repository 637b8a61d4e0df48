"""Tokenizers: training, exact round-trips, special tokens as plain text, and the fast encoders."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkiln.data.corpus import iter_documents
from lmkiln.data.fast_encode import PROBE_TEXT
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
        assert tok.encode_batch(texts) == tok.encode_batch_reference(texts)


def test_fast_encoder_identical_on_a_whole_corpus(bpe):
    assert bpe.encode_batch(PYDOC) == bpe.encode_batch_reference(PYDOC)


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
