"""The runner: one reader task fills a bounded queue, N workers turn rows into results, one writer
task spools them. It owns the concurrency and nothing else prints; progress goes through a callback.

Per row: load + encode the image, build the body, then ``stream_chat`` under the retry policy. Every
row ends as ``ok`` rows (one per choice) or one ``failed`` row that says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .client import ChatClient, StreamOutcome
from .config import Config
from .errors import ConfigError, EmptyResponse, ImageError, PipelineError
from .images import load_image
from .manifest import ManifestInfo, ManifestReader, Row
from .request import RequestBuilder, render_prompt
from .results import RESULT_COLUMNS, ResultRow, result_schema, rows_from_completion, to_table
from .retry import retry_policy
from .sinks import ResultSpool

log = logging.getLogger("pipeline")

_END = None  # queue sentinel
_WRITE_BATCH = 1000


@dataclass
class Progress:
    """Live counters the CLI's progress bar reads; updated by the runner only."""

    total: int = 0
    done: int = 0
    ok: int = 0
    failed: int = 0
    in_flight: int = 0
    retries: int = 0


@dataclass
class RunSummary:
    output: Path
    rows_total: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    rows_not_run: int = 0
    output_rows: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def exit_code(self) -> int:
        """0 all ok, 1 some rows failed, 4 interrupted (re-run to finish)."""
        if self.interrupted:
            return 4
        return 1 if self.rows_failed else 0


ProgressCallback = Callable[[Progress], None]


@dataclass
class _RowOutcome:
    row: Row
    results: list[ResultRow]


