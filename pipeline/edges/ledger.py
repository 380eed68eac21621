"""The durable request ledger: one SQLite file (WAL) per job, the source of truth for what is done.

A manifest row maps to a *request key* (image content + rendered prompt + every answer-changing
parameter). A finished answer counts as done only once it is committed here, so a crash loses at most
the requests that were in flight. Output files are derived from the ledger, never the other way round.

A commit that fails for the disk (full, I/O error, read-only) is rolled back by SQLite, so the ledger keeps
every earlier commit; it is raised as a ``StorageError`` naming the ledger (``disk_errors``), and the
same command resumes once the disk is fixed.

Tables: ``requests`` (one row per request key: status, attempts, last error, result JSON), ``items``
(manifest row id -> its input digest and request key), ``runs`` (history), ``meta`` (schema version).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from pipeline.core.errors import LedgerError, LockHeld
from pipeline.edges.files import storage_errors, storage_failure

SCHEMA_VERSION = 1

#: Versioned migrations: MIGRATIONS[v] brings a version v-1 database to version v.
MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE runs (
        run_id INTEGER PRIMARY KEY AUTOINCREMENT,
        command TEXT NOT NULL,
        status TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        config_digest TEXT NOT NULL,
        pid INTEGER,
        summary TEXT
    );
    CREATE TABLE requests (
        key TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('pending', 'in_flight', 'ok', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        error_type TEXT,
        error_message TEXT,
        final INTEGER NOT NULL DEFAULT 0,
        run_id INTEGER,
        updated_at TEXT NOT NULL,
        result TEXT
    );
    CREATE INDEX requests_by_status ON requests (status);
    CREATE TABLE items (
        row_id TEXT PRIMARY KEY,
        input_digest TEXT NOT NULL,
        request_key TEXT NOT NULL,
        run_id INTEGER,
        seen_at TEXT NOT NULL
    );
    CREATE INDEX items_by_key ON items (request_key);
    """,
}

#: SQLite's primary result codes that mean the disk, not the database: FULL, IOERR, READONLY, CANTOPEN.
_DISK_CODES = {13: "full", 10: "io", 8: "read-only", 14: "io"}

#: SQLite's default limit on bound parameters is 999 in old builds; stay below it.
_IN_CHUNK = 900


