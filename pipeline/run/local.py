"""The local engine: one feeder fills a bounded queue with the plan's row tasks, N workers turn them into
ledger writes through one ``LedgerWriter`` (``edges/writer.py``), each with the one ``RowProcessor``.
Nothing here prints; progress goes through a callback.

Durability: a worker commits its finished answer before it sends its next request (it may already have
loaded that request's image), so a crash (even SIGKILL) loses at most the requests in flight; an answer
the worker moved on from is never paid for twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from pipeline.core.config import Config
from pipeline.edges.ledger import StateStore, Write
from pipeline.edges.manifest import ManifestInfo, Row
from pipeline.edges.threads import in_thread
from pipeline.edges.writer import InlineWriter, LedgerWriter, Staged, ledger_writer
from pipeline.run.plan import Plan, RowTask
from pipeline.run.processor import PreparedRow, RowOutcome, RowProcessor
from pipeline.run.summary import Progress, ProgressCallback, RunSummary

log = logging.getLogger("pipeline")

_END: Any = None  # queue sentinel
#: How long after a request goes out its worker starts preparing the next row (see ``_RowAhead``).
PREPARE_AHEAD_DELAY_S = 0.15
#: Request bodies prepared ahead, all workers together, beyond which workers prepare rows only when due.
PREPARE_AHEAD_BYTES = 128 * 1024 * 1024

RowItems = tuple[tuple[str, str], ...]  # (row id, input digest) of the manifest rows a request answers


class _RowAhead:
    """A worker's next row, prepared while the worker's current request waits for its answer.

    Preparing starts ``delay`` after the request went out, off the burst of answers and new requests
    that arrive together at high concurrency, and only while ``room()`` says the bodies prepared ahead
    are not too big; if the answer comes back first, the worker prepares the row itself, so a fast
    endpoint never waits for the delay.
    """

    def __init__(self, prepare: Callable[[], Coroutine[Any, Any, PreparedRow | None]],
                 room: Callable[[], bool] = lambda: True) -> None:
        self._prepare = prepare
        self._room = room  # False: too many bytes prepared ahead already; the worker will prepare later
        self._loop = asyncio.get_running_loop()
        self._task: asyncio.Task[PreparedRow | None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def schedule(self, delay: float) -> None:
        self._timer = self._loop.call_later(delay, self._start_early)

    async def take(self) -> PreparedRow | None:
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


class LocalEngine:
    """Runs a plan's rows through a pool of ``run.concurrency`` workers in this event loop."""

    def __init__(self, config: Config, plan: Plan, summary: RunSummary, *,
                 on_progress: ProgressCallback | None = None) -> None:
        """``summary`` is filled in as rows finish (and with the plan's triage counts as it goes)."""
        self.config = config
        self.plan = plan
        self.summary = summary
        self.progress = Progress()
        self.on_progress = on_progress
        self._stop = asyncio.Event()
        self._single_flight: dict[str, asyncio.Future[Write | None]] = {}
        self._ahead_bytes = 0  # request bodies prepared and not yet taken by their worker
        self._stages = False  # the ledger writer takes answers as they complete (see ``InlineWriter.stage``)

    def stop(self) -> None:
        """Stop taking rows; in-flight requests get ``run.stop_grace`` seconds to finish."""
        self._stop.set()

    async def run(self, store: StateStore, lookups: StateStore, run_id: int, info: ManifestInfo,
                  base_url: str | None) -> None:
        """Work through the plan's rows, writing outcomes to ``store`` (``lookups``: a second connection
        for the reads workers make while the writer commits)."""
        self.progress.total = self.summary.rows_total  # narrowed once skipped rows are known
        self._notify()
        with fewer_collections():
            await self._run(store, lookups, run_id, info, base_url)

    async def _run(self, store: StateStore, lookups: StateStore, run_id: int, info: ManifestInfo,
                   base_url: str | None) -> None:
        size = self.config.run.concurrency
        rows: asyncio.Queue[RowTask | None] = asyncio.Queue(maxsize=size * 2)
        async with RowProcessor(self.config, base_url=base_url, pool_size=size) as processor:
            writer = ledger_writer(store, run_id, self._count)
            self._stages = isinstance(writer, InlineWriter)
            try:
                async with asyncio.TaskGroup() as group:
                    feeder = group.create_task(self._feed(rows, size, info, run_id))
                    workers = [group.create_task(self._work(processor, lookups, rows, writer)) for _ in range(size)]
                    watcher = group.create_task(self._watch_stop(feeder, rows, workers))
                    await asyncio.wait(workers)
                    watcher.cancel()
            except BaseException:
                with contextlib.suppress(Exception):  # keep what can be kept; the first failure is the news
                    await writer.close()
                raise
            await writer.close()

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

    async def _feed(self, rows: asyncio.Queue[RowTask | None], workers: int, info: ManifestInfo,
                    run_id: int) -> None:
        """Walk the manifest; queue rows whose inputs changed or that have no finished outcome: first the
        rows the ledger has never seen, then (a second walk, only if the first met known rows) the known
        ones, so a restart after many done rows sends at once (see ``Plan.triage_unseen``)."""
        synchronous = self.config.ledger.synchronous.upper()
        with StateStore(self.config.ledger_path, synchronous=synchronous) as store:
            known = 0

            def unseen(batch: list[Row]) -> list[RowTask]:
                nonlocal known
                tasks, left = self.plan.triage_unseen(batch, store)
                known += left
                return tasks

            await self._feed_pass(rows, unseen)
            if known:
                await self._feed_pass(rows, lambda batch: self.plan.triage_seen(batch, store, run_id))
        self.progress.total = info.rows - self.summary.rows_skipped
        self._notify()
        for _ in range(workers):
            await rows.put(_END)

    async def _feed_pass(self, rows: asyncio.Queue[RowTask | None],
                         triage: Callable[[list[Row]], list[RowTask]]) -> None:
        """One walk over the manifest, each batch triaged in a thread and its tasks queued."""
        batches = self.plan.batches()
        while (batch := await in_thread(next, batches, None)) is not None:
            tasks = await in_thread(triage, batch)  # a stop waits for it: it reads the ledger
            self._take_triage_counts()
            for task in tasks:
                await rows.put(task)

    def _take_triage_counts(self) -> None:
        counts, summary = self.plan.counts, self.summary
        summary.rows_new, summary.rows_changed = counts.new, counts.changed
        summary.rows_resumed, summary.rows_retried = counts.resumed, counts.retried
        summary.rows_skipped = self.progress.skipped = counts.skipped

    # -- working -------------------------------------------------------------------------------

    async def _work(self, processor: RowProcessor, lookups: StateStore, rows: asyncio.Queue[RowTask | None],
                    writer: LedgerWriter) -> None:
        ahead = _RowAhead(lambda: self._prepare_next(processor, rows),
                          lambda: self._ahead_bytes < PREPARE_AHEAD_BYTES)
        try:
            while (prepared := await ahead.take()) is not _END and not self._stop.is_set():
                self._ahead_bytes -= len(prepared.payload)
                ahead.schedule(PREPARE_AHEAD_DELAY_S)
                self.progress.in_flight += 1
                try:
                    write = await self._process(prepared, processor, lookups, writer)
                finally:
                    self.progress.in_flight -= 1
                if write is not None:  # None: not finished (the budget stopped the run), stays to do
                    await writer.commit(write)  # write-ahead: durable before this worker sends again
        finally:
            ahead.cancel()

    async def _prepare_next(self, processor: RowProcessor, rows: asyncio.Queue[RowTask | None]) -> PreparedRow | None:
        """The next row from the feeder with its image loaded and its body built (``_END`` at the end)."""
        task = await rows.get()
        if task is _END:
            return _END
        prepared = await processor.prepare(task)
        self._ahead_bytes += len(prepared.payload)
        return prepared

    async def _process(self, prepared: PreparedRow, processor: RowProcessor, lookups: StateStore,
                       writer: LedgerWriter) -> Write | Staged | None:
        """One row: answered from the ledger or an identical request in flight when it can, else sent."""
        task = prepared.task
        items, key = ((task.row.id, task.digest),), prepared.key
        if prepared.failure is not None:
            return as_write(await processor.send(prepared), items)
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
            done = await self._send(prepared, processor, writer, items)
            future.set_result(done.write if isinstance(done, Staged) else done)
            return done
        finally:
            if not future.done():
                future.cancel()
            del self._single_flight[key]

    async def _send(self, prepared: PreparedRow, processor: RowProcessor, writer: LedgerWriter,
                    items: RowItems) -> Write | Staged | None:
        """Send; None when the budget stopped the run first. A good answer is staged with the writer the
        moment it is complete, so it shares a commit with the other answers of its burst; the write then
        comes back as that ``Staged`` handle."""
        staged: Staged | None = None

        def stage(outcome: RowOutcome) -> None:
            nonlocal staged
            staged = writer.stage(as_write(outcome, items))

        outcome = await processor.send(prepared, stage if self._stages else None)
        if outcome.budget_stop is not None:
            self._stop_for_budget(outcome.budget_stop)
        if staged is not None:
            return staged
        return as_write(outcome, items) if outcome.status is not None else None

    def _stop_for_budget(self, message: str) -> None:
        if self.summary.stop_reason is None:
            log.warning("%s", message)
            self.summary.stop_reason = "budget"
            self.summary.budget_message = message
        self.stop()

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


