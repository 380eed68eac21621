"""Inputs on an object store, end to end against a real S3 API (moto's server, credentials enforced) and
the embedded endpoint: manifests (CSV / JSONL / Parquet) and directory listings on S3, images as s3:// URLs
or relative keys, a missing object failing only its row, resume without re-reading unchanged objects, and
wrong credentials stopping the job before anything is sent."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.api import run_job_async
from pipeline.core.config import InputConfig
from pipeline.core.errors import ObjectStoreError
from pipeline.edges.manifest import ManifestReader
from pipeline.server import LocalEndpoint

from .helpers import COLOURS, job_config, make_image, make_manifest, read_rows
from .s3server import S3Server, s3  # noqa: F401 - the fixture


def noise_png(width: int, height: int) -> bytes:
    """An image PNG cannot compress: bigger than any of the solid-colour ones."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def requests_seen(ep: LocalEndpoint) -> int:
    return ep.stats.snapshot()["requests"]


def s3_job(s3: S3Server, manifest: str, out: Path, ep: LocalEndpoint, **sections: Any) -> Any:  # noqa: F811
    """``job_config`` with the server's storage_options at top level (the input section may add its own)."""
    return job_config(manifest, out, ep.base_url, storage_options=s3.storage_options, **sections)  # type: ignore[arg-type]


async def test_demo_job_on_s3_gives_the_same_captions_as_on_local_disk(tmp_path: Path, endpoint: LocalEndpoint,
                                                                       s3: S3Server) -> None:  # noqa: F811
    manifest = make_manifest(tmp_path / "in", 6)
    local = await run_job_async(job_config(manifest, tmp_path / "local.parquet", endpoint.base_url))
    bucket = s3.create_bucket("demo-job")
    s3.upload_folder(tmp_path / "in", f"{bucket}/2026/batch")
    remote = await run_job_async(s3_job(s3, f"{bucket}/2026/batch/manifest.csv", tmp_path / "s3.parquet", endpoint))
    assert (local.rows_ok, remote.rows_ok, remote.rows_failed) == (6, 6, 0)
    local_rows, s3_rows = read_rows(tmp_path / "local.parquet"), read_rows(tmp_path / "s3.parquet")
    assert [r["content"] for r in s3_rows] == [r["content"] for r in local_rows]
    assert [r["id"] for r in s3_rows] == [f"row-{i}" for i in range(6)]
    assert s3_rows[0]["label"] == "label 0"  # carried columns come through


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifests_on_s3_stream_in_chunks_in_every_format(tmp_path: Path, s3: S3Server, fmt: str) -> None:  # noqa: F811
    bucket = s3.create_bucket(f"formats-{fmt}")
    records = [{"id": f"r{i}", "path": f"img/{i}.png", "n": str(i)} for i in range(25)]
    if fmt == "csv":
        data = ("id,path,n\n" + "".join(f"{r['id']},{r['path']},{r['n']}\n" for r in records)).encode()
    elif fmt == "jsonl":
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
    else:
        pq.write_table(pa.Table.from_pylist(records), tmp_path / "m.parquet", row_group_size=7)
        data = (tmp_path / "m.parquet").read_bytes()
    s3.put(f"{bucket}/deep/prefix/manifest.{fmt}", data)
    config = InputConfig(manifest=f"{bucket}/deep/prefix/manifest.{fmt}", chunk_size=10)
    reader = ManifestReader(config, storage_options=s3.storage_options)
    assert reader.check().rows == 25
    batches = list(reader.batches())
    assert [len(b) for b in batches] == [10, 10, 5]  # streamed chunk by chunk
    rows = [row for batch in batches for row in batch]
    assert [r.id for r in rows] == [r["id"] for r in records]
    assert rows[3].image_path() == f"{bucket}/deep/prefix/img/3.png"  # relative keys under the prefix


