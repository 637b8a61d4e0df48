"""Corpus readers and their bad-input errors (each names the file and line)."""

from __future__ import annotations

import json

import pytest
from conftest import write
from hypothesis import given, settings
from hypothesis import strategies as st

from lmkiln.data.corpus import iter_documents, resolve_sources
from lmkiln.errors import LmkilnError


def docs(spec, **kw):
    return [d.text for d in iter_documents(str(spec), **kw)]


def test_builtin_corpus_needs_no_download():
    texts = docs("builtin:pydoc")
    assert len(texts) > 50 and sum(map(len, texts)) > 300_000


def test_text_units(tmp_path):
    f = write(tmp_path / "a.txt", "one\ntwo\n\n\nthree\n")
    assert docs(f, text_unit="paragraph") == ["one\ntwo", "three"]
    assert docs(f, text_unit="line") == ["one", "two", "three"]
    assert docs(f, text_unit="file") == ["one\ntwo\n\n\nthree\n"]


def test_jsonl_csv_parquet_directories_and_globs(tmp_path):
    write(tmp_path / "d/a.jsonl", "\n".join(json.dumps({"body": t}) for t in ["x", "y"]) + "\n")
    write(tmp_path / "d/b.csv", 'body,other\n"multi\nline",1\nz,2\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p1", None, "p2"]}), tmp_path / "d/c.parquet")
    assert docs(tmp_path / "d", field="body") == ["x", "y", "multi\nline", "z", "p1", "p2"]
    assert docs(tmp_path / "d" / "*.jsonl", field="body") == ["x", "y"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n[1, 2]\n', r"bad.jsonl:2: expected a JSON object, got list"),
        (
            '{"text": "ok"}\n\n{"body": "x"}\n',
            r"bad.jsonl:3: no field 'text' \(fields: body\); choose one with --data.field",
        ),
        ('{"text": 5}\n', r"bad.jsonl:1: field 'text' must be a string, got int"),
    ],
)
def test_bad_jsonl_lines_name_file_and_line(tmp_path, content, message):
    f = write(tmp_path / "bad.jsonl", content)
    with pytest.raises(LmkilnError, match=message):
        docs(f)


def test_non_utf8_bytes_report_line_and_byte_offset(tmp_path):
    f = write(tmp_path / "latin.txt", "fine line\nsecond caf\xe9 line\n".encode("latin-1"))
    with pytest.raises(LmkilnError, match=r"latin.txt:2: not valid UTF-8 \(byte 0xe9 at byte offset 20"):
        docs(f)


def test_missing_corpus_and_csv_column(tmp_path):
    with pytest.raises(LmkilnError, match="corpus not found"):
        resolve_sources(str(tmp_path / "nope.txt"))
    with pytest.raises(LmkilnError, match="matches no files"):
        resolve_sources(str(tmp_path / "*.jsonl"))
    f = write(tmp_path / "t.csv", "a,b\n1,2\n")
    with pytest.raises(LmkilnError, match=r"t.csv:1: no column 'text' \(columns: a, b\)"):
        docs(f)


def test_block_decoding_keeps_lines_numbers_and_errors(tmp_path, monkeypatch):
    import lmkiln.data.textfile as corpus  # the block reader every corpus goes through

    body = "α one\r\ntwo\rstill two\n\n\nthree é\n"
    f = write(tmp_path / "a.txt", "\ufeff" + body * 2 + "last line")
    expected = {
        "paragraph": [
            ("1", "α one\r\ntwo\rstill two"),
            ("5", "three é\nα one\r\ntwo\rstill two"),
            ("10", "three é\nlast line"),
        ],
        "line": [
            ("1", "α one"),
            ("2", "two\rstill two"),
            ("5", "three é"),
            ("6", "α one"),
            ("7", "two\rstill two"),
            ("10", "three é"),
            ("11", "last line"),
        ],
    }
    for size in (1, 7, 64, 1 << 20):  # blocks that end inside lines and inside multi-byte characters
        monkeypatch.setattr(corpus, "READ_BLOCK", size)
        for unit, want in expected.items():
            got = [(d.key.rsplit(":", 1)[1], d.text) for d in iter_documents(str(f), text_unit=unit)]
            assert got == want, (size, unit)
        assert docs(f, text_unit="file") == [body * 2 + "last line"]
    bad = write(tmp_path / "bad.txt", ("ok line\n" * 30).encode() + b"caf\xe9\n")
    monkeypatch.setattr(corpus, "READ_BLOCK", 50)
    with pytest.raises(LmkilnError, match=r"bad.txt:31: not valid UTF-8 \(byte 0xe9 at byte offset 243"):
        docs(bad)


