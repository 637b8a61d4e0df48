"""The documentation is tested: its code blocks run, its listings match the CLI, its links resolve.

Blocks and their markers are described in tests/doc_blocks.py; the site itself is built with
`mkdocs build --strict` here and in .ci/run (a broken link or API reference fails).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmkiln.config import all_keys, field_docs
from lmkiln.config.reference import markdown
from lmkiln.config.schema import Config
from tests.doc_blocks import (
    ROOT,
    Block,
    all_blocks,
    relative_links,
    runnable_blocks,
    runnable_pages,
    transcript,
    transcript_blocks,
)


@pytest.fixture
def shell_env(tmp_path: Path) -> dict[str, str]:
    """PATH with `lmkiln` and `python` for this checkout, as after `pip install -e .`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "lmkiln").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lmkiln "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    for script in bin_dir.iterdir():
        script.chmod(0o755)
    return {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
        "COLUMNS": "200",
    }


def _run(block: Block, code: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = (
        ["bash", "-euo", "pipefail", "-c", code]
        if block.language != "python"
        else [sys.executable, "-c", code]
    )
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("page", sorted(runnable_pages()))
def test_page_blocks_run(page: str, tmp_path: Path, shell_env: dict[str, str]) -> None:
    for block in runnable_pages()[page]:
        proc = _run(block, block.text, tmp_path, shell_env)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{block.name} failed:\n{block.text}\n--- output ---\n{output}"


@pytest.mark.parametrize("block", transcript_blocks(), ids=lambda b: b.name)
def test_transcript_matches_cli(block: Block, tmp_path: Path, shell_env: dict[str, str]) -> None:
    for command, expected in transcript(block):
        proc = _run(block, command, tmp_path, shell_env)
        actual = (proc.stdout + proc.stderr).rstrip()
        assert actual == expected, (
            f"{block.name}: `{command}` printed\n{actual}\n--- the docs say ---\n{expected}"
        )


def test_every_block_is_run_or_says_why_not() -> None:
    blocks = all_blocks()
    assert len(runnable_blocks()) >= 3 and len(transcript_blocks()) >= 3
    unexplained = [b.name for b in blocks if b.marker == "skip" and not b.reason]
    assert not unexplained, f"skipped blocks without a reason: {unexplained}"


def test_readme_links_resolve() -> None:
    """The README is read on the code host, outside the site: its links must name real files."""
    targets = relative_links(ROOT / "README.md")
    assert any(t.startswith("docs/") for t in targets)
    missing = [t for t in targets if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_site_home_is_the_readme() -> None:
    """One front door: the site's home page is the README with links relative to docs/."""
    readme = (ROOT / "README.md").read_text().replace("](docs/", "](")
    assert (ROOT / "docs" / "index.md").read_text() == readme


def test_config_reference_is_the_schema() -> None:
    """Every key, its docstring and its default appear in the generated reference."""
    text = markdown()
    for key in all_keys(Config):
        assert f"| `{key}` |" in text, key
    assert field_docs(type(Config().optim))["lr"] in text
    assert "| `train.max_steps` | int" in text
    assert "| `data.shard_tokens` | int, >= 1000 |" in text  # the declared range (config/ranges.py)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed (the docs extra)"
)
def test_site_builds_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference = (tmp_path / "site" / "config-reference" / "index.html").read_text()
    assert "optim.lr" in reference and re.search(
        r"Trainer", (tmp_path / "site" / "reference" / "trainer" / "index.html").read_text()
    )
