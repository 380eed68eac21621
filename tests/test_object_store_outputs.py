"""Outputs, reports, the ledger's sync and the job's lock object on a real S3 API (moto's server on
127.0.0.1, started by the test suite): the object-store half of issue 14 that writes."""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.api import run_job_async
from pipeline.core.config import Config, config_from_dict
from pipeline.core.errors import LockHeld, ObjectStoreError
from pipeline.core.results import result_schema
from pipeline.core.targets import RemotePath
from pipeline.edges.objectlock import ObjectLock
from pipeline.edges.sinks import write_atomic

from .helpers import job_config, make_manifest, standalone_endpoint
from .s3server import S3Server, s3  # noqa: F401 - the fixture
from .test_crash import server_stats, start_run, wait_for_progress
from .test_resume import append_rows, requests_seen

#: Columns that differ between two runs of the same rows (timings, run ids, times).
_VOLATILE = {"latency_ms", "ttft_ms", "response_id", "finished_at", "started_at", "attempts"}


@pytest.fixture
def bucket(s3: S3Server, request: pytest.FixtureRequest) -> str:  # noqa: F811
    """A fresh bucket per test, so tests on one server never see each other's objects."""
    name = "out-" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:12]
    return s3.create_bucket(name).removeprefix("s3://")


def _fs(s3: S3Server) -> Any:  # noqa: F811
    """A client of our own to look at the bucket (never cached: each look is fresh)."""
    import s3fs

    return s3fs.S3FileSystem(**s3.storage_options, skip_instance_cache=True, use_listings_cache=False)


def _stable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in _VOLATILE} for row in rows]


def _read_remote_parquet(s3: S3Server, key: str) -> list[dict[str, Any]]:  # noqa: F811
    with _fs(s3).open(key, "rb") as handle:
        return pq.read_table(handle).to_pylist()


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
async def test_output_partitions_and_reports_on_s3_equal_a_local_run(tmp_path, endpoint, s3, bucket, fmt):  # noqa: F811
    manifest = make_manifest(tmp_path / "in", 8)
    local = _partitioned(job_config(manifest, tmp_path / "local" / f"captions.{fmt}", endpoint.base_url))
    remote = _partitioned(job_config(manifest, f"s3://{bucket}/nightly/captions.{fmt}", endpoint.base_url,
                                     ledger={"path": str(tmp_path / "remote.sqlite")},
                                     metrics={"prometheus": f"s3://{bucket}/metrics/"},
                                     storage_options=s3.storage_options))
    local_summary = await run_job_async(local)
    remote_summary = await run_job_async(remote)
    assert remote_summary.exit_code == local_summary.exit_code == 0

    fs = _fs(s3)
    found = sorted(fs.find(bucket))
    partition = [key for key in found if "/run_date=" in key]
    assert found == sorted([f"{bucket}/nightly/captions.{fmt}", f"{bucket}/nightly/captions.summary.json",
                            f"{bucket}/nightly/captions.summary.md", f"{bucket}/metrics/captions.prom",
                            *partition])
    assert len(partition) == 1 and partition[0].endswith(f"/part-run00001.{fmt}")
    local_partition = next((tmp_path / "local" / "captions").glob(f"run_date=*/part-run00001.{fmt}"))
    assert partition[0].split("/nightly/captions/")[1] == str(local_partition.relative_to(tmp_path / "local" / "captions"))

    read = _reader(fmt)
    assert _stable(read(fs.cat_file(f"{bucket}/nightly/captions.{fmt}"))) == _stable(
        read((tmp_path / "local" / f"captions.{fmt}").read_bytes()))
    assert _stable(read(fs.cat_file(partition[0]))) == _stable(read(local_partition.read_bytes()))
    report = json.loads(fs.cat_file(f"{bucket}/nightly/captions.summary.json"))
    assert report["output_rows"] == {"total": 8, "ok": 8, "failed": 0}
    assert report["output"] == f"s3://{bucket}/nightly/captions.{fmt}"
    assert b'pipeline_manifest_rows{job="captions"} 8' in fs.cat_file(f"{bucket}/metrics/captions.prom")


