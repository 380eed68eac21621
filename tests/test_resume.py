"""The durable ledger end to end: incremental runs, dedupe, retry, fresh starts, over real HTTP."""

from __future__ import annotations

import csv
import sqlite3

import pytest

from pipeline.api import run_job_async
from pipeline.ops.jobrun import JobRun
from pipeline.ops.jobs import export_job, job_status, run_history
from pipeline.server import FaultPlan, LocalEndpoint

from .helpers import COLOURS, job_config, make_image, make_manifest, read_rows


def requests_seen(ep: LocalEndpoint) -> int:
    return ep.stats.snapshot()["requests"]


def append_rows(manifest, start: int, count: int) -> None:
    folder = manifest.parent
    with open(manifest, "a", newline="") as handle:
        writer = csv.writer(handle)
        for i in range(start, start + count):
            make_image(folder / f"img_{i:03d}.png", COLOURS[i % len(COLOURS)], size=(40 + i, 30 + (i % 7)))
            writer.writerow([f"row-{i}", f"img_{i:03d}.png", f"label {i}"])


async def test_second_run_sends_nothing_adding_rows_sends_only_them_editing_prompt_sends_all(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 10)
    out = tmp_path / "out" / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url)

    first = await run_job_async(config)
    assert first.rows_new == 10 and requests_seen(endpoint) == 10

    second = await run_job_async(config)
    assert requests_seen(endpoint) == 10
    assert second.rows_skipped == 10 and second.rows_new == 0 and second.attempts == 0
    assert len(read_rows(out)) == 10 and second.exit_code == 0

    append_rows(manifest, 10, 5)
    third = await run_job_async(config)
    assert requests_seen(endpoint) == 15
    assert third.rows_new == 5 and third.rows_skipped == 10
    assert [r["id"] for r in read_rows(out)] == [f"row-{i}" for i in range(15)]

    edited = job_config(manifest, out, endpoint.base_url, request={"model": "test-model", "prompt": "Caption {id}!"})
    fourth = await run_job_async(edited)
    assert requests_seen(endpoint) == 30
    assert fourth.rows_changed == 15
    assert [h["command"] for h in run_history(config)] == ["run"] * 4


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_both_ledger_writers_record_every_row_once_and_resume(tmp_path, endpoint, synchronous):
    """normal commits on the loop (answers staged per burst); full group-commits in a writer thread."""
    folder = tmp_path / "in"
    manifest = make_manifest(folder, 12, missing={5})
    (folder / "copy.png").write_bytes((folder / "img_002.png").read_bytes())
    with open(manifest, "a", newline="") as handle:
        csv.writer(handle).writerow(["row-copy", "copy.png", "a copy"])
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, ledger={"synchronous": synchronous},
                        request={"model": "m", "prompt": "Describe it."}, run={"concurrency": 6})
    first = await run_job_async(config)
    assert (first.rows_ok, first.rows_failed, first.rows_deduplicated) == (12, 1, 1)
    assert requests_seen(endpoint) == 11  # 13 rows: one missing image, one duplicate answered from its twin
    rows = {r["id"]: r for r in read_rows(out)}
    assert len(rows) == 13 and rows["row-5"]["error_type"] == "image_missing"
    assert rows["row-copy"]["content"] == rows["row-2"]["content"]
    assert job_status(config)["rows"] == {"ok": 12, "failed": 1}  # no mark left in flight
    again = await run_job_async(config)
    assert again.rows_skipped == 13 and again.attempts == 0 and requests_seen(endpoint) == 11


async def test_changed_image_is_sent_again_unchanged_one_is_not(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 3)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url)
    await run_job_async(config)
    make_image(tmp_path / "in" / "img_001.png", (1, 2, 3), size=(99, 77))
    summary = await run_job_async(config)
    assert summary.rows_changed == 1 and summary.rows_skipped == 2
    assert requests_seen(endpoint) == 4
    assert "99x77" in read_rows(out)[1]["content"]


