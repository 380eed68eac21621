"""A full disk, a read-only file system: the run stops with one line naming the path and the cause, exit
code 6, the ledger intact, and the same command finishes the job once the disk is fixed, sending nothing
twice. Real small tmpfs mounts (the tests run as root, as in CI), unmounted whatever happens."""

from __future__ import annotations

import errno
import re
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import ExitCode

from .helpers import make_manifest, read_rows
from .test_cli import pipeline

Mount = Callable[..., Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """``tmpfs(name, size="1m")``: a fresh tmpfs of that size mounted at ``tmp_path/name``."""
    mounted: list[Path] = []

    def mount(name: str, size: str = "1m") -> Path:
        where = tmp_path / name
        where.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"these tests mount a tmpfs and need root: {result.stderr}"
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in reversed(mounted):
            if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True, timeout=30)


def fill(where: Path) -> Path:
    """Fill the file system at ``where`` to the last byte; delete the returned file to free it."""
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as handle:
        with pytest.raises(OSError) as full:
            while True:
                handle.write(b"\0" * 65536)
    assert full.value.errno == errno.ENOSPC
    return filler


def write_job(tmp_path: Path, rows: int, output_path: Path, ledger: Path, **sections: dict) -> Path:
    manifest = make_manifest(tmp_path / "data", rows)
    document = {
        "endpoint": {"base_url": "local"},
        "request": {"model": "m", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 4, "max_attempts": 2, "backoff_base": 0.01},
        "output": {"path": str(output_path)},
        "ledger": {"path": str(ledger)},
    }
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def ledger_counts(ledger: Path) -> tuple[str, int, list[str]]:
    """(integrity check, requests ok, run statuses) read straight from the SQLite file."""
    with sqlite3.connect(ledger) as db:
        integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
        ok = db.execute("SELECT COUNT(*) FROM requests WHERE status = 'ok'").fetchone()[0]
        runs = [row[0] for row in db.execute("SELECT status FROM runs ORDER BY run_id")]
    return integrity, ok, runs


def assert_one_clear_stop(result: subprocess.CompletedProcess, path: Path, cause: str) -> None:
    assert result.returncode == ExitCode.IO_ERROR == 6, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "--fresh" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {path}: {cause}; "), result.stderr
    assert "then run the same command again: rows already finished are kept in the ledger" in errors[0]