def _partitioned(config: Config) -> Config:
    """The same job with ``output.partition_by: run_date``."""
    document = config.model_dump()
    document["output"]["partition_by"] = "run_date"
    return config_from_dict(document)


def _reader(fmt: str) -> Any:
    import io

    import pyarrow.csv as pa_csv

    if fmt == "parquet":
        return lambda data: pq.read_table(io.BytesIO(data)).to_pylist()
    if fmt == "jsonl":
        return lambda data: [json.loads(line) for line in data.splitlines()]
    return lambda data: pa_csv.read_csv(io.BytesIO(data)).to_pylist()


def test_a_failed_write_leaves_the_previous_object_whole(s3, bucket):  # noqa: F811
    """The object is uploaded only once the file is complete: a write that fails half way never reaches
    the store, and readers keep the previous version."""
    schema = result_schema(pa.schema([]))
    url = RemotePath(f"s3://{bucket}/out/captions.parquet")
    row = {name: None for name in schema.names} | {"id": "old", "status": "ok"}
    assert write_atomic([pa.Table.from_pylist([row], schema)], url, "parquet", schema, s3.storage_options) == 1

    def failing():
        yield pa.Table.from_pylist([row | {"id": "new-1"}], schema)
        raise RuntimeError("the ledger went away half way")

    with pytest.raises(RuntimeError):
        write_atomic(failing(), url, "parquet", schema, s3.storage_options)
    assert [r["id"] for r in _read_remote_parquet(s3, url.split("://")[1])] == ["old"]


# -- real processes: a reader during the run, a SIGKILL, the lock ------------------------------------


@pytest.fixture
def served(tmp_path):
    """A standalone embedded endpoint that outlives the runs we kill, slowed so a run takes seconds."""
    with standalone_endpoint(tmp_path, 0.02) as base_url:
        yield base_url


