"""``funnel.html``: the web filter's funnel as a chart, with sample kept and rejected pairs.

One self-contained page (the chart and the thumbnails are inlined as base64): rows left
after each stage (bars) with the rejections per reason beside them, then a table per
(stage, reason) with up to :data:`SAMPLES` thumbnails, texts and the stage's values, and
the same for kept pairs. The chart is also written as ``funnel.png``. The rows shown come
from :class:`Samples`, a bounded sample per bucket fed while the outputs stream past.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from vlp.core.durable import atomic_path, atomic_write_text

SAMPLES = 6


def _chart_png(funnel: list) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [f["stage"] + (" (skipped)" if f.get("skipped") else "") for f in funnel]
    remaining = [f["out"] for f in funnel]
    rejected = [f["rejected"] for f in funnel]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(funnel) + 1.2), dpi=100)
    y = list(range(len(funnel)))[::-1]
    ax.barh(y, remaining, color="#4c8bd6", label="rows left")
    ax.barh(y, rejected, left=remaining, color="#e07b6b", label="rejected here")
    for yy, f in zip(y, funnel):
        reasons = ", ".join(f"{k} {v}" for k, v in f["reasons"].items())
        ax.text(f["in"] * 1.01 + 0.5, yy, f"-{f['rejected']}" + (f" ({reasons})" if reasons else ""), va="center",
                fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels(stages)
    ax.set_xlim(0, max([f["in"] for f in funnel] + [1]) * 1.9)
    ax.set_xlabel("rows")
    ax.set_title(f"web-filter funnel: {funnel[0]['in'] if funnel else 0} rows in, "
                 f"{funnel[-1]['out'] if funnel else 0} pairs kept")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


class Samples:
    """Up to :data:`SAMPLES` rows per bucket, the first ones with a thumbnail before the first
    ones without (what sorting every row of the bucket by "has a thumbnail" and taking the
    first :data:`SAMPLES` gives), and the number of rows seen per bucket."""

    def __init__(self, size: int = SAMPLES):
        self.size = size
        self.counts: dict = {}
        self._with: dict = {}
        self._without: dict = {}

    def add(self, bucket, row: dict) -> None:
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        store = self._with if row.get("thumb") else self._without
        rows = store.setdefault(bucket, [])
        if len(rows) < self.size:
            rows.append(row)

    def rows(self, bucket) -> list:
        return (self._with.get(bucket, []) + self._without.get(bucket, []))[:self.size]

    def buckets(self) -> list:
        return list(self.counts)


def _sample_cells(rows: list) -> str:
    cells = []
    for row in rows[:SAMPLES]:
        image = (f'<img src="data:image/jpeg;base64,{row["thumb"]}" alt="">' if row.get("thumb")
                 else '<div class="noimg">no thumbnail</div>')
        values = row.get("values")
        detail = html.escape(json.dumps(values, ensure_ascii=False))[:300] if values else \
            html.escape(f"score {row.get('score')}") if "score" in row else ""
        cells.append(f'<div class="cell">{image}<div class="key">{html.escape(str(row.get("key", "")))}</div>'
                     f'<div class="text">{html.escape(str(row.get("text", "")))[:200]}</div>'
                     f'<div class="values">{detail}</div></div>')
    return "".join(cells) or "<p>none</p>"


def write_funnel_page(path, chart_path, funnel: list, kept: Samples, rejected: Samples, *, title: str) -> Path:
    """``kept``: samples of the kept pairs (one bucket); ``rejected``: per (stage, reason)."""
    png = _chart_png(funnel)
    with atomic_path(chart_path) as tmp:
        Path(tmp).write_bytes(png)
    order = {f["stage"]: i for i, f in enumerate(funnel)}
    rows_html = "".join(
        f"<tr><td>{html.escape(f['stage'])}</td><td>{f['in']}</td><td>{f['rejected']}</td><td>{f['out']}</td>"
        f"<td>{html.escape(', '.join(f'{k}: {v}' for k, v in f['reasons'].items()) or f.get('skipped', ''))}</td></tr>"
        for f in funnel)
    sections = []
    for stage, reason in sorted(rejected.buckets(), key=lambda b: (order.get(b[0], 99), b[1])):
        sections.append(f"<h3>rejected at {html.escape(stage)}: {html.escape(reason)} "
                        f"({rejected.counts[(stage, reason)]})</h3>"
                        f'<div class="grid">{_sample_cells(rejected.rows((stage, reason)))}</div>')
    kept_count = sum(kept.counts.values())
    kept_rows = [row for bucket in kept.buckets() for row in kept.rows(bucket)][:SAMPLES]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 10px; }}
.cell {{ width: 160px; font-size: 11px; border: 1px solid #ddd; padding: 4px; }}
.cell img {{ max-width: 96px; max-height: 96px; display: block; }}
.noimg {{ width: 96px; height: 60px; background: #eee; color: #777; font-size: 10px; }}
.key {{ color: #555; }} .text {{ font-weight: bold; margin: 2px 0; }} .values {{ color: #444; word-break: break-all; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Read this page before trusting the pairs: the chart shows the rows left after each stage (stages run in this
order, cheap first); the tables below show sample rows kept and rejected, per stage and reason, with the values
the stage measured.</p>
<img src="data:image/png;base64,{base64.b64encode(png).decode('ascii')}" alt="funnel chart">
<h2>Funnel</h2>
<table><tr><th>stage</th><th>in</th><th>rejected</th><th>out</th><th>reasons</th></tr>{rows_html}</table>
<h2>Kept pairs ({kept_count})</h2><div class="grid">{_sample_cells(kept_rows)}</div>
<h2>Rejected rows</h2>{''.join(sections) or '<p>none</p>'}
</body></html>
"""
    return atomic_write_text(path, page)
