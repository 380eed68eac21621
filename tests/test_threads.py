"""``edges.threads.in_thread``: a cancelled caller unwinds only once its thread has returned.

Before it, a stop during the local engine's second manifest pass closed the ledger's SQLite connection while
a triage thread was still querying it, and the process died of a segmentation fault (seen in CI).
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from pipeline.edges.ledger import StateStore
from pipeline.edges.threads import in_thread

WAIT_S = 10


async def test_it_returns_the_value_and_raises_the_error_of_the_call() -> None:
    assert await in_thread(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await in_thread(lambda: 1 / 0)


async def test_a_cancelled_caller_waits_for_its_thread_before_unwinding() -> None:
    started, release, events = threading.Event(), threading.Event(), []

    def work() -> None:
        started.set()
        release.wait(WAIT_S)
        events.append("thread returned")

    async def caller() -> None:
        try:
            await in_thread(work)
        finally:
            events.append("caller unwound")

    task = asyncio.create_task(caller())
    assert await asyncio.to_thread(started.wait, WAIT_S)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert not done and events == []  # still waiting: the thread has not returned
    task.cancel()  # a second cancellation does not cut the wait short either
    done, _ = await asyncio.wait([task], timeout=0.3)
    assert not done and events == []
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    assert events == ["thread returned", "caller unwound"]


async def test_a_ledger_query_in_flight_ends_before_a_cancelled_caller_closes_the_ledger(tmp_path) -> None:
    """The engine's shape: ``with StateStore`` around an awaited thread that reads the store."""
    started, release, seen = threading.Event(), threading.Event(), []

    def triage(store: StateStore) -> None:
        started.set()
        release.wait(WAIT_S)
        seen.append(store.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])  # the store is still open

    async def feed() -> None:
        with StateStore(tmp_path / "ledger.sqlite") as store:
            await in_thread(triage, store)

    task = asyncio.create_task(feed())
    assert await asyncio.to_thread(started.wait, WAIT_S)
    task.cancel()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT_S)
    assert seen == [0]