def _write_job(folder: Path, base_url: str, manifest: Path, s3: Any, bucket: str, **sections: Any) -> Path:  # noqa: F811
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "endpoint": {"base_url": base_url},
        "request": {"model": "m", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 2, "backoff_base": 0.01},
        "output": {"path": f"s3://{bucket}/out/captions.parquet"},
        "ledger": {"path": str(folder / "state" / "captions.ledger.sqlite"),
                   "sync": f"s3://{bucket}/state/captions.ledger.sqlite"},
        "storage_options": s3.storage_options,
    }
    for name, values in sections.items():
        document[name] = {**document.get(name, {}), **values}
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def _bounded(condition: Any, what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds (a bounded wait on a real process, not a sleep-as-sync)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_the_output_object_appears_only_when_complete(tmp_path, s3, bucket, served):  # noqa: F811
    manifest = make_manifest(tmp_path / "in", 30)
    config = _write_job(tmp_path / "a", served, manifest, s3, bucket)
    fs = _fs(s3)
    proc = start_run(config, tmp_path / "a")
    try:
        wait_for_progress(proc, 3)
        assert not fs.exists(f"{bucket}/out/captions.parquet")  # rows are done, but the output is not
        seen = []
        while proc.poll() is None:
            fs.invalidate_cache()
            if fs.exists(f"{bucket}/out/captions.parquet"):
                seen.append(len(_read_remote_parquet(s3, f"{bucket}/out/captions.parquet")))
    finally:
        proc.communicate(timeout=120)
    assert proc.returncode == 0
    assert set(seen) <= {30}  # whenever a reader found the object, it was the whole output
    assert len(_read_remote_parquet(s3, f"{bucket}/out/captions.parquet")) == 30
    assert list((tmp_path / "a" / "state" / "logs").glob("captions.*.log"))  # the run's log: beside the ledger


def _ok_rows(ledger: Path) -> set[str]:
    db = sqlite3.connect(ledger)
    try:
        return {r[0] for r in db.execute("SELECT i.row_id FROM items i JOIN requests r ON r.key = i.request_key "
                                          "WHERE r.status = 'ok'")}
    finally:
        db.close()


async def test_a_fresh_container_restores_the_synced_ledger_and_sends_only_new_rows(  # noqa: F811
        tmp_path, endpoint, s3, bucket, caplog):  # noqa: F811
    manifest = make_manifest(tmp_path / "in", 10)
    sync = f"s3://{bucket}/state/captions.ledger.sqlite"

    def container(name: str) -> Any:  # a new machine: an empty local disk for the ledger
        return job_config(manifest, f"s3://{bucket}/out/captions.parquet", endpoint.base_url,
                          ledger={"path": str(tmp_path / name / "captions.ledger.sqlite"), "sync": sync},
                          storage_options=s3.storage_options)

    first = await run_job_async(container("one"))
    assert first.rows_ok == 10 and requests_seen(endpoint) == 10
    uploaded = tmp_path / "uploaded.sqlite"
    uploaded.write_bytes(_fs(s3).cat_file(sync.split("://")[1]))
    assert _ok_rows(uploaded) == {f"row-{i}" for i in range(10)}
    assert not _fs(s3).exists(f"{bucket}/state/captions.ledger.sqlite.lock")  # released at the end

    append_rows(manifest, 10, 4)
    second = await run_job_async(container("two"))
    assert requests_seen(endpoint) == 14  # only the 4 new rows went out
    assert second.rows_new == 4 and second.rows_skipped == 10
    assert [r["id"] for r in _read_remote_parquet(s3, f"{bucket}/out/captions.parquet")] == \
        [f"row-{i}" for i in range(14)]

    # the first machine again: its own ledger is older than the store's copy (the second one's rows are
    # not in it), so it is replaced, and nothing is sent again; a machine whose copy is current keeps it
    caplog.set_level(logging.INFO, logger="pipeline.ops.ledgersync")
    caplog.clear()
    third = await run_job_async(container("one"))
    assert requests_seen(endpoint) == 14 and third.rows_skipped == 14
    assert sum("restored the ledger" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    await run_job_async(container("one"))
    assert requests_seen(endpoint) == 14
    assert not any("restored the ledger" in r.getMessage() for r in caplog.records)


def test_resume_after_sigkill_resends_nothing_done_before_the_last_sync(tmp_path, s3, bucket, served):  # noqa: F811
    rows = 40
    manifest = make_manifest(tmp_path / "in", rows)
    sections = {"ledger": {"sync_interval": 0.2, "lock_ttl": 1.5}}
    first = _write_job(tmp_path / "first", served, manifest, s3, bucket, **sections)
    fs = _fs(s3)
    key = f"{bucket}/state/captions.ledger.sqlite"
    proc = start_run(first, tmp_path / "first")
    try:
        wait_for_progress(proc, 8)
        _bounded(lambda: fs.exists(key), "the first periodic sync")
        wait_for_progress(proc, 12)
    finally:
        proc.kill()  # SIGKILL: no final sync, no lock release
        proc.wait()
    fs.invalidate_cache()
    snapshot = tmp_path / "last-sync.sqlite"
    snapshot.write_bytes(fs.cat_file(key))
    done_before = _ok_rows(snapshot)
    assert 0 < len(done_before) < rows
    completed = server_stats(served)["completed_by_image"]
    frozen = {row: completed[_sha(manifest, row)] for row in done_before}

    second = _write_job(tmp_path / "second", served, manifest, s3, bucket, **sections)  # a new, empty disk
    lock = json.loads(fs.cat_file(key + ".lock"))
    _bounded(lambda: time.time() > lock["expires"], "the killed run's lock to expire", timeout=30)
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "run", str(second), "--no-progress"],
                             cwd=tmp_path / "second", capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over the expired job lock" in resumed.stderr
    after = server_stats(served)["completed_by_image"]
    assert {row: after[_sha(manifest, row)] for row in done_before} == frozen  # none of them re-sent
    assert len(_read_remote_parquet(s3, f"{bucket}/out/captions.parquet")) == rows


def _sha(manifest: Path, row_id: str) -> str:
    import hashlib

    return hashlib.sha256((manifest.parent / f"img_{int(row_id.split('-')[1]):03d}.png").read_bytes()).hexdigest()


def test_the_lock_object_refuses_a_second_run_and_an_expired_one_is_taken_over(tmp_path, s3, bucket, served):  # noqa: F811
    manifest = make_manifest(tmp_path / "in", 3)
    config = _write_job(tmp_path / "job", served, manifest, s3, bucket)
    url = RemotePath(f"s3://{bucket}/state/captions.ledger.sqlite.lock")
    holder = ObjectLock(url, ttl=300, options=s3.storage_options)  # another container, running now
    holder.acquire()
    with pytest.raises(LockHeld):  # the conditional create lets one of two writers have it
        ObjectLock(url, ttl=300, options=s3.storage_options).acquire()
    refused = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--no-progress"],
                             cwd=tmp_path / "job", capture_output=True, text=True, timeout=120)
    assert refused.returncode == 3
    assert "another run of this job is in progress (host " in refused.stderr
    assert f"lock {url})" in refused.stderr

    stale = {"host": "gone", "pid": 1, "run": "dead", "expires": time.time() - 1}
    _fs(s3).pipe_file(url.split("://")[1], json.dumps(stale).encode())  # its holder was killed long ago
    assert not holder.renew() and holder.lost  # the old holder notices it is no longer its lock
    taken = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--no-progress"],
                           cwd=tmp_path / "job", capture_output=True, text=True, timeout=120)
    assert taken.returncode == 0, taken.stderr
    assert "taking over the expired job lock" in taken.stderr and "host gone, pid 1, run dead" in taken.stderr
    assert not _fs(s3).exists(url.split("://")[1])  # released at the end


