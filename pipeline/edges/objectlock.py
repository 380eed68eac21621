"""The job lock for runners without a shared disk: a lock object next to the synced ledger.

Two containers of the same CronJob share no ``flock``, so ``ledger.sync`` adds a lock object
``<sync URL>.lock``: a small JSON document naming its owner (host, pid, run token) and when it expires.

- **Taking it** is a conditional create: ``put`` with ``If-None-Match: *`` on S3 and S3-compatible stores
  (s3fs's ``mode="create"``; AWS S3, MinIO, R2 and moto's server honour it), a generation precondition
  (``ifGenerationMatch=0``) where the fsspec backend offers one (gcsfs). The store lets exactly one of two
  racing writers create the object; the other gets "exists" and reads who holds it.
- **Renewing** (every third of ``ledger.lock_ttl``) rewrites it with a later expiry, conditionally on the
  version this run last wrote (S3 ``If-Match: <ETag>``): a run that lost its lock to a takeover learns it
  instead of overwriting the new owner.
- **An expired lock** (its holder was killed, or lost the store for longer than ``lock_ttl``) is taken over
  with a warning, with the same ``If-Match`` on the expired version so two runs cannot both take it over.
- **Released** at the end: deleted, if it is still this run's.

Where a backend has no conditional writes (fsspec then checks for the object and writes it, two
requests), two runs starting within the same moment could both believe they hold it; every write is
therefore read back and its owner checked, which narrows that window to the gap between the two requests.
The expiry is compared with this host's clock: keep clocks in sync (NTP) and ``lock_ttl`` well above any
skew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from pipeline.core.errors import LockHeld, PipelineError
from pipeline.core.redact import redact_url
from pipeline.core.targets import RemotePath
from pipeline.edges.remote import Options
from pipeline.edges.storage import filesystem, store_error

#: The config key the lock object's options come from, for messages.
WHERE = "ledger.storage_options"

__all__ = ["LockOwner", "ObjectLock", "lock_url"]

log = logging.getLogger("pipeline.edges.objectlock")


def lock_url(sync: RemotePath) -> RemotePath:
    """The lock object of a synced ledger: ``<sync URL>.lock``."""
    return RemotePath(f"{sync}.lock")


@dataclass(frozen=True, slots=True)
class LockOwner:
    """Who holds a lock object, and until when (POSIX seconds)."""

    host: str
    pid: int
    run: str
    expires: float

    def describe(self) -> str:
        until = datetime.fromtimestamp(self.expires, UTC).isoformat(timespec="seconds")
        return f"host {self.host}, pid {self.pid}, run {self.run}, lock expires {until}"


class ObjectLock:
    """One run at a time per job across machines: see the module docstring."""

    def __init__(self, url: RemotePath, ttl: float, options: Options = None) -> None:
        self.url = url
        self.ttl = ttl
        self._options = dict(options or {})
        self._token = uuid.uuid4().hex
        self._etag: str | None = None  # the version this run last wrote; None while not held
        self.lost = False

    def __repr__(self) -> str:
        return f"ObjectLock({str(self.url)!r})"

    @property
    def shown(self) -> str:
        """The URL as messages show it (no credentials, query or fragment)."""
        return redact_url(self.url)

    @property
    def held(self) -> bool:
        return self._etag is not None and not self.lost

    def acquire(self) -> None:
        """Take the lock or raise ``LockHeld`` naming its holder; an expired lock is taken over."""
        fs = filesystem(self.url, self._options, where=WHERE)
        try:
            try:
                self._etag = self._put(fs, mode="create")
            except FileExistsError:
                self._take_over(fs)
            self._check_owner(fs)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - each SDK has its own tree: store_error sorts them
            raise store_error(exc, self.url, self._options, where=WHERE, action="write the job lock") from None

    def renew(self) -> bool:
        """Push the expiry forward; False (and ``lost``) when another run holds the lock now."""
        if not self.held:
            return False
        try:
            fs = filesystem(self.url, self._options, where=WHERE)
            self._etag = self._put(fs, match=self._etag)
            self._check_owner(fs)
        except (LockHeld, FileNotFoundError) as exc:
            self.lost = True
            log.error("lost the job lock %s: %s; this run stops taking rows and will not upload its ledger",
                      self.shown, exc)
        except Exception as exc:  # noqa: BLE001 - the store is unreachable for now: the expiry is the bound
            log.warning("could not renew the job lock %s: %s", self.shown, exc)
        return not self.lost

    def release(self) -> None:
        """Delete the lock object if it is still this run's (best effort: it expires anyway)."""
        if not self.held:
            return
        self._etag = None
        try:
            fs = filesystem(self.url, self._options, where=WHERE)
            owner = self._read(fs)
            if owner is not None and owner[0].run == self._token:
                fs.rm_file(str(self.url))
        except Exception as exc:  # noqa: BLE001 - the lock expires by itself; say so and go on
            log.warning("could not release the job lock %s (it expires by itself): %s", self.shown, exc)

    def _take_over(self, fs: Any) -> None:
        found = self._read(fs)
        if found is None:  # released between our two requests: try once more
            self._etag = self._put(fs, mode="create")
            return
        owner, etag = found
        if owner.expires > time.time():
            raise LockHeld(f"another run of this job is in progress ({owner.describe()}; lock {self.shown}); "
                           "wait for it to finish or stop it")
        log.warning("taking over the expired job lock %s (%s)", self.shown, owner.describe())
        self._etag = self._put(fs, match=etag)

    def _put(self, fs: Any, *, mode: str = "overwrite", match: str | None = None) -> str | None:
        owner = LockOwner(socket.gethostname(), os.getpid(), self._token, time.time() + self.ttl)
        body = json.dumps(asdict(owner)).encode()
        kwargs: dict[str, Any] = {}
        if match is not None and _is_s3(fs):
            kwargs["IfMatch"] = match
        try:
            answer = fs.pipe_file(str(self.url), body, mode=mode, **kwargs)
        except FileExistsError:  # If-None-Match on create: the caller reads who holds it
            raise
        except OSError as exc:
            if _precondition_failed(exc):  # S3 412 on If-Match: someone else wrote it since
                raise LockHeld(f"the job lock {self.shown} changed under this run (another run took it)") from exc
            raise
        etag = answer.get("ETag") if isinstance(answer, dict) else None
        return str(etag) if etag else "written"

    def _check_owner(self, fs: Any) -> None:
        """Read the lock back: on a store without conditional writes, the last writer wins; make sure it is us."""
        found = self._read(fs)
        if found is None or found[0].run != self._token:
            holder = found[0].describe() if found else "nobody"
            self._etag = None
            raise LockHeld(f"another run of this job took the lock {self.shown} at the same moment ({holder}); "
                           "wait for it to finish or stop it")
        self._etag = found[1] or self._etag

    def _read(self, fs: Any) -> tuple[LockOwner, str | None] | None:
        try:
            info = fs.info(str(self.url), refresh=True) if _is_s3(fs) else fs.info(str(self.url))
            data = json.loads(fs.cat_file(str(self.url)))
        except FileNotFoundError:
            return None
        except ValueError:  # not our JSON (a hand-made object): treat it as an expired lock of unknown owner
            data = {}
        owner = LockOwner(str(data.get("host", "unknown")), int(data.get("pid", 0)), str(data.get("run", "?")),
                          float(data.get("expires", 0)))
        etag = info.get("ETag") or info.get("generation")
        return owner, (str(etag) if etag else None)


def _precondition_failed(exc: BaseException) -> bool:
    """S3's 412 (s3fs raises it as ``OSError(EINVAL)``; the botocore error it came from has the code)."""
    response = getattr(exc.__cause__, "response", None)
    if isinstance(response, dict) and response.get("Error", {}).get("Code") == "PreconditionFailed":
        return True
    return "precondition" in str(exc).lower().replace("-", "")


def _is_s3(fs: Any) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

