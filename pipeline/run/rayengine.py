"""The Ray engine (``run.engine: ray``): the same job spread over a Ray cluster with Ray Data.

The only module that imports Ray (an import-linter contract says so). What stays on the driver is what
the local engine does around its workers, reused, not copied: the plan triages the manifest against the
ledger (so resume means exactly what it means locally), the ledger writer records every outcome
(``edges/writer.py``), the counters and the budget stop are ``LocalEngine``'s. What moves to the cluster
is the row processor: the pending rows' tasks are cut into blocks of ``ray.rows_per_block`` rows and an
actor pool (``ray.actors`` actors of ``ray.cpus_per_actor`` CPUs) runs each block through one
``RowProcessor`` per actor. An actor returns one outcome per row and never raises: a UDF that raises
aborts a Ray Data job, and a failed row is a row.

Why the blocks are cut on the driver (``ray.put`` of small Arrow tables, then ``from_arrow_refs``):
``repartition`` runs a task that needs a whole CPU, and on small nodes whose CPUs the actors partly hold
it never starts (measured, Ray 2.60). Pre-flight (image loading, decode, resize, the request body) runs
before the actors, as tasks of ``ray.preflight_cpus`` CPUs spread over the cluster (``raypreflight.py``):
the actors get prepared rows and only send.

Durability: an outcome is committed when its block comes back to the driver. A rerun after a lost
driver, actor or node sends again only rows without an outcome, so the re-sends are bounded by the
blocks that were in flight; a block Ray retries after a killed actor is sent again whole (its answers
are paid twice), which is why blocks are small. The driver marks the rows of the blocks the actors can
hold ``in_flight`` (``_Book``), sends one row of each set of rows with the same input digest and gives
its outcome to the others (as the local engine answers identical requests once), and on a stop shuts
the Ray job down at once (``_halt``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import pickle
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.core.config import Config
from pipeline.core.errors import ClusterError, ConfigError, PipelineError
from pipeline.core.results import ResultRow
from pipeline.edges.ledger import StateStore, Write
from pipeline.edges.manifest import ManifestInfo
from pipeline.edges.threads import in_thread
from pipeline.edges.writer import LedgerWriter, ledger_writer
from pipeline.run.local import LocalEngine, as_write
from pipeline.run.plan import Plan, RowTask
from pipeline.run.processor import PreparedRow, RowOutcome, RowProcessor
from pipeline.run.raypreflight import PREPARED, preflight_block, task_cpus, task_threads
from pipeline.run.summary import ProgressCallback, RunSummary

try:
    import ray
    import ray.data
    import ray.exceptions
except ImportError:  # the extra is missing: say which one, once, before anything is sent
    raise ConfigError("run.engine is 'ray' but Ray is not installed: pip install 'pipeline[ray]' "
                      "(or run with --engine local)") from None

log = logging.getLogger("pipeline")

#: Blocks an actor holds at once: Ray Data runs that many calls of an async UDF together on one actor
#: (its default, made explicit because it bounds what a lost actor costs: these blocks are sent again).
BLOCKS_PER_ACTOR = 4
#: Columns of a block going out (``task``: the pickled ``RowTask``; the pre-flight stage swaps it for
#: ``prepared``) and coming back (``outcome``).
_KEYS = ("seq", "row_id", "digest")
#: Memory one pre-flight task asks Ray for, per pixel thread: the rows it holds at once (a 12 MP photo
#: read, decoded in draft mode, resized and re-encoded: ~15 MB each, ``ROWS_PER_THREAD`` of them). Asked
#: for a second reason too: remote arguments that differ keep Ray Data from fusing the stage into the
#: actors' operator (with ``preflight_cpus == cpus_per_actor`` it would, and pre-flight would run in the
#: actors again).
PREFLIGHT_MEMORY_PER_THREAD = 64 * 1024 * 1024


def actor_config(config: Config) -> Config:
    """The config one actor runs with: ``run.concurrency``, the rate limits and the budgets are job totals,
    so each of the ``ray.actors`` actors gets its share (AIMD and the breaker then act per actor)."""
    actors = config.ray.actors
    share = max(1, config.run.concurrency // actors)
    limits = config.limits
    update: dict[str, Any] = {"min_concurrency": min(limits.min_concurrency, share)}
    for name in ("requests_per_minute", "tokens_per_minute", "max_cost"):
        if (value := getattr(limits, name)) is not None:
            update[name] = value / actors
    for name in ("max_requests", "max_total_tokens"):
        if (value := getattr(limits, name)) is not None:
            update[name] = max(1, value // actors)
    root = config.input.root
    return config.model_copy(update={
        # pre-flight runs in Ray tasks sized by ray.preflight_cpus: threads there, not a process pool of its own
        "run": config.run.model_copy(update={"concurrency": share, "preflight_pool": "thread"}),
        "limits": limits.model_copy(update=update),
        # an actor runs in another folder (or on another machine): relative paths are the driver's
        "input": config.input.model_copy(update={"root": root.absolute() if root is not None else None}),
    })


class CaptionActor:
    """One actor of the pool: a ``RowProcessor`` opened lazily on the actor's event loop (Ray Data runs an
    async UDF on a loop of its own, in its own thread) and closed on teardown. Blocks that arrive together
    share the processor, whose gate keeps this actor's share of the limits."""

    def __init__(self, config: Config, base_url: str | None) -> None:
        self._config = config
        self._base_url = base_url
        self._processor: RowProcessor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._opening: asyncio.Lock | None = None
        self._rows: asyncio.Semaphore | None = None

    async def __call__(self, batch: pa.Table) -> pa.Table:
        """One outcome per input row, in order; never raises (a raising UDF would abort the whole job)."""
        keys = [batch.column(name).to_pylist() for name in _KEYS]
        try:
            processor = await self._open()
            rows = [pickle.loads(blob) for blob in batch.column(PREPARED).to_pylist()]
            outcomes = await asyncio.gather(*(self._one(processor, row) for row in rows))
        except Exception as exc:  # noqa: BLE001 - every row of the block fails, and says why
            log.exception("ray actor: a block of %d rows failed", batch.num_rows)
            outcomes = [_internal_failure(digest, exc) for digest in keys[2]]
        return _outcome_table(keys, outcomes)

    async def _open(self) -> RowProcessor:
        if self._opening is None:
            self._opening = asyncio.Lock()
            self._rows = asyncio.Semaphore(2 * self._config.run.concurrency)  # bodies prepared, bounded
        async with self._opening:
            if self._processor is None:
                processor = RowProcessor(self._config, base_url=self._base_url)
                await processor.__aenter__()
                self._processor, self._loop = processor, asyncio.get_running_loop()
        return self._processor

    async def _one(self, processor: RowProcessor, prepared: PreparedRow) -> RowOutcome:
        """Send one row the pre-flight stage prepared (a row it could not prepare fails here, unsent)."""
        assert self._rows is not None
        async with self._rows:
            try:
                return await processor.send(prepared)
            except Exception as exc:  # noqa: BLE001 - the processor keeps rows; this is a last guard
                log.exception("%s: internal error in the ray actor", prepared.task.row.label)
                return _internal_failure(prepared.task.digest, exc)

    def __del__(self) -> None:
        """Teardown (Ray Data drops the UDF when the pool shuts down): close the HTTP pool on its loop."""
        processor, loop = self._processor, self._loop
        if processor is None or loop is None or not loop.is_running():
            return
        self._processor = None
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(processor.__aexit__(None, None, None), loop).result(timeout=10)


