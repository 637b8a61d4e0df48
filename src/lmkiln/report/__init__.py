"""Self-contained HTML reports of runs (`lmkiln report`) and the table of runs (`lmkiln runs`)."""

from lmkiln.report.html import write_report
from lmkiln.report.runs import list_runs, runs_table

__all__ = ["list_runs", "runs_table", "write_report"]
