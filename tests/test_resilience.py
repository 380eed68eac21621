"""Resilience end to end, over real HTTP against the embedded endpoint's fault knobs."""

from __future__ import annotations

import time

from pipeline.api import run_job_async
from pipeline.ops.jobrun import JobRun

from .helpers import job_config, make_manifest, read_rows


async def test_429_with_retry_after_is_waited_out(tmp_path, endpoint):
    endpoint.faults.add("status:code=429,retry_after=1,times=1")
    manifest = make_manifest(tmp_path / "in", 1)
    out = tmp_path / "captions.parquet"
    started = time.monotonic()
    await run_job_async(job_config(manifest, out, endpoint.base_url))
    waited = time.monotonic() - started
    row = read_rows(out)[0]
    assert row["status"] == "ok" and row["attempts"] == 2
    assert waited >= 1.0  # the server's Retry-After, not the 10 ms backoff of this config


async def test_retry_after_beyond_max_retry_wait_fails_the_row_instead_of_sleeping(tmp_path, endpoint):
    endpoint.faults.add("status:code=429,retry_after=3600")
    manifest = make_manifest(tmp_path / "in", 1)
    out = tmp_path / "captions.parquet"
    await run_job_async(job_config(manifest, out, endpoint.base_url, limits={"max_retry_wait": 5}))
    row = read_rows(out)[0]
    assert row["status"] == "failed" and row["attempts"] == 1
    assert row["error_type"] == "rate_limited"
    assert "asked to wait 3600s, more than max_retry_wait=5s" in row["error_message"]


async def test_twenty_percent_transient_faults_of_every_kind_end_all_ok(tmp_path, endpoint):
    kinds = ["status:code=429,retry_after=0", "status:code=500", "status:code=502", "status:code=503",
             "status:code=504", "status:code=529", "status:code=408", "status:code=409", "drop",
             "truncate:after=2", "error_event:after=2,type=server_error", "malformed:after=1",
             "stall:after=2,seconds=30"]
    for seed, spec in enumerate(kinds):
        joiner = "," if ":" in spec else ":"
        endpoint.faults.add(f"{spec}{joiner}p=0.018,seed={seed}")  # ~21% of requests get one fault or another
    manifest = make_manifest(tmp_path / "in", 200)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, run={"concurrency": 16, "max_attempts": 10,
                                                             "backoff_base": 0.01, "backoff_max": 0.05},
                        endpoint={"timeout": {"idle": 0.3}})
    summary = await run_job_async(config)
    rows = read_rows(out)
    assert len(rows) == 200 and {r["status"] for r in rows} == {"ok"}
    stats = endpoint.stats.snapshot()
    assert sum(stats["faults_injected"].values()) >= 20  # the faults really happened
    assert summary.attempts == stats["requests"]  # every request is accounted for in the attempts column
    assert sum(r["attempts"] for r in rows) == stats["requests"]


def go_down_after(endpoint, rows_done: int, seconds: float):
    """A progress callback that takes the endpoint down once ``rows_done`` rows have finished."""
    def on_progress(progress) -> None:
        if progress.done == rows_done and not endpoint.faults.rules:
            endpoint.faults.add(f"down:seconds={seconds}")
    return on_progress


async def test_endpoint_down_for_a_while_does_not_fail_rows(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 16)
    out = tmp_path / "captions.parquet"
    limits = {"breaker_window": 4, "breaker_min_calls": 2, "breaker_cooldown": 0.3, "breaker_max_cooldown": 0.6}
    # two attempts and 10 ms backoff: without the breaker every row in flight would fail within the outage
    config = job_config(manifest, out, endpoint.base_url, run={"concurrency": 4, "max_attempts": 2,
                                                             "backoff_base": 0.01, "backoff_max": 0.01},
                        limits=limits)
    summary = await JobRun(config, on_progress=go_down_after(endpoint, 4, 2)).run()
    rows = read_rows(out)
    assert {r["status"] for r in rows} == {"ok"} and summary.rows_failed == 0
    statuses = endpoint.stats.snapshot()["responses_by_status"]
    assert statuses["503"] >= 2  # the outage really happened mid-run
    assert statuses["503"] < 40  # and cost few requests: one probe at a time while it lasted


async def test_without_breaker_the_same_outage_fails_rows(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 12)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, run={"concurrency": 4, "max_attempts": 2,
                                                             "backoff_base": 0.01, "backoff_max": 0.01},
                        limits={"circuit_breaker": False})
    summary = await JobRun(config, on_progress=go_down_after(endpoint, 4, 2)).run()
    assert summary.rows_failed >= 4
    assert {r["error_type"] for r in read_rows(out) if r["status"] == "failed"} == {"server_error"}


async def test_an_endpoint_that_never_answered_fails_fast(tmp_path, endpoint):
    endpoint.faults.add("down:seconds=60")
    manifest = make_manifest(tmp_path / "in", 4)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, run={"max_attempts": 2, "backoff_base": 0.01,
                                                             "backoff_max": 0.01})
    summary = await run_job_async(config)  # the breaker (cooldown 5 s by default) is not armed: no waiting
    assert summary.rows_failed == 4 and endpoint.stats.snapshot()["requests"] == 8


async def test_requests_per_minute_keeps_an_undisclosed_limit_free_of_429s(tmp_path, endpoint):
    endpoint.faults.add("rpm_limit:rpm=600")
    manifest = make_manifest(tmp_path / "in", 15)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, run={"concurrency": 8},
                        limits={"requests_per_minute": 570})
    await run_job_async(config)
    stats = endpoint.stats.snapshot()
    assert "429" not in stats["responses_by_status"] and stats["requests"] == 15
    assert {r["status"] for r in read_rows(out)} == {"ok"}


async def test_adaptive_concurrency_backs_off_an_undisclosed_concurrency_limit(tmp_path, endpoint):
    endpoint.faults.add("concurrency_limit:max=3")
    endpoint.faults.chunk_delay = 0.005
    manifest = make_manifest(tmp_path / "in", 40)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, run={"concurrency": 12, "max_attempts": 10,
                                                             "backoff_base": 0.01, "backoff_max": 0.05})
    summary = await run_job_async(config)
    assert summary.rows_ok == 40
    rejected = endpoint.stats.snapshot()["responses_by_status"].get("429", 0)
    # a fixed pool of 12 against a limit of 3 would have most requests turned away; AIMD keeps it low
    assert rejected < summary.attempts / 2


async def test_budget_guard_stops_cleanly_and_the_next_run_continues(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 10)
    out = tmp_path / "captions.parquet"
    capped = job_config(manifest, out, endpoint.base_url, run={"concurrency": 2}, limits={"max_requests": 4})
    first = await run_job_async(capped)
    assert first.exit_code == 5 and first.stop_reason == "budget"
    assert "max_requests=4" in first.budget_message
    assert endpoint.stats.snapshot()["requests"] == 4
    assert len(read_rows(out)) == 4 and first.rows_not_run == 6
    second = await run_job_async(job_config(manifest, out, endpoint.base_url))
    assert second.rows_skipped == 4 and second.rows_ok == 6 and second.exit_code == 0
    assert endpoint.stats.snapshot()["requests"] == 10