async def test_same_image_listed_twice_is_sent_once(tmp_path, endpoint):
    folder = tmp_path / "in"
    manifest = make_manifest(folder, 4)
    (folder / "copy.png").write_bytes((folder / "img_002.png").read_bytes())
    with open(manifest, "a", newline="") as handle:
        csv.writer(handle).writerow(["row-copy", "copy.png", "a copy"])
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, request={"model": "m", "prompt": "Describe it."},
                        run={"concurrency": 8})
    summary = await run_job_async(config)
    assert requests_seen(endpoint) == 4
    assert summary.rows_deduplicated == 1
    rows = {r["id"]: r for r in read_rows(out)}
    assert len(rows) == 5 and rows["row-copy"]["content"] == rows["row-2"]["content"]
    assert rows["row-copy"]["label"] == "a copy" and rows["row-copy"]["path"] == "copy.png"


async def test_run_retries_transient_failures_retry_also_resends_row_specific_ones(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 6, missing={4})
    endpoint.faults.add("status:code=400,message=nope,match=row-1")
    endpoint.faults.add("status:code=500,message=flaky,match=row-2,times=3")
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url)
    first = await run_job_async(config)
    assert first.rows_failed == 3 and first.exit_code == 1
    assert requests_seen(endpoint) == 1 + 3 + 3  # row-1 once (400), row-2 three times (500), three ok rows

    # a later run leaves row-specific failures alone but tries the server error again
    again = await run_job_async(config)
    assert again.rows_retried == 1 and again.rows_skipped == 5
    assert requests_seen(endpoint) == 8 and again.exit_code == 1
    assert {r["id"]: r["status"] for r in read_rows(out)}["row-2"] == "ok"
    assert (await run_job_async(config)).attempts == 0  # nothing left that a plain run would change

    endpoint.faults.clear()
    only_bad_requests = await JobRun(config, command="retry", error_type="bad_request").run()
    assert only_bad_requests.requeued == 1 and requests_seen(endpoint) == 9
    statuses = {r["id"]: (r["status"], r["error_type"]) for r in read_rows(out)}
    assert statuses["row-1"] == ("ok", None) and statuses["row-4"] == ("failed", "image_missing")

    everything = await JobRun(config, command="retry").run()
    assert everything.requeued == 1  # row-4: its image is still missing, so no request is sent
    assert requests_seen(endpoint) == 9 and everything.rows_failed == 1
    assert [h["command"] for h in run_history(config)] == ["run", "run", "run", "retry", "retry"]


async def test_auth_failure_is_retried_by_the_next_run_once_the_key_is_fixed(tmp_path):
    secret = "sk-test-0123456789abcdefghijklmnop"
    manifest = make_manifest(tmp_path / "in", 2)
    out = tmp_path / "captions.parquet"
    async with LocalEndpoint(FaultPlan(), api_key=secret) as ep:
        wrong = await run_job_async(job_config(manifest, out, ep.base_url, endpoint={"api_key": "sk-wrong-0000000000000"}))
        assert wrong.errors == {"auth_error": 2}
        fixed = await run_job_async(job_config(manifest, out, ep.base_url, endpoint={"api_key": secret}))
    assert fixed.rows_retried == 2 and fixed.rows_ok == 2
    assert [r["status"] for r in read_rows(out)] == ["ok", "ok"]


async def test_fresh_keeps_a_backup_and_sends_everything(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 3)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url)
    await run_job_async(config)
    summary = await JobRun(config, fresh=True).run()
    assert summary.rows_new == 3 and requests_seen(endpoint) == 6
    backups = list(tmp_path.glob("captions.ledger.sqlite.bak-*"))
    assert backups and not any(b.name.endswith("-wal") for b in backups if b.stat().st_size == 0)