async def test_directory_listing_with_a_glob(tmp_path: Path, endpoint: LocalEndpoint, s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("listing")
    for i, key in enumerate(("a.png", "sub/b.png", "sub/deep/c.png", "sub/notes.txt", "other.jpg")):
        s3.put(f"{bucket}/incoming/{key}", make_image(tmp_path / "x.png", COLOURS[i]))
    s3.put(f"{bucket}/elsewhere/d.png", make_image(tmp_path / "x.png", COLOURS[0]))
    config = s3_job(s3, "unused.csv", tmp_path / "out.parquet", endpoint,
                    input={"manifest": None, "directory": f"{bucket}/incoming/", "glob": "**/*.png"})
    summary = await run_job_async(config)
    rows = read_rows(tmp_path / "out.parquet")
    assert [r["id"] for r in rows] == ["a.png", "sub/b.png", "sub/deep/c.png"]
    assert summary.rows_ok == 3 and all(r["status"] == "ok" for r in rows)


async def test_relative_keys_absolute_urls_and_a_missing_object(tmp_path: Path, endpoint: LocalEndpoint,
                                                                s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("rows")
    other = s3.create_bucket("rows-other")
    s3.put(f"{bucket}/jobs/a/img/one.png", make_image(tmp_path / "1.png", COLOURS[0]))
    s3.put(f"{bucket}/jobs/shared/two.png", make_image(tmp_path / "2.png", COLOURS[1]))
    s3.put(f"{other}/three.png", make_image(tmp_path / "3.png", COLOURS[2]))
    s3.put(f"{bucket}/jobs/a/big.png", noise_png(64, 48))  # ~9 KB: over the cap below
    lines = ["id,path", "one,img/one.png", "two,../shared/two.png", f"three,{other}/three.png",
             "gone,img/not-there.png", "big,big.png"]
    s3.put(f"{bucket}/jobs/a/manifest.csv", ("\n".join(lines) + "\n").encode())
    config = s3_job(s3, f"{bucket}/jobs/a/manifest.csv", tmp_path / "out.parquet", endpoint,
                    images={"max_source_bytes": 2000})
    summary = await run_job_async(config)
    rows = {r["id"]: r for r in read_rows(tmp_path / "out.parquet")}
    assert [rows[k]["status"] for k in ("one", "two", "three")] == ["ok", "ok", "ok"]
    assert rows["gone"]["status"] == "failed" and rows["gone"]["error_type"] == "image_missing"
    assert f"{bucket}/jobs/a/img/not-there.png" in rows["gone"]["error_message"]
    assert rows["big"]["error_type"] == "image_too_large"
    assert "images.max_source_bytes=2000" in rows["big"]["error_message"]
    assert (summary.rows_ok, summary.rows_failed, requests_seen(endpoint)) == (3, 2, 3)


async def test_resume_reads_and_sends_nothing_for_unchanged_objects_and_resends_a_changed_one(
        tmp_path: Path, endpoint: LocalEndpoint, s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("resume")
    make_manifest(tmp_path / "in", 4)
    s3.upload_folder(tmp_path / "in", f"{bucket}/set")
    config = s3_job(s3, f"{bucket}/set/manifest.csv", tmp_path / "out.parquet", endpoint)
    first = await run_job_async(config)
    # each run asks every image's identity (ETag, size, mtime) with a 1-byte GET (s3direct), then reads the
    # images it sends with a full GET: 4 stats + 4 reads, then 4 stats and no read, then 4 stats and 1 read
    gets_after_first = s3.requests("GET", "/set/img_")
    assert first.rows_ok == 4 and gets_after_first == 4 + 4 and requests_seen(endpoint) == 4
    again = await run_job_async(config)
    assert again.rows_skipped == 4 and again.attempts == 0 and requests_seen(endpoint) == 4
    assert s3.requests("GET", "/set/img_") == gets_after_first + 4  # no image read again
    s3.put(f"{bucket}/set/img_002.png", make_image(tmp_path / "new.png", (1, 2, 3), size=(99, 77)))
    changed = await run_job_async(config)
    assert (changed.rows_changed, changed.rows_skipped, requests_seen(endpoint)) == (1, 3, 5)
    assert s3.requests("GET", "/set/img_") == gets_after_first + 4 + 4 + 1
    assert "99x77" in read_rows(tmp_path / "out.parquet")[2]["content"]


async def test_images_in_an_unknown_bucket_stop_the_job_before_anything_is_sent(
        tmp_path: Path, endpoint: LocalEndpoint, s3: S3Server) -> None:  # noqa: F811
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,path\na,s3://no-such-bucket-here/a.png\n")
    with pytest.raises(ObjectStoreError) as caught:
        await run_job_async(s3_job(s3, str(manifest), tmp_path / "out.parquet", endpoint))
    assert caught.value.problem == "no_bucket" and "s3://no-such-bucket-here/a.png" in str(caught.value)
    assert requests_seen(endpoint) == 0


async def test_wrong_credentials_exit_2_through_the_cli_before_any_request(tmp_path: Path, endpoint: LocalEndpoint,
                                                                          s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("cli-creds")
    make_manifest(tmp_path / "in", 2)
    s3.upload_folder(tmp_path / "in", f"{bucket}/job")
    wrong = {**s3.storage_options, "key": "AKIAWRONGWRONGWRONG9"}
    document = {"endpoint": {"base_url": endpoint.base_url}, "request": {"model": "m"},
                "input": {"manifest": f"{bucket}/job/manifest.csv", "storage_options": wrong},
                "output": {"path": str(tmp_path / "out.parquet")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(document))
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "pipeline", "run", "job.yaml", "--no-progress"], cwd=tmp_path,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, result.stderr
    assert f"{bucket}/job/manifest.csv" in error[0] and "InvalidAccessKeyId" in error[0]
    assert "input.storage_options" in error[0]
    assert s3.secret not in result.stderr + result.stdout
    assert requests_seen(endpoint) == 0 and not (tmp_path / "out.parquet").exists()


def test_a_local_job_never_imports_fsspec(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "in", 2)
    config = job_config(manifest, tmp_path / "out.parquet")
    path = tmp_path / "job.json"
    path.write_text(config.model_dump_json(exclude_none=True))
    probe = (f"import sys\nfrom pipeline.api import run_job\nassert run_job({str(path)!r}).rows_ok == 2\n"
             "print('fsspec' in sys.modules, 'pipeline.edges.storage' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "False"


async def test_estimate_counts_rows_whose_images_are_keys_on_s3(tmp_path: Path, endpoint: LocalEndpoint,
                                                                s3: S3Server) -> None:  # noqa: F811
    from pipeline.ops.estimate import estimate_job

    bucket = s3.create_bucket("estimate")
    make_manifest(tmp_path / "in", 3)
    s3.upload_folder(tmp_path / "in", f"{bucket}/e")
    config = s3_job(s3, f"{bucket}/e/manifest.csv", tmp_path / "out.parquet", endpoint)
    report = await asyncio.to_thread(estimate_job, config)
    assert (report.manifest_rows, report.rows_to_send, report.rows_invalid) == (3, 3, 0)
    assert report.input_tokens > 0 and requests_seen(endpoint) == 0


async def test_store_reads_in_flight_are_bounded_by_store_concurrency(tmp_path: Path,
                                                                       s3: S3Server) -> None:  # noqa: F811
    from pipeline.core.config import ImagesConfig
    from pipeline.edges.images import ImageLoader
    from pipeline.edges.storage import AsyncStore

    class CountingStore(AsyncStore):
        """The real store, counting the reads it has in flight."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.now = self.most = 0

        async def read(self, url: str, end: int) -> bytes:
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                return await super().read(url, end)
            finally:
                self.now -= 1

    bucket = s3.create_bucket("bounded")
    for i in range(12):
        s3.put(f"{bucket}/b/{i}.png", make_image(tmp_path / "x.png", COLOURS[i % len(COLOURS)]))
    store = CountingStore(s3.storage_options, where="input.storage_options")
    async with ImageLoader(ImagesConfig(), store=store, store_concurrency=3) as loader:
        payloads = await asyncio.gather(*(loader.load(f"{bucket}/b/{i}.png", tmp_path) for i in range(12)))
    assert len({p.sha256 for p in payloads}) == len(COLOURS) and store.most == 3


async def test_a_backend_without_async_reads_in_threads(tmp_path: Path, endpoint: LocalEndpoint) -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"memory://pipeline-tests/{tmp_path.name}"
    manifest = make_manifest(tmp_path / "in", 3)
    for path in (tmp_path / "in").iterdir():
        memory.pipe_file(f"{root}/{path.name}", path.read_bytes())
    config = job_config(f"{root}/manifest.csv", tmp_path / "out.parquet", endpoint.base_url)  # type: ignore[arg-type]
    first = await run_job_async(config)
    again = await run_job_async(config)
    assert (first.rows_ok, again.rows_skipped, requests_seen(endpoint)) == (3, 3, 3)
    local = await run_job_async(job_config(manifest, tmp_path / "local.parquet", endpoint.base_url))
    assert local.rows_ok == 3
    assert [r["content"] for r in read_rows(tmp_path / "out.parquet")] == \
        [r["content"] for r in read_rows(tmp_path / "local.parquet")]
