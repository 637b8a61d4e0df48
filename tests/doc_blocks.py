"""The code blocks of the documentation, as data: which ones tests/test_docs.py runs and how.

Every ```bash and ```python block in docs/*.md is executed by the test suite, unless an HTML
comment right above it says why not (the blocks of one page run in page order in one scratch
directory, as a reader would type them, so a later block may use the files of an earlier one):

    <!-- doc-test: skip (needs a trained run) -->

A plain ``` block of `$ command` lines and their output is compared with what the commands
really print when it is marked

    <!-- doc-test: output -->

so listings such as `lmkiln recipes` and the one-line errors cannot drift from the code. A
`--8<-- "path"` line (pymdownx.snippets, as the site renders it) stands for that file of the
repository, so an included example script is run as the page shows it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RUN_LANGUAGES = ("bash", "python")
_MARKER = re.compile(r"<!--\s*doc-test:\s*(skip|output)\b\s*(.*?)\s*-->")
_SNIPPET = re.compile(r'^--8<-- "(.+)"$')


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    language: str  # "" for a plain ``` block
    text: str
    marker: str  # "", "skip" or "output"
    reason: str  # what follows the marker, e.g. why a block is skipped

    @property
    def name(self) -> str:
        return f"{self.page.name}:{self.line}"


def _expand_snippets(text: str) -> str:
    lines = []
    for line in text.splitlines():
        match = _SNIPPET.match(line.strip())
        lines.append((ROOT / match.group(1)).read_text().rstrip("\n") if match else line)
    return "\n".join(lines) + "\n"


def page_blocks(page: Path) -> list[Block]:
    """The fenced blocks of one Markdown page, each with the doc-test marker right above it."""
    lines = page.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        fence = re.match(r"^(`{3,})\s*([\w+-]*)", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1)))
        above = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        marker = _MARKER.search(above)
        blocks.append(
            Block(
                page=page,
                line=i + 1,
                language=fence.group(2),
                text=_expand_snippets("\n".join(lines[i + 1 : end])),
                marker=marker.group(1) if marker else "",
                reason=marker.group(2) if marker else "",
            )
        )
        i = end + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for page in sorted(DOCS.rglob("*.md")) for block in page_blocks(page)]


def runnable_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.language in RUN_LANGUAGES and b.marker != "skip"]


def runnable_pages() -> dict[str, list[Block]]:
    """Page name → its runnable blocks, in page order."""
    pages: dict[str, list[Block]] = {}
    for block in runnable_blocks():
        pages.setdefault(block.page.name, []).append(block)
    return pages


def transcript_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.marker == "output"]


def transcript(block: Block) -> list[tuple[str, str]]:
    """(command, expected output) pairs of a `$ command` block; a trailing backslash continues a command."""
    pairs: list[tuple[str, list[str]]] = []
    continued = False
    for line in block.text.splitlines():
        if continued:
            pairs[-1] = (pairs[-1][0] + "\n" + line, pairs[-1][1])
        elif line.startswith("$ "):
            pairs.append((line[2:], []))
        else:
            pairs[-1][1].append(line)
        continued = line.endswith("\\") and not pairs[-1][1]
    return [(command, "\n".join(output).rstrip()) for command, output in pairs]


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def relative_links(page: Path) -> list[str]:
    """Link targets of a Markdown page that point inside the repository (no scheme, no bare anchor)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return [t for t in _LINK.findall(text) if "://" not in t and not t.startswith(("#", "mailto:"))]
