"""The runner: one feeder fills a bounded queue with rows that still need work, N workers turn them
into ledger writes through one ``LedgerWriter`` (``writer.py``). Nothing here prints; progress goes
through a callback.

Durability: a worker commits its finished answer before it sends its next request (it may already have
loaded that request's image), so a crash (even SIGKILL) loses at most the requests in flight; an answer
the worker moved on from is never paid for twice. The output file is rebuilt from the ledger at the end
of every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pipeline.core.config import Config
from pipeline.core.errors import (
    BudgetExceeded,
    ConfigError,
    EmptyResponse,
    ExitCode,
    ImageError,
    PipelineError,
)
from pipeline.core.request import (
    RequestBuilder,
    answer_params_digest,
    input_digest,
    render_prompt,
    request_key,
)
from pipeline.core.results import RESULT_COLUMNS, ResultRow, rows_from_completion
from pipeline.core.retry import retry_policy
from pipeline.edges.client import ChatClient, StreamOutcome
from pipeline.edges.images import ImageLoader, ImagePayload
from pipeline.edges.ledger import JobLock, StateStore, Write
from pipeline.edges.manifest import ManifestInfo, ManifestReader, Row
from pipeline.edges.writer import LedgerWriter, Staged, ledger_writer
from pipeline.ops.export import ExportReport, export_output, export_partition
from pipeline.ops.report import (
    build_report,
    notify_wanted,
    post_webhook,
    prometheus_path,
    render_prometheus,
    write_prometheus,
    write_reports,
)
from pipeline.run.gate import RequestGate

log = logging.getLogger("pipeline")

Command = Literal["run", "retry"]
_END: Any = None  # queue sentinel
#: How long after a request goes out its worker starts preparing the next row (see ``_RowAhead``).
PREPARE_AHEAD_DELAY_S = 0.15
#: Request bodies prepared ahead, all workers together, beyond which workers prepare rows only when due.
PREPARE_AHEAD_BYTES = 128 * 1024 * 1024


@dataclass
class Progress:
    """Live counters the CLI's progress bar reads; updated by the runner only."""

    total: int = 0  # rows this run has to do (known once the feeder has seen the whole manifest)
    done: int = 0
    ok: int = 0
    failed: int = 0
    in_flight: int = 0
    skipped: int = 0


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
    output_rows: int = 0
    output_ok: int = 0
    output_failed: int = 0
    elapsed_s: float = 0.0
    interrupted: bool = False
    stop_reason: str | None = None  # "signal" (Ctrl-C / SIGTERM) or "budget"
    budget_message: str | None = None
    max_failed_fraction: float = 0.0
    report_path: Path | None = None
    partition_path: Path | None = None
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def exit_code(self) -> int:
        """0 every output row ok, 1 some rows failed, 4 interrupted (run again to finish), 5 budget reached."""
        if self.stop_reason == "budget":
            return ExitCode.BUDGET
        if self.interrupted:
            return ExitCode.INTERRUPTED
        tolerated = self.max_failed_fraction * self.output_ok_or_failed
        return ExitCode.FAILED_ROWS if self.output_failed > tolerated else ExitCode.OK

    @property
    def output_ok_or_failed(self) -> int:
        return self.output_ok + self.output_failed

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["output"] = str(self.output)
        for name in ("report_path", "partition_path"):
            data[name] = str(data[name]) if data[name] is not None else None
        data["errors"] = dict(self.errors)
        return data


ProgressCallback = Callable[[Progress], None]


@dataclass(slots=True)
class RowTask:
    row: Row
    prompt: str
    digest: str  # input digest: unchanged inputs => unchanged digest


@dataclass(slots=True)
class _Prepared:
    """A row ready to go out: its image loaded and its request body built, or why that failed."""

    task: RowTask
    image: ImagePayload | None = None
    payload: bytes = b""
    key: str = ""
    failure: ImageError | None = None


