"""Write ``report.md`` and a self-contained ``report.html`` from a run folder's saved state.

Both documents have the same parts, in order: title, a loud banner when any data was synthetic, a
note when the run did not complete, headline tables, the study's text sections with their figures,
the remaining figures, the combined sub-runs, the list of tables, and the provenance. The HTML
embeds every figure as a base64 PNG and needs no other file.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .figure_layout import REPORT_WIDTH_PX
from .folder import PROVENANCE, REPORT, STATUS, RunFolderError, read_json
from .markdown_html import inline, markdown_to_html
from .provenance import is_synthetic

__all__ = ["render_report", "SYNTHETIC_WARNING", "load_children"]

SYNTHETIC_WARNING = ("SYNTHETIC DATA: these results were computed on the built-in synthetic image set, "
                     "not on CIFAR-10. They demonstrate the pipeline only; do not read them as CIFAR-10 results.")

# the page's text column is REPORT_WIDTH_PX wide, so figures (at most FIGURE_WIDTH_PX) show unscaled
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:{body}px;margin:24px auto;
padding:0 20px;color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#666;margin-top:0}
.banner{padding:14px 18px;margin:14px 0;border-radius:6px;font-weight:700}
.synthetic{background:#c62828;color:#fff;font-size:1.15em;border:3px solid #7f0000}
.incomplete{background:#fff3cd;color:#5c4400;border:1px solid #e0c36a}
table{border-collapse:collapse;margin:10px 0;font-size:.92em}
th,td{border:1px solid #d0d0d0;padding:4px 9px;text-align:left;vertical-align:top}
th{background:#f3f4f6}.provenance th{white-space:nowrap;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:18px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.92em;margin-top:4px}
code,pre{background:#f5f5f7;border-radius:3px}pre{padding:10px;overflow-x:auto;font-size:.85em}
.child{border-left:4px solid #9ab;padding-left:14px;margin:18px 0}
""".replace("{body}", str(REPORT_WIDTH_PX + 40))


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _md_table(columns: list[str], rows: list[list[Any]]) -> str:
    esc = lambda s: _cell(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(esc(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(esc(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(
        f'<td class="num">{html.escape(_cell(v))}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
        else f"<td>{html.escape(_cell(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def load_children(run_dir: Path, state: dict) -> list[dict[str, Any]]:
    """The combined sub-runs of a run: their folder, report state, provenance and status (``error`` if unreadable)."""
    out = []
    for child in state.get("children", []):
        path = (run_dir / child["path"]).resolve()
        rec: dict[str, Any] = {"path": path, "rel": child["path"], "title": child.get("title")}
        try:
            rec["state"] = read_json(path / REPORT)
            rec["provenance"] = read_json(path / PROVENANCE)
            rec["status"] = read_json(path / STATUS)
        except RunFolderError as e:
            rec["error"] = str(e)
        out.append(rec)
    return out


def _headline_parts(state: dict) -> list[tuple[str | None, str, str]]:
    """(title, markdown, html) per headline item."""
    parts = []
    for item in state.get("headlines", []):
        if item["kind"] == "table":
            parts.append((item.get("title"), _md_table(item["columns"], item["rows"]),
                          _html_table(item["columns"], item["rows"])))
        else:
            parts.append((item.get("title"), item["markdown"], markdown_to_html(item["markdown"])))
    return parts


def _figure_md(fig: dict, prefix: str = "") -> str:
    caption = fig.get("caption") or fig["spec"].get("title") or fig["name"]
    return f"![{caption}]({prefix}figures/{fig['name']}.png)\n\n*{caption}* (table `{fig['table']}`)"


def _figure_html(fig: dict, folder: Path) -> str:
    caption = fig.get("caption") or fig["spec"].get("title") or fig["name"]
    png = folder / "figures" / f"{fig['name']}.png"
    if not png.is_file():
        return f"<p><em>figure {html.escape(fig['name'])} is missing ({html.escape(str(png))})</em></p>"
    return (f'<figure id="fig-{html.escape(fig["name"])}"><img src="{_png_data_uri(png)}" '
            f'alt="{html.escape(caption)}"><figcaption>{inline(caption)} '
            f'(table <code>{html.escape(fig["table"])}</code>)</figcaption></figure>')


def _git_text(git: dict) -> str:
    rev = git.get("revision")
    if not rev:
        return f"unknown ({git.get('note') or 'no git information'})"
    return f"{rev[:12]}{' (dirty: uncommitted changes)' if git.get('dirty') else ''}"


def _provenance_rows(prov: dict, status: dict) -> list[tuple[str, str]]:
    git_text = _git_text(prov.get("git") or {})
    hw = prov.get("hardware") or {}
    gpu = hw.get("gpu") or "none"
    if hw.get("gpu_count", 0) > 1:
        gpu = f"{hw['gpu_count']} x {gpu}"
    data = prov.get("data")
    data_text = ("not recorded" if not data else
                 "; ".join(f"{k}: {v}" for k, v in data.items() if v not in (None, "")))
    pk = prov.get("packages") or {}
    wall = prov.get("wall_s")
    rows = [("command", prov.get("command", "")), ("working directory", prov.get("cwd", "")),
            ("git revision", git_text)]
    if prov.get("study_git"):
        rows.append(("study script git revision", _git_text(prov["study_git"])))
    hw_text = (f"{hw.get('cpu', '?')}, {hw.get('cores', '?')} cores, {hw.get('ram_gib', '?')} GiB RAM; GPU: {gpu}"
               + (f" (CUDA {hw['cuda']})" if hw.get("cuda") else ""))
    rows += [("data", data_text), ("hardware", hw_text),
             ("started", str(prov.get("started"))), ("finished", str(prov.get("finished") or "not finished")),
             ("wall time", f"{wall:.1f} s" if isinstance(wall, (int, float)) else "n/a"),
             ("status", status.get("state", "unknown") + (f": {status['error']}" if status.get("error") else "")),
             ("packages", ", ".join(f"{k} {v or 'not installed'}" for k, v in pk.items()))]
    src = prov.get("source")
    if src:
        rows.append(("study source", f"{src['file']} (sha256 {src['sha256'][:16]}...)"))
    return rows


def render_report(run_dir: Path, state: dict, prov: dict, status: dict) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir`` (figures must already be drawn).

    Args:
        run_dir: the run folder.
        state: its ``report.json`` content.
        prov: its ``provenance.json`` content.
        status: its status (as it will be on disk once the report is written).

    Returns:
        The paths of ``report.md`` and ``report.html``.
    """
    children = load_children(run_dir, state)
    synthetic = is_synthetic(prov.get("data")) or any(
        is_synthetic((c.get("provenance") or {}).get("data")) for c in children)
    title = state.get("title") or state["study"]
    meta = f"study `{state['study']}` · run `{run_dir.name}` · {status.get('state', 'unknown')}"
    md: list[str] = [f"# {title}", "", meta, ""]
    ht: list[str] = [f"<h1>{html.escape(title)}</h1>", f'<p class="meta">{inline(meta)}</p>']
    if synthetic:
        md += [f"> **WARNING: {SYNTHETIC_WARNING}**", ""]
        ht.append(f'<div class="banner synthetic">&#9888; WARNING: {html.escape(SYNTHETIC_WARNING)}</div>')
    if status.get("state") != "complete":
        note = (f"This run is incomplete (state: {status.get('state')}"
                + (f"; {status['error']}" if status.get("error") else "") + "). Results may be partial.")
        md += [f"> **{note}**", ""]
        ht.append(f'<div class="banner incomplete">{html.escape(note)}</div>')

    headlines = _headline_parts(state)
    if headlines:
        md += ["## Headline", ""]
        ht.append("<h2>Headline</h2>")
        for t, m, h in headlines:
            md += ([f"**{t}**", ""] if t else []) + [m, ""]
            ht += ([f"<p><strong>{html.escape(t)}</strong></p>"] if t else []) + [h]

    figures = state.get("figures", [])
    sections: list[str] = []
    for item in state.get("texts", []) + figures:
        if item.get("section") and item["section"] not in sections:
            sections.append(item["section"])
    for sec in sections:
        md += [f"## {sec}", ""]
        ht.append(f"<h2>{html.escape(sec)}</h2>")
        for t in (t for t in state.get("texts", []) if t["section"] == sec):
            md += [t["markdown"], ""]
            ht.append(markdown_to_html(t["markdown"]))
        for f in (f for f in figures if f.get("section") == sec):
            md += [_figure_md(f), ""]
            ht.append(_figure_html(f, run_dir))
    loose = [f for f in figures if not f.get("section")]
    if loose:
        md += ["## Figures", ""]
        ht.append("<h2>Figures</h2>")
        for f in loose:
            md += [_figure_md(f), ""]
            ht.append(_figure_html(f, run_dir))

    if children:
        md += ["## Sub-studies", ""]
        ht.append("<h2>Sub-studies</h2>")
        for c in children:
            _render_child(c, run_dir, md, ht)

    tables = state.get("tables", {})
    if tables:
        md += ["## Tables", "", _md_table(["table", "rows", "columns"],
                                          [[f"[{n}]({t['file']})", t["rows"], ", ".join(t["dtypes"])]
                                           for n, t in tables.items()]), ""]
        ht += ["<h2>Tables</h2>", _html_table(["table", "rows", "columns"],
                                              [[t["file"], t["rows"], ", ".join(t["dtypes"])]
                                               for t in tables.values()])]

    rows = _provenance_rows(prov, status)
    config = json.dumps(prov.get("config", {}), indent=2, sort_keys=True)
    md += ["## Provenance", "", _md_table(["field", "value"], [list(r) for r in rows]), "", "Config:", "",
           "```json", config, "```", ""]
    kv = "".join(f'<tr><th scope="row">{html.escape(k)}</th><td>{html.escape(v)}</td></tr>' for k, v in rows)
    ht += ["<h2>Provenance</h2>", f'<table class="provenance"><tbody>{kv}</tbody></table>',
           "<p>Config:</p>", f"<pre><code>{html.escape(config)}</code></pre>"]

    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, "\n".join(md).rstrip() + "\n")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(ht) + "\n</body></html>\n")
    atomic_write_text(html_path, page)
    return md_path, html_path


def _render_child(c: dict, run_dir: Path, md: list[str], ht: list[str]) -> None:
    if "error" in c:
        title = c.get("title") or c["rel"]
        md += [f"### {title}", "", f"*unavailable: {c['error']}*", ""]
        ht.append(f'<div class="child"><h3>{html.escape(title)}</h3><p><em>unavailable: '
                  f"{html.escape(c['error'])}</em></p></div>")
        return
    st = c["state"]
    title = c.get("title") or st.get("title") or st["study"]
    rel = Path(os.path.relpath(c["path"], run_dir)).as_posix()
    state_word = c["status"].get("state", "unknown")
    md += [f"### {title}", "", f"[full report]({rel}/report.md) · study `{st['study']}` · {state_word}", ""]
    ht.append(f'<div class="child"><h3>{html.escape(title)}</h3><p class="meta"><a href="{html.escape(rel)}/'
              f'report.html">full report</a> · study <code>{html.escape(st["study"])}</code> · '
              f"{html.escape(state_word)}</p>")
    if is_synthetic(c["provenance"].get("data")):
        md += ["**(synthetic data)**", ""]
        ht.append('<p><strong style="color:#c62828">synthetic data</strong></p>')
    for t, m, h in _headline_parts(st):
        md += ([f"**{t}**", ""] if t else []) + [m, ""]
        ht += ([f"<p><strong>{html.escape(t)}</strong></p>"] if t else []) + [h]
    for f in st.get("figures", []):
        md += [_figure_md(f, prefix=f"{rel}/"), ""]
        ht.append(_figure_html(f, c["path"]))
    ht.append("</div>")