@pytest.mark.parametrize(("options", "problem", "words"), [
    ({"secret": "not-the-secret-0000"}, "credentials", "SignatureDoesNotMatch"),
    ({}, "no_bucket", "no such bucket"),
])
async def test_an_unusable_output_store_is_one_clear_error_before_any_request(  # noqa: F811
        tmp_path, endpoint, s3, bucket, options, problem, words):  # noqa: F811
    manifest = make_manifest(tmp_path / "in", 3)
    where = bucket if problem != "no_bucket" else "no-such-bucket-here"
    config = job_config(manifest, f"s3://{where}/out/captions.parquet", endpoint.base_url,
                        ledger={"path": str(tmp_path / "ledger.sqlite")},
                        storage_options={**s3.storage_options, **options})
    with pytest.raises(ObjectStoreError) as caught:
        await run_job_async(config)
    assert caught.value.problem == problem and words in str(caught.value)
    assert "output.storage_options" in str(caught.value)
    assert options.get("secret", "never") not in str(caught.value)
    assert requests_seen(endpoint) == 0  # exit code 2: nothing was sent


async def test_the_whole_job_on_s3_manifest_images_output_and_synced_ledger(tmp_path, endpoint, s3, bucket):  # noqa: F811
    """The demo job with nothing on local disk but the ledger's working copy: its manifest and images in a
    bucket (relative keys), its output and ledger copy in the same bucket; the same rows as a local run."""
    manifest = make_manifest(tmp_path / "in", 6)
    s3.upload_folder(tmp_path / "in", f"s3://{bucket}/photos")
    local = await run_job_async(job_config(manifest, tmp_path / "local.parquet", endpoint.base_url))
    remote = job_config(f"s3://{bucket}/photos/manifest.csv", f"s3://{bucket}/out/captions.parquet",  # type: ignore[arg-type]
                        endpoint.base_url, storage_options=s3.storage_options,
                        ledger={"path": str(tmp_path / "cache" / "captions.ledger.sqlite"),
                                "sync": f"s3://{bucket}/state/captions.ledger.sqlite"})
    summary = await run_job_async(remote)
    assert summary.exit_code == local.exit_code == 0 and summary.rows_ok == 6
    assert _stable(_read_remote_parquet(s3, f"{bucket}/out/captions.parquet")) == _stable(
        pq.read_table(tmp_path / "local.parquet").to_pylist())
    assert _fs(s3).exists(f"{bucket}/state/captions.ledger.sqlite")
