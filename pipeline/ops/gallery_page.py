"""The gallery's HTML: one static page with its style, script and charts inline (``ops/gallery.py`` picks
what goes in it).

Why everything is escaped here and nowhere else: every text (captions, ids, columns, error messages) reaches
the page through ``_e`` (``html.escape``, quotes too, as attributes hold text as well), so an answer that
says ``<script>`` is shown as those characters. A Content-Security-Policy meta tag then allows only this
page's own style and script (by their SHA-256) and ``data:`` images: were a text ever to slip through
unescaped, the browser would still refuse to run it, and the page can fetch nothing from any network.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

#: Cards per page in the browser (default); the filters look at every card, the pager shows this many.
PAGE_SIZE = 60
_HIST_BINS, _RATE_BUCKETS = 20, 30
_CHART_W, _CHART_H = 360, 120


@dataclass(frozen=True)
class Card:
    """One row as the page shows it; every text already masked and cut, not yet escaped."""

    id: str
    status: str
    finished_at: str
    path: str
    caption: str
    choices: int
    columns: tuple[str, ...]
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float | None
    attempts: int | None
    error_type: str | None
    error_message: str | None
    thumb: str | None  # a data: URI
    thumb_note: str = ""


@dataclass(frozen=True)
class FailureGroup:
    error_type: str
    count: int
    rows: list[tuple[str, str]]  # (row id, message), a few of the rows


@dataclass(frozen=True)
class Header:
    """What the top of the page says: the run's report and how the cards were chosen."""

    title: str
    report: Mapping[str, Any]
    run_id: int
    scope_run: int | None  # None: the cards come from every row of the job
    rows: int
    rows_failed: int
    sample: str
    limit: int
    seed: int
    columns: Sequence[str] = field(default_factory=list)
    generated_at: str = ""


@dataclass(frozen=True)
class Page:
    html: str
    cards: int
    rows: int
    thumbnails: int
    left_out: int


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def render(header: Header, cards: Sequence[Card], failures: Sequence[FailureGroup], latencies: Sequence[float],
           finish_times: Sequence[float], *, max_bytes: int, page_size: int = PAGE_SIZE) -> Page:
    """The whole page, with as many of ``cards`` (in order) as fit in ``max_bytes``, ``page_size`` at a time."""
    parts = [_card(card, index, header.columns) for index, card in enumerate(cards)]
    error_types = sorted({g.error_type for g in failures} | {c.error_type for c in cards if c.error_type})
    frame = _frame(header, failures, error_types, _charts(latencies, finish_times)).replace(
        '<div id="grid">', f'<div id="grid" data-page-size="{int(page_size)}">', 1)
    total = len(frame.encode("utf-8")) + 400  # room for the left-out notice
    kept: list[str] = []
    for part in parts:
        size = len(part.encode("utf-8"))
        if total + size > max_bytes:
            break
        kept.append(part)
        total += size
    left_out = len(cards) - len(kept)
    notice = (f'<p class="note" id="left-out">{left_out} more cards were left out to keep this page under '
              f"{max_bytes / 1e6:.1f} MB; use --limit or --sample to choose others.</p>" if left_out else "")
    page = frame.replace("<!--CARDS-->", "".join(kept) + "</div>" + notice, 1)
    thumbs = sum(1 for card in cards[: len(kept)] if card.thumb)
    return Page(page, len(kept), header.rows, thumbs, left_out)


