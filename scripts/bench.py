"""Benchmark the pipeline against the official-SDK script and a naive aiohttp script (issue 7).

A fast fake endpoint (``scripts/bench_endpoint.py``) runs in its own process, pinned to core 0; every
client runs as its own subprocess pinned to core 1, so its CPU time (user+sys) and peak RSS are read
from its own ``wait4`` rusage. Every output row's content is checked against what the endpoint sent.

Scenarios
  a  CPU-bound: zero-latency endpoint, 40 chunks per answer, concurrency 64, 2,000 JPEGs of ~40 KB.
     Each client also runs a 20-row manifest so its start-up cost can be subtracted.
  b  latency-bound: 300 ms to first token + 40 chunks 10 ms apart, concurrency 512, 10 rows per slot;
     achieved throughput against the ideal concurrency / latency.
  c  memory: peak RSS at concurrency 256 for 2,000 and 200,000 rows of tiny unique images.
  d  resume: a finished 200,000-row job is run again; time until it exits or sends its first request.
  s3 object store: scenario (a)'s images and manifest read from a local S3 server (moto, pinned to the
     endpoint's core) versus local disk, in the same run: img/s and CPU-ms/img (scripts/bench_objectstore.py).
  e  camera photos: 12 MP JPEGs to openai-high, pipeline on 1 and 2 cores vs Pillow and pyvips scripts,
     and stream timing while pre-flight runs (scripts/bench_photos.py).
  f  more streams: (b)'s shape with 1 s answers at concurrency 2,048 and 4,096 (scripts/bench_streams.py).
  g  start-up and restart: time to the first request of a fresh 200,000-row run and of restarts after
     kill -9 at 200,000 done, and `pipeline --help` (scripts/bench_startup.py).
  ray  the Ray engine against the local engine: overhead per row and start-up on one machine, and 12 MP
     pre-flight spread over a two-node loopback cluster (scripts/bench_ray.py; needs the [ray] extra).

--client-share F emulates a client core 1/F as fast (for CPU-bound work): a CPU hog shares the client's core
while each client runs (scripts/bench_share.py; issue 16, (b) on slower cores).

    .venv/bin/python scripts/bench.py --scenario a            # default sizes
    .venv/bin/python scripts/bench.py --quick --scenario all  # a smoke run in well under a minute
"""

from __future__ import annotations

import argparse
import base64
import csv
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_endpoint import expected_content  # noqa: E402
from bench_share import Hog, SharePlan, parse_share, plan_for  # noqa: E402
from bench_share import check as check_share  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
PY = sys.executable
CLIENTS = ("pipeline", "sdk", "naive")
SERVER_CORE, CLIENT_CORE = 0, 1
TARGET_JPEG_BYTES = 40_000


# ---- parameters ---------------------------------------------------------------------------------------

@dataclass
class Sizes:
    a_rows: int = 2000
    a_tiny: int = 20
    a_conc: int = 64
    b_conc: int = 512
    b_rows: int | None = None  # default 10 x concurrency
    c_small: int = 2000
    c_large: int = 200_000
    c_conc: int = 256
    d_rows: int = 200_000
    d_conc: int = 256
    chunks: int = 40
    first_token: float = 0.3
    chunk_delay: float = 0.01
    photo_size: tuple[int, int] = (320, 240)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(a_rows=150, a_tiny=10, a_conc=16, b_conc=32, b_rows=160, c_small=100, c_large=1000,
                   c_conc=32, d_rows=500, d_conc=32, first_token=0.05, chunk_delay=0.002)


def has_sdk() -> bool:
    try:
        import openai  # noqa: F401
    except ImportError:
        return False
    return True


# ---- synthetic data --------------------------------------------------------------------------------------

