"""Read-side job operations over the ledger: status, run history, export. Safe while a run is going on
(SQLite WAL lets readers in beside the writer), and they never create a ledger that does not exist.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.core.config import Config
from pipeline.core.results import RESULT_COLUMNS
from pipeline.edges.ledger import StateStore
from pipeline.edges.manifest import ManifestReader
from pipeline.ops.export import ExportReport, export_output


def job_status(config: Config) -> dict[str, Any]:
    """Where every manifest row stands, the oldest pending row, failures by type, the last run."""
    reader = ManifestReader(config.input, reserved=RESULT_COLUMNS)
    info = reader.check([config.request.prompt])
    report: dict[str, Any] = {
        "ledger": str(config.ledger_path), "manifest_rows": info.rows, "rows": {"not_run_yet": info.rows},
        "oldest_pending": None, "errors": [], "last_run": None,
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
        runs = store.runs()
        report.update(
            rows=dict(counts), oldest_pending=store.oldest_pending(), errors=store.error_breakdown(),
            last_run=runs[-1] if runs else None,
        )
    return report


def run_history(config: Config) -> list[dict[str, Any]]:
    if not config.ledger_path.exists():
        return []
    with StateStore(config.ledger_path) as store:
        return store.runs()


def export_job(config: Config) -> ExportReport:
    """Rebuild ``output.path`` from the ledger, as a run does at its end."""
    reader = ManifestReader(config.input, reserved=RESULT_COLUMNS)
    reader.check([config.request.prompt])
    with StateStore(config.ledger_path) as store:
        return export_output(config, reader, store)
