"""How the workers' writes reach the ledger: write-ahead, so a worker sends nothing new until its last
answer is committed, and with as little event-loop work as the disk setting allows.

Two writers with one interface (``mark`` / ``commit`` / ``close``):

- ``InlineWriter`` (``ledger.synchronous: normal``): a WAL commit that does not wait for the disk takes
  a fraction of a millisecond, so it runs in the worker's own step. A hand-off to a writer task would
  cost every answer two event-loop turns, and at hundreds of streams in flight those turns were a
  tenth of the throughput (issue 7).
- ``GroupWriter`` (``synchronous: full``): each commit waits for the disk, so one writer task commits in
  a thread everything that queued up since its last commit (group commit), and workers wait for it.

``mark`` records a request going out (status ``in_flight``, for ``pipeline status``) without waiting;
the request's own answer must always win over its mark.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pipeline.edges.ledger import StateStore, Write
from pipeline.edges.threads import in_thread

__all__ = ["GroupWriter", "InlineWriter", "LedgerWriter", "Staged", "ledger_writer"]

#: How long an inline writer lets marks gather before committing them in one transaction.
MARK_DELAY_S = 0.2

OnCommitted = Callable[[Write], None]


@dataclass(slots=True, eq=False)
class Staged:
    """An answer handed over before its worker runs again (see ``InlineWriter.stage``)."""

    write: Write
    committed: bool = False


class LedgerWriter(Protocol):
    def mark(self, write: Write) -> None: ...

    def stage(self, write: Write) -> Staged | None: ...

    async def commit(self, write: Write | Staged) -> None: ...

    async def close(self) -> None: ...


def ledger_writer(store: StateStore, run_id: int, on_committed: OnCommitted) -> InlineWriter | GroupWriter:
    """The writer that fits the store's ``synchronous`` setting."""
    if store.synchronous.upper() == "NORMAL":
        return InlineWriter(store, run_id, on_committed)
    return GroupWriter(store, run_id, on_committed)


class InlineWriter:
    """Commits answers in the committing worker's own step. Answers are staged as they arrive (inside the
    connection's read callback, before any worker wakes), so the first worker of a burst commits every
    answer of the burst in one transaction and the others find theirs done: a commit costs about 0.1 ms
    whatever it carries. Marks are committed together a moment later, off the burst; an answer that comes
    back first simply replaces its pending mark."""

    def __init__(self, store: StateStore, run_id: int, on_committed: OnCommitted) -> None:
        self._store = store
        self._run_id = run_id
        self._on_committed = on_committed
        self._marks: dict[str, Write] = {}  # request key -> its in_flight mark, not committed yet
        self._staged: list[Staged] = []  # answers in hand, not committed yet
        self._timer: asyncio.TimerHandle | None = None
        self._error: BaseException | None = None  # a failed background flush, raised to the next caller

    def mark(self, write: Write) -> None:
        self._marks[write.key] = write
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(MARK_DELAY_S, self._flush_marks)

    def stage(self, write: Write) -> Staged:
        """Take an answer now; it is committed by the next ``commit`` of any worker (its own included)."""
        self._marks.pop(write.key, None)  # the answer supersedes its mark if that is still waiting
        staged = Staged(write)
        self._staged.append(staged)
        return staged

    async def commit(self, write: Write | Staged) -> None:
        self._raise_pending_error()
        pending = self._staged
        if isinstance(write, Staged):
            if write.committed:  # a worker ahead of this one in the burst committed it
                return
            group = pending
        else:
            self._marks.pop(write.key, None)
            group = [*pending, Staged(write)]
        self._staged = []
        try:
            self._store.commit([staged.write for staged in group], self._run_id)
        except BaseException:
            self._staged = pending + self._staged
            raise
        for staged in group:
            staged.committed = True
            self._on_committed(staged.write)

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._staged:  # answers whose workers were cancelled (the stop grace ran out): keep them
            await self.commit(self._staged[-1])
        self._flush_marks()
        self._raise_pending_error()

    def _flush_marks(self) -> None:
        self._timer = None
        if not self._marks or self._error is not None:
            return
        marks, self._marks = self._marks, {}
        try:
            self._store.commit(marks.values(), self._run_id)
        except Exception as exc:  # noqa: BLE001 - kept for the next commit(), which fails the run with it
            self._error = exc

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            raise self._error


@dataclass(slots=True)
class _Commit:
    """A write for the writer task; ``done`` resolves once it is committed (None: nobody waits)."""

    write: Write
    done: asyncio.Future[None] | None


class GroupWriter:
    """One writer task commits, in a thread, everything queued since its last commit."""

    def __init__(self, store: StateStore, run_id: int, on_committed: OnCommitted) -> None:
        self._store = store
        self._run_id = run_id
        self._on_committed = on_committed
        self._queue: asyncio.Queue[_Commit | None] = asyncio.Queue()  # bounded by the workers: each waits
        self._task = asyncio.get_running_loop().create_task(self._run())

    def mark(self, write: Write) -> None:
        self._queue.put_nowait(_Commit(write, None))

    def stage(self, write: Write) -> None:
        """Nothing to gain here: the writer task groups whatever queues up while it commits."""
        return None

    async def commit(self, write: Write | Staged) -> None:
        assert isinstance(write, Write)
        if self._task.done():  # the writer failed: say why rather than wait forever
            self._task.result()
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Commit(write, done))
        await done

    async def close(self) -> None:
        self._queue.put_nowait(None)
        await self._task

    async def _run(self) -> None:
        finished = False
        while not finished:
            group = [await self._queue.get()]
            while not self._queue.empty():
                group.append(self._queue.get_nowait())
            finished = None in group
            pending = [c for c in group if c is not None]
            if not pending:
                continue
            try:
                await in_thread(self._store.commit, [c.write for c in pending], self._run_id)
            except BaseException as exc:
                for c in pending:
                    if c.done is not None and not c.done.done():
                        c.done.set_exception(exc)
                raise
            for c in pending:
                if c.done is not None:
                    self._on_committed(c.write)
                    if not c.done.done():
                        c.done.set_result(None)
