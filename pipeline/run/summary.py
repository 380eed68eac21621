"""What a run reports while it goes (``Progress``, for a progress bar) and when it ends (``RunSummary``).

Kept apart from the engines so that every engine, the CLI and the Python API share one summary type.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.core.errors import ExitCode

Command = Literal["run", "retry"]


@dataclass
class Progress:
    """Live counters the CLI's progress bar reads; updated by the engine only."""

    total: int = 0  # rows this run has to do (known once the feeder has seen the whole manifest)
    done: int = 0
    ok: int = 0
    failed: int = 0
    in_flight: int = 0
    skipped: int = 0


ProgressCallback = Callable[[Progress], None]


@dataclass
class RunSummary:
    output: Path
    run_id: int = 0
    command: str = "run"
    rows_total: int = 0  # rows in the manifest
    rows_new: int = 0  # never seen by the ledger
    rows_changed: int = 0  # image, prompt or parameters changed since their last outcome
    rows_resumed: int = 0  # pending from an earlier run that stopped (or re-queued by retry)
    rows_retried: int = 0  # failed earlier for a reason that may pass now (timeouts, 5xx, auth...)
    rows_skipped: int = 0  # unchanged and already finished (ok or failed)
    rows_ok: int = 0  # finished ok in this run
    rows_failed: int = 0  # finished failed in this run
    rows_deduplicated: int = 0  # answered from an identical request instead of sending again
    rows_not_run: int = 0  # still pending when the run stopped
    requeued: int = 0  # failed rows put back in the queue by retry
    attempts: int = 0  # requests sent
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bytes_saved: int = 0  # by image pre-flight (resizing, re-encoding), over this run's answers
    # the output file after the run, in output rows (one per choice: request.n: 2 gives two per manifest
    # row): output_rows == output_ok + output_failed
    output_rows: int = 0
    output_ok: int = 0
    output_failed: int = 0
    # manifest rows with an outcome in the output: rows_total == manifest_ok + manifest_failed + rows_not_run
    manifest_ok: int = 0
    manifest_failed: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    stop_reason: str | None = None  # "signal" (Ctrl-C / SIGTERM) or "budget"
    budget_message: str | None = None
    io_error: str | None = None  # a write failed (disk full, I/O error, read-only) and stopped the run
    max_failed_fraction: float = 0.0
    report_path: Path | None = None
    partition_path: Path | None = None
    gallery_path: Path | None = None  # report.gallery: the page written after the run
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def exit_code(self) -> int:
        """0 every output row ok, 1 some rows failed, 4 interrupted (run again to finish), 5 budget reached,
        6 a write failed (fix the disk, run again)."""
        if self.io_error is not None:
            return ExitCode.IO_ERROR
        if self.stop_reason == "budget":
            return ExitCode.BUDGET
        if self.interrupted:
            return ExitCode.INTERRUPTED
        tolerated = self.max_failed_fraction * self.output_ok_or_failed
        return ExitCode.FAILED_ROWS if self.manifest_failed > tolerated else ExitCode.OK

    @property
    def output_ok_or_failed(self) -> int:
        """Manifest rows with an outcome (what ``run.max_failed_fraction`` is a fraction of)."""
        return self.manifest_ok + self.manifest_failed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        for name in ("report_path", "partition_path", "gallery_path"):
            data[name] = str(data[name]) if data[name] is not None else None
        data["errors"] = dict(self.errors)
        return data