def _frame(header: Header, failures: Sequence[FailureGroup], error_types: Sequence[str], charts: str) -> str:
    style, script = _STYLE, _SCRIPT
    policy = (f"default-src 'none'; img-src data:; style-src '{_sha256(style)}'; script-src '{_sha256(script)}'; "
              "base-uri 'none'; form-action 'none'")
    report = header.report
    title = f"{header.title} · run #{header.run_id}"
    return "".join([
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{style}</style></head><body>",
        f"<header><h1>{_e(header.title)} <small>run #{header.run_id}: {_e(report.get('command', ''))}, "
        f"{_e(_state(report))}</small></h1>",
        f'<p class="sub">{_e(_scope_text(header))}</p>',
        _numbers(report), f'<div class="charts">{charts}</div></header>',
        _failures(failures),
        _filters(header, error_types),
        '<div id="grid"><!--CARDS-->',
        f"</section><footer>pipeline gallery · generated {_e(header.generated_at)} UTC · self-contained: "
        "opens offline, loads nothing</footer>",
        f"<script>{script}</script></body></html>\n",
    ])


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _state(report: Mapping[str, Any]) -> str:
    if report.get("stop_reason") == "budget":
        return "stopped by its budget"
    return "interrupted" if report.get("interrupted") else str(report.get("status", ""))


def _scope_text(header: Header) -> str:
    where = (f"run #{header.scope_run} finished" if header.scope_run is not None
             else "with an outcome in the job")
    how = {"failed-first": "failed rows first, then the newest", "newest": "the newest first",
           "random": f"a random sample (seed {header.seed})"}[header.sample]
    shown = min(header.limit, header.rows)
    return (f"{shown:,} cards of the {header.rows:,} rows {where} ({header.rows_failed:,} failed), {how}. "
            f"The numbers and charts are run #{header.run_id}'s.")


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _numbers(report: Mapping[str, Any]) -> str:
    rows, tokens = report.get("rows", {}), report.get("tokens", {})
    latency, cost = report.get("latency_ms", {}), report.get("cost", {}).get("total")
    items = [
        ("rows", _fmt(rows.get("total"))), ("ok", _fmt(rows.get("ok"))), ("failed", _fmt(rows.get("failed"))),
        ("skipped", _fmt(rows.get("skipped"))),
        ("tokens in / out", f"{_fmt(tokens.get('prompt'))} / {_fmt(tokens.get('completion'))}"),
        ("cost", "–" if cost is None else f"{cost:.4f}"),
        ("latency p50 / p95", f"{_fmt(latency.get('p50'))} / {_fmt(latency.get('p95'))} ms"),
        ("throughput", f"{_fmt(report.get('throughput', {}).get('rows_per_s'), 2)} rows/s"),
        ("elapsed", f"{_fmt(report.get('elapsed_s'), 1)} s"),
    ]
    cells = "".join(f'<div><dt>{_e(name)}</dt><dd id="n-{_e(name.split()[0])}">{_e(value)}</dd></div>'
                    for name, value in items)
    return f'<dl class="numbers">{cells}</dl>'


def _failures(failures: Sequence[FailureGroup]) -> str:
    if not failures:
        return '<section id="failures"><h2>Failures</h2><p class="note">No failed rows.</p></section>'
    groups = []
    for group in failures:
        rows = "".join(f"<tr><td>{_e(row_id)}</td><td>{_e(message)}</td></tr>" for row_id, message in group.rows)
        more = group.count - len(group.rows)
        extra = f'<p class="note">and {more:,} more rows</p>' if more > 0 else ""
        groups.append(
            f'<details class="group" open><summary><span class="etype">{_e(group.error_type)}</span> '
            f"{group.count:,} row{'' if group.count == 1 else 's'} "
            f'<button type="button" class="show-type" data-error="{_e(group.error_type)}">show these cards</button>'
            f"</summary><table><thead><tr><th>row</th><th>message</th></tr></thead><tbody>{rows}</tbody></table>"
            f"{extra}</details>")
    return f'<section id="failures"><h2>Failures by error type</h2>{"".join(groups)}</section>'


