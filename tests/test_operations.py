"""Unattended operation end to end: reports, metrics, webhook, logs, partitions, exit codes, Python API."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest
import yaml
from aiohttp import web

import pipeline
from pipeline.edges.ledger import StateStore

from .helpers import make_manifest, read_rows


def write_config(tmp_path, manifest, **sections):
    document = {
        "endpoint": {"base_url": "local", "api_key": "${TEST_SECRET_KEY:-}"},
        "request": {"model": "gpt-4o-mini", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 4, "max_attempts": 2, "backoff_base": 0.01},
        "output": {"path": str(tmp_path / "out" / "captions.parquet")},
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def test_run_writes_summary_json_and_markdown_matching_the_ledger(tmp_path):
    manifest = make_manifest(tmp_path / "data", 6, missing={2})
    config = write_config(tmp_path, manifest, limits={"prices": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}}})
    result = cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1
    summary = json.loads((tmp_path / "out" / "captions.summary.json").read_text())
    markdown = (tmp_path / "out" / "captions.summary.md").read_text()
    rows = read_rows(tmp_path / "out" / "captions.parquet")
    ok = [r for r in rows if r["status"] == "ok"]
    with StateStore(tmp_path / "out" / "captions.ledger.sqlite") as store:
        run = store.runs()[-1]
    assert summary["run_id"] == run["run_id"] == 1
    assert summary["rows"]["ok"] == len(ok) == 5 and summary["rows"]["failed"] == 1
    assert summary["tokens"]["prompt"] == sum(r["prompt_tokens"] for r in ok)
    expected_cost = sum(r["prompt_tokens"] * 0.15 + r["completion_tokens"] * 0.6 for r in ok) / 1e6
    assert abs(summary["cost"]["total"] - expected_cost) < 1e-12
    assert summary["failures"][0]["error_type"] == "image_missing"
    assert "row-2" in json.dumps(summary["failures"])
    assert "# " in markdown and "image_missing" in markdown
    assert "report     " in result.stdout and "latency    p50" in result.stdout


def test_metrics_file_and_webhook(tmp_path):
    received = []

    async def hook(request):
        received.append(await request.json())
        return web.json_response({"ok": True})

    async def scenario():
        app = web.Application()
        app.router.add_post("/hook/secret-path", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            manifest = make_manifest(tmp_path / "data", 3)
            config = write_config(tmp_path, manifest, notify={"webhook_url": f"http://127.0.0.1:{port}/hook/secret-path"},
                                  metrics={"prometheus": str(tmp_path / "metrics"), "job": "captions"})
            summary = await pipeline.run_job_async(config)
        finally:
            await runner.cleanup()
        return summary

    import asyncio

    summary = asyncio.run(scenario())
    assert summary.exit_code == 0
    assert len(received) == 1
    assert received[0]["summary"]["rows"]["ok"] == 3 and "3 ok" in received[0]["text"]
    prom = (tmp_path / "metrics" / "captions.prom").read_text()
    assert '# TYPE' in prom and 'job="captions"' in prom
    assert "secret-path" not in json.dumps(received[0]["summary"])


def test_log_file_per_run_is_redacted(tmp_path):
    secret = "sk-live-abcdefghijklmnopqrstuvwxyz0123"
    manifest = make_manifest(tmp_path / "data", 2, missing={1})
    config = write_config(tmp_path, manifest)
    result = cli("--log-level", "DEBUG", "run", str(config), "--no-progress", "--log-format", "json", cwd=tmp_path,
                 env={"TEST_SECRET_KEY": secret})
    assert result.returncode == 1, result.stderr
    logs = list((tmp_path / "out" / "logs").glob("captions.*.log"))
    assert len(logs) == 1
    text = logs[0].read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert any("row 2 (id=row-1) failed" in line["message"] for line in lines)
    assert secret not in text and secret not in result.stderr
    assert "base64," not in text


def test_partitions_by_run_date_read_as_one_dataset(tmp_path):
    manifest = make_manifest(tmp_path / "data", 4)
    config = write_config(tmp_path, manifest, output={"path": str(tmp_path / "out" / "captions.parquet"),
                                                      "partition_by": "run_date"})
    assert cli("run", str(config), "--no-progress", cwd=tmp_path).returncode == 0
    with open(manifest, "a") as handle:
        handle.write("row-extra,img_000.png,again\n")
    assert cli("run", str(config), "--no-progress", cwd=tmp_path).returncode == 0
    parts = sorted((tmp_path / "out" / "captions").rglob("*.parquet"))
    assert [p.name for p in parts] == ["part-run00001.parquet", "part-run00002.parquet"]
    assert parts[0].parent.name.startswith("run_date=")
    table = ds.dataset(tmp_path / "out" / "captions", format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 5 and "run_date" in table.column_names
    assert sorted(table.column("id").to_pylist()) == sorted([f"row-{i}" for i in range(4)] + ["row-extra"])
    assert len(read_rows(tmp_path / "out" / "captions.parquet")) == 5  # the consolidated latest file


def test_budget_exit_code_5_and_tolerated_failures_exit_0(tmp_path):
    manifest = make_manifest(tmp_path / "data", 6)
    config = write_config(tmp_path, manifest, limits={"max_requests": 2}, run={"concurrency": 1})
    result = cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert result.returncode == 5, result.stdout
    assert "stopped: budget reached" in result.stdout

    manifest = make_manifest(tmp_path / "data2", 10, missing={3})
    config = write_config(tmp_path, manifest, run={"max_failed_fraction": 0.2},
                          output={"path": str(tmp_path / "out2" / "c.parquet")})
    assert cli("run", str(config), "--no-progress", cwd=tmp_path).returncode == 0  # 1 of 10 failed <= 20%


def test_python_api_runs_a_job_from_a_path(tmp_path):
    manifest = make_manifest(tmp_path / "data", 3)
    config = write_config(tmp_path, manifest)
    summary = pipeline.run_job(config)
    assert summary.exit_code == 0 and summary.rows_ok == 3
    again = pipeline.run_job(str(config))
    assert again.rows_skipped == 3 and again.attempts == 0


@pytest.mark.parametrize(("event_loop", "loop_class"), [("auto", "Loop"), ("uvloop", "Loop"),
                                                         ("asyncio", "_UnixSelectorEventLoop")])
def test_run_event_loop_picks_the_loop_the_job_runs_on(tmp_path, event_loop, loop_class):
    manifest = make_manifest(tmp_path / "data", 3)
    config = write_config(tmp_path, manifest, run={"event_loop": event_loop})
    loops: set[str] = set()
    summary = pipeline.run_job(config, on_progress=lambda _: loops.add(type(asyncio.get_running_loop()).__name__))
    assert summary.rows_ok == 3 and loops == {loop_class}  # uvloop's loop class is uvloop.Loop
