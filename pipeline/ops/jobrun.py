"""One run of a job: the plan's checks, the job's lock, the ledger's run record, the engine, the output
and the report. A failed write (``StorageError``: disk full, I/O error, read-only) stops the run: what can
still be recorded (the run's status and summary in the ledger, the report) is, and the error is raised.
The engine gets its endpoint URL from the caller (``pipeline.api`` starts the embedded
endpoint for ``base_url: local``), so nothing here knows about the embedded server.

Every run logs one INFO line when it starts (run id, manifest rows) and one when it ends (rows, exit code,
or the error that ended it), whatever the outcome: an unattended run's log then says that it ran and how
it ended even when nothing went wrong (the CLI's per-run log file takes INFO).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.config import Config
from pipeline.core.errors import ClusterError, ConfigError, PipelineError, StorageError
from pipeline.edges.ledger import JobLock, StateStore, job_lock_path
from pipeline.edges.manifest import ManifestInfo
from pipeline.edges.threads import in_thread
from pipeline.ops.ledgersync import LedgerSync
from pipeline.ops.publish import export_run, owe_partition, publish_report, run_report
from pipeline.run.local import LocalEngine
from pipeline.run.plan import Plan
from pipeline.run.summary import Command, ProgressCallback, RunSummary

log = logging.getLogger("pipeline.ops.jobrun")


class JobRun:
    """Runs one job described by a validated ``Config`` on its engine (``run.engine``), resuming from its ledger."""

    def __init__(self, config: Config, *, on_progress: ProgressCallback | None = None, command: Command = "run",
                 fresh: bool = False, error_type: str | None = None, manifest: Any = None) -> None:
        """``manifest``: a pandas DataFrame or Arrow table read in place of ``input.manifest``."""
        self.config = config
        self.command = command
        self.fresh = fresh
        self.error_type = error_type
        self.plan = Plan(config, table=manifest)
        self.summary = RunSummary(output=config.output.path, command=command,
                                  max_failed_fraction=config.run.max_failed_fraction)
        self.engine = _engine(config, self.plan, self.summary, on_progress)
        self.report: dict[str, Any] = {}

    def stop(self) -> None:
        """Stop taking rows; in-flight requests get ``run.stop_grace`` seconds to finish."""
        self.engine.stop()

    async def run(self, base_url: str | None = None) -> RunSummary:
        """Run to the end (or the stop) against ``base_url`` (default: ``endpoint.base_url``)."""
        if base_url is None and self.config.endpoint.is_local:
            raise ConfigError("endpoint.base_url is 'local': run the job through pipeline.api.run_job_async "
                              "(or the CLI), which starts the embedded endpoint")
        started = time.monotonic()
        info = await asyncio.to_thread(self.plan.check)
        self.summary.rows_total = info.rows
        try:
            await self._run_under_lock(info, base_url, started)
        except StorageError as exc:
            self.summary.io_error = exc.message
            await publish_report(self.config, self.summary, self.report)  # where the disk still allows
            _log_error_end(self.summary, exc)
            raise
        except BaseException as exc:
            _log_error_end(self.summary, exc)
            raise
        failure = await publish_report(self.config, self.summary, self.report)
        if failure is not None:
            self.summary.io_error = failure.message
            _log_error_end(self.summary, failure)
            raise failure
        _log_end(self.summary)
        return self.summary

    async def _run_under_lock(self, info: ManifestInfo, base_url: str | None, started: float) -> None:
        ledger = self.config.ledger_path
        with JobLock(job_lock_path(ledger)):
            if self.fresh:
                _backup(ledger)
            sync = await self._start_sync()
            try:
                await self._run_on_ledger(ledger, info, base_url, started)
            except BaseException:
                if sync is not None:
                    with contextlib.suppress(Exception):  # noqa: BLE001 - the run's own error is the news
                        await in_thread(sync.finish)
                raise
            if sync is not None and (failure := await in_thread(sync.finish)) is not None:
                raise failure

    async def _run_on_ledger(self, ledger: Path, info: ManifestInfo, base_url: str | None, started: float) -> None:
        synchronous = self.config.ledger.synchronous.upper()
        with StateStore(ledger, synchronous=synchronous) as store, \
             StateStore(ledger, synchronous=synchronous) as lookups:
            try:
                await self._run_locked(store, lookups, info, base_url, started)
            except StorageError as exc:
                self._record_storage_failure(store, exc, started)
                raise

    async def _start_sync(self) -> LedgerSync | None:
        """``ledger.sync``: take the lock object and restore the ledger from the store (``--fresh``: keep
        the store's copy out of it; the first save replaces it)."""
        if self.config.ledger.sync is None:
            return None
        loop = asyncio.get_running_loop()
        sync = LedgerSync(self.config, on_lost_lock=lambda: loop.call_soon_threadsafe(self.engine.stop))
        await asyncio.to_thread(sync.start, restore=not self.fresh)
        return sync

    @property
    def config_digest(self) -> str:
        return _config_digest(self.config)

    def _record_storage_failure(self, store: StateStore, exc: StorageError, started: float) -> None:
        """Best effort after a failed write: the run's status and summary in the ledger, and the report
        (built from the ledger, which SQLite kept intact); a second failure must not hide the first."""
        summary = self.summary
        summary.io_error = exc.message
        summary.elapsed_s = time.monotonic() - started
        if not summary.run_id:
            return
        with contextlib.suppress(StorageError):
            store.finish_run(summary.run_id, "failed", summary.to_dict())
        with contextlib.suppress(Exception):  # noqa: BLE001 - a report is a bonus here, the error is the news
            self.report = run_report(self.config, store, summary, self.config_digest)

    async def _run_locked(self, store: StateStore, lookups: StateStore, info: ManifestInfo,
                          base_url: str | None, started: float) -> None:
        summary, digest = self.summary, self.config_digest
        summary.run_id = store.start_run(self.command, digest)
        log.info("%s #%d started: %d manifest rows, output %s", summary.command, summary.run_id, info.rows,
                 summary.output, extra={"event": "run_start", "run_id": summary.run_id,
                                        "command": summary.command, "rows_total": info.rows})
        owe_partition(self.config, store, summary.run_id)
        store.reset_in_flight()
        if self.command == "retry":
            summary.requeued = store.requeue_failed(self.error_type)
        try:
            await self.engine.run(store, lookups, summary.run_id, info, base_url)
        except ExceptionGroup as group:
            error = _first_pipeline_error(group)
            if not isinstance(error, StorageError):
                store.finish_run(summary.run_id, "failed", summary.to_dict())
            raise error from None
        except ClusterError:  # the Ray engine's cluster failed: the run is over, what it recorded stays
            store.finish_run(summary.run_id, "failed", summary.to_dict())
            raise
        await export_run(self.config, self.plan, lookups, info, summary)
        summary.elapsed_s = time.monotonic() - started
        store.finish_run(summary.run_id, "interrupted" if summary.interrupted else "finished", summary.to_dict())
        self.report = run_report(self.config, store, summary, digest)


def _engine(config: Config, plan: Plan, summary: RunSummary, on_progress: ProgressCallback | None) -> LocalEngine:
    """``run.engine``'s engine; Ray is imported only for ``ray`` (a ``ConfigError`` naming the extra when
    it is not installed)."""
    if config.run.engine == "ray":
        from pipeline.run.rayengine import RayEngine

        return RayEngine(config, plan, summary, on_progress=on_progress)
    return LocalEngine(config, plan, summary, on_progress=on_progress)


def _log_end(summary: RunSummary) -> None:
    """The run's last line in the log: how it ended, its rows and its exit code."""
    state = f"stopped ({summary.stop_reason})" if summary.stop_reason else "finished"
    log.info("%s #%d %s in %.1fs: exit code %d; this run %d ok, %d failed; manifest %d rows, %d not run yet; "
             "output %d rows", summary.command, summary.run_id, state, summary.elapsed_s, summary.exit_code,
             summary.rows_ok, summary.rows_failed, summary.rows_total, summary.rows_not_run, summary.output_rows,
             extra={"event": "run_end", "run_id": summary.run_id, "command": summary.command,
                    "exit_code": int(summary.exit_code), "rows_ok": summary.rows_ok,
                    "rows_failed": summary.rows_failed, "rows_total": summary.rows_total,
                    "rows_not_run": summary.rows_not_run, "output_rows": summary.output_rows})


def _log_error_end(summary: RunSummary, exc: BaseException) -> None:
    """An error ended the run: its last line names the error (the CLI maps it to an exit code). Nothing
    when the run never started (the lock was held, the ledger could not be opened)."""
    if not summary.run_id:
        return
    log.info("%s #%d ended by an error after %d ok, %d failed rows: %s: %s", summary.command, summary.run_id,
             summary.rows_ok, summary.rows_failed, type(exc).__name__, exc,
             extra={"event": "run_end", "run_id": summary.run_id, "command": summary.command,
                    "error": type(exc).__name__, "rows_ok": summary.rows_ok, "rows_failed": summary.rows_failed,
                    "rows_total": summary.rows_total})


def _first_pipeline_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """A job-level failure inside the task groups (say, an unreadable manifest block) as itself."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_pipeline_error(exc)
        if isinstance(exc, PipelineError):
            return exc
    return group


def _backup(ledger: Path) -> None:
    """``--fresh``: keep the old ledger (and its WAL files) under a timestamped name."""
    if not ledger.exists():
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        source = ledger.with_name(ledger.name + suffix)
        if source.exists():
            shutil.move(source, ledger.with_name(f"{ledger.name}.bak-{stamp}{suffix}"))


def _config_digest(config: Config) -> str:
    """Identifies the job's settings in the run history (secrets are masked by the dump)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
