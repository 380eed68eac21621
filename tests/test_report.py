"""The run report against the ledger of a real run (local endpoint, injected faults), its JSON / Markdown
files, the Prometheus textfile format, and the webhook posting to a real local HTTP server."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from pipeline.api import run_job_async
from pipeline.edges.ledger import StateStore
from pipeline.ops.report import (
    build_report,
    percentile,
    post_webhook,
    render_prometheus,
    summary_line,
    write_prometheus,
    write_reports,
)
from pipeline.server import FaultPlan, LocalEndpoint

from .helpers import job_config, make_manifest

LEAKED_KEY = "sk-" "testkey1234567890abcdef"  # split: not a real key, and must not look like one
PRICES = {"test-model": {"input": 2.5, "output": 10.0}}


@pytest.fixture
async def job(tmp_path: Path) -> dict[str, Any]:
    """Three real runs over 6 rows. First: row-1 fails once (500) then succeeds, row-3 gets a 400 whose
    message leaks a key, row-4 gets a 503 on all 3 attempts, row-5's image is missing. Second: row-4 is
    sent again (a 503 may pass next time) and succeeds. Third: nothing left to send.

    Each run's report is built right after it, as the CLI does: a later run that re-sends a request
    takes the request's ledger row over. The ledger rows of the run are kept beside it to compare.
    """
    faults = [
        "status:code=500,times=1,match=Describe row-1.",
        f"status:code=400,message=bad request for key {LEAKED_KEY},match=Describe row-3.",
        "status:code=503,times=3,match=Describe row-4.",
    ]
    manifest = make_manifest(tmp_path / "in", 6, missing={5})
    output = tmp_path / "out" / "captions.parquet"
    state: dict[str, Any] = {"output": output}
    async with LocalEndpoint(FaultPlan(faults)) as endpoint:
        config = job_config(manifest, output, endpoint.base_url)
        state["config"] = config
        for which in ("first", "second", "third"):
            summary = await run_job_async(config)
            with StateStore(config.ledger_path) as store:
                state[which] = {
                    "summary": summary,
                    "report": build_report(store, summary.run_id, summary, config_digest="digest-1", prices=PRICES,
                                           default_model="test-model", exit_code=summary.exit_code),
                    "plain": build_report(store, summary.run_id, summary.to_dict(), config_digest="digest-1"),
                    "requests": ledger_requests(store, summary.run_id),
                    "run": store.db.execute("SELECT started_at, finished_at FROM runs WHERE run_id = ?",
                                            (summary.run_id,)).fetchone(),
                    "failed_items": dict(store.db.execute(
                        "SELECT r.error_type, COUNT(*) FROM items i JOIN requests r ON r.key = i.request_key "
                        "WHERE r.status = 'failed' AND r.run_id = ? GROUP BY 1", (summary.run_id,)).fetchall()),
                }
    return state


def ledger_requests(store: StateStore, run_id: int) -> list[tuple[str, int, str | None, list[dict[str, Any]]]]:
    return [(s, a, e, json.loads(r) if r else []) for s, a, e, r in store.db.execute(
        "SELECT status, attempts, error_type, result FROM requests WHERE run_id = ?", (run_id,))]


async def test_report_numbers_match_the_ledger(job):
    first = job["first"]
    summary, report, rows, failed_items = first["summary"], first["report"], first["requests"], first["failed_items"]
    started, finished = first["run"]
    ok = [(a, results[0]) for s, a, _, results in rows if s == "ok"]
    failed = [(a, e) for s, a, e, _ in rows if s == "failed"]
    assert len(ok) == 3 and len(failed) == 3  # rows 0, 1, 2 ok; 3 (400), 4 (503), 5 (missing image) failed

    assert report["run_id"] == summary.run_id and report["config_digest"] == "digest-1"
    assert (report["started_at"], report["finished_at"]) == (started, finished)
    assert report["status"] == "finished" and report["exit_code"] == 1 and report["success"] is False
    assert report["rows"]["total"] == 6 and report["rows"]["new"] == 6 and report["rows"]["skipped"] == 0
    assert report["rows"]["ok"] == summary.rows_ok == 3 and report["rows"]["failed"] == summary.rows_failed == 3
    assert report["requests"] == {"sent": summary.attempts, "ok": 3, "failed": 3,
                                  "extra_attempts": sum(a - 1 for a, _ in ok) + sum(max(a - 1, 0) for a, _ in failed)}

    prompt = sum(first["prompt_tokens"] for _, first in ok)
    completion = sum(first["completion_tokens"] for _, first in ok)
    assert prompt > 0 and completion > 0
    assert report["tokens"] == {"prompt": prompt, "completion": completion, "total": prompt + completion}
    assert (prompt, completion) == (summary.prompt_tokens, summary.completion_tokens)
    assert report["cost"]["total"] == pytest.approx((prompt * 2.5 + completion * 10.0) / 1e6)
    assert report["cost"]["unpriced_requests"] == 0

    latencies = [first["latency_ms"] for _, first in ok]
    ttfts = [first["ttft_ms"] for _, first in ok]
    for key, values in (("latency_ms", latencies), ("ttft_ms", ttfts)):
        stats = report[key]
        assert stats["count"] == 3 and stats["max"] == max(values)
        for q in (50, 95, 99):
            assert stats[f"p{q}"] == pytest.approx(float(np.percentile(values, q)))
    assert report["throughput"]["rows_per_s"] == pytest.approx(3 / summary.elapsed_s, rel=1e-3)

    # retries: row-1 needed two attempts then succeeded; row-4 was tried max_attempts times then failed
    assert [a for a, _ in ok if a > 1] == [2]
    assert report["retries"] == {"retried_then_ok": 1, "server_error": 1}

    by_type = {f["error_type"]: f for f in report["failures"]}
    assert {k: v["count"] for k, v in by_type.items()} == failed_items
    assert set(by_type) == {"bad_request", "server_error", "image_missing"}
    assert by_type["image_missing"]["examples"][0]["id"] == "row-5"
    assert by_type["bad_request"]["examples"][0]["id"] == "row-3"
    assert LEAKED_KEY not in json.dumps(report) and "sk-***" in by_type["bad_request"]["examples"][0]["message"]

    sizes = [(first["image_bytes"], first["sent_bytes"]) for _, first in ok]
    assert report["preflight"] == {"images": 3, "image_bytes": sum(s[0] for s in sizes),
                                   "sent_bytes": sum(s[1] for s in sizes),
                                   "bytes_saved": sum(s[0] - s[1] for s in sizes)}
    json.dumps(report, allow_nan=False)  # plain JSON, no NaN


async def test_report_of_later_runs(job):
    second = job["second"]["plain"]
    assert second["rows"]["retried"] == 1 and second["rows"]["skipped"] == 5  # 3 ok + 2 final failures
    assert second["requests"]["ok"] == 1 and second["latency_ms"]["count"] == 1
    assert second["failures"] == [] and second["retries"] == {"retried_then_ok": 0}
    [(status, _, _, results)] = job["second"]["requests"]
    assert status == "ok" and second["latency_ms"]["p99"] == results[0]["latency_ms"]
    assert second["tokens"]["prompt"] == results[0]["prompt_tokens"]
    # the output still holds row-3's and row-5's failures: the run did not fail, but the job is not all ok
    assert second["output_rows"] == {"total": 6, "ok": 4, "failed": 2} and second["success"] is False

    third = job["third"]["plain"]
    assert third["rows"]["skipped"] == 6 and third["requests"] == {"sent": 0, "ok": 0, "failed": 0,
                                                                    "extra_attempts": 0}
    assert third["latency_ms"]["p50"] is None and third["latency_ms"]["count"] == 0
    assert third["cost"]["total"] is None and third["tokens"]["total"] == 0 and third["failures"] == []


def test_percentile_is_numpy_linear():
    values = [5.0, 1.0, 9.0, 3.0, 7.5]
    for q in (0, 0.25, 0.5, 0.95, 0.99, 1):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q * 100)))
    assert percentile([], 0.5) is None and percentile([4.0], 0.99) == 4.0


async def test_reports_are_written_beside_the_output(job):
    report = job["first"]["report"]
    json_path, md_path = write_reports(report, job["output"])
    assert json_path == job["output"].with_name("captions.summary.json")
    assert md_path == job["output"].with_name("captions.summary.md")
    assert json.loads(json_path.read_text()) == report
    markdown = md_path.read_text()
    assert markdown.startswith(f"# pipeline run #{report['run_id']}: finished")
    assert "| error type | rows | examples |" in markdown and "row-5" in markdown
    assert "| total | " in markdown and LEAKED_KEY not in markdown
    table_lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert all(line.endswith("|") for line in table_lines)
    assert not [p for p in json_path.parent.iterdir() if p.name.startswith(".")]  # no temp files left
    assert summary_line(report) in markdown


# --- Prometheus -----------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)|NaN|[+-]Inf)"
_SAMPLE = re.compile(rf"^({_NAME})\{{({_LABEL}(?:,{_LABEL})*)\}} ({_VALUE})$")


def strict_parse(text: str) -> dict[str, dict[str, Any]]:
    """The text exposition format, strictly: HELP then TYPE then the family's samples, one block per
    family, every sample labelled, no duplicate series, a final newline."""
    assert text.endswith("\n") and "\n\n" not in text
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    series: set[str] = set()
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert re.fullmatch(_NAME, name) and name not in families, line
            assert lines[index + 1].startswith(f"# TYPE {name} "), line
            families[name] = {"samples": []}
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("gauge", "counter", "summary"), line
            families[name]["type"] = kind
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            family = families[current]  # type: ignore[index]
            allowed = {current} | ({f"{current}_sum", f"{current}_count"} if family["type"] == "summary" else set())
            assert name in allowed, line
            assert f"{name}{{{labels}}}" not in series, f"duplicate series {line!r}"
            series.add(f"{name}{{{labels}}}")
            parsed = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
            family["samples"].append((name, parsed, float(value)))
    return families


async def test_prometheus_textfile_format(job, tmp_path):
    report = job["first"]["report"]
    text = render_prometheus(report, 'captions "nightly"\\eu')
    families = strict_parse(text)
    assert all(s[1]["job"] == 'captions \\"nightly\\"\\\\eu' for f in families.values() for s in f["samples"])

    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["pipeline_last_run_success"].type == "gauge"
    assert parsed["pipeline_last_run_success"].samples[0].value == 0
    assert parsed["pipeline_last_run_success"].samples[0].labels == {"job": 'captions "nightly"\\eu'}

    def values(name: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in parsed[name].samples}

    assert values("pipeline_run_rows", "status")["ok"] == 3 and values("pipeline_run_rows", "status")["failed"] == 3
    assert values("pipeline_run_tokens", "kind") == {"prompt": report["tokens"]["prompt"],
                                                      "completion": report["tokens"]["completion"]}
    assert values("pipeline_run_failed_rows", "error_type") == {f["error_type"]: f["count"] for f in report["failures"]}
    assert values("pipeline_run_requests", "outcome")["sent"] == report["requests"]["sent"]
    assert parsed["pipeline_run_duration_seconds"].samples[0].value == report["elapsed_s"]
    assert parsed["pipeline_run_cost"].samples[0].value == pytest.approx(report["cost"]["total"])
    assert parsed["pipeline_last_run_exit_code"].samples[0].value == 1

    latency = parsed["pipeline_request_latency_seconds"]
    assert latency.type == "summary"
    quantiles = {s.labels["quantile"]: s.value for s in latency.samples if "quantile" in s.labels}
    assert quantiles == pytest.approx({"0.5": report["latency_ms"]["p50"] / 1000,
                                       "0.95": report["latency_ms"]["p95"] / 1000,
                                       "0.99": report["latency_ms"]["p99"] / 1000})
    count = [s.value for s in latency.samples if s.name.endswith("_count")]
    assert count == [3]
    assert parsed["pipeline_last_run_timestamp_seconds"].samples[0].value > 1.6e9

    path = write_prometheus(text, tmp_path / "textfile" / "captions.prom")
    assert path.read_text() == text and [p.name for p in path.parent.iterdir()] == ["captions.prom"]


async def test_prometheus_without_requests_has_nan_quantiles(job):
    text = render_prometheus(job["third"]["plain"], "captions")
    families = strict_parse(text)
    quantiles = [v for n, labels, v in families["pipeline_request_latency_seconds"]["samples"] if "quantile" in labels]
    assert len(quantiles) == 3 and all(np.isnan(quantiles))
    assert "pipeline_run_cost" not in families  # no prices, no cost metric
    assert families["pipeline_last_run_success"]["samples"][0][2] == 0  # row-3 and row-5 are still failed


# --- webhook --------------------------------------------------------------------------------------


@pytest.fixture
async def webhook_server():
    """A real HTTP server on 127.0.0.1 that records what is POSTed to /hook and answers with ``status``."""
    state: dict[str, Any] = {"received": [], "status": 200}

    async def hook(request: web.Request) -> web.Response:
        state["received"].append({"path": request.path, "content_type": request.content_type,
                                  "body": await request.json()})
        return web.Response(status=state["status"], text="nope" if state["status"] >= 400 else "ok")

    app = web.Application()
    app.router.add_post("/services/T000/B000/secret-token", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state["url"] = f"http://127.0.0.1:{port}/services/T000/B000/secret-token"
    state["runner"] = runner
    yield state
    await runner.cleanup()


async def test_webhook_receives_the_summary(job, webhook_server):
    report = job["first"]["report"]
    assert await post_webhook(webhook_server["url"], report) is True
    [received] = webhook_server["received"]
    assert received["content_type"] == "application/json"
    assert received["body"]["summary"] == json.loads(json.dumps(report))
    text = received["body"]["text"]
    assert text == summary_line(report) and "\n" not in text
    assert text.startswith(f"[FAILED] pipeline run #{report['run_id']} finished")
    assert "3 ok, 3 failed" in text


async def test_webhook_failures_are_logged_not_raised(job, webhook_server, caplog):
    report = job["first"]["plain"]
    webhook_server["status"] = 500
    with caplog.at_level(logging.WARNING, logger="pipeline.ops.report"):
        assert await post_webhook(webhook_server["url"], report) is False
    assert "HTTP 500" in caplog.text and "secret-token" not in caplog.text

    url = webhook_server["url"]
    await webhook_server["runner"].cleanup()  # nothing listens there any more
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.ops.report"):
        assert await post_webhook(url, report, timeout=5) is False
    assert "webhook http://127.0.0.1" in caplog.text and "secret-token" not in caplog.text
    assert await post_webhook("not a url", report) is False
