"""End-to-end runs of a job over real HTTP against the embedded endpoint and its fault knobs."""

from __future__ import annotations

import asyncio
import json
import logging

import pyarrow.csv as pa_csv
import pytest

from pipeline.api import run_job_async
from pipeline.ops.jobrun import JobRun
from pipeline.server import FaultPlan, LocalEndpoint, parse_fault_spec

from .helpers import job_config, make_manifest, read_rows


def add_faults(ep: LocalEndpoint, *specs: str) -> None:
    for spec in specs:
        ep.faults.add(parse_fault_spec(spec))


async def test_plain_run_writes_one_ok_row_per_image_in_manifest_order(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 12)
    out = tmp_path / "out" / "captions.parquet"
    summary = await run_job_async(job_config(manifest, out, endpoint.base_url))
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(12)]
    assert all(r["status"] == "ok" and r["content"] for r in rows)
    assert rows[0]["label"] == "label 0"  # carried-through column
    assert f"{40}x{30}" in rows[0]["content"]  # the endpoint really looked at the image
    assert {r["attempts"] for r in rows} == {1}
    assert all(r["finish_reason"] == "stop" and r["choice_index"] == 0 for r in rows)
    assert all(r["started_at"] <= r["finished_at"] and r["latency_ms"] > 0 for r in rows)
    assert summary.rows_ok == 12 and summary.rows_failed == 0 and summary.exit_code == 0
    assert endpoint.stats.snapshot()["requests"] == 12
    assert not list(out.parent.glob(".*"))  # no spool or temp files left behind


async def test_n2_gives_two_rows_per_image_with_choice_index(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 3)
    out = tmp_path / "captions.parquet"
    await run_job_async(job_config(manifest, out, endpoint.base_url, request={"model": "m", "n": 2}))
    rows = read_rows(out)
    assert [(r["id"], r["choice_index"]) for r in rows] == [
        ("row-0", 0), ("row-0", 1), ("row-1", 0), ("row-1", 1), ("row-2", 0), ("row-2", 1)]
    assert rows[0]["content"] != rows[1]["content"]
    assert rows[0]["response_id"] == rows[1]["response_id"]


async def test_usage_lands_in_token_columns(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 2)
    out = tmp_path / "captions.parquet"
    summary = await run_job_async(job_config(manifest, out, endpoint.base_url))
    for row in read_rows(out):
        assert row["prompt_tokens"] > 85  # at least one image tile's worth
        assert row["completion_tokens"] == len(row["content"].split())
        assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]
        assert row["model"] == "test-model" and row["system_fingerprint"] == "fp_local"
    assert summary.completion_tokens > 0


async def test_tools_request_yields_accumulated_tool_calls(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 2)
    out = tmp_path / "captions.parquet"
    tool = {"type": "function", "function": {"name": "record_caption", "parameters": {
        "type": "object", "properties": {"caption": {"type": "string"}, "width": {"type": "integer"}}}}}
    request = {"model": "m", "tools": [tool], "tool_choice": {"type": "function", "function": {"name": "record_caption"}}}
    await run_job_async(job_config(manifest, out, endpoint.base_url, request=request))
    rows = read_rows(out)
    assert all(r["status"] == "ok" and r["finish_reason"] == "tool_calls" for r in rows)
    calls = json.loads(rows[0]["tool_calls"])
    assert calls[0]["type"] == "function" and calls[0]["function"]["name"] == "record_caption"
    arguments = json.loads(calls[0]["function"]["arguments"])
    assert arguments["width"] == 40 and "40x30" in arguments["caption"]


async def test_truncated_stream_is_retried_then_succeeds(tmp_path, endpoint):
    add_faults(endpoint, "truncate:after=2,per_image=1")
    manifest = make_manifest(tmp_path / "in", 6)
    out = tmp_path / "captions.parquet"
    summary = await run_job_async(job_config(manifest, out, endpoint.base_url))
    rows = read_rows(out)
    assert all(r["status"] == "ok" for r in rows)
    assert {r["attempts"] for r in rows} == {2}
    stats = endpoint.stats.snapshot()
    assert stats["requests"] == 12 and stats["faults_injected"]["truncate"] == 6
    assert summary.attempts == 12