def test_output_on_a_full_disk_stops_with_exit_6_and_a_rerun_finishes_without_resending(tmp_path, tmpfs):
    out = tmpfs("out")
    ledger = tmp_path / "state" / "job.ledger.sqlite"
    config = write_job(tmp_path, 12, out / "captions.parquet", ledger)
    filler = fill(out)

    result = pipeline("run", str(config), "--no-progress", cwd=tmp_path)

    assert_one_clear_stop(result, out / "captions.parquet", "No space left on device (ENOSPC)")
    assert "ok 12" in result.stdout  # the summary of what the run did is still printed
    assert ledger_counts(ledger) == ("ok", 12, ["failed"])
    filler.unlink()
    again = pipeline("run", str(config), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "requests sent 0" in again.stdout
    assert [row["status"] for row in read_rows(out / "captions.parquet")] == ["ok"] * 12


def test_ledger_filling_up_mid_run_keeps_every_commit_and_the_rerun_sends_only_the_rest(tmp_path, tmpfs):
    state = tmpfs("state", "384k")  # room for the schema and a few commits
    ledger = state / "job.ledger.sqlite"
    config = write_job(tmp_path, 80, tmp_path / "out" / "captions.csv", ledger)

    result = pipeline("run", str(config), "--no-progress", cwd=tmp_path, timeout=120)

    assert_one_clear_stop(result, ledger, "database or disk is full (SQLITE_FULL)")
    remount(state, "size=16m")
    integrity, done_before, runs = ledger_counts(ledger)
    assert integrity == "ok" and 0 < done_before < 80, (integrity, done_before)
    assert runs in (["running"], ["failed"])  # its end is recorded when the full disk still allows it
    again = pipeline("run", str(config), "--no-progress", cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stderr
    assert re.search(rf"requests sent {80 - done_before}\b", again.stdout), again.stdout
    assert ledger_counts(ledger)[:2] == ("ok", 80)


def test_read_only_output_folder_stops_with_exit_6_and_the_rerun_finishes(tmp_path, tmpfs):
    out = tmpfs("out")
    ledger = tmp_path / "state" / "job.ledger.sqlite"
    config = write_job(tmp_path, 6, out / "captions.jsonl", ledger)
    remount(out, "ro")

    result = pipeline("run", str(config), "--no-progress", "--log-file", str(tmp_path / "run.log"), cwd=tmp_path)

    assert_one_clear_stop(result, out / "captions.jsonl", "Read-only file system (EROFS)")
    assert ledger_counts(ledger) == ("ok", 6, ["failed"])
    remount(out, "rw")
    again = pipeline("run", str(config), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0 and "requests sent 0" in again.stdout, again.stderr
    assert len((out / "captions.jsonl").read_text().splitlines()) == 6


def test_the_run_log_on_a_read_only_disk_stops_before_anything_is_sent(tmp_path, tmpfs):
    out = tmpfs("out")
    config = write_job(tmp_path, 3, out / "captions.csv", tmp_path / "state" / "job.ledger.sqlite")
    remount(out, "ro")

    result = pipeline("run", str(config), "--no-progress", cwd=tmp_path)

    assert result.returncode == 6 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: cannot write {out}/logs/captions.") and result.stderr.count("\n") == 1
    assert not (tmp_path / "state" / "job.ledger.sqlite").exists()


@pytest.mark.parametrize("what", ["partition", "prometheus"])
def test_a_partition_or_report_that_cannot_be_written_is_exit_6_after_the_output(tmp_path, tmpfs, what):
    elsewhere = tmpfs("elsewhere")
    remount(elsewhere, "ro")
    output = tmp_path / "out" / "captions.parquet"
    sections = ({"output": {"path": str(output), "partition_by": "run_date", "partition_dir": str(elsewhere)}}
                if what == "partition" else {"metrics": {"prometheus": str(elsewhere)}})
    config = write_job(tmp_path, 4, output, tmp_path / "state" / "job.ledger.sqlite", **sections)

    result = pipeline("run", str(config), "--no-progress", cwd=tmp_path)

    assert result.returncode == 6 and "Traceback" not in result.stderr, result.stderr
    target = f"{elsewhere}/run_date=" if what == "partition" else f"{elsewhere}/captions.prom"
    assert f"error: cannot write {target}" in result.stderr and "Read-only file system (EROFS)" in result.stderr
    assert len(read_rows(output)) == 4  # the output itself was written
    remount(elsewhere, "rw")
    again = pipeline("run", str(config), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0 and "requests sent 0" in again.stdout, again.stderr
    if what == "partition":  # the first run's partition is written by the rerun, which owes it
        (part,) = elsewhere.glob("run_date=*/part-run00001.parquet")
        assert len(read_rows(part)) == 4
    else:
        assert "pipeline_" in (elsewhere / "captions.prom").read_text()


def test_a_run_log_on_a_full_disk_is_one_warning_not_a_traceback_per_line(tmp_path, tmpfs):
    logs = tmpfs("logs")
    config = write_job(tmp_path, 4, tmp_path / "out" / "captions.csv", tmp_path / "state" / "job.ledger.sqlite")
    (tmp_path / "data" / "img_000.png").unlink()  # a failed row: a WARNING line for the log
    fill(logs)

    result = pipeline("run", str(config), "--no-progress", "--log-file", str(logs / "run.log"), cwd=tmp_path)

    assert result.returncode == 1, result.stderr  # the run itself finished: one row failed, the log is a bonus
    assert "Traceback" not in result.stderr and "Logging error" not in result.stderr, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: cannot write the log")]
    assert warnings == [f"warning: cannot write the log file {logs / 'run.log'}: No space left on device (ENOSPC); "
                        "logging to stderr only"], result.stderr


def test_a_file_size_limit_is_a_clear_stop_too(tmp_path):
    """No mount needed: RLIMIT_FSIZE makes the kernel refuse the output's growth with EFBIG."""
    output = tmp_path / "out" / "captions.csv"
    config = write_job(tmp_path, 150, output, tmp_path / "state" / "job.ledger.sqlite")
    assert pipeline("run", str(config), "--no-progress", cwd=tmp_path).returncode == 0
    before = output.read_bytes()
    limit = 36_000  # room for the ledger's 32 KiB shared-memory file, not for the output
    assert len(before) > limit

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = subprocess.run([sys.executable, "-m", "pipeline", "export", str(config)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, preexec_fn=limit_file_size)

    assert result.returncode == 6 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith(f"error: cannot write {output}: File too large (EFBIG); ")
    assert output.read_bytes() == before  # the old output is left whole, no half file beside it
    assert [p.name for p in output.parent.iterdir() if p.name.startswith(".")] == []