def _internal_failure(digest: str, exc: BaseException) -> RowOutcome:
    """A row the actor could not run at all (not a failure of the row itself: a later run retries it)."""
    message = f"internal error in the ray actor: {type(exc).__name__}: {exc}"
    if isinstance(exc, PipelineError):
        message = exc.message
    now = datetime.now(UTC)
    result = ResultRow(status="failed", attempts=0, error_type="error", error_message=message,
                       started_at=now, finished_at=now)
    return RowOutcome(f"image:{digest}", "failed", 0, "error", message, [result.to_json()])


def _outcome_table(keys: list[list[Any]], outcomes: list[RowOutcome]) -> pa.Table:
    columns: dict[str, Any] = dict(zip(_KEYS, keys, strict=True))
    columns["outcome"] = pa.array([pickle.dumps(o) for o in outcomes], pa.binary())
    return pa.table(columns)


def _task_table(tasks: list[RowTask]) -> pa.Table:
    """A block of row tasks; a relative image folder is made absolute (the actor runs elsewhere)."""
    rows = [task.row for task in tasks]
    portable = [dataclasses.replace(task, row=dataclasses.replace(task.row, base_dir=task.row.base_dir.absolute()))
                if isinstance(task.row.base_dir, Path) else task for task in tasks]
    return pa.table({
        "seq": pa.array([row.seq for row in rows], pa.int64()),
        "row_id": pa.array([row.id for row in rows], pa.string()),
        "digest": pa.array([task.digest for task in tasks], pa.string()),
        "task": pa.array([pickle.dumps(task) for task in portable], pa.binary()),
    })