@pytest.mark.parametrize("spec", ["error_event:after=2,style=data,per_image=1", "error_event:after=1,style=event,per_image=1",
                                  "malformed:after=1,per_image=1", "drop:per_image=1", "status:code=503,per_image=1",
                                  "status:code=429,retry_after=0,per_image=1"])
async def test_transient_faults_are_retried(tmp_path, endpoint, spec):
    add_faults(endpoint, spec)
    manifest = make_manifest(tmp_path / "in", 3)
    out = tmp_path / "captions.parquet"
    await run_job_async(job_config(manifest, out, endpoint.base_url))
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert {r["attempts"] for r in rows} == {2}


async def test_stalled_stream_is_cut_by_idle_timeout_and_retried(tmp_path, endpoint):
    add_faults(endpoint, "stall_first_byte:seconds=30,match=row-1,times=1", "stall:after=2,seconds=30,per_image=1")
    manifest = make_manifest(tmp_path / "in", 2)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, endpoint={"timeout": {"idle": 0.3, "first_byte": 0.5}})
    await run_job_async(config)
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["attempts"] for r in rows] == [2, 3]  # row-1: a first-byte stall, then an idle stall


async def test_400_is_not_retried_and_row_carries_endpoint_message(tmp_path, endpoint, caplog):
    add_faults(endpoint, "status:code=400,message=Invalid image content: unsupported colour profile,match=row-3")
    manifest = make_manifest(tmp_path / "in", 5)
    out = tmp_path / "captions.parquet"
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        summary = await run_job_async(job_config(manifest, out, endpoint.base_url))
    rows = {r["id"]: r for r in read_rows(out)}
    bad = rows["row-3"]
    assert bad["status"] == "failed" and bad["attempts"] == 1
    assert bad["error_type"] == "bad_request"
    assert bad["error_message"] == "HTTP 400: Invalid image content: unsupported colour profile"
    assert bad["content"] is None and bad["choice_index"] is None
    assert all(rows[f"row-{i}"]["status"] == "ok" for i in (0, 1, 2, 4))
    assert endpoint.stats.snapshot()["requests"] == 5
    assert summary.exit_code == 1 and summary.errors == {"bad_request": 1}
    assert "row 4 (id=row-3) failed after 1 attempt(s): bad_request" in caplog.text


async def test_retries_exhausted_records_last_error(tmp_path, endpoint):
    add_faults(endpoint, "status:code=500,message=boom,match=row-0")
    manifest = make_manifest(tmp_path / "in", 2)
    out = tmp_path / "captions.parquet"
    await run_job_async(job_config(manifest, out, endpoint.base_url))
    rows = read_rows(out)
    assert rows[0]["status"] == "failed" and rows[0]["attempts"] == 3
    assert rows[0]["error_type"] == "server_error" and "boom" in rows[0]["error_message"]
    assert rows[1]["status"] == "ok"


async def test_missing_and_broken_images_fail_only_their_rows(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 4, missing={1})
    (tmp_path / "in" / "img_002.png").write_text("not an image at all")
    out = tmp_path / "captions.parquet"
    summary = await run_job_async(job_config(manifest, out, endpoint.base_url))
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "ok"]
    assert rows[1]["error_type"] == "image_missing" and "img_001.png" in rows[1]["error_message"]
    assert rows[2]["error_type"] == "image_unsupported"
    assert rows[1]["attempts"] == 0  # nothing was sent for it
    assert endpoint.stats.snapshot()["requests"] == 2
    assert summary.errors == {"image_missing": 1, "image_unsupported": 1}


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
async def test_csv_and_jsonl_outputs_share_the_schema(tmp_path, endpoint, suffix):
    manifest = make_manifest(tmp_path / "in", 3)
    out = tmp_path / f"captions.{suffix}"
    await run_job_async(job_config(manifest, out, endpoint.base_url))
    if suffix == "csv":
        rows = pa_csv.read_csv(out).to_pylist()
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["row-0", "row-1", "row-2"]
    assert list(rows[0])[:4] == ["id", "path", "label", "status"]
    assert all(r["status"] == "ok" and r["content"] for r in rows)