#: Container allocations between two passes of the cyclic collector's youngest generation while rows flow.
GC_THRESHOLD = 50_000
_gc_lock = threading.Lock()
_gc_runs = 0  # engines running in this process: the first one in tunes the collector, the last one out restores it
_gc_saved = gc.get_threshold()


@contextlib.contextmanager
def fewer_collections(threshold: int = GC_THRESHOLD) -> Iterator[None]:
    """Run the cyclic garbage collector less often while rows flow (restored when the last run ends).

    Why: every streamed token allocates a few containers (the parsed JSON chunk: dict, list, dicts) that
    reference counting frees at once, so with the default threshold (700) the collector ran every hundred-odd
    tokens and walked the young objects each time: about 7% of the client's core at 512 streams (perf, scenario
    b). Cycles are still collected, at most ``threshold`` allocations late (a bounded few MB); ``gc.freeze`` moves
    what start-up built (config, plan, modules, the ledger's caches) out of every later full pass. Counted, so
    runs that overlap in one process (the API, tests) restore the collector only when the last one ends.
    """
    global _gc_runs, _gc_saved
    with _gc_lock:
        if _gc_runs == 0:
            _gc_saved = gc.get_threshold()
            gc.freeze()
            gc.set_threshold(max(threshold, _gc_saved[0]), *_gc_saved[1:])
        _gc_runs += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_runs -= 1
            if _gc_runs == 0:
                gc.set_threshold(*_gc_saved)
                gc.unfreeze()


def as_write(outcome: RowOutcome, items: RowItems) -> Write:
    """A row outcome as the ledger stores it, mapped to the manifest rows it answers."""
    return Write(outcome.key, outcome.status, outcome.attempts, outcome.error_type, outcome.error_message,
                 outcome.results, items, outcome.final)
