"""Scenario (s3) of ``scripts/bench.py``: images read from an object store versus local disk (issue 14).

The same JPEGs and manifest as scenario (a) are uploaded to a local S3 server (moto's server mode, pinned
to the endpoint's core so the client's core stays the client's), and the pipeline's real CLI runs twice
against the zero-latency endpoint at concurrency 64: once with ``input.manifest`` on local disk, once with
``input.manifest: s3://bench/photos/manifest.csv`` (relative paths resolve against the bucket prefix).
Reported per run: img/s, client CPU-ms/img (the pipeline process's own rusage: the S3 server's CPU is not
in it), the S3 server's CPU-ms per image and per request (from ``/proc`` and its request log), and the
S3/local ratio. Target: S3 throughput within 10% of local disk.

moto is a test server written in Python, far slower than S3 or MinIO per request (~1.5-2.5 ms of CPU per
GET here, against ~0.4 ms for the client to send it); where it, not the pipeline, is the bottleneck the
notes under the table say so, with the img/s its core allows at that cost. It is started with one fix
that does not change what it answers: moto's dispatcher lists its own package directory on every request
(``backends.list_of_moto_modules``, a quarter of its CPU per GET), here computed once.

Needs the test extras (``pip install -e '.[test]'``: s3fs and ``moto[server]``); without them the scenario
says so and is skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

#: ``scripts/bench.py`` as it runs (its ``__main__``, whose settings such as ``--pipeline-src`` are set):
#: handed over by ``run_scenario``.
bench: Any = None

BUCKET = "bench"
PREFIX = "photos"
REGION = "us-east-1"


#: ``python -m moto.server``, with its per-request scan of moto's own package directory done once.
_MOTO_LAUNCHER = ("import functools, sys; from moto import backends, server; "
                  "backends.list_of_moto_modules = functools.cache(backends.list_of_moto_modules); "
                  "server.main(sys.argv[1:])")


class MotoServer:
    """moto's S3 server in a subprocess on 127.0.0.1, pinned to the endpoint's core; stopped by its pid."""

    def __init__(self, workdir: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "moto.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.proc = subprocess.Popen([sys.executable, "-c", _MOTO_LAUNCHER, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, preexec_fn=_pin_server)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                    break
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server did not start; see {workdir / 'moto.log'}") from None
                time.sleep(0.1)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.url, "key": "bench-key", "secret": "bench-secret",
                "client_kwargs": {"region_name": REGION}}

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id="bench-key",
                            aws_secret_access_key="bench-secret")

    def cpu_s(self) -> float:
        """The server's CPU seconds so far (``/proc``), to tell when it is the bottleneck."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def requests(self) -> dict[str, int]:
        """Requests answered so far, by method (from its access log: one line per request, maybe coloured)."""
        self.log.flush()
        text = (Path(self.log.name)).read_text(errors="replace")
        return {method: len(re.findall(rf'"(?:\x1b\[[0-9;]*m)*{method} /', text)) for method in ("GET", "HEAD", "PUT")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _pin_server() -> None:
    if bench._cores() >= 2:
        os.sched_setaffinity(0, {bench.SERVER_CORE})


def upload(server: MotoServer, folder: Path, names: list[str]) -> None:
    """The images and the manifests under ``s3://bench/photos/`` (16 uploads in flight)."""
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    started = time.monotonic()

    def put(name: str) -> None:
        client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{name}", Body=(folder / name).read_bytes())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, names))
    print(f"  uploaded {len(names)} files to s3://{BUCKET}/{PREFIX}/ in {time.monotonic() - started:.1f}s")


def missing_packages() -> list[str]:
    return [name for name in ("s3fs", "moto", "boto3") if importlib.util.find_spec(name) is None]


def run_scenario(args: argparse.Namespace, sizes: Any, work: Path, harness: ModuleType) -> bool:
    global bench
    bench = harness
    rows, tiny, conc = args.rows or sizes.a_rows, sizes.a_tiny, args.concurrency or sizes.a_conc
    print(f"\n== (s3) object store vs local disk: {rows} JPEGs, zero-latency endpoint, concurrency {conc}")
    if missing := missing_packages():
        print(f"  not run: {', '.join(missing)} not installed (pip install -e '.[test]')")
        return True
    data = work / "photos"
    paths = bench.make_images(data, rows, "photo", sizes.photo_size)
    expected = bench.expected_by_path(data, paths, sizes.chunks)
    manifests = {n: bench.write_manifest(data, f"manifest-s3-{n}.csv", paths, n) for n in (tiny, rows)}
    server = MotoServer(work)
    try:
        upload(server, data, [*paths, *(m.name for m in manifests.values())])
        bench.EXTRA_CONFIG["pipeline-s3"] = {"storage_options": server.storage_options}
        with bench.Endpoint(work, chunks=sizes.chunks) as endpoint:
            results = {label: _measure(label, endpoint, manifests, rows, tiny, conc, work, expected, server)
                       for label in ("pipeline", "pipeline-s3")}
    finally:
        server.stop()
    return _report(results, rows, conc, sizes)


def _measure(label: str, endpoint: Any, manifests: dict[int, Path], rows: int, tiny: int, conc: int,
             work: Path, expected: dict[str, str], server: MotoServer) -> dict[str, Any]:
    """The tiny run (start-up cost) and the full run of one source, verified row by row."""
    runs = []
    for count in (tiny, rows):
        source: Path | str = manifests[count]
        if label == "pipeline-s3":
            source = f"s3://{BUCKET}/{PREFIX}/{manifests[count].name}"
        out = bench.fresh_output(work, "s3", f"{label}-{count}")
        moto_before, asked_before = server.cpu_s(), server.requests()
        run = bench.run_client(label, endpoint, source, count, conc, out)
        bench.verify(run, out, manifests[count], expected)
        asked = {m: n - asked_before[m] for m, n in server.requests().items() if n > asked_before[m]}
        moto_cpu = server.cpu_s() - moto_before
        s3_ms_per_img = moto_cpu / count * 1000
        if label == "pipeline-s3":
            run.notes.append(
                f"S3 server: {moto_cpu:.1f} CPU-s in a {run.wall_s:.1f} s run for {sum(asked.values()):,} requests "
                f"({', '.join(f'{n:,} {m}' for m, n in asked.items())}): "
                f"{moto_cpu / max(sum(asked.values()), 1) * 1000:.2f} CPU-ms per request, {s3_ms_per_img:.2f} per "
                f"image; at that cost its core allows at most {1000 / max(s3_ms_per_img, 1e-9):,.0f} img/s")
        runs.append(run)
    return {"tiny": runs[0], "full": runs[1], "s3_ms_per_img": s3_ms_per_img}


def _report(results: dict[str, dict[str, Any]], rows: int, conc: int, sizes: Any) -> bool:
    table, notes, rate, ok = [], [], {}, True
    tiny_rows = sizes.a_tiny
    for label, runs in results.items():
        t, r = runs["tiny"], runs["full"]
        excl = (r.cpu_s - t.cpu_s) / (rows - tiny_rows) * 1000
        rate[label] = rows / r.wall_s
        verified = r.verified == "ok" and t.verified == "ok"
        ok &= verified
        source = "S3 (moto)" if label.endswith("s3") else "local disk"
        s3_ms = bench._f(runs["s3_ms_per_img"]) if label.endswith("s3") else "-"
        table.append([source, f"{r.requests:,}", f"{rate[label]:,.0f}", bench._f(r.cpu_s / rows * 1000),
                      bench._f(excl), s3_ms, bench._f(r.maxrss_mb, 0),
                      "ok" if verified else f"{r.verified} / tiny {t.verified}"])
        notes += [f"{source}: {n}" for n in r.notes]
    if ok:
        notes.append(f"S3 / local img/s: {rate['pipeline-s3'] / rate['pipeline']:.2f} (target >= 0.90)")
    bench.print_table(f"(s3) images from an object store vs local disk, {rows} rows, concurrency {conc}",
                      ["source", "requests", "img/s", "client CPU-ms/img", "client CPU-ms/img excl start-up",
                       "S3 server CPU-ms/img", "peak RSS MB", "content verified"], table, notes)
    return ok
