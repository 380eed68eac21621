"""The ledger writers (inline for synchronous=normal, grouped in a thread for full) on real SQLite files,
and the worker's row-ahead preparation."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.edges.ledger import StateStore, Write
from pipeline.edges.writer import GroupWriter, InlineWriter, ledger_writer
from pipeline.run.local import _RowAhead


def ok(key: str, row: str) -> Write:
    return Write(key, "ok", 1, results=[{"status": "ok", "content": f"caption {key}"}], items=((row, f"d-{row}"),))


def mark(key: str, row: str) -> Write:
    return Write(key, "in_flight", items=((row, f"d-{row}"),))


def statuses(store: StateStore) -> dict[str, str]:
    return dict(store.db.execute("SELECT key, status FROM requests").fetchall())


@pytest.mark.parametrize("synchronous", ["normal", "full"])
async def test_answers_win_over_their_marks_and_other_marks_are_kept(tmp_path, synchronous):
    with StateStore(tmp_path / "l.sqlite", synchronous=synchronous.upper()) as store:
        run_id = store.start_run("run", "digest")
        committed: list[str] = []
        writer = ledger_writer(store, run_id, lambda w: committed.append(w.key))
        assert isinstance(writer, InlineWriter if synchronous == "normal" else GroupWriter)
        writer.mark(mark("a", "row-a"))
        writer.mark(mark("b", "row-b"))
        await writer.commit(ok("a", "row-a"))
        assert statuses(store)["a"] == "ok"  # durable as soon as commit() returns: write-ahead
        await writer.close()  # commits the marks still waiting
        assert statuses(store) == {"a": "ok", "b": "in_flight"}
        assert committed == ["a"]  # only answers are counted, never marks
        assert store.status_counts() == {"ok": 1, "in_flight": 1}


async def test_an_inline_mark_flushed_before_its_answer_is_then_overwritten(tmp_path):
    with StateStore(tmp_path / "l.sqlite") as store:
        writer = InlineWriter(store, store.start_run("run", "d"), lambda w: None)
        writer.mark(mark("a", "row-a"))
        await writer.close()  # the mark reaches the ledger first ...
        assert statuses(store) == {"a": "in_flight"}
        await writer.commit(ok("a", "row-a"))  # ... and the answer replaces it
        assert statuses(store) == {"a": "ok"}


async def test_a_failed_background_flush_fails_the_next_commit(tmp_path):
    store = StateStore(tmp_path / "l.sqlite").open()
    writer = InlineWriter(store, store.start_run("run", "d"), lambda w: None)
    writer.mark(mark("a", "row-a"))
    store.close()  # the mark flush will find no database
    writer._flush_marks()
    with pytest.raises(RuntimeError, match="not open"):
        await writer.commit(ok("b", "row-b"))


async def test_row_ahead_is_prepared_at_once_when_the_worker_asks_before_the_delay() -> None:
    prepared: list[int] = []

    async def prepare() -> int:
        prepared.append(len(prepared))
        return prepared[-1]

    ahead = _RowAhead(prepare)  # type: ignore[arg-type]
    assert await ahead.take() == 0
    ahead.schedule(3600)  # an hour: take() must not wait for it
    async with asyncio.timeout(5):
        assert await ahead.take() == 1
    ahead.schedule(3600)
    ahead.cancel()
    assert prepared == [0, 1]  # the cancelled one never started


async def test_row_ahead_does_not_start_early_without_room() -> None:
    asked = asyncio.Event()
    prepared: list[str] = []

    def room() -> bool:
        asked.set()
        return False

    async def prepare() -> str:
        prepared.append("row")
        return "row"

    ahead = _RowAhead(prepare, room)  # type: ignore[arg-type]
    ahead.schedule(0)
    await asyncio.wait_for(asked.wait(), 5)
    assert prepared == []  # no room: left for the worker
    assert await ahead.take() == "row" and prepared == ["row"]


async def test_staged_answers_share_the_first_commit_and_are_counted_once(tmp_path):
    with StateStore(tmp_path / "l.sqlite") as store:
        committed: list[str] = []
        writer = InlineWriter(store, store.start_run("run", "d"), lambda w: committed.append(w.key))
        writer.mark(mark("b", "row-b"))
        first, second = writer.stage(ok("a", "row-a")), writer.stage(ok("b", "row-b"))
        assert statuses(store) == {}  # staged is not yet durable: the worker's commit() makes it so
        await writer.commit(first)  # the first worker of the burst commits both answers
        assert statuses(store) == {"a": "ok", "b": "ok"} and second.committed
        await writer.commit(second)  # the second worker finds its answer done
        await writer.close()  # and b's superseded mark never overwrites it
        assert statuses(store) == {"a": "ok", "b": "ok"}
        assert committed == ["a", "b"]


async def test_close_commits_answers_whose_workers_never_came_back(tmp_path):
    with StateStore(tmp_path / "l.sqlite") as store:
        writer = InlineWriter(store, store.start_run("run", "d"), lambda w: None)
        writer.stage(ok("a", "row-a"))  # its worker was cancelled before committing
        await writer.close()
        assert statuses(store) == {"a": "ok"}
