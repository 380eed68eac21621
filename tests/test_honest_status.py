"""Honest status, logs and progress (issue #12, section 6), through the real CLI where the process boundary
matters: a killed run vs a running one, the per-run log's start and end lines, no bar when stderr is not a
terminal (and warnings above the bar when it is), JSONL line numbers, ``run_job`` inside a running loop,
report files under the umask, and counts that add up with ``request.n: 2``."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import re
import stat
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.core.errors import ManifestError
from pipeline.edges.files import atomic_path, published_mode
from pipeline.edges.manifest import ManifestReader
from pipeline.ops.progress import ProgressBar, ProgressLog, progress_reporter
from pipeline.run.summary import Progress

from .helpers import job_config, make_manifest

PIPELINE = [sys.executable, "-m", "pipeline"]


def write_config(tmp_path: Path, manifest: Path, **overrides: dict) -> Path:
    document = {
        "endpoint": {"base_url": "local"},
        "request": {"model": "m", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 2, "max_attempts": 1},
        "output": {"path": "out/captions.parquet"},
    }
    for section, values in overrides.items():
        document[section] = {**document.get(section, {}), **values}
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(document))
    return config


def cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PIPELINE, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def run_log(tmp_path: Path) -> str:
    logs = sorted((tmp_path / "out" / "logs").glob("captions.*.log"))
    assert len(logs) == 1, logs
    return logs[0].read_text()


# --- status: killed vs running ----------------------------------------------------------------------


def test_status_tells_a_killed_run_from_a_running_one(tmp_path: Path) -> None:
    manifest = make_manifest(tmp_path / "data", 40)
    # a row takes over a second: the run is still going when status looks (it is killed long before its end)
    config = write_config(tmp_path, manifest, endpoint={"base_url": "local", "local": {"first_byte_delay": 1.5}},
                          run={"concurrency": 1})
    proc = subprocess.Popen([*PIPELINE, "--log-level", "INFO", "run", str(config), "--no-progress"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # ends at the run's start line (or at EOF if the run died first)
            if "run #1 started" in line:
                break
        running = json.loads(cli("status", str(config), "--json", cwd=tmp_path).stdout)
        assert running["last_run"]["status"] == "running" and running["running_pid"] == proc.pid
        assert f"running now: pid {proc.pid}" in cli("status", str(config), cwd=tmp_path).stdout
    finally:
        proc.kill()  # SIGKILL: the ledger still says "running", only the lock knows better
        proc.wait(timeout=30)
        proc.stderr.close()
    killed = json.loads(cli("status", str(config), "--json", cwd=tmp_path).stdout)
    assert killed["last_run"]["status"] == "crashed" and killed["running_pid"] is None
    text = cli("status", str(config), cwd=tmp_path).stdout
    assert "last run: #1 run crashed" in text and "run the job again to resume" in text
    assert "running now" not in text
    assert [r["status"] for r in json.loads(cli("runs", str(config), "--json", cwd=tmp_path).stdout)] == ["crashed"]


# --- the per-run log --------------------------------------------------------------------------------


def test_the_run_log_has_start_and_end_lines_when_all_goes_well(tmp_path: Path) -> None:
    config = write_config(tmp_path, make_manifest(tmp_path / "data", 2))
    result = cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # the console stays quiet at the default level; the file has the record
    text = run_log(tmp_path)
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO pipeline\.ops\.jobrun: "
    assert re.search(stamp + r"run #1 started: 2 manifest rows", text, re.M), text
    assert re.search(stamp + r"run #1 finished in [\d.]+s: exit code 0; this run 2 ok, 0 failed; "
                     r"manifest 2 rows, 0 not run yet; output 2 rows$", text, re.M), text

    for log in (tmp_path / "out" / "logs").iterdir():
        log.unlink()
    result = cli("run", str(config), "--no-progress", "--log-format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = {e["event"]: e for e in map(json.loads, run_log(tmp_path).splitlines()) if "event" in e}
    assert events["run_start"]["run_id"] == 2 and events["run_start"]["rows_total"] == 2
    assert events["run_end"]["exit_code"] == 0 and events["run_end"]["rows_ok"] == 0  # both rows skipped
    assert events["run_end"]["ts"].startswith("20")


# --- progress: no bar off a terminal, warnings above the bar on one ----------------------------------


def test_no_bar_when_stderr_is_not_a_terminal_but_progress_lines_in_the_log(tmp_path: Path) -> None:
    config = write_config(tmp_path, make_manifest(tmp_path / "data", 6, missing={2}))
    result = cli("run", str(config), "--progress-interval", "0.05", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "\r" not in result.stderr and "img/s" not in result.stderr and "%|" not in result.stderr
    assert "WARNING pipeline: row 3 (id=row-2) failed: image_missing" in result.stderr
    assert "progress (end): 6 of 6 rows done (5 ok, 1 failed), 0 in flight" in run_log(tmp_path)


def read_terminal(master: int) -> bytes:
    """Everything written to a pty until its last writer closes it."""
    data = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: no process holds the terminal any more
            return data
        if not chunk:
            return data
        data += chunk


def test_warnings_print_above_the_bar_on_a_terminal(tmp_path: Path) -> None:
    config = write_config(tmp_path, make_manifest(tmp_path / "data", 6, missing={1, 3, 4}),
                          endpoint={"base_url": "local", "local": {"chunk_delay": 0.01}})
    master, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen([*PIPELINE, "run", str(config)], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=terminal, stdin=subprocess.DEVNULL)
        os.close(terminal)
        screen = read_terminal(master).decode()
        assert proc.wait(timeout=60) == 1
    finally:
        os.close(master)
    assert "img/s" in screen or "/6" in screen  # the bar was drawn
    starts = [m.start() for m in re.finditer("WARNING", screen)]
    assert len(starts) == 3, screen
    # each warning begins a line of its own (tqdm cleared the bar first), never glued to the bar's text
    assert all(screen[i - 1] in "\r\n" for i in starts), [screen[max(0, i - 30):i + 10] for i in starts]


def test_progress_lines_come_on_a_timer_and_once_at_the_end() -> None:
    lines: list[str] = []
    due = threading.Event()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())
            due.set()

    logger = logging.getLogger("pipeline.progress")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with open(os.devnull, "w") as not_a_terminal:
            reporter = progress_reporter(not_a_terminal, interval=0.01)
        assert isinstance(reporter, ProgressLog)
        reporter.update(Progress(total=5, done=2, ok=1, failed=1, in_flight=3))
        assert due.wait(timeout=30)  # a line with no row finishing: the timer, not the rows, decides
        reporter.close()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert lines[0].startswith("progress: 2 of 5 rows done (1 ok, 1 failed), 3 in flight")
    assert lines[-1].startswith("progress (end): 2 of 5 rows done")
    master, terminal = pty.openpty()
    with open(terminal, "w") as stream, open(master, "rb"):
        assert isinstance(progress_reporter(stream), ProgressBar)


# --- JSONL line numbers -----------------------------------------------------------------------------


def jsonl_reader(path: Path) -> ManifestReader:
    return ManifestReader(job_config(path, path.with_name("out.parquet")).input)


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "path": "a.png"}', '{"id": "b", "path": "b.png"}', '{"id": "c", "path": "c.p'],
     "invalid JSON at line 3 ("),
    (['{"id": "a", "path": "a.png"}', "", '{"id": "b" "path": "b.png"}', '{"id": "c", "path": "c.png"}'],
     "invalid JSON at line 3 ("),
    (['{"id": "a", "path": "a.png"}', '["b", "b.png"]'], "line 2 is not a JSON object"),
])
def test_jsonl_errors_name_the_line_counting_from_one(tmp_path: Path, lines: list[str], message: str) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines))  # the last line has no newline: a file cut short
    with pytest.raises(ManifestError, match=re.escape(f"{manifest}: {message}")):
        jsonl_reader(manifest).check()


def test_jsonl_error_past_the_first_block_names_its_line(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    good = [json.dumps({"id": f"row-{i}", "path": f"img_{i:06d}.png", "note": "x" * 40}) for i in range(40_000)]
    good[30_000] = good[30_000][:-9]  # about 2.4 MB in: well past Arrow's first 1 MiB block
    manifest.write_text("\n".join(good) + "\n")
    with pytest.raises(ManifestError, match="invalid JSON at line 30001 "):
        jsonl_reader(manifest).check()
    config = write_config(tmp_path, manifest)
    result = cli("validate", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "invalid JSON at line 30001 (" in result.stderr
    assert "Traceback" not in result.stderr


# --- run_job inside a running event loop --------------------------------------------------------------


async def test_run_job_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    from pipeline import run_job

    config = job_config(make_manifest(tmp_path / "data", 3), tmp_path / "out.parquet")
    summary = run_job(config)  # a notebook cell: the loop is running, and the call still just works
    assert summary.exit_code == 0 and summary.rows_ok == 3
    assert pq.read_table(tmp_path / "out.parquet").num_rows == 3


# --- files under the umask ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o027, 0o640), (0o002, 0o664)])
def test_reports_and_outputs_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    config = write_config(tmp_path, make_manifest(tmp_path / "data", 2),
                          metrics={"prometheus": str(tmp_path / "metrics")})
    line = " ".join([f"umask {umask:03o};", "exec", *PIPELINE, "run", str(config), "--no-progress"])
    result = subprocess.run(["/bin/sh", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    published = [out / "captions.parquet", out / "captions.summary.json", out / "captions.summary.md",
                 tmp_path / "metrics" / "captions.prom"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in published} == {p.name: oct(mode) for p in published}


def test_the_temporary_file_stays_private_until_the_rename(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    with atomic_path(target) as temporary:
        temporary.write_text("{}")
        assert stat.S_IMODE(temporary.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == published_mode() == 0o666 & ~current_umask_of_this_process()


def current_umask_of_this_process() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask line in /proc/self/status")


# --- counts that add up ---------------------------------------------------------------------------------


def test_summary_counts_output_rows_and_manifest_rows_apart(tmp_path: Path) -> None:
    config = write_config(tmp_path, make_manifest(tmp_path / "data", 3, missing={2}), request={"n": 2})
    result = cli("run", str(config), "--no-progress", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    table = pq.read_table(tmp_path / "out" / "captions.parquet").to_pylist()
    ok_rows = sum(r["status"] == "ok" for r in table)
    failed_rows = len(table) - ok_rows
    assert ok_rows == 4  # two choices for each of the two good images
    assert f"out/captions.parquet: {len(table)} rows ({ok_rows} ok, {failed_rows} failed)" in result.stdout
    assert "for 3 of 3 manifest rows (2 ok, 1 failed, 0 not run yet)" in result.stdout

    report = json.loads((tmp_path / "out" / "captions.summary.json").read_text())
    assert report["output_rows"] == {"total": len(table), "ok": ok_rows, "failed": failed_rows}
    assert report["manifest_rows"] == {"total": 3, "ok": 2, "failed": 1, "not_run": 0}
    markdown = (tmp_path / "out" / "captions.summary.md").read_text()
    assert (f"Output file: {len(table)} rows ({ok_rows} ok, {failed_rows} failed), "
            "for 3 of 3 manifest rows (2 ok, 1 failed, 0 not run yet).") in markdown

    exported = cli("export", str(config), cwd=tmp_path)
    assert (f"{len(table)} rows ({ok_rows} ok, {failed_rows} failed) for 3 manifest rows (2 ok, 1 failed)"
            in exported.stdout)
