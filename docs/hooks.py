"""MkDocs hooks: pages written from the code at build time (mkdocs.yml `hooks:`).

The configuration reference comes from the schema's dataclasses through
`lmkiln.config.reference`, so the site can never disagree with `lmkiln train --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# The checkout's sources, not whatever lmkiln an environment has installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmkiln.config.reference import markdown  # noqa: E402

MARKER = "<!-- config-reference -->"


def on_page_markdown(text: str, page, config, files) -> str:  # noqa: ANN001 (MkDocs' hook signature)
    if MARKER in text:
        return text.replace(MARKER, markdown())
    return text
