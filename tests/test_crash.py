"""Crash safety with real processes: SIGKILL mid-run and resume, the job lock, against `pipeline serve`."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from .helpers import make_manifest, standalone_endpoint

ROWS = 40


@pytest.fixture
def server(tmp_path):
    """A standalone endpoint that outlives the runs we kill; slowed down so a run takes seconds."""
    with standalone_endpoint(tmp_path, 0.01) as base_url:
        yield base_url


def server_stats(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/_admin/stats", timeout=10) as response:
        return json.load(response)


def write_job(tmp_path: Path, base_url: str, concurrency: int = 4) -> tuple[Path, Path, Path]:
    manifest = make_manifest(tmp_path / "data", ROWS)
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump({
        "endpoint": {"base_url": base_url},
        "request": {"model": "m", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": concurrency, "backoff_base": 0.01},
        "output": {"path": "out/captions.parquet"},
    }))
    return config, manifest, tmp_path / "out" / "captions.ledger.sqlite"


def start_run(config: Path, cwd: Path, *extra: str) -> subprocess.Popen:
    """A run whose stderr (a pipe, not a terminal: no bar) gets a progress line every 0.05 s."""
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(config), "--log-level", "INFO",
                             "--progress-interval", "0.05", *extra], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_progress(proc: subprocess.Popen, at_least: int) -> None:
    """Read the progress lines on stderr until one reports ``at_least`` finished rows."""
    seen = ""
    while proc.poll() is None:
        done = [int(n) for n in re.findall(r"(\d+) of \d+ rows done", seen)]
        if done and max(done) >= at_least:
            return
        seen += proc.stderr.read(1)


def ok_rows(ledger: Path) -> set[str]:
    db = sqlite3.connect(ledger)
    try:
        rows = db.execute("SELECT i.row_id FROM items i JOIN requests r ON r.key = i.request_key "
                          "WHERE r.status = 'ok'").fetchall()
    finally:
        db.close()
    return {r[0] for r in rows}


def image_sha(manifest: Path, row_id: str) -> str:
    index = int(row_id.split("-")[1])
    return hashlib.sha256((manifest.parent / f"img_{index:03d}.png").read_bytes()).hexdigest()


def test_sigkill_at_several_points_then_resume_never_pays_twice(tmp_path, server):
    config, manifest, ledger = write_job(tmp_path, server)
    output = tmp_path / "out" / "captions.parquet"
    frozen: dict[str, int] = {}  # image -> completions seen when its answer was already committed
    kills = 0
    for point in (5, 15, 25):
        proc = start_run(config, tmp_path)
        wait_for_progress(proc, point)
        proc.kill()  # SIGKILL: no clean-up of any kind
        proc.wait()
        kills += 1
        if output.exists():
            pq.read_table(output)  # never a half-written file
        completed = server_stats(server)["completed_by_image"]
        for row_id in ok_rows(ledger):
            frozen.setdefault(image_sha(manifest, row_id), completed[image_sha(manifest, row_id)])

    final = start_run(config, tmp_path, "--no-progress")
    stdout, stderr = final.communicate(timeout=120)
    assert final.returncode == 0, stderr

    table = pq.read_table(output)
    ids = table.column("id").to_pylist()
    assert ids == [f"row-{i}" for i in range(ROWS)]  # one row per manifest row, in order, no duplicates
    assert set(table.column("status").to_pylist()) == {"ok"}

    completed = server_stats(server)["completed_by_image"]
    # no answer that was committed before a kill was requested again afterwards
    assert {sha: completed[sha] for sha in frozen} == frozen
    assert len(frozen) >= 25
    # at most the requests in flight at each kill were paid for twice
    assert sum(completed.values()) - ROWS <= 4 * kills
    assert "skipped (already done)" in stdout


def test_second_run_of_the_same_job_is_refused_while_the_first_holds_the_lock(tmp_path, server):
    config, _, _ = write_job(tmp_path, server, concurrency=1)
    first = start_run(config, tmp_path)
    try:
        wait_for_progress(first, 1)
        second = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 3
        assert f"another run of this job is in progress (pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 4
    # once the holder is gone, the job runs again (more streams: the request keys, so the ledger, are the same)
    job = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**job, "run": {**job["run"], "concurrency": 8}}))
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--no-progress"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr


def test_status_and_runs_commands_print_the_ledger(tmp_path, server):
    config, manifest, _ = write_job(tmp_path, server, concurrency=8)
    (manifest.parent / "img_003.png").unlink()
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(config), "--no-progress"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1

    status = subprocess.run([sys.executable, "-m", "pipeline", "status", str(config)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0
    assert re.search(r"ok\s+39\n", status.stdout) and re.search(r"failed\s+1\n", status.stdout)
    assert "image_missing" in status.stdout and "row-3" in status.stdout

    as_json = subprocess.run([sys.executable, "-m", "pipeline", "status", str(config), "--json"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert json.loads(as_json.stdout)["rows"] == {"ok": 39, "failed": 1}

    runs = subprocess.run([sys.executable, "-m", "pipeline", "runs", str(config)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    lines = runs.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "command", "status"]
    fields = lines[1].split()
    assert fields[:3] == ["1", "run", "finished"]
    assert fields[-5:] == ["40", "0", "39", "1", "39"]  # new, skipped, ok, failed, requests sent
