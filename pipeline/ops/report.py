"""The run report: what one run did, built from the ledger, written beside the output as JSON and Markdown,
rendered for Prometheus' textfile collector, and posted to a webhook.

Why from the ledger and not from in-memory counters: the ledger is the source of truth (it is what the
output is rebuilt from), so the report's latency percentiles, token totals and failure examples are the
numbers anyone can recompute later with SQL. The runner's ``RunSummary`` supplies what the ledger does not
keep per run (rows skipped, new, changed, the elapsed time).

What "this run" means here: the ``requests`` rows whose ``run_id`` is the run's id, i.e. the requests whose
outcome this run wrote. Build the report right after the run ends: a later run that re-sends a request
takes its ``run_id`` over.

Retries by cause: the ledger keeps each request's attempt count and only its *final* error, not the error of
every attempt. So the report counts ``retried_then_ok`` (ok requests that needed more than one attempt; their
earlier causes are not recorded) and, per final error type, failed requests that were tried more than once.
Requests that failed on their only attempt (a 400, a broken image) were not retried and show up only under
``failures``.
"""

from __future__ import annotations

import json
import logging
import math
from array import array
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.core.redact import redact, redact_url
from pipeline.core.targets import Target
from pipeline.edges.files import atomic_write_text
from pipeline.edges.ledger import StateStore

if TYPE_CHECKING:
    from pipeline.core.config import Egress

log = logging.getLogger("pipeline.ops.report")

REPORT_VERSION = 1
QUANTILES = (0.5, 0.95, 0.99)
EXAMPLES_PER_ERROR = 3
_MESSAGE_CHARS = 300  # an example message is a hint, not a dump of an HTML error page


# --- building ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) by linear interpolation between closest ranks (numpy's default,
    Hyndman & Fan type 7); ``None`` for no values. Sorted copy; the input is left alone."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _distribution(values: Sequence[float]) -> dict[str, Any]:
    stats: dict[str, Any] = {f"p{round(q * 100)}": percentile(values, q) for q in QUANTILES}
    stats.update(count=len(values), sum=float(sum(values)),
                 mean=(sum(values) / len(values)) if values else None, max=max(values) if values else None)
    return stats


def _price_lookup(prices: Mapping[str, Any] | None, default_model: str | None) -> Any:
    """The budget guard's price rule (exact model, longest prefix, else the configured model), reused so
    the report's cost and the ``max_cost`` guard never disagree about which price applies."""
    from pipeline.run.limits import BudgetGuard

    plain = {name: (p.model_dump() if hasattr(p, "model_dump") else p) for name, p in (prices or {}).items()}
    return BudgetGuard(prices=plain, default_model=default_model).price_for


def _run_row(store: StateStore, run_id: int) -> dict[str, Any]:
    run = store.run_record(run_id)
    if run is None:
        raise ValueError(f"{store.path}: no run #{run_id} in the ledger")
    return run


_REQUEST_FIELDS = ("model", "prompt_tokens", "completion_tokens", "latency_ms", "ttft_ms", "image_bytes",
                   "sent_bytes")


@dataclass
class _RunNumbers:
    """This run's requests folded as they stream out of the ledger: a 200,000-row run must not load
    200,000 result dicts just to be summarised."""

    ok: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: array = field(default_factory=lambda: array("d"))
    ttft: array = field(default_factory=lambda: array("d"))
    by_model: Counter[str] = field(default_factory=Counter)
    unpriced: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    extra_attempts: int = 0
    images: int = 0
    image_bytes: int = 0
    sent_bytes: int = 0


