"""The package keeps its layers: the import-linter contract in pyproject.toml holds (no exceptions)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT

# import-linter closes the stream it prints to, so it runs in its own process, not under pytest's capture.
LINT = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))"


def test_the_layers_contract_has_no_exceptions_and_holds():
    contract = (ROOT / "pyproject.toml").read_text().split("[tool.importlinter]", 1)[1]
    assert 'type = "layers"' in contract and "ignore_imports" not in contract
    done = subprocess.run(
        [sys.executable, "-c", LINT, str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 kept, 0 broken" in done.stdout