def _reference_documents(raw: str, unit: str) -> list[tuple[int, str]]:
    """The line-by-line reading lmkiln used before block decoding: the definition of the units."""
    lines = raw.split("\n")  # lines end at \n only
    lines = [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    if unit == "line":
        return [(n, line.rstrip("\r\n")) for n, line in enumerate(lines, 1) if line.rstrip("\r\n").strip()]
    out, paragraph, start = [], [], 1
    for number, line in enumerate(lines, 1):
        if line.strip():
            start = number if not paragraph else start
            paragraph.append(line)
        elif paragraph:
            out.append((start, "".join(paragraph).rstrip("\r\n")))
            paragraph = []
    if paragraph:
        out.append((start, "".join(paragraph).rstrip("\r\n")))
    return [(n, t) for n, t in out if t.strip()]


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="ab é\n\r\t\x0c\x1c\u2028\ufeff", max_size=80), block=st.integers(1, 40))
def test_paragraphs_and_lines_match_the_line_by_line_definition(tmp_path_factory, text, block):
    import lmkiln.data.textfile as corpus  # the block reader every corpus goes through

    f = write(tmp_path_factory.mktemp("c") / "t.txt", text)
    saved, corpus.READ_BLOCK = corpus.READ_BLOCK, block
    try:
        for unit in ("paragraph", "line"):
            got = [(int(d.key.rsplit(":", 1)[1]), d.text) for d in iter_documents(str(f), text_unit=unit)]
            assert got == _reference_documents(text, unit), unit
    finally:
        corpus.READ_BLOCK = saved


@pytest.fixture(scope="module")
def stdlib_docs():
    return list(iter_documents("builtin:stdlib"))


def test_builtin_stdlib_is_the_manual_plus_every_docstring(stdlib_docs):
    by_key = {d.key: d.text for d in stdlib_docs}
    assert len(by_key) == len(stdlib_docs)  # keys are unique: the seeded split is well defined
    assert by_key["stdlib:json/__init__.py:1"].startswith("JSON (JavaScript Object Notation)")
    pydoc = list(iter_documents("builtin:pydoc"))
    assert stdlib_docs[: len(pydoc)] == pydoc  # the reference manual's topics, unchanged
    assert not any("site-packages/" in d.key for d in stdlib_docs)
    assert sum(len(d.text) for d in stdlib_docs) > 1_500_000  # even where a distro strips the tests
    # the same documents in the same order on a second parse (files sorted, docstrings by line)
    from lmkiln.data.corpus import _read_stdlib_docstrings, _stdlib_root

    again = _read_stdlib_docstrings(_stdlib_root())
    assert [next(again) for _ in range(500)] == stdlib_docs[len(pydoc) : len(pydoc) + 500]


def test_builtin_stdlib_reads_docstrings_skips_broken_files_and_site_packages(tmp_path, monkeypatch):
    import sysconfig

    write(
        tmp_path / "b.py",
        '"""Module b."""\n\nclass K:\n    """A class."""\n\n    async def f(self):\n        """A method."""\n',
    )
    write(tmp_path / "a/broken.py", "def (:\n")
    write(tmp_path / "a/c.py", "x = 1  # no docstring\n")
    write(tmp_path / "site-packages/third.py", '"""Not the standard library."""\n')
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    docstrings = [d for d in iter_documents("builtin:stdlib") if d.key.startswith("stdlib:")]
    assert docstrings == [
        ("stdlib:b.py:1", "Module b."),
        ("stdlib:b.py:4", "A class."),
        ("stdlib:b.py:7", "A method."),
    ]


def test_builtin_stdlib_fingerprint_is_stable_cheap_and_follows_the_files(tmp_path, monkeypatch):
    import ast
    import sysconfig

    from lmkiln.data.corpus import source_fingerprints

    write(tmp_path / "m.py", '"""Doc."""\n')
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    monkeypatch.setattr(ast, "parse", lambda *a, **k: pytest.fail("fingerprinting must not parse"))
    first = source_fingerprints("builtin:stdlib")
    assert source_fingerprints("builtin:stdlib") == first
    assert first != source_fingerprints("builtin:pydoc")
    write(tmp_path / "m.py", '"""Another doc."""\n')
    assert source_fingerprints("builtin:stdlib") != first


def test_audit_findings_in_a_docstring_name_the_stdlib_file_and_line():
    from lmkiln.data.audit import location

    text = "Summary line.\n\nSecond paragraph with a finding."
    assert location("stdlib:json/decoder.py:42", text, text.index("finding")) == "stdlib:json/decoder.py:44"
    assert location("pydoc:assert", text, 0) == "pydoc:assert:1"