def _filters(header: Header, error_types: Sequence[str]) -> str:
    errors = "".join(f'<option value="{_e(t)}">{_e(t)}</option>' for t in error_types)
    columns = "".join(f'<option value="{i}">{_e(name)}</option>' for i, name in enumerate(header.columns))
    status = "".join(f'<button type="button" class="status-filter" data-status-filter="{s}" '
                     f'id="f-status-{s}" aria-pressed="{str(s == "all").lower()}">{s}</button>'
                     for s in ("all", "ok", "failed"))
    return "".join([
        '<section id="rows"><h2>Rows</h2><div class="filters">',
        f'<span class="seg" role="group" aria-label="status">{status}</span>',
        f'<label>error type <select id="f-error"><option value="">any</option>{errors}</select></label>',
        '<label>caption or id <input id="f-text" type="search" placeholder="search text"></label>',
        f'<label>column <select id="f-column"><option value="">-</option>{columns}</select></label>',
        '<input id="f-value" type="search" placeholder="value contains" aria-label="column value">',
        '</div><div class="pager"><span id="shown"></span> <button type="button" id="prev">previous</button> '
        '<span id="page"></span> <button type="button" id="next">next</button></div>',
    ])


def _card(card: Card, index: int, names: Sequence[str]) -> str:
    columns = "".join(f' data-c{i}="{_e(v)}"' for i, v in enumerate(card.columns))
    image = (f'<img src="{card.thumb}" alt="{_e(card.id)}">' if card.thumb
             else f'<span class="ph">{_e(card.thumb_note)}</span>')
    facts = [("finish", card.finish_reason), ("tokens", _tokens(card)),
             ("latency", None if card.latency_ms is None else f"{card.latency_ms:,.0f} ms"),
             ("attempts", card.attempts), ("finished", _short_time(card.finished_at))]
    if card.choices > 1:
        facts.append(("choices", card.choices))
    kv = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts if v not in (None, ""))
    error = (f'<p class="error"><b>{_e(card.error_type)}</b>: {_e(card.error_message)}</p>'
             if card.status == "failed" else "")
    caption = f'<p class="caption">{_e(card.caption)}</p>' if card.caption else ""
    return (f'<article class="card {_e(card.status)}" data-i="{index}" data-id="{_e(card.id)}" '
            f'data-status="{_e(card.status)}" data-error="{_e(card.error_type or "")}"{columns}>'
            f'<div class="thumb" title="{_e(card.path)}">{image}</div><div class="body">'
            f'<p class="head"><span class="rid">{_e(card.id)}</span> <span class="st">{_e(card.status)}</span></p>'
            f"{caption}{error}<dl class=\"kv\">{kv}{_column_facts(card, names)}</dl></div></article>")


def _column_facts(card: Card, names: Sequence[str]) -> str:
    return "".join(f"<dt>{_e(name)}</dt><dd>{_e(value)}</dd>" for name, value in zip(names, card.columns, strict=False)
                   if value)


def _tokens(card: Card) -> str | None:
    if card.prompt_tokens is None and card.completion_tokens is None:
        return None
    return f"{_fmt(card.prompt_tokens)} in / {_fmt(card.completion_tokens)} out"


def _short_time(iso: str) -> str:
    return iso[:19].replace("T", " ") if iso else ""


# --- charts (inline SVG, drawn here from the run's timestamps) -----------------------------------------


def _charts(latencies: Sequence[float], finish_times: Sequence[float]) -> str:
    return _figure("latency (ok requests)", _histogram(latencies)) + \
        _figure("throughput over the run", _throughput(finish_times))


def _figure(caption: str, svg: str) -> str:
    return f"<figure><figcaption>{_e(caption)}</figcaption>{svg}</figure>"


def _svg(body: str, label: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_CHART_W} {_CHART_H}" width="{_CHART_W}" '
            f'height="{_CHART_H}" role="img" aria-label="{_e(label)}">{body}</svg>')


def _empty_chart(text: str) -> str:
    return _svg(f'<text x="10" y="{_CHART_H // 2}" class="axis">{_e(text)}</text>', text)