class _RowAhead:
    """A worker's next row, prepared while the worker's current request waits for its answer.

    Preparing starts ``delay`` after the request went out, off the burst of answers and new requests
    that arrive together at high concurrency, and only while ``room()`` says the bodies prepared ahead
    are not too big; if the answer comes back first, the worker prepares the row itself, so a fast
    endpoint never waits for the delay.
    """

    def __init__(self, prepare: Callable[[], Coroutine[Any, Any, _Prepared | None]],
                 room: Callable[[], bool] = lambda: True) -> None:
        self._prepare = prepare
        self._room = room  # False: too many bytes prepared ahead already; the worker will prepare later
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[_Prepared | None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def schedule(self, delay: float) -> None:
        self._timer = self._loop.call_later(delay, self._start_early)

    async def take(self) -> _Prepared | None:
        self._start()
        task, self._task = self._task, None
        assert task is not None
        return await task

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:
            self._task.cancel()

    def _start_early(self) -> None:
        self._timer = None
        if self._room():
            self._start()

    def _start(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is None:
            self._task = self._loop.create_task(self._prepare())


class Runner:
    """Runs one job described by a validated ``Config``, resuming from its ledger."""

    def __init__(self, config: Config, *, on_progress: ProgressCallback | None = None, command: Command = "run",
                 fresh: bool = False, error_type: str | None = None) -> None:
        self.config = config
        self.on_progress = on_progress
        self.command = command
        self.fresh = fresh
        self.error_type = error_type
        self.progress = Progress()
        self.reader = ManifestReader(config.input, reserved=RESULT_COLUMNS)
        self.builder = RequestBuilder(config.request, config.images)
        self.images = ImageLoader(config.images, root=config.input.root)
        self.params = answer_params_digest(config.request, config.images)
        self.summary = RunSummary(output=config.output.path, command=command,
                                  max_failed_fraction=config.run.max_failed_fraction)
        self.report: dict[str, Any] = {}
        self._stop = asyncio.Event()
        self._single_flight: dict[str, asyncio.Future[Write | None]] = {}
        self._ahead_bytes = 0  # request bodies prepared and not yet taken by their worker
        self.gate = RequestGate.from_config(config)
        self._run_id = 0
        self._manifest_ids = hashlib.sha256()  # every row id in order: the manifest as the output sees it

    def stop(self) -> None:
        """Stop taking rows; in-flight requests get ``run.stop_grace`` seconds to finish."""
        self._stop.set()

    # -- checks --------------------------------------------------------------------------------

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

    def _local_faults(self) -> list[Any]:
        """The embedded endpoint's fault rules, parsed (a bad spec is a config error, caught up front)."""
        if not self.config.endpoint.is_local:
            return []
        from pipeline.server import parse_fault_spec

        rules = []
        for index, spec in enumerate(self.config.endpoint.local.faults):
            try:
                rules.append(parse_fault_spec(spec))
            except ValueError as exc:
                raise ConfigError(f"endpoint.local.faults[{index}]: {exc}") from None
        return rules

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> RunSummary:
        started = time.monotonic()
        info = await asyncio.to_thread(self.check)
        self.summary.rows_total = self.progress.total = info.rows  # narrowed once skipped rows are known
        ledger = self.config.ledger_path
        with JobLock(ledger.with_name(ledger.name + ".lock")):
            if self.fresh:
                _backup(ledger)
            synchronous = self.config.ledger.synchronous.upper()
            with StateStore(ledger, synchronous=synchronous) as store, \
                 StateStore(ledger, synchronous=synchronous) as lookups:
                digest = _config_digest(self.config)
                self._run_id = self.summary.run_id = store.start_run(self.command, digest)
                store.reset_in_flight()
                if self.command == "retry":
                    self.summary.requeued = store.requeue_failed(self.error_type)
                self._notify()
                try:
                    await self._run_pool(store, lookups, info)
                except ExceptionGroup as group:
                    store.finish_run(self._run_id, "failed", self.summary.to_dict())
                    raise _first_pipeline_error(group) from None
                await self._export(lookups, info)
                self.summary.elapsed_s = time.monotonic() - started
                status = "interrupted" if self.summary.interrupted else "finished"
                store.finish_run(self._run_id, status, self.summary.to_dict())
                # built under the lock: a later run that re-sends a request takes over its run id
                self.report = build_report(
                    store, self._run_id, self.summary, config_digest=digest, prices=self.config.limits.prices,
                    default_model=self.config.request.model, exit_code=self.summary.exit_code,
                    secrets=job_secrets(self.config),
                )
        await self._publish(self.report)  # outside the lock: a slow webhook never holds up the next run
        return self.summary

    async def _publish(self, report: dict[str, Any]) -> None:
        """The run report beside the output, the Prometheus textfile, and the webhook; never fatal."""
        config = self.config
        try:
            self.summary.report_path = (await asyncio.to_thread(write_reports, report, config.output.path))[0]
            if config.metrics.prometheus is not None:
                job = config.metrics.job or config.output.path.stem
                text = render_prometheus(report, job)
                await asyncio.to_thread(write_prometheus, text, prometheus_path(config.metrics.prometheus, job))
        except OSError as exc:
            log.warning("could not write the run report: %s", exc)
        if config.notify.webhook_url is not None and notify_wanted(report, config.notify.when):
            await post_webhook(config.notify.webhook_url.get_secret_value(), report, timeout=config.notify.timeout)

    async def _export(self, store: StateStore, info: ManifestInfo) -> None:
        """Rebuild the output from the ledger, unless nothing it depends on changed since the last time."""
        signature = json.dumps({
            "writes": store.writes, "manifest": self._manifest_ids.hexdigest(), "rows": info.rows,
            "output": str(self.config.output.path), "format": self.config.output.output_format,
            "carried": info.carried.names,
        })
        previous = json.loads(store.get_meta("export") or "{}")
        unchanged = previous.get("signature") == signature and self.config.output.path.exists()
        if unchanged:
            report = ExportReport(**previous["report"])
        else:
            report = await asyncio.to_thread(export_output, self.config, self.reader, store, info.carried)
            store.set_meta("export", json.dumps({"signature": signature, "report": asdict(report)}))
        if self.config.output.partition_by == "run_date" and not unchanged:
            self.summary.partition_path = await asyncio.to_thread(
                export_partition, self.config, self.reader, store, self._run_id, info.carried)
        summary = self.summary
        summary.output_rows, summary.output_ok, summary.output_failed = report.rows, report.ok, report.failed
        summary.rows_not_run = summary.rows_total - report.manifest_rows_done

    async def _run_pool(self, store: StateStore, lookups: StateStore, info: ManifestInfo) -> None:
        size = self.config.run.concurrency
        rows: asyncio.Queue[RowTask | None] = asyncio.Queue(maxsize=size * 2)
        async with self._endpoint() as base_url, self.images, \
                ChatClient(self.config.endpoint, base_url=base_url, pool_size=size) as client:
            writer = ledger_writer(store, self._run_id, self._count)
            try:
                async with asyncio.TaskGroup() as group:
                    feeder = group.create_task(self._feed(rows, size, info))
                    workers = [group.create_task(self._work(client, lookups, rows, writer)) for _ in range(size)]
                    watcher = group.create_task(self._watch_stop(feeder, rows, workers))
                    await asyncio.wait(workers)
                    watcher.cancel()
            except BaseException:
                with contextlib.suppress(Exception):  # keep what can be kept; the first failure is the news
                    await writer.close()
                raise
            await writer.close()

    @contextlib.asynccontextmanager
    async def _endpoint(self) -> AsyncIterator[str | None]:
        """Start the embedded endpoint in this event loop when ``base_url: local``."""
        endpoint = self.config.endpoint
        if not endpoint.is_local:
            yield None
            return
        from pipeline.server import FaultPlan, LocalEndpoint

        local = endpoint.local
        key = endpoint.api_key.get_secret_value() if endpoint.api_key else None
        server = LocalEndpoint(FaultPlan(self._local_faults()), api_key=key, chunk_delay=local.chunk_delay,
                               first_byte_delay=local.first_byte_delay)
        base_url = await server.start()
        try:
            yield base_url
        finally:
            await server.stop()

    async def _watch_stop(self, feeder: asyncio.Task[None], rows: asyncio.Queue[RowTask | None],
                          workers: list[asyncio.Task[None]]) -> None:
        """On stop: no new rows; in-flight rows get the grace period, then are cancelled."""
        await self._stop.wait()
        self.summary.interrupted = True
        self.summary.stop_reason = self.summary.stop_reason or "signal"
        feeder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feeder
        while not rows.empty():
            rows.get_nowait()
        for _ in workers:
            rows.put_nowait(_END)
        _, late = await asyncio.wait(workers, timeout=self.config.run.stop_grace)
        for task in late:
            task.cancel()

    # -- feeding -------------------------------------------------------------------------------

    async def _feed(self, rows: asyncio.Queue[RowTask | None], workers: int, info: ManifestInfo) -> None:
        """Walk the manifest; queue rows whose inputs changed or that have no finished outcome."""
        synchronous = self.config.ledger.synchronous.upper()
        with StateStore(self.config.ledger_path, synchronous=synchronous) as store:
            batches = self.reader.batches()
            while True:
                batch = await asyncio.to_thread(next, batches, None)
                if batch is None:
                    break
                tasks = await asyncio.to_thread(self.triage, batch, store)
                for task in tasks:
                    await rows.put(task)
        self.progress.total = info.rows - self.summary.rows_skipped
        self._notify()
        for _ in range(workers):
            await rows.put(_END)

    def triage(self, batch: list[Row], store: StateStore | None) -> list[RowTask]:
        """The rows of ``batch`` that need work, counted into the summary by why (new, changed, ...).

        Runs in a thread: one ledger query for the batch and one ``stat`` per row, no image reads.
        """
        ids = [row.id for row in batch]
        self._manifest_ids.update("\0".join(ids).encode())
        self._manifest_ids.update(b"\1")
        states = store.item_states(ids) if store is not None else {}
        fingerprint = self.images.fingerprint
        template, summary = self.config.request.prompt, self.summary
        tasks = []
        for row in batch:
            prompt = row.prompt or render_prompt(template, row.columns)
            digest = input_digest(self.params, fingerprint(row.path, row.base_dir), prompt)
            state = states.get(row.id)
            if state is None:
                summary.rows_new += 1
            elif state.input_digest != digest:
                summary.rows_changed += 1
            elif state.settled:
                summary.rows_skipped += 1
                continue
            elif state.status == "failed":
                summary.rows_retried += 1
            else:
                summary.rows_resumed += 1
            tasks.append(RowTask(row, prompt, digest))
        self.progress.skipped = summary.rows_skipped
        return tasks

    # -- working -------------------------------------------------------------------------------

    async def _work(self, client: ChatClient, lookups: StateStore, rows: asyncio.Queue[RowTask | None],
                    writer: LedgerWriter) -> None:
        ahead = _RowAhead(lambda: self._prepare_next(rows), lambda: self._ahead_bytes < PREPARE_AHEAD_BYTES)
        try:
            while (prepared := await ahead.take()) is not _END and not self._stop.is_set():
                self._ahead_bytes -= len(prepared.payload)
                ahead.schedule(PREPARE_AHEAD_DELAY_S)
                self.progress.in_flight += 1
                try:
                    write = await self._process(prepared, client, lookups, writer)
                finally:
                    self.progress.in_flight -= 1
                if write is not None:  # None: not finished (the budget stopped the run), stays to do
                    await writer.commit(write)  # write-ahead: durable before this worker sends again
        finally:
            ahead.cancel()

    async def _prepare_next(self, rows: asyncio.Queue[RowTask | None]) -> _Prepared | None:
        """The next row from the feeder with its image loaded and its body built (``_END`` at the end)."""
        task = await rows.get()
        if task is _END:
            return _END
        row = task.row
        try:
            if not row.path:
                raise ImageError("the path column is empty for this row", error_type="image_missing")
            image = await self.images.load(row.path, row.base_dir)
        except ImageError as exc:
            return _Prepared(task, failure=exc)
        payload = self.builder.build_payload(task.prompt, image.url)
        self._ahead_bytes += len(payload)
        return _Prepared(task, image, payload, request_key(self.params, image.sha256, task.prompt))

    async def _process(self, prepared: _Prepared, client: ChatClient, lookups: StateStore,
                       writer: LedgerWriter) -> Write | Staged | None:
        task = prepared.task
        row, items, key = task.row, ((task.row.id, task.digest),), prepared.key
        started = _now()
        if prepared.image is None:
            assert prepared.failure is not None
            return self._failure(f"image:{task.digest}", row, prepared.failure, 0, started, items)
        if lookups.answered(key):
            self.summary.rows_deduplicated += 1
            return Write(key, None, items=items)
        if (twin := self._single_flight.get(key)) is not None:
            first = await twin
            if first is None:
                return None
            self.summary.rows_deduplicated += 1
            return Write(key, None, error_type=first.error_type, items=items)
        future: asyncio.Future[Write | None] = asyncio.get_running_loop().create_future()
        self._single_flight[key] = future
        try:
            writer.mark(Write(key, "in_flight", items=items))
            done = await self._send(client, writer, key, row, prepared.image, task.prompt, started, items,
                                    prepared.payload)
            future.set_result(done.write if isinstance(done, Staged) else done)
            return done
        finally:
            if not future.done():
                future.cancel()
            del self._single_flight[key]

    async def _send(self, client: ChatClient, writer: LedgerWriter, key: str, row: Row, image: ImagePayload,
                    prompt: str, started: datetime, items: tuple[tuple[str, str], ...],
                    payload: bytes) -> Write | Staged | None:
        """Send under the gate and the retry policy; None when the budget stopped the run first.

        A good answer is staged with the writer the moment it is complete (``on_answer``), so it shares a
        commit with the other answers of its burst; the write comes back as that ``Staged`` handle."""
        size = (image.report.get("sent_width"), image.report.get("sent_height"))
        estimate = self.gate.estimate(lambda: self.builder.build(prompt, ""),  # text, image parts, max_tokens
                                      size if None not in size else None)  # type: ignore[arg-type]
        sent = 0
        staged: Staged | None = None

        def on_answer(outcome: StreamOutcome) -> None:
            nonlocal staged
            if outcome.completion.choices and staged is None:
                staged = writer.stage(self._answer(key, outcome, sent, started, items, image))

        async def send_once(body: bytes) -> StreamOutcome:
            nonlocal sent
            sent += 1
            outcome = await client.stream_chat(body, on_answer)
            if not outcome.completion.choices:
                raise EmptyResponse("the endpoint finished the stream without any choice")
            return outcome

        try:
            try:  # the common case, one attempt, costs no retry machinery
                outcome = await self.gate.send(send_once, payload, estimate)
            except PipelineError as exc:
                if not exc.retryable or self.config.run.max_attempts == 1:
                    raise
                outcome = await self._retry(send_once, payload, estimate, exc)
        except BudgetExceeded as exc:
            self._stop_for_budget(exc)
            return staged  # None unless the answer came in before the budget said stop
        except PipelineError as exc:
            # an answer already staged stands: whatever failed came after it (and it will be committed)
            return staged or self._failure(key, row, exc, sent, started, items, image.report)
        except Exception as exc:  # a bug must not lose the row: record it and say so loudly
            log.exception("%s: internal error", row.label)
            failure = PipelineError(f"internal error: {type(exc).__name__}: {exc}")
            return staged or self._failure(key, row, failure, sent, started, items, image.report)
        return staged if staged is not None else self._answer(key, outcome, sent, started, items, image)

    def _answer(self, key: str, outcome: StreamOutcome, attempts: int, started: datetime,
                items: tuple[tuple[str, str], ...], image: ImagePayload) -> Write:
        results = rows_from_completion(
            outcome.completion, attempts=attempts, ttft_ms=outcome.ttft_ms, latency_ms=outcome.latency_ms,
            started_at=started, finished_at=_now(), image=image.report,
        )
        return Write(key, "ok", attempts, results=[r.to_json() for r in results], items=items)

    async def _retry(self, send_once: Any, payload: bytes, estimate: Any, first: PipelineError) -> StreamOutcome:
        """Attempts 2..max_attempts under the tenacity policy; attempt 1 replays the failure we saw."""
        async for attempt in retry_policy(self.config.run, max_server_wait=self.config.limits.max_retry_wait):
            with attempt:
                if attempt.retry_state.attempt_number == 1:
                    raise first
                outcome: StreamOutcome = await self.gate.send(send_once, payload, estimate)
        return outcome

    def _stop_for_budget(self, exc: BudgetExceeded) -> None:
        if self.summary.stop_reason is None:
            log.warning("%s", exc.message)
            self.summary.stop_reason = "budget"
            self.summary.budget_message = exc.message
        self.stop()

    def _failure(self, key: str, row: Row, exc: PipelineError, attempts: int, started: datetime,
                 items: tuple[tuple[str, str], ...], image: dict[str, Any] | None = None) -> Write:
        tries = f" after {attempts} attempt(s)" if attempts else ""
        log.warning("%s failed%s: %s: %s", row.label, tries, exc.error_type, exc.message)
        result = ResultRow(status="failed", attempts=attempts, error_type=exc.error_type, error_message=exc.message,
                           started_at=started, finished_at=_now(), **(image or {}))
        return Write(key, "failed", attempts, exc.error_type, exc.message, [result.to_json()], items,
                     final=exc.row_specific)

    # -- counting ------------------------------------------------------------------------------

    def _count(self, write: Write) -> None:
        summary, progress = self.summary, self.progress
        progress.done += 1
        summary.attempts += write.attempts if write.status else 0
        if write.status == "failed" or (write.status is None and write.error_type):
            progress.failed += 1
            summary.rows_failed += 1
            summary.errors[write.error_type or "error"] += 1
        else:
            progress.ok += 1
            summary.rows_ok += 1
            first = write.results[0] if write.results else {}
            summary.prompt_tokens += first.get("prompt_tokens") or 0
            summary.completion_tokens += first.get("completion_tokens") or 0
            if first.get("image_bytes") is not None and first.get("sent_bytes") is not None:
                summary.bytes_saved += first["image_bytes"] - first["sent_bytes"]
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


def _backup(ledger: Path) -> None:
    """``--fresh``: keep the old ledger (and its WAL files) under a timestamped name."""
    if not ledger.exists():
        return
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        source = ledger.with_name(ledger.name + suffix)
        if source.exists():
            shutil.move(source, ledger.with_name(f"{ledger.name}.bak-{stamp}{suffix}"))


def job_secrets(config: Config) -> list[str]:
    """Values that must never appear in logs or reports: the API key and the webhook URL."""
    secrets = [config.endpoint.api_key, config.notify.webhook_url]
    return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]


def _config_digest(config: Config) -> str:
    """Identifies the job's settings in the run history (secrets are masked by the dump)."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]


def _now() -> datetime:
    return datetime.now(UTC)


async def run_job(config: Config, *, on_progress: ProgressCallback | None = None) -> RunSummary:
    """Run a job to the end (resuming from its ledger) and return its summary."""
    return await Runner(config, on_progress=on_progress).run()