def _join(address: str | None) -> None:
    """``ray.init`` for ``ray.address``; a cluster that cannot be joined is a ``ClusterError`` naming it.
    A ``host:port`` address is probed first: ``ray.init`` retries an address where nothing listens for
    minutes, a refused connection says at once that the head is not there."""
    host, _, port = (address or "").rpartition(":")
    try:
        if host and port.isdigit() and "://" not in address:  # type: ignore[operator]
            socket.create_connection((host, int(port)), timeout=10).close()
        local = starts_local(address)
        ray.init(**init_options(address, local=local))
        if local:
            log.info("ray engine: started a local Ray for this run on %s", ray.util.get_node_ip_address())
    except (OSError, RuntimeError, ValueError, ray.exceptions.RayError) as exc:
        where = address or "RAY_ADDRESS / a local Ray"
        raise ClusterError(f"ray.address {where}: cannot join the Ray cluster: {_first_line(exc)}; start it "
                           "(ray start --head) or fix ray.address") from None


def starts_local(address: str | None) -> bool:
    """True when ``ray.init`` would start a Ray of its own: ``ray.address`` is null and Ray finds no cluster
    to join (neither ``RAY_ADDRESS`` nor a cluster ``ray start`` left on this machine). Asked of Ray's own
    resolver (2.60; private, so a Ray without it counts as joining), which reads the environment itself."""
    if address is not None:
        return False
    try:
        from ray._private.services import canonicalize_bootstrap_address
        return canonicalize_bootstrap_address(None) is None
    except Exception:  # noqa: BLE001 - an unknown Ray: let ray.init decide as before
        return False


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


#: The node address of a Ray a run starts for itself (on Linux, where every 127.x address is loopback): Ray
#: would register a local Ray on the host's outward address (it rewrites 127.0.0.1 and localhost to it), so
#: its processes would talk through that address; another loopback address it takes literally.
LOCAL_RAY_IP = "127.0.0.2"


def init_options(address: str | None, *, local: bool = False) -> dict[str, Any]:
    """``ray.init``'s arguments for ``ray.address``. A driver that joins a cluster on a loopback address is
    on that cluster's machine and must register with that address (Ray would otherwise take the host's
    outward address, which no raylet of a loopback cluster has). A Ray the run starts itself (``local``)
    runs on ``LOCAL_RAY_IP``, without a dashboard."""
    options: dict[str, Any] = {"address": address, "log_to_driver": False, "logging_level": logging.WARNING}
    host = (address or "").rpartition("://")[2].rpartition(":")[0]
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            options["_node_ip_address"] = host
    if address is None:
        options["include_dashboard"] = False
    if local and sys.platform.startswith("linux"):
        options.update(address="local", _node_ip_address=LOCAL_RAY_IP)
    return options


#: Key prefix of the provisional requests that mark rows in flight: the request key is known only once an
#: actor has read the image, so a block's rows are marked under ``ray:<input digest>`` until their answer
#: maps them to their request (then the mark, no longer referred to, is dropped at the end of the run).
MARK_PREFIX = "ray:"

Item = tuple[str, str]  # (row id, input digest) of a manifest row