def _photo(i: int, size: tuple[int, int], quality: int) -> bytes:
    """A deterministic ~photo-sized JPEG: seeded gradients plus noise."""
    import numpy as np
    from PIL import Image

    w, h = size
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * (1 + i % 5) + y) % 256, (y * (1 + i % 3)) % 256, ((x ^ y) + i) % 256], -1)
    pixels = np.clip(base.astype(np.float32) + rng.normal(0, 24, (h, w, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _tune_quality(size: tuple[int, int], target: int) -> int:
    """The JPEG quality whose first few images come closest to ``target`` bytes on average."""
    def mean_size(q: int) -> float:
        return sum(len(_photo(i, size, q)) for i in range(6)) / 6

    return min(range(50, 97, 2), key=lambda q: abs(mean_size(q) - target))


def _tiny(i: int) -> bytes:
    """A unique 16x16 JPEG: the row number's bits as 4x4 blocks in the red and green channels."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((16, 16, 3), np.uint8)
    for k in range(16):
        r, c = divmod(k, 4)
        pixels[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4, 0] = 255 * ((i >> k) & 1)
        pixels[r * 4:(r + 1) * 4, c * 4:(c + 1) * 4, 1] = 255 * ((i >> (k + 16)) & 1)
    pixels[:, :, 2] = (i * 37) % 256
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_images(folder: Path, count: int, kind: str, size: tuple[int, int] = (320, 240)) -> list[str]:
    """Make sure images 0..count-1 exist under ``folder`` (a marker remembers how many were made, so
    a larger set extends a smaller one); return their paths relative to ``folder``."""
    names = [f"img/{i // 1000:04d}/{kind}_{i:07d}.jpg" for i in range(count)]
    marker = folder / f".made-{kind}-{size[0]}x{size[1]}" if kind == "photo" else folder / f".made-{kind}"
    made = int(marker.read_text()) if marker.exists() else 0
    if made >= count:
        return names
    started = time.monotonic()
    quality = _tune_quality(size, TARGET_JPEG_BYTES) if kind == "photo" else 90
    for i in range(made, count):
        path = folder / names[i]
        if i == made or i % 1000 == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_photo(i, size, quality) if kind == "photo" else _tiny(i))
    marker.write_text(str(count))
    sample = names[:200]
    mean = sum((folder / n).stat().st_size for n in sample) / len(sample)
    print(f"  generated {count - made} {kind} images in {time.monotonic() - started:.1f}s "
          f"(~{mean / 1000:.1f} KB each{f', JPEG quality {quality}' if kind == 'photo' else ''})")
    return names


def write_manifest(folder: Path, name: str, paths: list[str], rows: int) -> Path:
    """A CSV manifest of ``rows`` rows cycling over ``paths``."""
    manifest = folder / name
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path"])
        for i in range(rows):
            writer.writerow([f"r{i:07d}", paths[i % len(paths)]])
    return manifest


def expected_by_path(folder: Path, paths: list[str], chunks: int) -> dict[str, str]:
    """What the endpoint answers for each image file."""
    return {p: expected_content(base64.b64encode((folder / p).read_bytes()), chunks) for p in paths}


# ---- the fake endpoint -----------------------------------------------------------------------------------

class Endpoint:
    """The fake endpoint in its own process; ``stats()`` reads its counter and CPU over HTTP."""

    def __init__(self, workdir: Path, *, chunks: int, first_token: float = 0.0, chunk_delay: float = 0.0) -> None:
        self.workdir = workdir
        self.args = ["--chunks", str(chunks), "--first-token", str(first_token), "--chunk-delay", str(chunk_delay)]
        self.chunks, self.first_token, self.chunk_delay = chunks, first_token, chunk_delay
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def __enter__(self) -> Endpoint:
        port_file = self.workdir / "endpoint.port"
        port_file.unlink(missing_ok=True)
        cmd = [PY, str(SCRIPTS / "bench_endpoint.py"), "--port-file", str(port_file), "--max-seconds", "7200",
               *self.args]
        if _cores() >= 2:
            cmd += ["--cpu", str(SERVER_CORE)]
        self.log = open(self.workdir / "endpoint.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bench endpoint did not start; see {self.workdir / 'endpoint.log'}")
            time.sleep(0.02)
        self.base_url = f"http://127.0.0.1:{port_file.read_text().strip()}/v1"
        return self

    def stats(self) -> dict:
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/_stats", timeout=10) as response:
            return json.loads(response.read())

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


_CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cores() -> int:
    """Cores this process could use at start (read before it pins itself to the endpoint's core)."""
    return _CORES


# ---- clients ---------------------------------------------------------------------------------------------

@dataclass
class Run:
    client: str
    rows: int
    wall_s: float
    cpu_s: float
    maxrss_mb: float
    exit_code: int
    server_cpu_s: float
    requests: int
    window_s: float | None  # endpoint side: first request in -> last answer out
    foreign_cpu_s: float | None = None  # CPU time used by other processes on the machine meanwhile
    hog_cpu_s: float | None = None  # --client-share: the hog's CPU time during the run (in neither count)
    verified: str = "?"
    ok_rows: int = 0
    notes: list[str] = field(default_factory=list)


#: Extra top-level config sections per pipeline client label (``pipeline-s3``: its storage_options).
EXTRA_CONFIG: dict[str, dict] = {}


def pipeline_config(path: Path, manifest: Path | str, base_url: str, concurrency: int, output: Path,
                    extra: dict | None = None) -> Path:
    import yaml

    document = {
        "endpoint": {"base_url": base_url, "api_key": "bench-key",
                     "timeout": {"connect": 30, "first_byte": 120, "idle": 60, "total": 600}},
        "request": {"model": "bench-model", "prompt": "Describe this image in one sentence."},
        "input": {"manifest": str(manifest), "id_column": "id", "path_column": "path"},
        "run": {"concurrency": concurrency, "max_attempts": 5},
        "output": {"path": str(output), "format": "parquet"},
        **(extra or {}),
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def client_command(client: str, manifest: Path | str, base_url: str, concurrency: int, out: Path) -> list[str]:
    if client.startswith("pipeline"):
        config = pipeline_config(out.with_suffix(".yaml"), manifest, base_url, concurrency, out,
                                 EXTRA_CONFIG.get(client))
        return [PY, "-m", "pipeline", "run", str(config)]  # progress bar on (stderr goes to a log)
    return [PY, str(SCRIPTS / "bench_baselines.py"), client, "--manifest", str(manifest),
            "--base-url", base_url, "--concurrency", str(concurrency), "--out", str(out)]


def _share_arg(text: str) -> float:
    try:
        return parse_share(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _pin_client() -> None:
    if _cores() >= 2:
        os.sched_setaffinity(0, {CLIENT_CORE})
    if CLIENT_SHARE.client_nice:
        os.nice(CLIENT_SHARE.client_nice)


#: Where ``python -m pipeline`` imports the package from (``--pipeline-src``); this checkout by default.
PIPELINE_SRC: Path = ROOT


def spawn(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    """Start a client in its output folder (so ``-m pipeline`` never picks up a stray cwd package)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PIPELINE_SRC), *filter(None, [env.get("PYTHONPATH")])])
    with open(log, "wb") as handle:
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent, env=env,
                                preexec_fn=_pin_client)


def reap(proc: subprocess.Popen[bytes]) -> tuple[int, float, float]:
    """Wait for this one child: (exit code, user+sys CPU seconds, peak RSS MB) from its own rusage."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def fresh_output(work: Path, scenario: str, label: str) -> Path:
    """An empty folder per run (so no ledger or output of an earlier run is ever resumed)."""
    folder = work / scenario / label
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder / "output.parquet"


#: ``--wait-idle``: before each measured run, wait up to this many seconds for other load to go away.
WAIT_IDLE_S = 0.0

#: ``--client-share``: the client's share of its core (a hog takes the rest while each client runs).
CLIENT_SHARE: SharePlan = SharePlan(1.0)


@contextmanager
def share_hog() -> Iterator[Hog | None]:
    """The hog of ``--client-share`` on the client's core for the duration, or nothing at share 1."""
    if CLIENT_SHARE.hog_nice is None:
        yield None
        return
    with Hog(CLIENT_CORE if _cores() >= 2 else None, CLIENT_SHARE.hog_nice) as hog:
        yield hog


def wait_idle(limit_s: float, *, threshold: float = 0.15, probe_s: float = 1.0) -> None:
    """Wait (at most ``limit_s``) until the machine's busy CPU over ``probe_s`` is below ``threshold`` cores."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        before = _machine_busy_s()
        if before is None:
            return
        time.sleep(probe_s)
        if (_machine_busy_s() - before) / probe_s < threshold:
            return
    print(f"  (the machine did not go idle within {limit_s:.0f} s; measuring anyway)")


def run_client(client: str, endpoint: Endpoint, manifest: Path | str, rows: int, concurrency: int, out: Path) -> Run:
    if WAIT_IDLE_S > 0:
        wait_idle(WAIT_IDLE_S)
    with share_hog() as hog:  # started after the wait for idle, killed after the client
        before = _reset_window(endpoint)
        busy_before, hog_before = _machine_busy_s(), hog.cpu_s() if hog else 0.0
        started = time.monotonic()
        proc = spawn(client_command(client, manifest, endpoint.base_url, concurrency, out), out.with_suffix(".log"))
        code, cpu, rss = reap(proc)
        wall = time.monotonic() - started
        busy_after, hog_cpu = _machine_busy_s(), hog.cpu_s() - hog_before if hog else None
    after = endpoint.stats()
    window = None
    if after.get("first_at") is not None and after.get("last_at") is not None:
        window = after["last_at"] - after["first_at"]
    run = Run(client, rows, wall, cpu, rss, code, after["cpu_s"] - before["cpu_s"],
              after["requests"] - before["requests"], window, hog_cpu_s=hog_cpu)
    if busy_before is not None and busy_after is not None:
        run.foreign_cpu_s = max(0.0, busy_after - busy_before - cpu - run.server_cpu_s - (hog_cpu or 0.0))
        if run.foreign_cpu_s > 0.15 * wall:
            run.notes.append(f"other processes used {run.foreign_cpu_s:.1f} CPU-s during this {wall:.1f} s run "
                             "(a busy machine: timings are noisy, CPU-ms/img less so)")
    if code != 0:
        run.notes.append(f"exit {code}: see {out.with_suffix('.log')}")
    return run


def _machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine so far (Linux /proc/stat), to spot other load."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _reset_window(endpoint: Endpoint) -> dict:
    with urllib.request.urlopen(endpoint.base_url.removesuffix("/v1") + "/_stats?reset=1", timeout=10) as r:
        return json.loads(r.read())


def verify(run: Run, out: Path, manifest: Path, expected: dict[str, str]) -> None:
    """Every manifest row must be in the output, ok, with exactly the content the endpoint sent."""
    import pyarrow.parquet as pq

    if not out.exists():
        run.verified = "no output"
        return
    with open(manifest, newline="") as handle:
        want = {row["id"]: expected[row["path"]] for row in csv.DictReader(handle)}
    table = pq.read_table(out, columns=["id", "status", "content"])
    ids, statuses, contents = (table.column(n).to_pylist() for n in ("id", "status", "content"))
    bad = missing = 0
    seen = set()
    for row_id, status, content in zip(ids, statuses, contents, strict=True):
        seen.add(row_id)
        if status != "ok" or want.get(row_id) != content:
            bad += 1
    missing = len(want.keys() - seen)
    run.ok_rows = len(ids) - bad
    run.verified = "ok" if not bad and not missing and len(ids) == len(want) else f"FAIL ({bad} wrong, {missing} missing)"


# ---- tables ----------------------------------------------------------------------------------------------

def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(f"\n{title}")
    print(line)
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    for note in notes:
        print(f"  {note}")


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}x"


def _ratio_notes(metric: str, values: dict[str, float | None], better: str) -> list[str]:
    base = values.get("pipeline")
    out = []
    for other in ("sdk", "naive"):
        if other in values:
            out.append(f"pipeline/{other} {metric}: {_ratio(base, values[other])} ({better} is better)")
    return out


def _clients(args: argparse.Namespace, skipped: list[str]) -> list[str]:
    chosen = [c for c in args.clients.split(",") if c]
    if "sdk" in chosen and not has_sdk():
        chosen.remove("sdk")
        skipped.append("sdk baseline not run: the openai package is not installed (pip install -e '.[bench]')")
    return chosen


# ---- scenarios -------------------------------------------------------------------------------------------

def scenario_a(args: argparse.Namespace, sizes: Sizes, work: Path) -> bool:
    rows, tiny, conc = args.rows or sizes.a_rows, sizes.a_tiny, args.concurrency or sizes.a_conc
    print(f"\n== (a) CPU-bound: {rows} JPEGs, zero-latency endpoint, {sizes.chunks} chunks, concurrency {conc}")
    data = work / "photos"
    paths = make_images(data, rows, "photo", sizes.photo_size)
    expected = expected_by_path(data, paths, sizes.chunks)
    big = write_manifest(data, f"manifest-a-{rows}.csv", paths, rows)
    small = write_manifest(data, f"manifest-a-{tiny}.csv", paths, tiny)
    notes: list[str] = []
    clients = _clients(args, notes)
    table, cpu_ex, rate, all_ok = [], {}, {}, True
    with Endpoint(work, chunks=sizes.chunks) as endpoint:
        for client in clients:
            out_tiny, out_big = fresh_output(work, "a", f"{client}-{tiny}"), fresh_output(work, "a", f"{client}-{rows}")
            t = run_client(client, endpoint, small, tiny, conc, out_tiny)
            verify(t, out_tiny, small, expected)
            r = run_client(client, endpoint, big, rows, conc, out_big)
            verify(r, out_big, big, expected)
            excl = (r.cpu_s - t.cpu_s) / (rows - tiny) * 1000
            steady = (rows - tiny) / (r.wall_s - t.wall_s) if r.wall_s > t.wall_s else None
            cpu_ex[client], rate[client] = excl, rows / r.wall_s
            ok = r.verified == "ok" and t.verified == "ok"
            all_ok &= ok
            table.append([client, f"{r.requests:,}", f"{rows / r.wall_s:,.0f}", _f(steady, 0), _f(r.cpu_s / rows * 1000),
                          _f(excl), _f(t.cpu_s, 2), _f(r.maxrss_mb, 0), _f(r.server_cpu_s / rows * 1000),
                          f"{r.server_cpu_s / r.wall_s:.0%}", "ok" if ok else f"{r.verified} / tiny {t.verified}"])
            notes += [f"{client}: {n}" for n in r.notes + t.notes]
    notes += _ratio_notes("CPU-ms/img excl. start-up", cpu_ex, "lower")
    notes += _ratio_notes("img/s", rate, "higher")
    print_table(f"(a) CPU-bound, {rows} rows, concurrency {conc}, {sizes.chunks} chunks/answer",
                ["client", "requests", "img/s", "steady img/s", "CPU-ms/img", "CPU-ms/img excl start-up", "start-up CPU-s",
                 "peak RSS MB", "server CPU-ms/img", "server busy", "content verified"], table, notes)
    return all_ok


def scenario_b(args: argparse.Namespace, sizes: Sizes, work: Path) -> bool:
    conc = args.concurrency or sizes.b_conc
    rows = args.rows or sizes.b_rows or 10 * conc
    latency = sizes.first_token + (sizes.chunks - 1) * sizes.chunk_delay
    ideal = conc / latency
    print(f"\n== (b) latency-bound: {rows} rows, {sizes.first_token * 1000:.0f} ms to first token + "
          f"{sizes.chunks} chunks {sizes.chunk_delay * 1000:.0f} ms apart, concurrency {conc}")
    data = work / "photos"
    paths = make_images(data, rows, "photo", sizes.photo_size)  # unique: identical requests may be deduplicated
    expected = expected_by_path(data, paths, sizes.chunks)
    manifest = write_manifest(data, f"manifest-b-{rows}.csv", paths, rows)
    notes: list[str] = [f"ideal = concurrency / latency = {conc} / {latency:.3f} s = {ideal:,.0f} img/s; "
                        "'served' is rows / (endpoint's first request in -> last answer out), excluding client start-up"]
    clients = _clients(args, notes)
    table, served, all_ok = [], {}, True
    with Endpoint(work, chunks=sizes.chunks, first_token=sizes.first_token, chunk_delay=sizes.chunk_delay) as endpoint:
        for client in clients:
            runs: list[tuple[float, Run]] = []
            for _ in range(args.repeat):
                out = fresh_output(work, "b", client)
                r = run_client(client, endpoint, manifest, rows, conc, out)
                verify(r, out, manifest, expected)
                all_ok &= r.verified == "ok"
                runs.append((rows / r.window_s if r.window_s else 0.0, r))
            runs.sort(key=lambda pair: pair[0])
            s, r = runs[len(runs) // 2]  # the median run (the upper one of an even count)
            if len(runs) > 1:
                notes.append(f"{client}: {len(runs)} runs, of ideal: "
                             + ", ".join(f"{v / ideal:.1%}" for v, _ in runs) + "; the table shows the median")
            served[client] = s or None
            table.append([client, f"{r.requests:,}", f"{rows / r.wall_s:,.0f}", _f(s, 0), f"{s / ideal:.1%}" if s else "-",
                          _f(r.cpu_s / rows * 1000), f"{r.cpu_s / r.wall_s:.0%}", *_share_cells(r),
                          _f(r.maxrss_mb, 0), f"{r.server_cpu_s / r.wall_s:.0%}", r.verified])
            notes += [f"{client}: {n}" for n in r.notes]
    notes += _ratio_notes("served img/s", served, "higher")
    print_table(f"(b) latency-bound, {rows} rows, concurrency {conc}, ideal {ideal:,.0f} img/s{_share_title()}",
                ["client", "requests", "img/s (wall)", "served img/s", "of ideal", "CPU-ms/img", "client busy",
                 *_share_header(), "peak RSS MB", "server busy", "content verified"], table, notes)
    return all_ok


def _share_title() -> str:
    f = CLIENT_SHARE
    return "" if f.hog_nice is None else f", client share {f.requested:g} (nominal {f.nominal:.3f})"


def _share_header() -> list[str]:
    return [] if CLIENT_SHARE.hog_nice is None else ["CPU-ms/img / F", "busy of its share", "hog CPU-s"]


def _share_cells(r: Run) -> list[str]:
    """Under --client-share: the client's CPU per image and busy time as on a core 1/F as fast (F nominal)."""
    if CLIENT_SHARE.hog_nice is None:
        return []
    f = CLIENT_SHARE.nominal
    return [_f(r.cpu_s / r.rows * 1000 / f), f"{r.cpu_s / r.wall_s / f:.0%}", _f(r.hog_cpu_s, 1)]


def scenario_c(args: argparse.Namespace, sizes: Sizes, work: Path) -> bool:
    conc = args.concurrency or sizes.c_conc
    small, large = sizes.c_small, args.rows or sizes.c_large
    print(f"\n== (c) memory: {small} and {large} rows of tiny unique images, concurrency {conc}")
    data = work / "tiny"
    paths = make_images(data, large, "tiny")
    expected = expected_by_path(data, paths, sizes.chunks)
    notes: list[str] = []
    clients = _clients(args, notes)
    large_clients = [c for c in clients if c != "sdk" or args.sdk_large]
    if len(large_clients) < len(clients):
        notes.append(f"sdk baseline not run at {large} rows (too slow here; --sdk-large includes it)")
    table, rss, all_ok = [], {}, True
    with Endpoint(work, chunks=sizes.chunks) as endpoint:
        for client in clients:
            results = {}
            for n in (small, large):
                if n == large and client not in large_clients:
                    continue
                manifest = write_manifest(data, f"manifest-c-{n}.csv", paths, n)
                out = fresh_output(work, "c", f"{client}-{n}")
                results[n] = r = run_client(client, endpoint, manifest, n, conc, out)
                verify(r, out, manifest, expected)
                all_ok &= r.verified == "ok"
                notes += [f"{client} {n}: {x}" for x in r.notes]
            s, lg = results.get(small), results.get(large)
            growth = lg.maxrss_mb - s.maxrss_mb if lg and s else None
            rss[client] = lg.maxrss_mb if lg else None
            table.append([client, _f(s.maxrss_mb, 0) if s else "-", _f(lg.maxrss_mb, 0) if lg else "-",
                          _f(growth, 0), f"{large / lg.wall_s:,.0f}" if lg else "-",
                          _f(lg.cpu_s / large * 1000) if lg else "-",
                          " / ".join(r.verified for r in results.values())])
    notes += _ratio_notes(f"peak RSS at {large} rows", {k: v for k, v in rss.items() if v}, "lower")
    print_table(f"(c) memory, concurrency {conc}",
                ["client", f"peak RSS MB @{small}", f"peak RSS MB @{large}", "growth MB",
                 f"img/s @{large}", f"CPU-ms/img @{large}", "content verified"], table, notes)
    return all_ok


def scenario_d(args: argparse.Namespace, sizes: Sizes, work: Path) -> bool:
    rows, conc = args.rows or sizes.d_rows, args.concurrency or sizes.d_conc
    print(f"\n== (d) resume: run a finished {rows}-row job again (concurrency {conc})")
    data = work / "tiny"
    paths = make_images(data, rows, "tiny")
    manifest = write_manifest(data, f"manifest-d-{rows}.csv", paths, rows)
    out = fresh_output(work, "d", "pipeline")
    with Endpoint(work, chunks=1) as endpoint:  # the first, unmeasured run: one chunk per answer
        first = run_client("pipeline", endpoint, manifest, rows, conc, out)
        verify(first, out, manifest, expected_by_path(data, paths, 1))
        before = _reset_window(endpoint)["requests"]
        started = time.monotonic()
        proc = spawn(client_command("pipeline", manifest, endpoint.base_url, conc, out), out.with_name("rerun.log"))
        first_request = exited = None
        sent = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            now = time.monotonic() - started
            sent = endpoint.stats()["requests"] - before
            if sent and first_request is None:
                first_request = now
            if pid:
                exited = now
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if sent >= 2 * conc or now > 300:  # it is re-sending everything: stop it (SIGTERM: clean stop)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                break
            time.sleep(0.01)
    resumed = exited is not None and sent < rows
    if not resumed:
        result = "n/a (no resume support yet)"
    elif sent == 0:
        result = f"finished in {exited:.2f} s without sending"
    else:
        result = f"first request after {first_request:.2f} s; exited after {exited:.2f} s"
    table = [["pipeline", f"{rows:,}", f"{first.wall_s:.1f}", first.verified, str(sent), result]]
    notes = [] if resumed else [f"the second run sent {sent} requests (first after {_f(first_request)} s) "
                                "and was stopped: done rows are re-sent"]
    print_table(f"(d) resume over {rows} done rows", ["client", "rows", "first run s", "first run verified",
                "requests on re-run", "time to start sending / finish"], table, notes)
    return first.verified == "ok"


def external(module: str) -> Callable[[argparse.Namespace, Sizes, Path], bool]:
    """A scenario that lives in its own module (``scripts/MODULE.py``, entry ``run_scenario``), imported when run."""
    def scenario(args: argparse.Namespace, sizes: Sizes, work: Path) -> bool:
        return importlib.import_module(module).run_scenario(args, sizes, work, sys.modules[__name__])

    return scenario


SCENARIOS = {"a": scenario_a, "b": scenario_b, "c": scenario_c, "d": scenario_d,
             "e": external("bench_photos"),      # camera photos end to end
             "f": external("bench_streams"),     # more streams
             "g": external("bench_startup"),     # start-up and restart
             "s3": external("bench_objectstore"),
             "ray": external("bench_ray")}        # the Ray engine (needs the [ray] extra)


# ---- main ------------------------------------------------------------------------------------------------

@contextmanager
def workdir(out: str | None) -> Iterator[Path]:
    if out:
        path = Path(out).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Benchmark the pipeline against the SDK and naive baselines.")
    parser.add_argument("--scenario", default="a", choices=[*SCENARIOS, "all"])
    parser.add_argument("--rows", type=int, help="main row count of the scenario (a: 2000, b: 10 x concurrency, "
                        "c: the large manifest, 200000; d: 200000; e: 2000)")
    parser.add_argument("--concurrency", type=int, help="a: 64, b: 512, c: 256, d: 256, e: 64")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in well under a minute")
    parser.add_argument("--out", help="work folder (images are cached there); a temporary one by default")
    parser.add_argument("--clients", default=",".join(CLIENTS), help="comma-separated subset of "
                        f"{','.join(CLIENTS)} (default: all)")
    parser.add_argument("--pipeline-src", type=Path, help="import the pipeline package from this folder "
                        "(default: this checkout; e.g. a snapshot of a commit: git archive HEAD pipeline | tar -x -C DIR)")
    parser.add_argument("--wait-idle", type=float, default=0.0, metavar="S",
                        help="before each measured run, wait up to S seconds for other processes' load to go away")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="(b): run each client N times and report the median run (the machine is noisy)")
    parser.add_argument("--sdk-large", action="store_true", help="(c): also run the sdk baseline on the large manifest")
    parser.add_argument("--client-share", type=_share_arg, default=1.0, metavar="F",
                        help="emulate a client core 1/F as fast, 0 < F <= 1: while each client runs (scenarios whose clients "
                        "run through run_client: a, b, c, f, s3), a CPU hog pinned to the client's core at a nice level "
                        "whose weight leaves the client F of it (scripts/bench_share.py; measured and printed "
                        "first). Emulates a slower core for CPU-bound work; not slower caches or memory, nor the "
                        "kernel's share, and it adds wake-up lateness (printed) a slower core would not have")
    args = parser.parse_args(argv)
    sizes = Sizes.quick() if args.quick else Sizes()
    global WAIT_IDLE_S, CLIENT_SHARE
    WAIT_IDLE_S = args.wait_idle
    CLIENT_SHARE = plan_for(args.client_share)
    if args.pipeline_src is not None:
        global PIPELINE_SRC
        PIPELINE_SRC = args.pipeline_src.resolve()
        if not (PIPELINE_SRC / "pipeline" / "__init__.py").exists():
            parser.error(f"--pipeline-src: no pipeline/__init__.py under {PIPELINE_SRC}")
    if _cores() >= 2:
        os.sched_setaffinity(0, {SERVER_CORE})  # keep this process off the client's core
    print(f"bench: pipeline imported from {PIPELINE_SRC}")
    print(f"bench: {_cores()} core(s); endpoint pinned to core {SERVER_CORE}, clients to core {CLIENT_CORE}"
          if _cores() >= 2 else "bench: 1 core: endpoint and clients share it (numbers are not comparable)")
    if CLIENT_SHARE.requested < 1:
        for line in check_share(CLIENT_SHARE, CLIENT_CORE if _cores() >= 2 else None):
            print(f"bench: {line}")
    ok = True
    with workdir(args.out) as work:
        print(f"bench: work folder {work}")
        for name in (SCENARIOS if args.scenario == "all" else [args.scenario]):
            ok &= SCENARIOS[name](args, sizes, work)
    print(f"\ncontent verification: {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
