"""``ledger.sync``: the ledger of a stateless runner (a Kubernetes CronJob with no volume) kept on a store.

The ledger itself stays a local SQLite file; a copy lives at the ``ledger.sync`` URL:

- **At start**, after the job's lock object is taken (``edges/objectlock.py``), the copy is restored when
  the local file is missing or older than the object (a sidecar ``<ledger>.sync.json`` remembers the version
  this machine last uploaded or restored, so a runner that keeps its disk does not download its own copy).
- **During the run**, one thread saves a consistent snapshot (SQLite's backup API, ``StateStore.snapshot``)
  and uploads it every ``ledger.sync_interval`` seconds, and renews the lock every third of
  ``ledger.lock_ttl``. One thread, so at most one upload is in flight, and never on the event loop.
  A killed container loses at most one interval of answers: the next run re-sends only those.
- **At the end** (finished, stopped, or failed) the thread is stopped, a last snapshot is uploaded and the
  lock released. A run that lost its lock to another run (it could not renew it for ``lock_ttl``) stops
  taking rows and uploads nothing, so it never overwrites the new owner's ledger.

An upload is one whole-object PUT (``edges/remote.upload``), so the object is always a complete ledger.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError, StorageError
from pipeline.core.redact import redact_url
from pipeline.edges.ledger import StateStore
from pipeline.edges.objectlock import ObjectLock, lock_url
from pipeline.edges.remote import download, object_info, upload

log = logging.getLogger("pipeline.ops.ledgersync")

#: The config key the options of the synced ledger come from, for messages.
WHERE = "ledger.storage_options"


class LedgerSync:
    """Restore, periodic and final snapshots, and the lock object of one run with ``ledger.sync``."""

    def __init__(self, config: Config, on_lost_lock: Callable[[], None]) -> None:
        assert config.ledger.sync is not None
        self.url = config.ledger.sync
        self.local = config.ledger_path
        self.interval = config.ledger.sync_interval
        self._options = config.storage_options_for("ledger")
        self.lock = ObjectLock(lock_url(self.url), config.ledger.lock_ttl, self._options)
        self._on_lost_lock = on_lost_lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.uploads = 0

    @property
    def _sidecar(self) -> Path:
        return self.local.with_name(self.local.name + ".sync.json")

    # -- start ----------------------------------------------------------------------------------

    def start(self, *, restore: bool = True) -> None:
        """Take the lock object, restore the ledger if the store's copy is newer, start the saving thread.
        Blocking (network): call it in a worker thread."""
        self.lock.acquire()
        try:
            if restore:
                self.restore()
        except BaseException:
            self.lock.release()
            raise
        self._thread = threading.Thread(target=self._loop, name="ledger-sync", daemon=True)
        self._thread.start()

    def restore(self) -> bool:
        """Replace the local ledger with the store's copy when the local one is missing or older."""
        info = object_info(self.url, self._options, where=WHERE)
        if info is None:
            log.info("ledger sync: no copy at %s yet; starting from the local ledger", redact_url(self.url))
            return False
        if self.local.exists():
            synced = self._synced_version()  # the version this machine uploaded or restored last
            if synced is not None:
                if info.etag == synced:
                    return False
            elif info.modified is not None and self.local.stat().st_mtime >= info.modified:
                return False
        for suffix in ("-wal", "-shm"):  # a stale WAL must never be replayed into the restored file
            self.local.with_name(self.local.name + suffix).unlink(missing_ok=True)
        download(self.url, self.local, self._options, where=WHERE)
        self._remember(info.etag)
        log.info("ledger sync: restored the ledger from %s (%d bytes)", redact_url(self.url), info.size,
                 extra={"event": "ledger_restored"})
        return True

    # -- saving ---------------------------------------------------------------------------------

    def save(self) -> None:
        """Upload a consistent snapshot of the local ledger (raises ``StorageError``)."""
        with tempfile.TemporaryDirectory(prefix="pipeline-ledger-") as folder:
            snapshot = Path(folder) / self.local.name
            with StateStore(self.local) as store:
                store.snapshot(snapshot)
            upload(snapshot, self.url, self._options, where=WHERE)
        self.uploads += 1
        with contextlib.suppress(PipelineError):  # the version is a hint for the next restore only
            info = object_info(self.url, self._options, where=WHERE)
            self._remember(info.etag if info else None)
        log.debug("ledger sync: saved the ledger to %s", redact_url(self.url))

    def _loop(self) -> None:
        """The saving thread: a snapshot every ``interval`` seconds, the lock renewed every third of its ttl."""
        renew_every = self.lock.ttl / 3
        next_save, next_renew = time.monotonic() + self.interval, time.monotonic() + renew_every
        while not self._stop.wait(max(0.0, min(next_save, next_renew) - time.monotonic())):
            now = time.monotonic()
            if now >= next_renew:
                next_renew = now + renew_every
                if not self.lock.renew():
                    self._on_lost_lock()
                    return
            if now >= next_save:
                next_save = now + self.interval
                try:
                    self.save()
                except Exception as exc:  # noqa: BLE001 - the next interval (or the end of the run) tries again
                    log.warning("ledger sync: could not save the ledger: %s", exc)

    def finish(self) -> StorageError | None:
        """Stop the thread, upload the last snapshot (unless the lock was lost), release the lock; returns
        a failed final upload for the caller to report. Blocking: call it in a worker thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        failure = None
        try:
            if self.lock.held:
                self.save()
        except StorageError as exc:
            failure = exc
        finally:
            self.lock.release()
        return failure

    # -- sidecar --------------------------------------------------------------------------------

    def _synced_version(self) -> str | None:
        try:
            state = json.loads(self._sidecar.read_text())
        except (OSError, ValueError):
            return None
        return state.get("etag") if state.get("url") == str(self.url) else None

    def _remember(self, etag: str | None) -> None:
        with contextlib.suppress(OSError):
            self._sidecar.write_text(json.dumps({"url": str(self.url), "etag": etag}))