def _run_requests(store: StateStore, run_id: int, price_for: Any, default_model: str | None) -> _RunNumbers:
    """Fold every request this run finished; the first result stands for the request (usage, latency and
    image sizes are per request and repeated on every choice's result)."""
    numbers = _RunNumbers()
    numbers.retries["retried_then_ok"] = 0
    for status, attempts, error_type, *values in store.finished_requests(run_id, _REQUEST_FIELDS):
        attempts = int(attempts or 0)
        numbers.extra_attempts += max(attempts - 1, 0)
        if status == "failed":
            numbers.failed += 1
            if attempts > 1:
                numbers.retries[error_type or "error"] += 1
            continue
        model, prompt, completion, latency, ttft, image_bytes, sent_bytes = values
        numbers.ok += 1
        numbers.retries["retried_then_ok"] += attempts > 1
        numbers.prompt_tokens += int(prompt or 0)
        numbers.completion_tokens += int(completion or 0)
        if latency is not None:
            numbers.latency.append(float(latency))
        if ttft is not None:
            numbers.ttft.append(float(ttft))
        if image_bytes is not None and sent_bytes is not None:
            numbers.images += 1
            numbers.image_bytes += int(image_bytes)
            numbers.sent_bytes += int(sent_bytes)
        if price_for is not None:
            name = model or default_model or "unknown"
            price = price_for(name)
            if price is None:
                numbers.unpriced += 1
            else:
                numbers.by_model[name] += price.cost(int(prompt or 0), int(completion or 0))
    return numbers


