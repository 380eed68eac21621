"""Read-side job operations over the ledger: status, run history, export. Safe while a run is going on
(SQLite WAL lets readers in beside the writer), and they never create a ledger that does not exist.

A run that is killed (SIGKILL, OOM, power loss) leaves its ledger record saying ``running``: only the next
run's start can correct it. The job's lock tells the truth at once (the kernel frees an ``flock`` when its
holder dies), so status and history probe it and show such a run as ``crashed`` while the lock is free.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.core.config import Config
from pipeline.core.results import RESULT_COLUMNS
from pipeline.edges.ledger import JobLock, StateStore, job_lock_path
from pipeline.edges.manifest import ManifestReader
from pipeline.ops.export import ExportReport, export_output


def job_status(config: Config) -> dict[str, Any]:
    """Where every manifest row stands, the oldest pending row, failures by type, the last run."""
    reader = ManifestReader(config.input, reserved=RESULT_COLUMNS,
                            storage_options=config.storage_options_for("input"))
    info = reader.check([config.request.prompt])
    report: dict[str, Any] = {
        "ledger": str(config.ledger_path), "manifest_rows": info.rows, "rows": {"not_run_yet": info.rows},
        "oldest_pending": None, "errors": [], "last_run": None, "running_pid": None,
    }
    if not config.ledger_path.exists():
        return report
    with StateStore(config.ledger_path) as store:
        counts: Counter[str] = Counter()
        for batch in reader.batches():
            states = store.item_states([row.id for row in batch])
            for row in batch:
                state = states.get(row.id)
                counts[(state.status or "pending") if state else "not_run_yet"] += 1
        with JobLock(job_lock_path(config.ledger_path)).probe() as holder:
            runs = _live(store.runs(), holder)
        report.update(
            rows=dict(counts), oldest_pending=store.oldest_pending(), errors=store.error_breakdown(),
            last_run=runs[-1] if runs else None, running_pid=holder,
        )
    return report


def run_history(config: Config) -> list[dict[str, Any]]:
    if not config.ledger_path.exists():
        return []
    with StateStore(config.ledger_path) as store, JobLock(job_lock_path(config.ledger_path)).probe() as holder:
        return _live(store.runs(), holder)


def _live(runs: list[dict[str, Any]], holder: int | None) -> list[dict[str, Any]]:
    """Runs the ledger still calls ``running`` are ``crashed`` when no process holds the job's lock (the
    next run records the same); read under ``JobLock.probe``, so no run can start in between."""
    if holder is None:
        for run in runs:
            if run["status"] == "running":
                run["status"] = "crashed"
    return runs


def export_job(config: Config) -> ExportReport:
    """Rebuild ``output.path`` from the ledger, as a run does at its end."""
    reader = ManifestReader(config.input, reserved=RESULT_COLUMNS,
                            storage_options=config.storage_options_for("input"))
    reader.check([config.request.prompt])
    with StateStore(config.ledger_path) as store:
        return export_output(config, reader, store)