def _bars(values: Sequence[float], titles: Sequence[str], left: str, right: str, top: str) -> str:
    """Bars over the chart's width, scaled to the tallest; axis labels at the corners."""
    plot_h, base = _CHART_H - 30, _CHART_H - 16
    width = _CHART_W / len(values)
    tallest = max(values) or 1.0
    rects = []
    for i, (value, title) in enumerate(zip(values, titles, strict=True)):
        height = plot_h * value / tallest
        rects.append(f'<rect class="bar" x="{i * width + 1:.1f}" y="{base - height:.1f}" width="{width - 2:.1f}" '
                     f'height="{height:.1f}"><title>{_e(title)}</title></rect>')
    axis = (f'<line class="base" x1="0" y1="{base}" x2="{_CHART_W}" y2="{base}"/>'
            f'<text class="axis" x="0" y="{_CHART_H - 3}">{_e(left)}</text>'
            f'<text class="axis" x="{_CHART_W}" y="{_CHART_H - 3}" text-anchor="end">{_e(right)}</text>'
            f'<text class="axis" x="0" y="10">{_e(top)}</text>')
    return _svg("".join(rects) + axis, top)


def _histogram(latencies: Sequence[float]) -> str:
    if not latencies:
        return _empty_chart("no ok requests in this run")
    low, high = 0.0, max(latencies)
    step = (high - low) / _HIST_BINS or 1.0
    counts = [0] * _HIST_BINS
    for value in latencies:
        counts[min(int((value - low) / step), _HIST_BINS - 1)] += 1
    titles = [f"{low + i * step:,.0f}–{low + (i + 1) * step:,.0f} ms: {n:,} requests" for i, n in enumerate(counts)]
    return _bars([float(n) for n in counts], titles, "0 ms", f"{high:,.0f} ms", f"{max(counts):,} requests (peak)")


def _throughput(finish_times: Sequence[float]) -> str:
    if len(finish_times) < 2:
        return _empty_chart("too few requests to draw a rate")
    start, end = min(finish_times), max(finish_times)
    span = max(end - start, 1e-3)
    step = span / _RATE_BUCKETS
    counts = [0] * _RATE_BUCKETS
    for moment in finish_times:
        counts[min(int((moment - start) / step), _RATE_BUCKETS - 1)] += 1
    rates = [n / step for n in counts]
    titles = [f"{_clock(start + i * step)}: {rate:,.1f} rows/s" for i, rate in enumerate(rates)]
    return _bars(rates, titles, _clock(start), f"{_clock(end)} ({span:,.1f} s)", f"{max(rates):,.1f} rows/s (peak)")


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return ""
    return datetime.fromtimestamp(seconds, UTC).strftime("%H:%M:%S")


_STYLE = """
:root{--ok:#1b7f3b;--bad:#b3261e;--ink:#1d1d1f;--mute:#666;--line:#ddd;--bg:#f6f6f4}
*{box-sizing:border-box}[hidden]{display:none!important}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg)}
header,section,footer{padding:12px 20px}h1{font-size:20px;margin:4px 0}h1 small{font-weight:normal;color:var(--mute)}
h2{font-size:16px;margin:8px 0}.sub,.note,footer{color:var(--mute)}
.numbers{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}.numbers div{background:#fff;border:1px solid var(--line);
border-radius:6px;padding:6px 10px}.numbers dt{font-size:11px;color:var(--mute);text-transform:uppercase}
.numbers dd{margin:0;font-size:16px;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0;background:#fff;border:1px solid var(--line);
border-radius:6px;padding:6px}figcaption{font-size:12px;color:var(--mute)}
.bar{fill:#4a78c2}.base{stroke:#999}.axis{font-size:10px;fill:var(--mute)}
.group{background:#fff;border:1px solid var(--line);border-radius:6px;margin:6px 0;padding:4px 10px}
.group summary{cursor:pointer}.etype{font-weight:600;color:var(--bad)}
table{border-collapse:collapse;width:100%;font-size:12px}td,th{text-align:left;border-top:1px solid var(--line);
padding:2px 6px;vertical-align:top;word-break:break-word}td:first-child,th:first-child{width:14em}
.filters,.pager{display:flex;flex-wrap:wrap;gap:10px;align-items:center;margin:6px 0}
.seg button{border:1px solid #999;background:#fff;padding:3px 10px;cursor:pointer}
.seg button[aria-pressed=true]{background:var(--ink);color:#fff}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(260px,1fr));gap:10px}
.card{display:flex;gap:8px;background:#fff;border:1px solid var(--line);border-left:4px solid var(--ok);
border-radius:6px;padding:8px;overflow:hidden}.card.failed{border-left-color:var(--bad)}
.thumb{flex:0 0 96px;height:96px;display:flex;align-items:center;justify-content:center;background:#eee;border-radius:4px}
.thumb img{max-width:96px;max-height:96px}.ph{font-size:11px;color:var(--mute);text-align:center;padding:4px}
.body{min-width:0;flex:1}.head{margin:0 0 4px;display:flex;justify-content:space-between;gap:6px}
.rid{font-family:ui-monospace,monospace;font-size:12px;word-break:break-all}
.st{font-size:11px;text-transform:uppercase;color:var(--ok)}.failed .st{color:var(--bad)}
.caption{margin:0 0 4px;white-space:pre-wrap;word-break:break-word}.error{margin:0 0 4px;color:var(--bad);
word-break:break-word;font-size:12px}.kv{display:grid;grid-template-columns:auto 1fr;gap:0 8px;margin:0;font-size:11px;
color:var(--mute)}.kv dd{margin:0;word-break:break-word}
"""