@dataclasses.dataclass
class _Book:
    """The driver's account of what it handed to Ray: each block's rows, the rows that wait on an identical
    row's request (same input digest: same image file, prompt and parameters, so the same request key),
    and which blocks are marked in flight or back. Memory: one entry per row still to do."""

    blocks: list[tuple[Item, ...]] = dataclasses.field(default_factory=list)
    block_of: dict[str, int] = dataclasses.field(default_factory=dict)  # digest -> its block (-1: not cut yet)
    twins: dict[str, list[Item]] = dataclasses.field(default_factory=dict)  # digest -> rows answered by it
    back: set[int] = dataclasses.field(default_factory=set)  # blocks whose outcomes came back
    marked: int = 0  # blocks marked in flight so far, in order

    def admit(self, tasks: list[RowTask]) -> list[RowTask]:
        """The tasks to send; a task whose input digest an earlier one of this run has waits on that one."""
        sent = []
        for task in tasks:
            if task.digest in self.block_of:
                self.twins.setdefault(task.digest, []).append((task.row.id, task.digest))
            else:
                self.block_of[task.digest] = -1
                sent.append(task)
        return sent

    def add_block(self, tasks: list[RowTask]) -> None:
        index = len(self.blocks)
        self.blocks.append(tuple((task.row.id, task.digest) for task in tasks))
        for task in tasks:
            self.block_of[task.digest] = index

    def came_back(self, digests: list[str]) -> int:
        """Note the blocks these outcomes belong to as back; the rows that were marked in flight there."""
        unmarked = 0
        for index in {self.block_of[digest] for digest in digests} - self.back:
            self.back.add(index)
            unmarked += len(self.blocks[index]) if index < self.marked else 0
        return unmarked

    def to_mark(self, ahead: int) -> list[tuple[Item, ...]]:
        """Blocks to mark in flight now: up to ``ahead`` blocks beyond those back (what the actors can hold),
        skipping any that came back before their turn (their outcomes are already recorded)."""
        found = []
        while self.marked < min(len(self.blocks), len(self.back) + ahead):
            if self.marked not in self.back:
                found.append(self.blocks[self.marked])
            self.marked += 1
        return found


def twin_write(outcome: RowOutcome, item: Item) -> tuple[Write, bool] | None:
    """A row's write from an identical row's outcome, as the local engine makes it (``LocalEngine._process``):
    nothing when the budget stopped the request first (the row stays to do); its own failure when nothing
    was sent (the image could not be read); else mapped to the same request (True: deduplicated)."""
    if outcome.status is None:
        return None
    if outcome.attempts == 0:
        return as_write(outcome, (item,)), False
    error_type = outcome.error_type if outcome.status == "failed" else None
    return Write(outcome.key, None, error_type=error_type, items=(item,)), True


