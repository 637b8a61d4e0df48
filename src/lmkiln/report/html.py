"""`lmkiln report`: one self-contained report.html (inline SVG charts and CSS, no scripts, no
network) with loss and learning-rate curves, throughput and MFU, evaluations, samples, the
config (and what differs between runs), and the plan's prediction next to the measurement."""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

from lmkiln.config import flatten
from lmkiln.files import write_atomic
from lmkiln.report.runs import RunRecord, read_run

log = logging.getLogger("lmkiln")
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}table{border-collapse:collapse;font-size:.9em}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f3f3f3}
.charts{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.9em;color:#555}
pre{background:#f7f7f7;padding:.6em;white-space:pre-wrap}"""


def _chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], log_y: bool = False) -> str:
    """An inline SVG line chart; each series is (label, [(x, y), ...])."""
    import math

    width, height, pad = 460, 240, 44
    points = [(x, y) for _, data in series for x, y in data if y == y and (y > 0 or not log_y)]
    if not points:
        return ""
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    xs, ys = [x for x, _ in points], [ty(y) for _, y in points]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def at(x: float, y: float) -> str:
        px = pad + (x - x0) / (x1 - x0) * (width - pad - 10)
        py = height - pad + 10 - (ty(y) - y0) / (y1 - y0) * (height - pad - 10)
        return f"{px:.1f},{py:.1f}"

    parts = [f'<svg class="chart" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    parts.append(
        f'<rect x="{pad}" y="0" width="{width - pad - 10}" height="{height - pad + 10}" fill="#fafafa" stroke="#ccc"/>'
    )
    low, high = (10**y0, 10**y1) if log_y else (y0, y1)
    parts.append(f'<text x="2" y="12" font-size="10">{high:.3g}</text>')
    parts.append(f'<text x="2" y="{height - pad + 8}" font-size="10">{low:.3g}</text>')
    parts.append(f'<text x="{pad}" y="{height - pad + 24}" font-size="10">{x0:g}</text>')
    parts.append(f'<text x="{width - 40}" y="{height - pad + 24}" font-size="10">{x1:g}</text>')
    for index, (label, data) in enumerate(series):
        kept = [(x, y) for x, y in data if y == y and (y > 0 or not log_y)]
        if not kept:
            continue
        color = COLORS[index % len(COLORS)]
        coords = " ".join(at(x, y) for x, y in kept)
        parts.append(
            f'<polyline class="series" data-label="{html.escape(label)}" fill="none" stroke="{color}" '
            f'stroke-width="1.6" points="{coords}"/>'
        )
        parts.append(
            f'<text x="{pad + 6}" y="{14 + 13 * index}" font-size="11" fill="{color}">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}</figcaption></figure>"


def _series(records: list[RunRecord], key: str, events: str = "train") -> list[tuple[str, list]]:
    out = []
    for record in records:
        rows = record.train if events == "train" else record.evals
        data = [(r["step"], float(r[key])) for r in rows if key in r and "step" in r]
        if data:
            out.append((f"{record.directory.name} {key}", data))
    return out


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _config_section(records: list[RunRecord]) -> str:
    flat = [flatten(r.config) for r in records]
    if len(records) == 1:
        return _table(["key", "value"], [[k, _format(v)] for k, v in sorted(flat[0].items())])
    keys = sorted({k for f in flat for k in f if len({json.dumps(x.get(k), default=str) for x in flat}) > 1})
    names = [r.directory.name for r in records]
    rows = [[k, *(_format(f.get(k, "")) for f in flat)] for k in keys]
    return "<p>Keys that differ between the runs:</p>" + _table(
        ["key", *names], rows or [["(none)"] * (1 + len(names))]
    )


def _plan_section(record: RunRecord) -> str:
    if not record.plan:
        return ""
    plan, final = record.plan, record.final
    rows = []
    # the loop logs its rate as tokens_per_s whatever it counts (examples for an MLP)
    unit = "tokens" if plan.get("tokens_per_s") else "examples"
    if plan.get(f"{unit}_per_s") and "tokens_per_s" in final:
        rows.append([f"{unit}/s", f"{plan[f'{unit}_per_s']:.0f}", f"{final['tokens_per_s']:.0f}"])
    if plan.get("train_seconds") and "elapsed_s" in final:
        rows.append(["training time (s)", f"{plan['train_seconds']:.1f}", f"{final['elapsed_s']:.1f}"])
    if plan.get("predicted_peak_bytes"):
        measured = f"{final['peak_memory_mb']:.1f}" if "peak_memory_mb" in final else "-"
        rows.append(["peak memory (MiB)", f"{plan['predicted_peak_bytes'] / 2**20:.1f}", measured])
    return f"<h3>{html.escape(record.directory.name)}: plan vs measured</h3>" + _table(
        ["", "predicted", "measured"], rows
    )


def _samples(record: RunRecord, count: int) -> list[str]:
    """A few unconditional samples from the run's newest checkpoint (none without one)."""
    if (
        count <= 0
        or not (record.directory / "checkpoints").is_dir()
        or record.config.get("task", "pretrain") != "pretrain"
    ):
        return []
    try:
        from lmkiln.infer.generate import generate_text
        from lmkiln.model.generate import Sampling
        from lmkiln.runs.load import load_run

        loaded = load_run(record.directory)
        sampling = Sampling(max_new_tokens=48, temperature=0.8, top_k=50, seed=0)
        return generate_text(loaded.model, loaded.tokenizer, [""] * count, sampling)
    except Exception as err:  # a report is still worth writing without samples
        log.warning("no samples from %s: %s", record.directory, err)
        return []


def render(records: list[RunRecord], samples: int = 2) -> str:
    title = "lmkiln report: " + ", ".join(r.directory.name for r in records)
    charts = [
        _chart("training loss by step (log scale)", _series(records, "loss"), log_y=True),
        _chart("validation loss by step", _series(records, "val_loss", "eval")),
        _chart("learning rate by step", _series(records, "lr")),
        _chart("throughput (tokens/s) by step", _series(records, "tokens_per_s")),
        _chart("MFU (% of the measured matmul peak) by step", _series(records, "mfu")),
    ]
    finals = [
        [
            r.directory.name,
            *(
                _format(r.final.get(k, "-"))
                for k in ("step", "loss", "val_loss", "val_ppl", "val_bpb", "tokens_per_s", "elapsed_s")
            ),
        ]
        for r in records
    ]
    body = [
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Final metrics</h2>",
        _table(["run", "step", "loss", "val_loss", "val_ppl", "val_bpb", "tokens/s", "time (s)"], finals),
        "<h2>Curves</h2>",
        f'<div class="charts">{"".join(c for c in charts if c)}</div>',
        "<h2>Evaluations</h2>",
    ]
    for record in records:
        keys = sorted({k for e in record.evals for k in e if k != "event"}, key=lambda k: (k != "step", k))
        if keys:
            body.append(f"<h3>{html.escape(record.directory.name)}</h3>")
            body.append(_table(keys, [[_format(e.get(k, "")) for k in keys] for e in record.evals]))
    plans = "".join(_plan_section(r) for r in records)
    if plans:
        body += ["<h2>Plan vs measured</h2>", plans]
    texts = [(r.directory.name, s) for r in records for s in _samples(r, samples)]
    if texts:
        body.append("<h2>Samples</h2>")
        body += [f"<p>{html.escape(name)}:</p><pre>{html.escape(text)}</pre>" for name, text in texts]
    body += ["<h2>Config</h2>", _config_section(records)]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report(run_dirs: list[str | Path], out: str | Path | None = None, samples: int = 2) -> Path:
    """Write report.html (into the first run directory unless `out` is given); returns its path."""
    records = [read_run(d) for d in run_dirs]
    path = Path(out) if out else records[0].directory / "report.html"
    write_atomic(path, render(records, samples))
    return path