_SCRIPT = """
(function () {
  "use strict";
  var byId = function (id) { return document.getElementById(id); };
  var PAGE = Math.max(1, parseInt(byId("grid").getAttribute("data-page-size"), 10) || 60);
  var cards = Array.prototype.slice.call(document.querySelectorAll("#grid .card"));
  var texts = cards.map(function (card) {
    var caption = card.querySelector(".caption");
    return ((caption ? caption.textContent : "") + " " + card.getAttribute("data-id")).toLowerCase();
  });
  var state = { status: "all", page: 0 };
  function matches(card, i) {
    if (state.status !== "all" && card.getAttribute("data-status") !== state.status) { return false; }
    var error = byId("f-error").value;
    if (error && card.getAttribute("data-error") !== error) { return false; }
    var text = byId("f-text").value.trim().toLowerCase();
    if (text && texts[i].indexOf(text) < 0) { return false; }
    var column = byId("f-column").value, value = byId("f-value").value.trim().toLowerCase();
    if (column !== "" && value &&
        (card.getAttribute("data-c" + column) || "").toLowerCase().indexOf(value) < 0) { return false; }
    return true;
  }
  function apply(first) {
    if (first) { state.page = 0; }
    var hits = cards.filter(matches);
    var pages = Math.max(1, Math.ceil(hits.length / PAGE));
    state.page = Math.min(state.page, pages - 1);
    var shown = hits.slice(state.page * PAGE, (state.page + 1) * PAGE);
    cards.forEach(function (card) { card.hidden = true; });
    shown.forEach(function (card) { card.hidden = false; });
    byId("shown").textContent = hits.length + " of " + cards.length + " cards match";
    byId("page").textContent = "page " + (state.page + 1) + " of " + pages;
    byId("prev").disabled = state.page === 0;
    byId("next").disabled = state.page >= pages - 1;
    Array.prototype.forEach.call(document.querySelectorAll("[data-status-filter]"), function (b) {
      b.setAttribute("aria-pressed", String(b.getAttribute("data-status-filter") === state.status));
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("[data-status-filter]"), function (b) {
    b.addEventListener("click", function () { state.status = b.getAttribute("data-status-filter"); apply(true); });
  });
  Array.prototype.forEach.call(document.querySelectorAll(".show-type"), function (b) {
    b.addEventListener("click", function (event) {
      event.preventDefault();
      byId("f-error").value = b.getAttribute("data-error");
      state.status = "all";
      apply(true);
      byId("rows").scrollIntoView();
    });
  });
  ["f-error", "f-column"].forEach(function (id) { byId(id).addEventListener("change", function () { apply(true); }); });
  ["f-text", "f-value"].forEach(function (id) { byId(id).addEventListener("input", function () { apply(true); }); });
  byId("prev").addEventListener("click", function () { state.page -= 1; apply(false); });
  byId("next").addEventListener("click", function () { state.page += 1; apply(false); });
  apply(true);
  document.body.setAttribute("data-ready", "1");
})();
"""