class RayEngine(LocalEngine):
    """Runs a plan's rows on a Ray cluster; the ledger, counters and stop are the local engine's."""

    def __init__(self, config: Config, plan: Plan, summary: RunSummary, *,
                 on_progress: ProgressCallback | None = None) -> None:
        super().__init__(config, plan, summary, on_progress=on_progress)
        if config.ray.actors > config.run.concurrency:
            raise ConfigError(f"ray.actors ({config.ray.actors}) is more than run.concurrency "
                              f"({config.run.concurrency}), which is split among the actors: lower ray.actors "
                              "or raise run.concurrency")
        self._book = _Book()

    async def run(self, store: StateStore, lookups: StateStore, run_id: int, info: ManifestInfo,
                  base_url: str | None) -> None:
        """Triage, send the pending rows' blocks to the actor pool, record outcomes as blocks come back."""
        self.progress.total = self.summary.rows_total
        self._notify()
        started = not ray.is_initialized()
        if started:
            _join(self.config.ray.address)
        try:
            blocks = await in_thread(self._cut_blocks)  # it reads the ledger
            self._take_triage_counts()
            self._log_start(len(blocks))
            self.progress.total = info.rows - self.summary.rows_skipped
            self._notify()
            writer = ledger_writer(store, run_id, self._count)
            try:
                if blocks:
                    await self._stream(blocks, writer, base_url)
            except BaseException:
                with contextlib.suppress(Exception):  # keep what can be kept; the first failure is the news
                    await writer.close()
                raise
            await writer.close()
            store.drop_unmapped(MARK_PREFIX)  # the marks of rows now answered
        finally:
            if started:
                ray.shutdown()

    def _log_start(self, blocks: int) -> None:
        settings, resources = self.config.ray, ray.cluster_resources()
        alive = [node for node in ray.nodes() if node.get("Alive")]
        sent = sum(len(block) for block in self._book.blocks)
        log.info("ray engine: %d rows to send in %d blocks of up to %d rows, %d actors; the cluster has %g CPUs "
                 "on %d nodes", sent, blocks, settings.rows_per_block, settings.actors, resources.get("CPU", 0),
                 len(alive), extra={"event": "ray_start", "blocks": blocks, "actors": settings.actors,
                                    "nodes": len(alive)})
        if twins := sum(len(rows) for rows in self._book.twins.values()):
            log.info("ray engine: %d more rows repeat a row's request and get its answer", twins)
        log.debug("ray engine: nodes %s", ", ".join(sorted(str(node.get("NodeManagerAddress")) for node in alive)))

    def _cut_blocks(self) -> list[Any]:
        """Triage the manifest (in this thread, with its own ledger connection) and put the pending rows'
        tasks in the object store, ``ray.rows_per_block`` to a block; the driver holds one block at a time.
        A row whose request an earlier row of the run sends already is kept back (``_Book.admit``)."""
        size, refs, pending = self.config.ray.rows_per_block, [], []
        synchronous = self.config.ledger.synchronous.upper()
        with StateStore(self.config.ledger_path, synchronous=synchronous) as store:
            for batch in self.plan.batches():
                pending.extend(self._book.admit(self.plan.triage(batch, store)))
                while len(pending) >= size:
                    refs.append(self._put(pending[:size]))
                    del pending[:size]
        if pending:
            refs.append(self._put(pending))
        return refs

    def _put(self, tasks: list[RowTask]) -> Any:
        self._book.add_block(tasks)
        return ray.put(_task_table(tasks))

    def _dataset(self, blocks: list[Any], base_url: str | None, executors: list[Any]) -> Any:
        """Blocks -> pre-flight tasks (spread over the nodes) -> the captioning actors; ``executors`` gets the
        dataset's executor once it starts (see ``_halt``)."""
        settings, config = self.config.ray, actor_config(self.config)
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the CLI draws its own
        context.print_on_execution_start = False
        cpus = self._preflight_cpus()
        threads = task_threads(cpus)
        catcher = _executor_catcher(executors)
        context.custom_execution_callback_classes.append(catcher)  # the dataset keeps a copy of the context
        try:
            source = ray.data.from_arrow_refs(blocks)
        finally:
            context.custom_execution_callback_classes.remove(catcher)
        prepared = source.map_batches(  # Ray Data spreads tasks over the nodes
            preflight_block, fn_kwargs={"config": config, "threads": threads}, batch_size=None,
            batch_format="pyarrow", num_cpus=cpus, memory=threads * PREFLIGHT_MEMORY_PER_THREAD)
        pool = ray.data.ActorPoolStrategy(size=settings.actors, max_tasks_in_flight_per_actor=BLOCKS_PER_ACTOR)
        return prepared.map_batches(
            CaptionActor, fn_constructor_kwargs={"config": config, "base_url": base_url},
            batch_size=None, batch_format="pyarrow", compute=pool,
            num_cpus=settings.cpus_per_actor)  # Ray Data restarts lost actors and retries their blocks

    def _preflight_cpus(self) -> float:
        """``ray.preflight_cpus``, or less where no node has that much room beside the actors (said once)."""
        settings = self.config.ray
        nodes = [node.get("Resources", {}).get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]
        cpus = task_cpus(settings, nodes)
        if cpus < settings.preflight_cpus:
            log.warning("ray.preflight_cpus %g does not fit beside the actors on any node (the largest has %g "
                        "CPUs): pre-flight tasks take %g CPUs each", settings.preflight_cpus, max(nodes), cpus,
                        extra={"event": "ray_preflight_cpus", "cpus": cpus})
        return cpus

    async def _stream(self, blocks: list[Any], writer: LedgerWriter, base_url: str | None) -> None:
        """Take blocks of outcomes as the cluster finishes them and commit each block's outcomes; the
        blocks the actors can hold are marked in flight ahead. A stop ends the Ray job at once (``_halt``)."""
        executors = ExecutorBox()
        dataset = self._dataset(blocks, base_url, executors)
        results: Iterator[pa.Table] = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        halt = asyncio.get_running_loop().create_task(self._halt(executors))
        try:
            await self._mark_ahead(writer)
            while not self._stop.is_set() and (batch := await asyncio.to_thread(next, results, None)) is not None:
                await self._record(batch, writer)
                await self._mark_ahead(writer)
        except ray.exceptions.RayError as exc:  # Ray Data gave up (actors that cannot start, a lost driver)
            if not self._stop.is_set():  # (a stop shuts the job down: its errors are not news)
                raise ClusterError(f"the Ray job failed: {type(exc).__name__}: {_first_line(exc)}; the rows "
                                   "recorded so far are kept: run the same command again to resume") from None
        finally:
            if self._stop.is_set():
                with contextlib.suppress(Exception):  # the job's shutdown ends before the engine does
                    await halt
            else:
                halt.cancel()
            if self._stop.is_set():
                self.summary.interrupted = True
                self.summary.stop_reason = self.summary.stop_reason or "signal"
            close = getattr(results, "close", None)
            if close is not None:
                with contextlib.suppress(ValueError):  # still running in a thread the halt ends
                    await asyncio.to_thread(close)

    async def _halt(self, executors: list[Any]) -> None:
        """On a stop (Ctrl-C, a budget), end the Ray job now rather than when the next block comes back:
        Ray Data's executor is shut down, its actors with it; the rows of blocks not back stay without an
        outcome, so a rerun sends them. Where a Ray version does not hand the executor over, the stop
        waits for the next block, as before."""
        await self._stop.wait()
        if executors:
            log.info("ray engine: stopping the Ray job (the rows of blocks not back are sent by the next run)")
            await asyncio.to_thread(executors[0].shutdown, True)

    async def _mark_ahead(self, writer: LedgerWriter) -> None:
        """Mark in flight the rows of the blocks the actors can hold now (``pipeline status`` shows them;
        a rerun after a killed driver finds them pending again, as the local engine's)."""
        ahead = self.config.ray.actors * BLOCKS_PER_ACTOR
        marks = [Write(f"{MARK_PREFIX}{digest}", "in_flight", items=((row_id, digest),))
                 for block in self._book.to_mark(ahead) for row_id, digest in block]
        if marks:
            self.progress.in_flight += len(marks)
            await _commit_all(marks, writer)
            self._notify()

    async def _record(self, batch: pa.Table, writer: LedgerWriter) -> None:
        """A block's outcomes through the ledger writer, in one transaction where the writer allows it; rows
        that repeat a row of the block get its answer (``twin_write``)."""
        writes: list[Write] = []
        digests = batch.column("digest").to_pylist()
        self.progress.in_flight -= self._book.came_back(digests)  # before any await: no mark after this
        for row_id, digest, blob in zip(batch.column("row_id").to_pylist(), digests,
                                        batch.column("outcome").to_pylist(), strict=True):
            outcome: RowOutcome = pickle.loads(blob)
            if outcome.budget_stop is not None:
                self._stop_for_budget(outcome.budget_stop)
            if outcome.status is not None:  # None: the budget stopped it before it was sent; stays to do
                writes.append(as_write(outcome, ((row_id, digest),)))
            for twin in self._book.twins.pop(digest, ()):
                if (made := twin_write(outcome, twin)) is not None:
                    writes.append(made[0])
                    self.summary.rows_deduplicated += made[1]
        await _commit_all(writes, writer)

    def _count(self, write: Write) -> None:
        if write.status != "in_flight":  # a mark is not an outcome
            super()._count(write)