class ItemState(NamedTuple):
    """What the ledger knows about one manifest row. A tuple, not a frozen dataclass: a resume builds one
    per done row (200,000 on a restart), and a frozen dataclass's ``__init__`` costs ~1 us more each."""

    input_digest: str
    request_key: str
    status: str | None  # of its request; None if the request row is gone
    final: bool = False  # failed for a reason of its own: a plain run leaves it failed
    run_id: int | None = None  # the run that last wrote the row (``Plan.triage_seen`` skips its own run's)

    @property
    def settled(self) -> bool:
        """Nothing a plain ``run`` should do: ok, or failed in a way that would fail again."""
        return self.status == "ok" or (self.status == "failed" and self.final)


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished request: its status and the result rows (one per choice, or one failure)."""

    status: str
    attempts: int
    results: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Write:
    """One change the writer commits: a request's new state and the manifest rows that map to it."""

    key: str
    status: str | None  # None: only map the items to an already finished request
    attempts: int = 0
    error_type: str | None = None
    error_message: str | None = None
    results: list[dict[str, Any]] | None = None
    items: tuple[tuple[str, str], ...] = ()  # (row_id, input_digest)
    final: bool = False


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class StateStore:
    """SQLite ledger for one job. Use one instance per thread (SQLite connections are not shared)."""

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        self.path = path
        self.synchronous = synchronous
        self._db: sqlite3.Connection | None = None
        self._bumped = False  # this connection has counted itself in meta 'writes'

    def __repr__(self) -> str:
        return f"StateStore({str(self.path)!r})"

    # -- lifecycle -----------------------------------------------------------------------------

    def open(self) -> StateStore:
        with storage_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with disk_errors(self.path):
                db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(f"PRAGMA synchronous={self.synchronous}")
                db.execute("PRAGMA busy_timeout=30000")
                self._db = db
                self._migrate()
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: not a usable ledger ({exc}); move it away or run with --fresh") from None
        return self

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> StateStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("StateStore is not open")
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a failed COMMIT (the disk filled up) is rolled back like a failed statement."""
        with disk_errors(self.path):
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # SQLite may have rolled back already (SQLITE_FULL)
                    with contextlib.suppress(sqlite3.Error):
                        self.db.execute("ROLLBACK")
                raise

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema v{version} is newer than this pipeline understands "
                f"(v{SCHEMA_VERSION}); upgrade pipeline"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.transaction() as db:
                for statement in MIGRATIONS[target].split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version={target}")

    @property
    def schema_version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    # -- runs ----------------------------------------------------------------------------------

    def start_run(self, command: str, config_digest: str) -> int:
        """Record a new run; any run still marked running died without closing (we hold the lock)."""
        with self.transaction() as db:
            db.execute("UPDATE runs SET status = 'crashed' WHERE status = 'running'")
            cursor = db.execute(
                "INSERT INTO runs (command, status, started_at, config_digest, pid) VALUES (?, 'running', ?, ?, ?)",
                (command, utc_now(), config_digest, os.getpid()),
            )
        return int(cursor.lastrowid or 0)

    def finish_run(self, run_id: int, status: str, summary: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE runs SET status = ?, finished_at = ?, summary = ? WHERE run_id = ?",
                (status, utc_now(), json.dumps(summary), run_id),
            )

    def run_record(self, run_id: int) -> dict[str, Any] | None:
        """One run's row (command, status, times, config digest), or None if there is no such run."""
        row = self.db.execute(
            "SELECT command, status, started_at, finished_at, config_digest FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            return None
        return dict(zip(("command", "status", "started_at", "finished_at", "config_digest"), row, strict=True))

    def runs(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT run_id, command, status, started_at, finished_at, summary FROM runs ORDER BY run_id"
        ).fetchall()
        return [
            {"run_id": r[0], "command": r[1], "status": r[2], "started_at": r[3], "finished_at": r[4],
             "summary": json.loads(r[5]) if r[5] else {}}
            for r in rows
        ]

    # -- resume --------------------------------------------------------------------------------

    def reset_in_flight(self) -> int:
        """Requests left in flight by a run that died are simply pending again."""
        with self.transaction() as db:
            return db.execute(
                "UPDATE requests SET status = 'pending', updated_at = ? WHERE status = 'in_flight'", (utc_now(),)
            ).rowcount

    def requeue_failed(self, error_type: str | None = None) -> int:
        """Mark failed requests pending again (all, or those of one error type) for ``retry``."""
        sql = "UPDATE requests SET status = 'pending', updated_at = ? WHERE status = 'failed'"
        params: tuple[Any, ...] = (utc_now(),)
        if error_type:
            sql += " AND error_type = ?"
            params += (error_type,)
        with self.transaction() as db:
            return db.execute(sql, params).rowcount

    def item_states(self, row_ids: Sequence[str]) -> dict[str, ItemState]:
        """Ledger state of many manifest rows in a few queries."""
        found: dict[str, ItemState] = {}
        for chunk in _chunks(row_ids):
            marks = ",".join("?" * len(chunk))
            for row_id, digest, key, status, final, run_id in self.db.execute(
                "SELECT i.row_id, i.input_digest, i.request_key, r.status, r.final, i.run_id FROM items i "
                f"LEFT JOIN requests r ON r.key = i.request_key WHERE i.row_id IN ({marks})",
                chunk,
            ):
                found[row_id] = ItemState(digest, key, status, bool(final), run_id)
        return found

    def known_rows(self, row_ids: Sequence[str]) -> set[str]:
        """The manifest rows the ledger has seen at all: one primary-key probe each, no join (about 1 us a
        row against ~6 us for ``item_states``, whose join looks each request up by its hashed key)."""
        known: set[str] = set()
        for chunk in _chunks(row_ids):
            marks = ",".join("?" * len(chunk))
            known.update(row_id for (row_id,) in self.db.execute(
                f"SELECT row_id FROM items WHERE row_id IN ({marks})", chunk))
        return known

    def answered(self, key: str) -> bool:
        """True if the request key has an ok answer (so a duplicate image need not be sent again)."""
        return self.db.execute("SELECT 1 FROM requests WHERE key = ? AND +status = 'ok'", (key,)).fetchone() is not None

    # -- writes --------------------------------------------------------------------------------

    def commit(self, writes: Iterable[Write], run_id: int | None) -> None:
        """Apply a group of writes in one transaction (the writer's group commit)."""
        now = utc_now()
        requests, items = [], []
        for w in writes:
            if w.status is not None:
                result = orjson.dumps(w.results).decode() if w.results is not None else None
                requests.append(
                    (w.key, w.status, w.attempts, w.error_type, w.error_message, int(w.final), run_id, now, result)
                )
            items.extend((row_id, digest, w.key, run_id, now) for row_id, digest in w.items)
        with self.transaction() as db:
            if not self._bumped:  # once per connection is enough to tell "this run changed something"
                db.execute(
                    "INSERT INTO meta (key, value) VALUES ('writes', '1') "
                    "ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                )
            db.executemany(
                "INSERT INTO requests (key, status, attempts, error_type, error_message, final, run_id, updated_at, "
                "result) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET status = excluded.status, "
                "attempts = excluded.attempts, error_type = excluded.error_type, "
                "error_message = excluded.error_message, final = excluded.final, run_id = excluded.run_id, "
                "updated_at = excluded.updated_at, result = COALESCE(excluded.result, requests.result)",
                requests,
            )
            if items:
                db.executemany(
                    "INSERT INTO items (row_id, input_digest, request_key, run_id, seen_at) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (row_id) DO UPDATE SET input_digest = excluded.input_digest, "
                    "request_key = excluded.request_key, run_id = excluded.run_id, seen_at = excluded.seen_at",
                    items,
                )
        self._bumped = True

    def drop_unmapped(self, prefix: str) -> int:
        """Delete the unfinished requests whose key starts with ``prefix`` that no manifest row maps to any
        more: an engine's provisional in-flight marks (the Ray engine's), superseded by their rows' answers."""
        with self.transaction() as db:
            return db.execute(
                "DELETE FROM requests WHERE key >= ? AND key < ? AND status IN ('pending', 'in_flight') "
                "AND NOT EXISTS (SELECT 1 FROM items WHERE items.request_key = requests.key)",
                (prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)),
            ).rowcount

    # -- snapshots -----------------------------------------------------------------------------

    def snapshot(self, target: Path) -> None:
        """Write a consistent copy of the ledger to ``target`` (a new file) with SQLite's online backup API:
        one read transaction, so the copy is the ledger as of one commit even while a run keeps writing
        (WAL: writers are not blocked). The copy is a plain rollback-journal database with no ``-wal``
        beside it, ready to upload (``ledger.sync``). Call it on a connection of its own thread."""
        with disk_errors(target):
            copy = sqlite3.connect(target)
            try:
                self.db.backup(copy)
                copy.execute("PRAGMA journal_mode=DELETE")
            finally:
                copy.close()

    # -- meta ----------------------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                       "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))

    @property
    def writes(self) -> int:
        """Grows with every connection that commits writes: unchanged means no outcome changed since it was
        read (a run's first commit bumps it; later ones need not, which keeps a commit to its own rows)."""
        return int(self.get_meta("writes") or 0)

    # -- reading results -----------------------------------------------------------------------

    def outcomes(self, row_ids: Sequence[str], run_id: int | None = None) -> dict[str, Outcome]:
        """Finished outcomes (ok or failed) of manifest rows, for rebuilding the output; with ``run_id``
        only the rows that run finished (for per-run partitions)."""
        found: dict[str, Outcome] = {}
        only_run = "" if run_id is None else " AND i.run_id = ?"
        for chunk in _chunks(row_ids):
            marks = ",".join("?" * len(chunk))
            params = [*chunk] if run_id is None else [*chunk, run_id]
            for row_id, status, attempts, result in self.db.execute(
                "SELECT i.row_id, r.status, r.attempts, r.result FROM items i JOIN requests r "
                # "+r.status": keeps SQLite from scanning the status index instead of two key lookups
                f"ON r.key = i.request_key WHERE i.row_id IN ({marks}) AND +r.status IN ('ok', 'failed')"
                + only_run,
                params,
            ):
                found[row_id] = Outcome(status, attempts, orjson.loads(result) if result else [])
        return found

    def status_counts(self) -> dict[str, int]:
        """Manifest rows known to the ledger, by the status of their request."""
        rows = self.db.execute(
            "SELECT COALESCE(r.status, 'pending'), COUNT(*) FROM items i "
            "LEFT JOIN requests r ON r.key = i.request_key GROUP BY 1"
        ).fetchall()
        return {status: count for status, count in rows}

    def error_breakdown(self, examples: int = 3) -> list[dict[str, Any]]:
        """Failed rows by error type, most common first, with a few example rows and messages."""
        return [{"error_type": error_type, "count": count,
                 "examples": [{"id": row_id, "message": message} for row_id, message in sample]}
                for error_type, count, sample in self.failure_groups(examples)]

    def failure_groups(self, examples: int = 3, run_id: int | None = None
                       ) -> list[tuple[str | None, int, list[tuple[str, str | None]]]]:
        """Manifest rows whose request failed, as (error type, count, [(row id, message)] examples), most
        common type first; with ``run_id`` only the requests that run failed (for its run report)."""
        only_run, params = ("", ()) if run_id is None else (" AND r.run_id = ?", (run_id,))
        groups = self.db.execute(
            "SELECT r.error_type, COUNT(*) FROM items i JOIN requests r ON r.key = i.request_key "
            f"WHERE r.status = 'failed'{only_run} GROUP BY r.error_type ORDER BY COUNT(*) DESC, r.error_type",
            params,
        ).fetchall()
        out = []
        for error_type, count in groups:
            sample = self.db.execute(
                "SELECT i.row_id, r.error_message FROM items i JOIN requests r ON r.key = i.request_key "
                f"WHERE r.status = 'failed'{only_run} AND r.error_type IS ? ORDER BY i.row_id LIMIT ?",
                (*params, error_type, examples),
            ).fetchall()
            out.append((error_type, count, sample))
        return out

    def finished_rows(self, run_id: int | None = None) -> list[tuple[str, str, str]]:
        """(row id, status, finished at) of every manifest row with an outcome (ok or failed), by row id;
        with ``run_id`` only the rows whose request that run finished. What the gallery picks its cards
        from: three short columns per row, so 100,000 rows stay a few MB."""
        only_run, params = ("", ()) if run_id is None else (" AND r.run_id = ?", (run_id,))
        return self.db.execute(
            "SELECT i.row_id, r.status, r.updated_at FROM items i JOIN requests r ON r.key = i.request_key "
            f"WHERE r.status IN ('ok', 'failed'){only_run} ORDER BY i.row_id", params,
        ).fetchall()

    def finished_requests(self, run_id: int, result_fields: Sequence[str]) -> Iterator[tuple[Any, ...]]:
        """(status, attempts, error_type, *fields of the first result) of every request run ``run_id``
        finished, streamed from SQLite so a large run is folded without loading it whole."""
        for name in result_fields:
            if not name.isidentifier():
                raise ValueError(f"not a result field name: {name!r}")
        columns = "".join(f", json_extract(result, '$[0].{name}')" for name in result_fields)
        yield from self.db.execute(
            f"SELECT status, attempts, error_type{columns} FROM requests "
            "WHERE run_id = ? AND status IN ('ok', 'failed')", (run_id,)
        )

    def mean_usage(self) -> tuple[float | None, float | None]:
        """Mean prompt and completion tokens per finished request so far (for estimates)."""
        row = self.db.execute(
            "SELECT AVG(json_extract(result, '$[0].prompt_tokens')), "
            "AVG(json_extract(result, '$[0].completion_tokens')) FROM requests WHERE status = 'ok'"
        ).fetchone()
        return row[0], row[1]

    def oldest_pending(self) -> dict[str, Any] | None:
        row = self.db.execute(
            "SELECT i.row_id, r.updated_at FROM items i JOIN requests r ON r.key = i.request_key "
            "WHERE r.status IN ('pending', 'in_flight') ORDER BY r.updated_at LIMIT 1"
        ).fetchone()
        return {"id": row[0], "since": row[1]} if row else None


@contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """SQLite's disk failures (``database or disk is full``, I/O errors, a read-only file system) as a
    ``StorageError`` naming the ledger; anything else (a corrupt file) passes through."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        kind = _DISK_CODES.get(getattr(exc, "sqlite_errorcode", -1) & 0xFF)
        if kind is None:
            raise
        name = getattr(exc, "sqlite_errorname", "")
        raise storage_failure(path, f"{exc} ({name})" if name else str(exc), kind) from exc


def _chunks(values: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]


def job_lock_path(ledger: Path) -> Path:
    """The job's lock file, beside its ledger: ``<ledger>.lock``."""
    return ledger.with_name(ledger.name + ".lock")


class JobLock:
    """One run at a time per job: an exclusive ``flock`` on a file beside the ledger.

    The kernel drops the lock when its holder dies, so a lock left by a killed run is taken over
    without any clean-up; the file holds the holder's pid only to say who is running.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> None:
        with storage_errors(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockHeld(
                f"another run of this job is in progress (pid {holder}, lock {self.path}); "
                "wait for it to finish or stop it"
            ) from None
        try:
            with storage_errors(self.path):
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @contextmanager
    def probe(self) -> Iterator[int | None]:
        """Who holds the lock: the running run's pid, or None when no run holds it (a killed run's lock
        is free: the kernel dropped it with the process).

        Never waits and never creates the lock file. When the lock is free, a shared ``flock`` is kept for
        the ``with`` block, so no run can start (and be taken for dead) while the caller reads the ledger;
        keep the block short: a run starting in that moment is refused as for any concurrent run. A
        holder that left no pid in the file is reported as pid 0.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 64).decode(errors="replace").strip()
                yield int(text) if text.isdigit() else 0
                return
            yield None
        finally:
            os.close(fd)  # closing drops the shared lock

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JobLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