def run_failures(store: StateStore, run_id: int, examples: int = EXAMPLES_PER_ERROR,
                 secrets: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Manifest rows whose request failed in this run, by error type (most common first), with a few
    example rows. ``StateStore.error_breakdown`` restricted to one run; messages are redacted and cut."""
    secrets = tuple(secrets)
    out = []
    for error_type, count, sample in store.failure_groups(examples, run_id=run_id):
        out.append({
            "error_type": error_type or "error", "count": int(count),
            "examples": [{"id": row_id, "message": _short(redact(message or "", secrets))}
                         for row_id, message in sample],
        })
    return out


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def build_report(store: StateStore, run_id: int, summary: Mapping[str, Any] | Any, *, config_digest: str,
                 prices: Mapping[str, Any] | None = None, default_model: str | None = None,
                 exit_code: int | None = None, secrets: Iterable[str] = ()) -> dict[str, Any]:
    """The report of run ``run_id`` as a JSON-ready dict (see the module docstring for what it counts).

    ``summary`` is the run's ``RunSummary`` (or its ``to_dict()``); ``prices`` is ``limits.prices`` (per 1M
    tokens, by model) and ``default_model`` the configured ``request.model``, used when the endpoint did not
    name the model; without prices the cost is ``None``. ``exit_code``, when the caller knows it (it may
    tolerate a few failures), decides ``success``; otherwise success means nothing failed and nothing was
    interrupted. ``secrets`` are masked in the example error messages.
    """
    data = dict(summary.to_dict() if hasattr(summary, "to_dict") else summary)
    run = _run_row(store, run_id)
    numbers = _run_requests(store, run_id, _price_lookup(prices, default_model) if prices else None, default_model)
    prompt_tokens, completion_tokens = numbers.prompt_tokens, numbers.completion_tokens
    elapsed = _elapsed(data, run)
    interrupted, output_failed = bool(data.get("interrupted", False)), int(data.get("output_failed", 0))
    success = (exit_code == 0) if exit_code is not None else (not interrupted and not output_failed)
    return {
        "report_version": REPORT_VERSION,
        "run_id": run_id,
        "command": data.get("command", run["command"]),
        "status": run["status"],
        "config_digest": config_digest,
        "output": str(data.get("output", "")),
        "started_at": run["started_at"],
        "finished_at": run["finished_at"] or datetime.now(UTC).isoformat(timespec="milliseconds"),
        "elapsed_s": round(elapsed, 3),
        "exit_code": exit_code,
        "success": success,
        "interrupted": interrupted,
        "stop_reason": data.get("stop_reason"),  # "signal" or "budget" when the run stopped early
        "budget_message": data.get("budget_message"),
        "rows": {name: data.get(f"rows_{name}", 0) for name in _ROW_COUNTS},
        "output_rows": {"total": data.get("output_rows", 0), "ok": data.get("output_ok", 0),
                        "failed": output_failed},
        "manifest_rows": _manifest_rows(data),
        "requests": {"sent": data.get("attempts", 0), "ok": numbers.ok, "failed": numbers.failed,
                     "extra_attempts": numbers.extra_attempts},
        "tokens": {"prompt": prompt_tokens, "completion": completion_tokens,
                   "total": prompt_tokens + completion_tokens},
        "cost": _cost(numbers, bool(prices)),
        "throughput": _throughput(numbers, int(data.get("rows_ok", 0)), elapsed),
        "latency_ms": _distribution(numbers.latency),
        "ttft_ms": _distribution(numbers.ttft),
        "retries": dict(numbers.retries),
        "failures": run_failures(store, run_id, secrets=secrets),
        "preflight": {"images": numbers.images, "image_bytes": numbers.image_bytes, "sent_bytes": numbers.sent_bytes,
                      "bytes_saved": numbers.image_bytes - numbers.sent_bytes},
    }


#: The summary's ``rows_*`` counters, in the order the report lists them.
_ROW_COUNTS = ("total", "new", "changed", "resumed", "retried", "skipped", "ok", "failed", "deduplicated", "not_run")


def _manifest_rows(data: Mapping[str, Any]) -> dict[str, int]:
    """Manifest rows by their outcome in the output after the run: ``total == ok + failed + not_run``
    (``output_rows`` counts output rows, one per choice, so with ``request.n`` > 1 the two differ)."""
    return {"total": data.get("rows_total", 0), "ok": data.get("manifest_ok", 0),
            "failed": data.get("manifest_failed", 0), "not_run": data.get("rows_not_run", 0)}


def _elapsed(data: Mapping[str, Any], run: Mapping[str, Any]) -> float:
    """The summary's own duration, else the ledger's start/finish times (a run that died has no summary)."""
    elapsed = float(data.get("elapsed_s") or 0.0)
    started, finished = _parse_time(run["started_at"]), _parse_time(run["finished_at"])
    if not elapsed and started is not None:
        elapsed = ((finished or datetime.now(UTC)) - started).total_seconds()
    return elapsed


def _cost(numbers: _RunNumbers, priced: bool) -> dict[str, Any]:
    """Cost by model and in total; all ``None``/empty without ``limits.prices`` (no guessing at prices)."""
    if not priced:
        return {"total": None, "by_model": {}, "unpriced_requests": 0}
    return {"total": sum(numbers.by_model.values()), "by_model": dict(sorted(numbers.by_model.items())),
            "unpriced_requests": numbers.unpriced}


def _throughput(numbers: _RunNumbers, rows_ok: int, elapsed: float) -> dict[str, float | None]:
    def per_second(count: float) -> float | None:
        return count / elapsed if elapsed > 0 else None

    return {"rows_per_s": per_second(rows_ok), "requests_per_s": per_second(numbers.ok + numbers.failed),
            "completion_tokens_per_s": per_second(numbers.completion_tokens)}


# --- files ------------------------------------------------------------------------------------------


def report_paths(output_path: Target) -> tuple[Target, Target]:
    """``<output stem>.summary.json`` and ``.summary.md`` beside the output (a local file or an object)."""
    return (output_path.with_name(f"{output_path.stem}.summary.json"),
            output_path.with_name(f"{output_path.stem}.summary.md"))


def write_reports(report: Mapping[str, Any], output_path: Target,
                  options: Mapping[str, Any] | None = None) -> tuple[Target, Target]:
    """Write the report beside the output as JSON and Markdown (each atomically); returns both paths.
    ``options``: the store's ``storage_options`` when the output is an object-store URL."""
    json_path, md_path = report_paths(output_path)
    atomic_write_text(json_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n", options)
    atomic_write_text(md_path, render_markdown(report), options)
    return json_path, md_path


# --- text -------------------------------------------------------------------------------------------


def _num(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cost_text(report: Mapping[str, Any]) -> str:
    total = report["cost"]["total"]
    return "-" if total is None else f"{total:.4f}"


def _state(report: Mapping[str, Any]) -> str:
    if report.get("stop_reason") == "budget":
        return "stopped by its budget"
    return "interrupted" if report["interrupted"] else str(report["status"])


def summary_line(report: Mapping[str, Any]) -> str:
    """One line for chat (the webhook's ``text``) and for logs."""
    rows, tokens = report["rows"], report["tokens"]
    state = _state(report)
    mark = "ok" if report["success"] else "FAILED"
    failed = ", ".join(f"{f['error_type']} {f['count']}" for f in report["failures"][:3])
    failed_text = f" ({failed})" if failed else ""
    cost = "" if report["cost"]["total"] is None else f" · cost {_cost_text(report)}"
    return (f"[{mark}] pipeline {report['command']} #{report['run_id']} {state} in {report['elapsed_s']:.1f}s: "
            f"{rows['ok']} ok, {rows['failed']} failed{failed_text}, {rows['skipped']} skipped of "
            f"{rows['total']} rows · tokens {tokens['prompt']:,} in / {tokens['completion']:,} out{cost} · "
            f"{report['output']}")


def _md(value: Any) -> str:
    """A table cell: no pipes or newlines from error messages may break the table."""
    return " ".join(str(value).split()).replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in rows]
    return lines


def _manifest_text(report: Mapping[str, Any]) -> str:
    """The output's manifest rows, which add up to the manifest."""
    rows = report["manifest_rows"]
    return (f"for {_num(rows['ok'] + rows['failed'])} of {_num(rows['total'])} manifest rows ({_num(rows['ok'])} "
            f"ok, {_num(rows['failed'])} failed, {_num(rows['not_run'])} not run yet)")


def render_markdown(report: Mapping[str, Any]) -> str:
    """A short human report: a header, then small tables (GitHub / GitLab / any Markdown viewer)."""
    rows, out, req, tokens = report["rows"], report["output_rows"], report["requests"], report["tokens"]
    lines = [f"# pipeline {report['command']} #{report['run_id']}: {_state(report)}", "",
             summary_line(report), ""]
    if report.get("budget_message"):
        lines += [f"> {_md(report['budget_message'])}", ""]
    lines += _table(["", ""], [
        ("output", f"`{report['output']}`"), ("config digest", f"`{report['config_digest']}`"),
        ("started (UTC)", report["started_at"]), ("finished (UTC)", report["finished_at"]),
        ("elapsed", f"{report['elapsed_s']:.1f} s"),
        ("exit code", "-" if report["exit_code"] is None else report["exit_code"]),
    ])
    lines += ["", "## Rows", ""]
    lines += _table(["manifest", "new", "changed", "resumed", "retried", "skipped", "ok", "failed",
                     "deduplicated", "not run"],
                    [[_num(rows[k]) for k in ("total", "new", "changed", "resumed", "retried", "skipped", "ok",
                                              "failed", "deduplicated", "not_run")]])
    lines += ["", f"Output file: {_num(out['total'])} rows ({_num(out['ok'])} ok, {_num(out['failed'])} failed), "
              f"{_manifest_text(report)}.", "", "## Requests, tokens, cost", ""]
    throughput = report["throughput"]
    lines += _table(["requests sent", "ok", "failed", "prompt tokens", "completion tokens", "cost", "rows/s"],
                    [[_num(req["sent"]), _num(req["ok"]), _num(req["failed"]), _num(tokens["prompt"]),
                      _num(tokens["completion"]), _cost_text(report), _num(throughput["rows_per_s"], 2)]])
    lines += ["", "## Latency (ms)", ""]
    lines += _table(["", "p50", "p95", "p99", "max", "requests"], [
        [name, *(_num(stats[k]) for k in ("p50", "p95", "p99", "max")), _num(stats["count"])]
        for name, stats in (("total", report["latency_ms"]), ("time to first token", report["ttft_ms"]))
    ])
    if any(report["retries"].values()):
        lines += ["", "## Retries by cause", "",
                  "Requests that needed more than one attempt; the ledger keeps only the final error.", ""]
        lines += _table(["cause", "requests"], [(c, _num(n)) for c, n in report["retries"].items() if n])
    if report["failures"]:
        lines += ["", "## Failures by error type", ""]
        lines += _table(["error type", "rows", "examples"], [
            (f["error_type"], _num(f["count"]), "; ".join(f"{e['id']}: {e['message']}" for e in f["examples"]))
            for f in report["failures"]
        ])
    pre = report["preflight"]
    lines += ["", "## Image pre-flight", "",
              f"{_num(pre['images'])} images: {_num(pre['image_bytes'])} bytes read, {_num(pre['sent_bytes'])} "
              f"bytes sent, {_num(pre['bytes_saved'])} bytes saved.", ""]
    return "\n".join(lines)


# --- Prometheus -------------------------------------------------------------------------------------


def _label_value(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_value(value: Any) -> str:
    if value is None:
        return "NaN"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


class _PromText:
    """Accumulates metric families in the text exposition format (one HELP/TYPE block per family)."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[str, Mapping[str, Any], Any]]) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for suffix, labels, value in samples:
            pairs = {"job": self.job, **labels}
            text = ",".join(f'{k}="{_label_value(v)}"' for k, v in pairs.items())
            self.lines.append(f"{name}{suffix}{{{text}}} {_sample_value(value)}")

    def gauge(self, name: str, help_text: str, value: Any, **labels: Any) -> None:
        self.family(name, "gauge", help_text, [("", labels, value)])

    def gauges(self, name: str, help_text: str, label: str, values: Mapping[str, Any]) -> None:
        self.family(name, "gauge", help_text, [("", {label: key}, value) for key, value in values.items()])

    def summary(self, name: str, help_text: str, stats_ms: Mapping[str, Any]) -> None:
        samples: list[tuple[str, Mapping[str, Any], Any]] = [
            ("", {"quantile": str(q)}, _seconds(stats_ms[f"p{round(q * 100)}"])) for q in QUANTILES
        ]
        samples += [("_sum", {}, stats_ms["sum"] / 1000.0), ("_count", {}, stats_ms["count"])]
        self.family(name, "summary", help_text, samples)


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _timestamp(iso: str | None) -> float | None:
    moment = _parse_time(iso)
    return moment.timestamp() if moment else None


def render_prometheus(report: Mapping[str, Any], job: str) -> str:
    """The report as a node_exporter textfile-collector file: gauges describing the job's last run, all
    labelled ``job="<job>"``, and request latency / time to first token as summaries (seconds).

    Gauges rather than counters because the file is rewritten by every run: alert on
    ``pipeline_last_run_success == 0`` or on ``time() - pipeline_last_run_timestamp_seconds`` growing.
    """
    prom = _PromText(job)
    prom.gauge("pipeline_manifest_rows", "Rows in the manifest at the last run.", report["rows"]["total"])
    prom.gauges("pipeline_run_rows", "Manifest rows of the last run, by how the run treated them (new, changed, "
                "resumed, retried and skipped add up to the manifest; ok, failed, deduplicated and not_run are "
                "outcomes).", "status", {k: v for k, v in report["rows"].items() if k != "total"})
    prom.gauges("pipeline_output_rows", "Rows in the output file after the last run, by status.", "status",
                {k: v for k, v in report["output_rows"].items() if k != "total"})
    prom.gauges("pipeline_run_requests", "Requests finished by the last run, by outcome; 'sent' counts "
                "every attempt.", "outcome",
                {"sent": report["requests"]["sent"], "ok": report["requests"]["ok"],
                 "failed": report["requests"]["failed"]})
    prom.gauges("pipeline_run_tokens", "Tokens used by the last run, as reported by the endpoint.", "kind",
                {"prompt": report["tokens"]["prompt"], "completion": report["tokens"]["completion"]})
    if report["cost"]["total"] is not None:
        prom.gauge("pipeline_run_cost", "Cost of the last run from limits.prices (currency of the prices).",
                   report["cost"]["total"])
    prom.gauge("pipeline_run_duration_seconds", "Wall-clock duration of the last run.", report["elapsed_s"])
    prom.gauge("pipeline_run_rows_per_second", "Rows finished ok per second in the last run.",
               report["throughput"]["rows_per_s"] or 0.0)
    prom.gauges("pipeline_run_retried_requests", "Requests of the last run that needed more than one attempt, "
                "by final outcome or error type.", "cause", report["retries"])
    prom.gauges("pipeline_run_failed_rows", "Manifest rows that failed in the last run, by error type.",
                "error_type", {f["error_type"]: f["count"] for f in report["failures"]})
    pre = report["preflight"]
    prom.gauges("pipeline_run_image_bytes", "Image bytes read and sent in the last run, and saved by "
                "pre-flight.", "kind",
                {"read": pre["image_bytes"], "sent": pre["sent_bytes"], "saved": pre["bytes_saved"]})
    prom.summary("pipeline_request_latency_seconds", "Request latency of the last run (request sent to "
                 "stream end, ok requests).", report["latency_ms"])
    prom.summary("pipeline_time_to_first_token_seconds", "Time to first streamed token in the last run "
                 "(ok requests).", report["ttft_ms"])
    prom.gauge("pipeline_last_run_id", "Ledger run id of the last run.", report["run_id"])
    prom.gauge("pipeline_last_run_start_timestamp_seconds", "Start of the last run (Unix time).",
               _timestamp(report["started_at"]))
    prom.gauge("pipeline_last_run_timestamp_seconds", "End of the last run (Unix time).",
               _timestamp(report["finished_at"]))
    prom.gauge("pipeline_last_run_success", "1 if the last run succeeded, else 0.", bool(report["success"]))
    prom.gauge("pipeline_last_run_interrupted", "1 if the last run was interrupted (resumable).",
               bool(report["interrupted"]))
    if report["exit_code"] is not None:
        prom.gauge("pipeline_last_run_exit_code", "Exit code of the last run.", report["exit_code"])
    return "\n".join(prom.lines) + "\n"


def prometheus_path(target: Target, job: str) -> Target:
    """A configured ``.prom`` file as is, or ``<job>.prom`` inside a configured textfile-collector folder
    (on an object store: a URL without a suffix, or ending in ``/``, is a folder)."""
    folder = target.is_dir() if isinstance(target, Path) else target.endswith("/")
    return target / f"{job}.prom" if folder or not target.suffix else target


def write_prometheus(text: str, path: Target, options: Mapping[str, Any] | None = None) -> Target:
    """Atomically replace the job's ``.prom`` file (node_exporter may read it at any moment)."""
    atomic_write_text(path, text, options)
    return path


# --- webhook ----------------------------------------------------------------------------------------


def webhook_payload(report: Mapping[str, Any]) -> dict[str, Any]:
    """Slack-compatible: Slack (and Mattermost, Teams' Slack mode, Discord's /slack) show ``text``; other
    receivers get the whole report under ``summary``."""
    return {"text": summary_line(report), "summary": dict(report)}


def notify_wanted(report: Mapping[str, Any], when: str = "always") -> bool:
    """``notify.when``: ``always``, or ``failure`` (only runs that did not succeed)."""
    return when == "always" or not report["success"]


async def post_webhook(url: str, report: Mapping[str, Any], *, timeout: float = 10.0,
                       egress: Egress | None = None) -> bool:
    """POST the report as JSON; True on a 2xx answer. Never raises: a broken webhook is logged as a
    warning and must not turn a good run into a failed one. ``egress``: the proxy and CA to use
    (``Config.webhook_egress``: the endpoint's)."""
    import aiohttp

    from pipeline.core.config import Egress
    from pipeline.edges.downloads import aiohttp_proxy
    from pipeline.edges.tls import client_context

    egress = egress or Egress()
    try:
        connector = aiohttp.TCPConnector(ssl=client_context(egress.tls, egress.tls_key))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=connector,
                                         trust_env=False) as session, \
                session.post(url, json=webhook_payload(report), **aiohttp_proxy(egress.proxy_for(url))) as response:
            if 200 <= response.status < 300:
                return True
            body = _short(await response.text(errors="replace"))[:200]
            log.warning("webhook %s answered HTTP %d: %s", redact_url(url, keep_path=False), response.status, body)
    except Exception as exc:  # any failure here is reported, never raised
        path = urlsplit(url).path
        detail = redact(str(exc), [url] + ([path] if len(path) > 1 else [])) or "no detail"
        log.warning("webhook %s failed: %s: %s", redact_url(url, keep_path=False), type(exc).__name__, detail)
    return False