async def test_api_key_is_sent_and_never_written(tmp_path, caplog):
    secret = "sk-test-0123456789abcdefghijklmnop"
    manifest = make_manifest(tmp_path / "in", 3, missing={2})
    out = tmp_path / "captions.jsonl"
    async with LocalEndpoint(FaultPlan(), api_key=secret) as ep:
        wrong = job_config(manifest, out, ep.base_url, endpoint={"api_key": "sk-wrong-key-000000000000000"})
        with caplog.at_level(logging.DEBUG):
            await run_job_async(wrong)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert rows[0]["error_type"] == "auth_error" and rows[0]["attempts"] == 1
        await run_job_async(job_config(manifest, out, ep.base_url, endpoint={"api_key": secret}))
    text = out.read_text()
    assert '"status": "ok"' in text
    assert secret not in text and "sk-wrong" not in text
    assert secret not in caplog.text and "sk-wrong" not in caplog.text
    assert "base64," not in caplog.text


async def test_stop_keeps_finished_results(tmp_path):
    manifest = make_manifest(tmp_path / "in", 40)
    out = tmp_path / "captions.parquet"
    async with LocalEndpoint(FaultPlan(), chunk_delay=0.02) as ep:
        done = asyncio.Event()

        def progress(p):
            if p.done >= 5:
                done.set()

        runner = JobRun(job_config(manifest, out, ep.base_url), on_progress=progress)
        task = asyncio.create_task(runner.run())
        await done.wait()
        runner.stop()
        summary = await task
    rows = read_rows(out)
    assert summary.interrupted and summary.exit_code == 4
    assert 5 <= len(rows) < 40 and all(r["status"] == "ok" for r in rows)
    assert summary.rows_not_run == 40 - len(rows)
    assert len({r["id"] for r in rows}) == len(rows)


async def test_embedded_endpoint_from_config(tmp_path):
    manifest = make_manifest(tmp_path / "in", 3)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, "local", endpoint={"local": {"faults": ["truncate:after=1,per_image=1"]}})
    summary = await run_job_async(config)
    assert summary.rows_ok == 3
    assert {r["attempts"] for r in read_rows(out)} == {2}


async def test_reading_stops_at_done_even_if_the_connection_stays_open(tmp_path, endpoint):
    add_faults(endpoint, "linger:seconds=60")
    manifest = make_manifest(tmp_path / "in", 3)
    out = tmp_path / "captions.parquet"
    # idle timeout far below the linger: had the client waited for the connection to close, rows would fail
    await run_job_async(job_config(manifest, out, endpoint.base_url, endpoint={"timeout": {"idle": 2, "total": 5}}))
    rows = read_rows(out)
    assert [(r["status"], r["attempts"]) for r in rows] == [("ok", 1)] * 3
    assert max(r["latency_ms"] for r in rows) < 2000


async def test_html_instead_of_a_stream_is_a_clear_error(tmp_path, endpoint):
    add_faults(endpoint, "html")
    manifest = make_manifest(tmp_path / "in", 1)
    out = tmp_path / "captions.parquet"
    await run_job_async(job_config(manifest, out, endpoint.base_url, run={"max_attempts": 2}))
    row = read_rows(out)[0]
    assert row["status"] == "failed" and row["attempts"] == 2
    assert row["error_type"] == "malformed_chunk"
    assert "Content-Type text/html, not an event stream" in row["error_message"]


async def test_per_row_prompt_column_reaches_the_wire(tmp_path, endpoint):
    prompts = ["What colour is it?", "", "Count the shapes, please."]
    manifest = make_manifest(tmp_path / "in", 3, extra={"question": prompts})
    add_faults(endpoint, "status:code=400,message=saw the per-row prompt,match=Count the shapes")
    out = tmp_path / "captions.parquet"
    await run_job_async(job_config(manifest, out, endpoint.base_url,
                             input={"manifest": str(manifest), "prompt_column": "question"}))
    rows = read_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]  # row 1's empty prompt falls back to the template
    assert rows[2]["error_message"] == "HTTP 400: saw the per-row prompt"
    assert rows[0]["question"] == "What colour is it?"