async def test_status_and_export_match_the_ledger(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 5, missing={3})
    out = tmp_path / "captions.jsonl"
    config = job_config(manifest, out, endpoint.base_url)
    await run_job_async(config)
    append_rows(manifest, 5, 2)
    status = job_status(config)
    assert status["manifest_rows"] == 7
    assert status["rows"] == {"ok": 4, "failed": 1, "not_run_yet": 2}
    assert status["errors"][0]["error_type"] == "image_missing"
    assert status["errors"][0]["examples"][0]["id"] == "row-3"
    assert status["last_run"]["status"] == "finished"

    before = out.read_text()
    out.unlink()
    report = export_job(config)
    assert out.read_text() == before and report.rows == 5 and report.failed == 1


async def test_interrupted_run_resumes_without_resending_finished_rows(tmp_path):
    manifest = make_manifest(tmp_path / "in", 30)
    out = tmp_path / "captions.parquet"
    async with LocalEndpoint(FaultPlan(), chunk_delay=0.02) as ep:
        config = job_config(manifest, out, ep.base_url, run={"concurrency": 3, "stop_grace": 0})
        runner = JobRun(config, on_progress=lambda p: runner.stop() if p.done >= 6 else None)
        first = await runner.run()
        assert first.interrupted and first.exit_code == 4
        done_before = len(read_rows(out))
        sent_before = requests_seen(ep)
        assert 6 <= done_before < 30
        second = await run_job_async(config)
        assert second.rows_skipped == done_before
        assert second.rows_new + second.rows_resumed == 30 - done_before
        # only rows without a committed answer were sent again (at most the ones cancelled in flight)
        assert requests_seen(ep) - sent_before == 30 - done_before
    rows = read_rows(out)
    assert [r["id"] for r in rows] == [f"row-{i}" for i in range(30)]
    assert all(r["status"] == "ok" for r in rows)


def leave_in_flight(config, row_ids) -> None:
    """The ledger as a run killed with SIGKILL leaves it: these rows' requests marked in flight."""
    db = sqlite3.connect(config.ledger_path)
    marks = ",".join("?" * len(row_ids))
    with db:
        db.execute("UPDATE requests SET status = 'in_flight' WHERE key IN "
                   f"(SELECT request_key FROM items WHERE row_id IN ({marks}))", row_ids)
    db.close()


async def test_a_restart_sends_rows_the_ledger_never_saw_before_checking_the_known_ones(tmp_path, endpoint):
    """Two-pass triage: a restart after many done rows sends its first new row without first checking
    every done one; rows left in flight by the killed run are still re-sent, after the new ones."""
    manifest = make_manifest(tmp_path / "in", 10)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url, run={"concurrency": 1, "stop_grace": 5})
    await run_job_async(config)
    leave_in_flight(config, ["row-7", "row-8", "row-9"])
    append_rows(manifest, 10, 3)
    runner = JobRun(config, on_progress=lambda p: runner.stop() if p.done >= 1 else None)
    first = await runner.run()
    assert first.interrupted and requests_seen(endpoint) == 11
    assert {r["id"] for r in read_rows(out)} == {f"row-{i}" for i in range(7)} | {"row-10"}

    rest = await run_job_async(config)
    assert (rest.rows_new, rest.rows_resumed, rest.rows_skipped) == (2, 3, 8)
    assert requests_seen(endpoint) == 10 + 1 + 5
    assert [r["id"] for r in read_rows(out)] == [f"row-{i}" for i in range(13)]


async def test_output_is_rebuilt_only_when_something_it_shows_changed(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 4)
    out = tmp_path / "captions.parquet"
    config = job_config(manifest, out, endpoint.base_url)
    await run_job_async(config)
    written = out.stat().st_mtime_ns
    await run_job_async(config)
    assert out.stat().st_mtime_ns == written  # nothing changed: the file is left alone

    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # drop the last manifest row
    summary = await run_job_async(config)
    assert summary.attempts == 0
    assert [r["id"] for r in read_rows(out)] == ["row-0", "row-1", "row-2"]

    out.unlink()
    summary = await run_job_async(config)
    assert out.exists() and summary.output_rows == 3 and summary.exit_code == 0