class Runner:
    """Runs one job described by a validated ``Config``."""

    def __init__(self, config: Config, *, on_progress: ProgressCallback | None = None) -> None:
        self.config = config
        self.on_progress = on_progress
        self.progress = Progress()
        self.reader = ManifestReader(config.input, reserved=RESULT_COLUMNS)
        self.builder = RequestBuilder(config.request, config.images)
        self.summary = RunSummary(output=config.output.path)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Stop taking rows; in-flight requests are cancelled and finished results are kept."""
        self._stop.set()

    def check(self) -> ManifestInfo:
        """Everything that can be checked before a request is sent (raises ManifestError/ConfigError)."""
        info = self.reader.check([self.config.request.prompt])
        self._local_faults()
        output = self.config.output
        if output.if_exists == "error" and output.path.exists():
            raise ConfigError(
                f"output.path {output.path} exists and output.if_exists is 'error'; "
                "move it away or set output.if_exists: overwrite"
            )
        return info

    async def run(self) -> RunSummary:
        started = time.monotonic()
        info = await asyncio.to_thread(self.check)
        self.progress.total = self.summary.rows_total = info.rows
        self._notify()
        spool = ResultSpool(_spool_dir(self.config.output.path), result_schema(info.carried))
        spool.open()
        try:
            async with self._endpoint() as base_url:
                pool = self.config.run.concurrency
                async with ChatClient(self.config.endpoint, base_url=base_url, pool_size=pool) as client:
                    await self._run_pool(client, spool)
        except ExceptionGroup as group:
            raise _first_pipeline_error(group) from None
        finally:
            spool.close()
        self.summary.output_rows = await asyncio.to_thread(
            spool.finalize, self.config.output.path, self.config.output.output_format or "parquet"
        )
        self.summary.rows_not_run = self.summary.rows_total - self.progress.done
        self.summary.elapsed_s = time.monotonic() - started
        return self.summary

    @contextlib.asynccontextmanager
    async def _endpoint(self) -> AsyncIterator[str | None]:
        """Start the embedded endpoint in this event loop when ``base_url: local``."""
        endpoint = self.config.endpoint
        if not endpoint.is_local:
            yield None
            return
        from .server import FaultPlan, LocalEndpoint

        local = endpoint.local
        key = endpoint.api_key.get_secret_value() if endpoint.api_key else None
        server = LocalEndpoint(FaultPlan(self._local_faults()), api_key=key, chunk_delay=local.chunk_delay,
                               first_byte_delay=local.first_byte_delay)
        base_url = await server.start()
        try:
            yield base_url
        finally:
            await server.stop()

    def _local_faults(self) -> list[Any]:
        """The embedded endpoint's fault rules, parsed (a bad spec is a config error, caught up front)."""
        if not self.config.endpoint.is_local:
            return []
        from .server import parse_fault_spec

        rules = []
        for index, spec in enumerate(self.config.endpoint.local.faults):
            try:
                rules.append(parse_fault_spec(spec))
            except ValueError as exc:
                raise ConfigError(f"endpoint.local.faults[{index}]: {exc}") from None
        return rules

    async def _run_pool(self, client: ChatClient, spool: ResultSpool) -> None:
        size = self.config.run.concurrency
        rows: asyncio.Queue[Row | None] = asyncio.Queue(maxsize=size * 2)
        results: asyncio.Queue[_RowOutcome | None] = asyncio.Queue(maxsize=size * 2)

        async def work() -> None:
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._feed(rows, size))
                    for _ in range(size):
                        group.create_task(self._work(client, rows, results))
            finally:
                await results.put(_END)

        async with asyncio.TaskGroup() as outer:
            outer.create_task(self._write(results, spool))
            workers = outer.create_task(work())
            watcher = outer.create_task(self._watch_stop(workers))
            workers.add_done_callback(lambda _: watcher.cancel())

    async def _watch_stop(self, workers: asyncio.Task[None]) -> None:
        await self._stop.wait()
        self.summary.interrupted = True
        workers.cancel()

    async def _feed(self, rows: asyncio.Queue[Row | None], workers: int) -> None:
        batches = self.reader.batches()
        while True:
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                break
            for row in batch:
                await rows.put(row)
        for _ in range(workers):
            await rows.put(_END)

    async def _work(self, client: ChatClient, rows: asyncio.Queue[Row | None],
                    results: asyncio.Queue[_RowOutcome | None]) -> None:
        while (row := await rows.get()) is not _END:
            self.progress.in_flight += 1
            try:
                outcome = await self._process(client, row)
            finally:
                self.progress.in_flight -= 1
            await results.put(outcome)

    async def _process(self, client: ChatClient, row: Row) -> _RowOutcome:
        started = _now()
        attempts = 0
        try:
            if not row.path:
                raise ImageError("the path column is empty for this row", error_type="image_missing")
            image = await load_image(row.image_path())
            prompt = row.prompt or render_prompt(self.config.request.prompt, row.columns)
            body = self.builder.build(prompt, image.data_uri)
            retrying = retry_policy(self.config.run)
            async for attempt in retrying:
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    outcome: StreamOutcome = await client.stream_chat(body)
                    if not outcome.completion.choices:
                        raise EmptyResponse("the endpoint finished the stream without any choice")
            self.progress.retries += attempts - 1
            results = rows_from_completion(
                outcome.completion, attempts=attempts, ttft_ms=outcome.ttft_ms,
                latency_ms=outcome.latency_ms, started_at=started, finished_at=_now(),
            )
            return _RowOutcome(row, results)
        except PipelineError as exc:
            self.progress.retries += max(attempts - 1, 0)
            return _RowOutcome(row, [self._failed(row, exc, attempts, started)])
        except Exception as exc:  # a bug must not lose the row: record it and say so loudly
            log.exception("%s: internal error", row.label)
            failure = PipelineError(f"internal error: {type(exc).__name__}: {exc}")
            return _RowOutcome(row, [self._failed(row, failure, attempts, started)])

    def _failed(self, row: Row, exc: PipelineError, attempts: int, started: datetime) -> ResultRow:
        tries = f" after {attempts} attempt(s)" if attempts else ""
        log.warning("%s failed%s: %s: %s", row.label, tries, exc.error_type, exc.message)
        return ResultRow(status="failed", attempts=attempts, error_type=exc.error_type,
                         error_message=exc.message, started_at=started, finished_at=_now())

    async def _write(self, results: asyncio.Queue[_RowOutcome | None], spool: ResultSpool) -> None:
        """Group whatever has queued up into one spool write; flush at the end or every batch."""
        carried = self.reader.carried_columns
        pending: list[dict[str, Any]] = []
        finished = False
        while not finished:
            item = await results.get()
            while True:
                if item is _END:
                    finished = True
                    break
                self._count(item)
                values = {name: item.row.columns.get(name) for name in carried}
                pending.extend(r.record(item.row.seq, item.row.id, item.row.path, values) for r in item.results)
                if results.empty():
                    break
                item = results.get_nowait()
            if pending and (finished or len(pending) >= _WRITE_BATCH):
                spool.write(to_table(pending, spool.schema))
                pending.clear()

    def _count(self, outcome: _RowOutcome) -> None:
        summary, progress = self.summary, self.progress
        first = outcome.results[0]
        progress.done += 1
        summary.attempts += first.attempts
        if first.status == "ok":
            progress.ok += 1
            summary.rows_ok += 1
            summary.prompt_tokens += first.prompt_tokens or 0
            summary.completion_tokens += first.completion_tokens or 0
        else:
            progress.failed += 1
            summary.rows_failed += 1
            summary.errors[first.error_type or "error"] += 1
        self._notify()

    def _notify(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)


def _first_pipeline_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """A job-level failure inside the task groups (say, an unreadable manifest block) as itself."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_pipeline_error(exc)
        if isinstance(exc, PipelineError):
            return exc
    return group


def _spool_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


def _now() -> datetime:
    return datetime.now(UTC)


async def run_job(config: Config, *, on_progress: ProgressCallback | None = None) -> RunSummary:
    """Run a job to the end and return its summary."""
    return await Runner(config, on_progress=on_progress).run()
