"""The package keeps its layers: the import-linter contract in pyproject.toml holds (no exceptions)."""

from __future__ import annotations

from conftest import ROOT


def test_the_layers_contract_has_no_exceptions_and_holds(capsys):
    from importlinter.cli import lint_imports

    contract = (ROOT / "pyproject.toml").read_text().split("[tool.importlinter]", 1)[1]
    assert 'type = "layers"' in contract and "ignore_imports" not in contract
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0, capsys.readouterr().out