class ExecutorBox(list):  # type: ignore[type-arg]
    """The list the executor catcher fills: Ray ships the job's ``DataContext`` (and so the catcher class and
    this box) to every task it starts, by value; the box travels empty, never with the executor in it (an
    executor holds locks, which cannot be pickled, and means nothing elsewhere)."""

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return ExecutorBox, ()


def _executor_catcher(found: list[Any]) -> type:
    """A Ray Data execution callback class (``DataContext.custom_execution_callback_classes``; the four
    methods of Ray 2.60's ``ExecutionCallback``) that hands over the job's streaming executor as it starts:
    the one handle that ends a job whose blocks are all still out (the dataset keeps its executor only
    once the first block is back)."""

    class CatchExecutor:
        def before_execution_starts(self, executor: Any) -> None:
            found.append(executor)

        def on_execution_step(self, executor: Any) -> None:
            pass

        def after_execution_succeeds(self, executor: Any) -> None:
            pass

        def after_execution_fails(self, executor: Any, error: Exception) -> None:
            pass

    return CatchExecutor


async def _commit_all(writes: list[Write], writer: LedgerWriter) -> None:
    """Writes through the ledger writer, in one transaction where the writer allows it."""
    if not writes:
        return
    staged = [writer.stage(write) for write in writes[:-1]]
    if all(handle is not None for handle in staged):
        await writer.commit(writes[-1])  # the staged ones share its commit
    else:
        await asyncio.gather(*(writer.commit(write) for write in writes))
