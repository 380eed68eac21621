"""Scenario (g) of ``scripts/bench.py``: start-up and restart (issue 16).

Three measurements, each of the real CLI (``python -m pipeline run``) in a subprocess pinned to the
client's core, against the zero-latency endpoint (one chunk per answer, concurrency 256):

- **fresh start**: time from spawning ``pipeline run`` to the endpoint's first request, for a manifest of
  200,000 tiny images the ledger has never seen (the run is stopped with SIGKILL once that request is in);
- **restart after kill -9**: a run of a 300,000-row manifest is killed with SIGKILL once 200,000 rows are
  answered; the restart's time to its first request is measured, then the restart is killed the same way
  shortly after its first request, and again, ``KILLS`` times in all, so a restart time that grows with each
  kill shows up; the last restart then runs to the end and its output is verified row by row (so resume
  lost and re-sent nothing it should not have). Per kill: rows done (read from the ledger), the ledger's
  ``-wal`` file size before the restart, the restart's time to first request;
- **``pipeline --help``** wall time.

Times to the first request are the endpoint's own ``CLOCK_MONOTONIC`` stamp of the first request minus
the bench's stamp just before it spawned the client (the same clock on Linux). Baselines from the same
run: ``python -c pass`` and ``python -c "import pipeline"`` (interpreter and package import), and the
naive aiohttp script's time to its first request on the same fresh manifest.

Targets: fresh start < 1 s, restart < 2 s however many times it was killed, ``--help`` < 0.3 s.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sqlite3
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

#: Restarts killed in a row in (ii) (the last one then runs to the end).
KILLS = 5
#: Interpreter start-up repeats per command for (iii) and its baselines (the median is reported).
HELP_REPEATS = 7

bench: Any = None  # scripts/bench.py as it runs (handed over by run_scenario)


def run_scenario(args: argparse.Namespace, sizes: Any, work: Path, harness: Any) -> bool:
    global bench
    bench = harness
    fresh_rows = args.rows or (2_000 if args.quick else 200_000)
    done_at = 1_500 if args.quick else 200_000
    total = done_at + (500 if args.quick else 100_000)
    conc = args.concurrency or sizes.d_conc
    print(f"\n== (g) start-up and restart: {fresh_rows} new rows; kill -9 at {done_at} of {total} done, "
          f"{KILLS} restarts killed in a row; concurrency {conc}")
    data = work / "tiny"
    paths = bench.make_images(data, max(fresh_rows, total), "tiny")
    rows = _help_rows(work)
    with bench.Endpoint(work, chunks=1) as endpoint:
        rows += _fresh_rows(endpoint, data, paths, fresh_rows, conc, work, args)
        restart_rows, ok = _restarts(endpoint, data, paths, total, done_at, conc, work)
    print_table = bench.print_table
    print_table("(g) start-up, restart and --help (seconds; medians where repeated)",
                ["measured", "what", "s"], rows,
                ["targets: fresh start < 1 s, restart < 2 s after any number of kills, --help < 0.3 s"])
    print_table(f"(g) restarts after kill -9 ({total} rows, killed at ~{done_at} done)",
                ["kill", "rows done at kill", "-wal MB before restart", "ledger MB", "restart: s to first request"],
                restart_rows, [f"the last restart ran to the end: content {'verified' if ok else 'NOT verified'}"])
    return ok


# ---- (iii) --help and interpreter baselines ------------------------------------------------------------

def _help_rows(work: Path) -> list[list[str]]:
    commands = [("baseline", "python -c pass", ["-c", "pass"]),
                ("baseline", "python -c 'import pipeline'", ["-c", "import pipeline"]),
                ("pipeline", "pipeline --help", ["-m", "pipeline", "--help"]),
                ("pipeline", "pipeline run --help", ["-m", "pipeline", "run", "--help"])]
    out = []
    folder = work / "g"
    folder.mkdir(parents=True, exist_ok=True)
    for who, label, argv in commands:
        times = []
        for _ in range(HELP_REPEATS):
            started = time.monotonic()
            proc = bench.spawn([bench.PY, *argv], folder / "help.log")
            code, _, _ = bench.reap(proc)
            times.append(time.monotonic() - started)
            if code != 0:
                raise RuntimeError(f"{label} exited {code}: see {folder / 'help.log'}")
        out.append([who, label, f"{statistics.median(times):.3f}"])
    return out


# ---- (i) fresh start -------------------------------------------------------------------------------------

def _fresh_rows(endpoint: Any, data: Path, paths: list[str], rows: int, conc: int, work: Path,
                args: argparse.Namespace) -> list[list[str]]:
    manifest = bench.write_manifest(data, f"manifest-g-{rows}.csv", paths, rows)
    out = []
    clients = ["pipeline", *(["naive"] if "naive" in args.clients.split(",") else [])]
    for client in clients:
        target = bench.fresh_output(work, "g", f"fresh-{client}")
        first = _time_to_first_request(endpoint, client, manifest, conc, target, then=_kill)
        who = "pipeline" if client == "pipeline" else "baseline"
        out.append([who, f"{client}: fresh start, {rows:,} new rows, to first request", _f(first)])
    return out


def _kill(proc: subprocess.Popen[bytes], endpoint: Any, before: int) -> None:
    proc.send_signal(signal.SIGKILL)
    bench.reap(proc)


def _time_to_first_request(endpoint: Any, client: str, manifest: Path, conc: int, target: Path,
                           then: Any, log_name: str = "run.log") -> float | None:
    """Spawn ``client`` and return seconds until the endpoint's first request (None: it exited first);
    ``then(proc, endpoint, requests_before)`` decides what happens to the process afterwards."""
    if bench.WAIT_IDLE_S > 0:
        bench.wait_idle(bench.WAIT_IDLE_S)
    before = bench._reset_window(endpoint)["requests"]
    started = time.monotonic()
    proc = bench.spawn(bench.client_command(client, manifest, endpoint.base_url, conc, target),
                       target.with_name(log_name))
    deadline = started + 300
    first_at = None
    while time.monotonic() < deadline:
        first_at = endpoint.stats().get("first_at")
        if first_at is not None or proc.poll() is not None:
            break
        time.sleep(0.01)
    if first_at is None:
        proc.kill()
        bench.reap(proc)
        return None
    then(proc, endpoint, before)
    return first_at - started


# ---- (ii) restarts after kill -9 -------------------------------------------------------------------------

def _kill_at(count: int) -> Any:
    """A ``then`` that kills the run (SIGKILL) once the endpoint has had ``count`` requests from it."""
    def kill(proc: subprocess.Popen[bytes], endpoint: Any, before: int) -> None:
        deadline = time.monotonic() + 600
        while endpoint.stats()["requests"] - before < count and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        _kill(proc, endpoint, before)
    return kill


def _restarts(endpoint: Any, data: Path, paths: list[str], total: int, done_at: int, conc: int,
              work: Path) -> tuple[list[list[str]], bool]:
    manifest = bench.write_manifest(data, f"manifest-g-{total}.csv", paths, total)
    target = bench.fresh_output(work, "g", "restart")
    ledger = target.with_name(f"{target.stem}.ledger.sqlite")
    _time_to_first_request(endpoint, "pipeline", manifest, conc, target, then=_kill_at(done_at),
                           log_name="first.log")
    out = []
    for kill in range(1, KILLS + 2):
        done, wal_mb, db_mb = _ledger_state(ledger)
        last = kill == KILLS + 1
        then = _finish if last else _kill_at(2 * conc)  # a little past the first request, then kill again
        first = _time_to_first_request(endpoint, "pipeline", manifest, conc, target, then=then,
                                       log_name=f"restart-{kill}.log")
        out.append([str(kill) if not last else f"{kill - 1} (then ran to the end)", f"{done:,}", f"{wal_mb:.1f}",
                    f"{db_mb:.1f}", _f(first)])
    run = bench.Run("pipeline", total, 0, 0, 0, 0, 0, 0, None)
    bench.verify(run, target, manifest, bench.expected_by_path(data, paths[:total], 1))
    if run.verified != "ok":
        print(f"  restart output: {run.verified}")
    return out, run.verified == "ok"


def _finish(proc: subprocess.Popen[bytes], endpoint: Any, before: int) -> None:
    code, _, _ = bench.reap(proc)
    if code != 0:
        print(f"  the last restart exited {code}")


def _ledger_state(ledger: Path) -> tuple[int, float, float]:
    """(rows answered ok, ``-wal`` MB, ledger MB) as a killed run left them; read on a copy so the
    measured restart finds the files exactly as the kill left them (a reader could checkpoint the WAL)."""
    wal = ledger.with_name(ledger.name + "-wal")
    wal_mb = wal.stat().st_size / 1e6 if wal.exists() else 0.0
    db_mb = ledger.stat().st_size / 1e6
    copy = ledger.with_name("peek.sqlite")
    for suffix in ("", "-wal"):
        source = ledger.with_name(ledger.name + suffix)
        Path(str(copy) + suffix).unlink(missing_ok=True)
        if source.exists():
            shutil.copyfile(source, str(copy) + suffix)
    db = sqlite3.connect(copy)
    try:
        done = db.execute("SELECT COUNT(*) FROM requests WHERE status = 'ok'").fetchone()[0]
    finally:
        db.close()
    for suffix in ("", "-wal", "-shm"):
        Path(str(copy) + suffix).unlink(missing_ok=True)
    return done, wal_mb, db_mb


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
