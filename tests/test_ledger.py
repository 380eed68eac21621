"""The SQLite state store and the job lock, on real files."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from pipeline.core.errors import LedgerError, LockHeld
from pipeline.edges.ledger import (
    SCHEMA_VERSION,
    JobLock,
    StateStore,
    Write,
)


@pytest.fixture
def store(tmp_path):
    with StateStore(tmp_path / "job.ledger.sqlite") as s:
        yield s


def ok(key: str, *rows: str, content: str = "a caption") -> Write:
    return Write(key, "ok", 1, results=[{"status": "ok", "content": content, "choice_index": 0}],
                 items=tuple((r, f"digest-{r}") for r in rows))


def test_schema_is_versioned_and_wal(store):
    assert store.schema_version == SCHEMA_VERSION
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "l.sqlite"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(LedgerError, match="newer than this pipeline understands"):
        StateStore(path).open()


def test_not_a_database_is_a_clear_error(tmp_path):
    path = tmp_path / "l.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a usable ledger"):
        StateStore(path).open()


def test_commit_and_read_back(store):
    run = store.start_run("run", "cfg")
    store.commit([ok("k1", "a", "b"), Write("k2", "failed", 3, "bad_request", "HTTP 400: no",
                                            [{"status": "failed"}], (("c", "digest-c"),))], run)
    states = store.item_states(["a", "b", "c", "zzz"])
    assert states["a"].request_key == "k1" and states["a"].status == "ok" and states["a"].input_digest == "digest-a"
    assert states["c"].status == "failed" and "zzz" not in states
    outcomes = store.outcomes(["a", "b", "c"])
    assert outcomes["b"].results[0]["content"] == "a caption"
    assert outcomes["c"].status == "failed" and outcomes["c"].attempts == 3
    assert store.answered("k1") and not store.answered("k2")


def test_known_rows_are_the_rows_the_ledger_has_seen_whatever_their_status(store):
    store.commit([ok("k1", "a"), Write("k2", "in_flight", items=(("b", "d"),))], 1)
    rows = ["a", "b", "new", *(f"x{i}" for i in range(2000))]  # more ids than one IN list holds
    assert store.known_rows(rows) == {"a", "b"}
    assert store.item_states(["a"])["a"].run_id == 1


def test_in_flight_then_result_keeps_one_row_per_key(store):
    store.commit([Write("k", "in_flight", items=(("a", "d"),))], 1)
    assert store.item_states(["a"])["a"].status == "in_flight"
    assert store.outcomes(["a"]) == {}
    store.commit([ok("k", "a")], 1)
    assert store.db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] == 1
    assert store.outcomes(["a"])["a"].status == "ok"


def test_items_only_write_maps_a_duplicate_row(store):
    store.commit([ok("k", "a")], 1)
    store.commit([Write("k", None, items=(("dup", "d2"),))], 2)
    assert store.outcomes(["dup"])["dup"].results == store.outcomes(["a"])["a"].results


def test_drop_unmapped_removes_only_marks_no_row_maps_to(store):
    """The Ray engine marks rows in flight under ``ray:<digest>`` until their answers map them elsewhere."""
    store.commit([Write("ray:d1", "in_flight", items=(("a", "d1"),)),
                  Write("ray:d2", "in_flight", items=(("b", "d2"),)),
                  Write("ray:d3", "failed", 0, "image_missing", "gone", [{}], (("c", "d3"),))], 1)
    store.commit([ok("k", "a"), Write("ray:d4", "in_flight")], 1)  # a answered; d4: a mark no row maps to

    assert store.drop_unmapped("ray:") == 2  # d1 (a now maps to k) and d4

    keys = [key for (key,) in store.db.execute("SELECT key FROM requests ORDER BY key")]
    assert keys == ["k", "ray:d2", "ray:d3"] and store.item_states(["b"])["b"].status == "in_flight"


def test_reset_in_flight_and_requeue_failed(store):
    store.commit([Write("k1", "in_flight", items=(("a", "d"),)),
                  Write("k2", "failed", 1, "timeout", "t", [{}], (("b", "d"),)),
                  Write("k3", "failed", 1, "bad_request", "x", [{}], (("c", "d"),))], 1)
    assert store.reset_in_flight() == 1
    assert store.item_states(["a"])["a"].status == "pending"
    assert store.requeue_failed("timeout") == 1
    assert store.item_states(["b", "c"])["b"].status == "pending"
    assert store.item_states(["c"])["c"].status == "failed"
    assert store.requeue_failed() == 1


def test_runs_history_marks_dead_runs_crashed(store):
    first = store.start_run("run", "cfg")
    second = store.start_run("run", "cfg")  # the first never finished: its process died
    store.finish_run(second, "finished", {"rows_ok": 3})
    runs = store.runs()
    assert [(r["run_id"], r["status"]) for r in runs] == [(first, "crashed"), (second, "finished")]
    assert runs[1]["summary"] == {"rows_ok": 3}


def test_status_queries(store):
    store.commit([ok("k1", "a"), Write("k2", "failed", 1, "image_missing", "gone", [{}], (("b", "d"), ("c", "d"))),
                  Write("k3", "in_flight", items=(("d", "d"),))], 1)
    assert store.status_counts() == {"ok": 1, "failed": 2, "in_flight": 1}
    breakdown = store.error_breakdown()
    assert breakdown == [{"error_type": "image_missing", "count": 2,
                          "examples": [{"id": "b", "message": "gone"}, {"id": "c", "message": "gone"}]}]
    assert store.oldest_pending()["id"] == "d"


def test_per_run_queries_see_only_that_run(store):
    first = store.start_run("run", "cfg")
    store.commit([Write("k1", "failed", 2, "timeout", "slow", [{}], (("a", "d"),)), ok("k2", "b")], first)
    second = store.start_run("retry", "cfg")
    store.commit([Write("k3", "failed", 1, "bad_request", "HTTP 400", [{}], (("c", "d"),))], second)
    assert store.run_record(second)["command"] == "retry" and store.run_record(second + 1) is None
    assert store.failure_groups(run_id=first) == [("timeout", 1, [("a", "slow")])]
    assert [group[0] for group in store.failure_groups()] == ["bad_request", "timeout"]
    finished = sorted(store.finished_requests(first, ["content", "choice_index"]), key=str)
    assert finished == [("failed", 2, "timeout", None, None), ("ok", 1, None, "a caption", 0)]
    with pytest.raises(ValueError, match="not a result field"):
        list(store.finished_requests(first, ["x') FROM meta --"]))


def test_many_ids_are_queried_in_chunks(store):
    rows = [f"r{i}" for i in range(2500)]
    store.commit([ok(f"k{i}", r) for i, r in enumerate(rows)], 1)
    assert len(store.item_states(rows)) == 2500 and len(store.outcomes(rows)) == 2500


def _try_lock(path, queue):
    try:
        JobLock(path).acquire()
        queue.put("acquired")
    except LockHeld as exc:
        queue.put(str(exc))


def test_lock_refuses_a_second_holder_and_is_freed_by_death(tmp_path):
    path = tmp_path / "job.lock"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    with JobLock(path):
        child = context.Process(target=_try_lock, args=(path, queue))
        child.start()
        child.join()
        message = queue.get()
        assert "another run of this job is in progress" in message
        assert str(path) in message
    # a holder that dies without releasing (the child exits holding it) does not block the next run
    child = context.Process(target=_try_lock, args=(path, queue))
    child.start()
    child.join()
    assert queue.get() == "acquired"
    with JobLock(path):
        pass
