"""Scenario (ray) of ``scripts/bench.py``: the Ray engine against the local engine (issue 15, item 5).

(i) Overhead, one machine: scenario (a)'s JPEGs against the fake endpoint at zero latency and at (b)'s
    latency, the local engine and the Ray engine in the same run, each as the real CLI. The Ray engine
    joins a one-node Ray cluster of 1 CPU on 127.0.0.2 (started here as ``tests/raycluster.py`` starts
    nodes; loopback only), pinned to the client's core like the local engine. Each engine runs a tiny
    manifest first, so its fixed start-up (time to the first request) and its per-row cost (CPU-ms/row
    over the rows beyond the tiny run) are told apart. CPU is the whole machine's busy time less the
    endpoint's (the Ray cluster's processes are not the driver's children; an idle machine is assumed:
    run it under the bench lock).
(ii) Pre-flight spread: 12 MP photo-like JPEGs (3-5 MB, made here and cached in ``--out``) at
    ``images.fit: openai-high``. The local engine on one core (the client's), the local engine on both
    cores, and the Ray engine on a two-node cluster (127.0.0.2 on core 0, 127.0.0.3 on core 1, 1 CPU
    each) whose pre-flight tasks run on both nodes. img/s; every row's answer is checked against the
    answer to the bytes this checkout's pre-flight sends.

    .venv/bin/python scripts/bench.py --scenario ray --quick --out /tmp/bench-ray
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

bench: Any = None  # scripts/bench.py as it runs (its settings: --pipeline-src, --wait-idle ...)

PHOTO_SIZE = (4032, 3024)
#: (i): rows per latency and engine, (ii): photos; quick sizes in the second place.
OVERHEAD_ROWS, PHOTO_ROWS = (2000, 300), (48, 8)
LATENT_CONCURRENCY = (256, 64)
RAY = {"actors": 2, "cpus_per_actor": 0.25}


# ---- the photos ----------------------------------------------------------------------------------------

def photo(i: int, size: tuple[int, int] = PHOTO_SIZE) -> bytes:
    """A deterministic 12 MP photo-like JPEG of 3-5 MB: soft gradients, shapes, grain and sensor noise;
    camera EXIF with orientation 6 (portrait, rotated on pre-flight) for every third."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(20_000 + i)
    w, h = size
    small = (w // 8, h // 8)
    y, x = np.mgrid[0:small[1], 0:small[0]].astype(np.float32)
    base = np.stack([x / small[0] * 190 + 40, y / small[1] * 170 + 50, (x + y) / sum(small) * 150 + 60], -1)
    scene = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(scene)
    for _ in range(40):
        cx, cy, r = (int(v) for v in rng.integers(0, small[0], 3) // (1, 1, 6))
        draw.ellipse((cx, cy % small[1], cx + r, cy % small[1] + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(scene.resize(size, Image.Resampling.BICUBIC), np.int16)
    # grain and sensor noise from one 1024x1024 tile, shifted per image (JPEG does not see the repeats)
    tile = rng.standard_normal((1024, 1024, 3), np.float32) * 3 + rng.standard_normal((1024, 1024, 1), np.float32) * 8
    tile = np.roll(tile.astype(np.int16), int(rng.integers(0, 1024)), axis=1)
    pixels += np.tile(tile, (-(-h // 1024), -(-w // 1024), 1))[:h, :w]
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "BenchCam", "Model 12", 6 if i % 3 == 2 else 1
    buffer = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=88, exif=exif.tobytes())
    return buffer.getvalue()


def make_photos(folder: Path, count: int) -> list[str]:
    """Photos 0..count-1 under ``folder``, made once and cached; their paths relative to ``folder``."""
    names = [f"ray12mp/photo_{i:04d}.jpg" for i in range(count)]
    todo = [(folder / n, i) for i, n in enumerate(names) if not (folder / n).exists()]
    started = time.monotonic()
    for path, i in todo:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        part.write_bytes(photo(i))
        part.replace(path)
    if todo:
        sizes = [(folder / n).stat().st_size for n in names]
        print(f"  generated {len(todo)} photos of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} in "
              f"{time.monotonic() - started:.0f}s ({min(sizes) / 1e6:.1f}-{max(sizes) / 1e6:.1f} MB)")
    return names


def expected_after_preflight(folder: Path, names: list[str], chunks: int, images: dict[str, Any]) -> dict[str, str]:
    """The answer to the bytes this checkout's pre-flight sends for each photo."""
    from pipeline.core.config import ImagesConfig
    from pipeline.edges.preflight import prepare

    policy = ImagesConfig(**images)
    return {n: bench.expected_content(base64.b64encode(prepare((folder / n).read_bytes(), n, policy).data), chunks)
            for n in names}


# ---- a loopback Ray cluster, pinned ---------------------------------------------------------------------

@contextmanager
def ray_cluster(work: Path, cores: list[int]) -> Iterator[str]:
    """One ``ray start --block`` node of 1 CPU per core in ``cores`` (127.0.0.2, 127.0.0.3), each pinned
    to its core (a child inherits its parent's affinity: this process pins itself around each start)."""
    sys.path.insert(0, str(bench.ROOT))
    from tests.raycluster import HEAD_IP, SECOND_IP, RayNode

    own = os.sched_getaffinity(0)
    nodes: list[Any] = []
    try:
        for core, ip in zip(cores, (HEAD_IP, SECOND_IP), strict=False):
            os.sched_setaffinity(0, {core})
            node = RayNode(ip, work, head=nodes[0].address if nodes else None)
            os.sched_setaffinity(0, own)
            nodes.append(node)
            node.wait_listening(node.port if len(nodes) == 1 else node.manager_port)
            node.wait_listening(node.manager_port)
        yield nodes[0].address
    finally:
        os.sched_setaffinity(0, own)
        for node in reversed(nodes):
            node.stop()


# ---- one measured run -----------------------------------------------------------------------------------

@dataclass
class Measured:
    label: str
    rows: int
    wall_s: float
    cpu_s: float  # the machine's busy CPU less the endpoint's
    first_request_s: float | None
    requests: int
    exit_code: int
    verified: str = "?"


def measure(label: str, endpoint: Any, manifest: Path, rows: int, conc: int, out: Path, expected: dict[str, str],
            extra: dict[str, Any], engine: str, cores: set[int] | None = None) -> Measured:
    """The CLI run once (``--engine``), pinned to ``cores`` (default: the client's core), and verified."""
    if bench.WAIT_IDLE_S > 0:
        bench.wait_idle(bench.WAIT_IDLE_S)
    config = bench.pipeline_config(out.with_suffix(".yaml"), manifest, endpoint.base_url, conc, out, extra)
    command = [bench.PY, "-m", "pipeline", "run", str(config), "--engine", engine, "--no-progress"]
    before, busy = bench._reset_window(endpoint), bench._machine_busy_s()
    started = time.monotonic()
    proc = bench.spawn(command, out.with_suffix(".log"))
    if cores is not None:
        os.sched_setaffinity(proc.pid, cores)  # before it starts threads: a few ms after the fork
    code, _cpu, _rss = bench.reap(proc)
    wall = time.monotonic() - started
    after = endpoint.stats()
    cpu = bench._machine_busy_s() - busy - (after["cpu_s"] - before["cpu_s"])
    first = after["first_at"] - started if after.get("first_at") is not None else None
    run = Measured(label, rows, wall, cpu, first, after["requests"] - before["requests"], code)
    check = bench.Run(label, rows, wall, cpu, 0, code, 0, run.requests, None)
    bench.verify(check, out, manifest, expected)
    run.verified = check.verified if code == 0 else f"exit {code}: see {out.with_suffix('.log')}"
    return run


def _f_rate(run: Measured, digits: int = 0) -> str:
    """Rows per second from the first request on (the start-up left out)."""
    if run.first_request_s is None or run.wall_s <= run.first_request_s:
        return "-"
    return bench._f(run.rows / (run.wall_s - run.first_request_s), digits)


# ---- (i) overhead ----------------------------------------------------------------------------------------

def overhead(args: argparse.Namespace, sizes: Any, work: Path, address: str) -> bool:
    quick = int(args.quick)
    rows, tiny = args.rows or (sizes.a_rows if not quick else OVERHEAD_ROWS[1]), sizes.a_tiny
    data = work / "photos"
    paths = bench.make_images(data, rows, "photo", sizes.photo_size)
    expected = bench.expected_by_path(data, paths, sizes.chunks)
    manifests = {n: bench.write_manifest(data, f"manifest-ray-{n}.csv", paths, n) for n in (tiny, rows)}
    latencies = [("zero", 0.0, 0.0, args.concurrency or sizes.a_conc),
                 ("(b)", sizes.first_token, sizes.chunk_delay, LATENT_CONCURRENCY[quick])]
    table, ok = [], True
    for name, first_token, delay, conc in latencies:
        ray = {"ray": {"address": address, "rows_per_block": 64, **RAY}}
        with bench.Endpoint(work, chunks=sizes.chunks, first_token=first_token, chunk_delay=delay) as endpoint:
            for engine in ("local", "ray"):
                t, r = (measure(engine, endpoint, manifests[n], n, conc, bench.fresh_output(work, "ray", f"{engine}-{n}"),
                                expected, ray if engine == "ray" else {}, engine) for n in (tiny, rows))
                ok &= t.verified == r.verified == "ok"
                per_row = (r.cpu_s - t.cpu_s) / (rows - tiny) * 1000
                table.append([name, engine, str(conc), f"{rows / r.wall_s:,.0f}", _f_rate(r),
                              bench._f(r.cpu_s / rows * 1000),
                              bench._f(per_row), bench._f(t.first_request_s), bench._f(t.wall_s, 1),
                              f"{r.verified} / tiny {t.verified}"])
    bench.print_table(f"(ray i) local vs Ray engine, {rows} JPEGs (~40 KB), {sizes.chunks} chunks/answer; Ray: "
                      f"one node, 1 CPU, {RAY['actors']} actors", ["latency", "engine", "concurrency", "img/s",
                      "img/s after 1st request", "CPU-ms/img", "CPU-ms/img excl start-up", "first request s", f"{tiny}-row run s", "verified"],
                      table, ["CPU: the machine's busy time less the endpoint's (Ray's own processes included)",
                              "first request: seconds from the CLI's start to the endpoint's first request"])
    return ok


# ---- (ii) pre-flight of 12 MP photos --------------------------------------------------------------------

def photos(args: argparse.Namespace, sizes: Any, work: Path, address: str) -> bool:
    rows = PHOTO_ROWS[int(args.quick)]
    data = work / "photos"
    names = make_photos(data, rows)
    images = {"fit": "openai-high"}
    expected = expected_after_preflight(data, names, sizes.chunks, images)
    manifest = bench.write_manifest(data, f"manifest-ray12mp-{rows}.csv", names, rows)
    extra = {"images": images}
    ray = {**extra, "ray": {"address": address, "rows_per_block": 2, **RAY, "preflight_cpus": 0.75}}
    both = set(range(bench._cores()))
    runs = []
    with bench.Endpoint(work, chunks=sizes.chunks) as endpoint:
        for label, engine, cores, settings in (("local, 1 core", "local", None, extra),
                                               (f"local, {len(both)} cores", "local", both, extra),
                                               ("ray, 2 nodes x 1 CPU", "ray", None, ray)):
            out = bench.fresh_output(work, "ray12mp", label.split(",")[0] + str(len(cores or ())))
            runs.append(measure(label, endpoint, manifest, rows, 8, out, expected, settings, engine, cores))
    base = runs[0].rows / runs[0].wall_s
    table = [[r.label, f"{r.rows / r.wall_s:.2f}", f"{r.rows / r.wall_s / base:.2f}x", _f_rate(r, 2), bench._f(r.cpu_s / r.rows * 1000, 0),
              bench._f(r.first_request_s), bench._f(r.wall_s, 1), r.verified] for r in runs]
    bench.print_table(f"(ray ii) {rows} photos {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} (3-5 MB JPEG), images.fit: "
                      "openai-high, zero-latency endpoint, concurrency 8", ["engine", "img/s", "vs local 1 core",
                      "img/s after 1st request", "CPU-ms/img", "first request s", "wall s", "verified"], table,
                      ["Ray: pre-flight tasks of 0.75 CPU beside 2 actors of 0.25 CPU, 2 rows per block; the "
                       "driver on core 1 with the second node", "img/s includes each run's start-up"])
    return all(r.verified == "ok" for r in runs)


def run_scenario(args: argparse.Namespace, sizes: Any, work: Path, harness: ModuleType) -> bool:
    global bench
    bench = harness
    print("\n== (ray) the Ray engine against the local engine: overhead on one machine, 12 MP pre-flight on two nodes")
    if bench._cores() < 2:
        print("  not run: needs 2 cores (the endpoint on one, the client and the Ray nodes on the other)")
        return True
    try:
        import ray  # noqa: F401
    except ImportError:
        print("  not run: Ray is not installed (pip install -e '.[ray]')")
        return True
    with ray_cluster(work, [bench.CLIENT_CORE]) as address:
        ok = overhead(args, sizes, work, address)
    with ray_cluster(work, [bench.SERVER_CORE, bench.CLIENT_CORE]) as address:
        ok &= photos(args, sizes, work, address)
    return ok
