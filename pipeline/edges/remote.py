"""Publishing to object stores: whole-object uploads, object metadata, downloads, and the lock object.

Imported only for a ``RemotePath`` (``edges/files.py`` imports it lazily), so a job with local paths never
loads fsspec.

**Atomic by construction.** A file bound for a store is written completely on local disk first (by the
same writers as a local file), then uploaded with fsspec's ``put_file``: one ``PutObject`` for a small
file, a multipart upload for a large one (S3 and S3-compatible stores, GCS's resumable upload and Azure's
block list work the same way). Either way the store makes the object visible only when the upload
completes, so a reader sees the previous object or the new one, never half of one; a failed upload leaves
the previous object as it was (an unfinished multipart upload is aborted).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.core.errors import ObjectStoreError, StorageError
from pipeline.core.targets import RemotePath
from pipeline.edges.storage import filesystem, translated

__all__ = ["ObjectInfo", "download", "exists", "object_info", "probe", "staged_upload", "store_calls", "upload"]

Options = Mapping[str, Any] | None
#: The config key the options of a published file come from, for messages.
WHERE = "output.storage_options"


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store says about one object: its version tag (ETag / generation) and when it was written."""

    etag: str | None
    modified: float | None  # POSIX seconds
    size: int


@contextmanager
def store_calls(url: RemotePath, options: Options, *, where: str = WHERE, action: str = "write") -> Iterator[Any]:
    """The blocking fsspec filesystem for ``url``; any SDK failure inside is one ``ObjectStoreError``
    naming the URL, the problem and the ``storage_options`` key to check (``edges/storage.store_error``)."""
    opts = dict(options or {})
    with translated(url, opts, where=where, action=action):
        yield filesystem(url, opts, where=where)


def upload(local: Path, url: RemotePath, options: Options = None, *, where: str = WHERE) -> None:
    """Upload ``local`` whole to ``url`` (one PUT, or a multipart upload completed at the end). A failure is
    a ``StorageError`` (exit code 6, like a full disk): the rows are in the ledger, the same command
    publishes them once the store is reachable again."""
    try:
        with store_calls(url, options, where=where) as fs:
            fs.put_file(str(local), str(url))
    except ObjectStoreError as exc:
        raise StorageError(f"cannot write {exc}; then run the same command again: rows already finished are "
                           "kept in the ledger and are not sent again", path=exc.url, cause=exc.problem) from None


@contextmanager
def staged_upload(url: RemotePath, options: Options = None) -> Iterator[Path]:
    """Yield a private local temporary file to write; when the block ends without an error it is uploaded
    whole to ``url`` (see the module docstring), and removed in any case. Staged in ``TMPDIR``."""
    fd, name = tempfile.mkstemp(prefix=f".{url.name}.", suffix=".tmp")
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        upload(temporary, url, options)
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def object_info(url: RemotePath, options: Options = None, *, where: str = WHERE) -> ObjectInfo | None:
    """The object's metadata (never from a listing cache), or None when there is no such object."""
    with store_calls(url, options, where=where, action="read") as fs:
        try:
            info = fs.info(str(url), refresh=True) if _takes_refresh(fs) else fs.info(str(url))
        except FileNotFoundError:
            return None
    if info.get("type") == "directory":
        return None
    return ObjectInfo(etag=_etag(info), modified=_modified(info), size=int(info.get("size") or 0))


def exists(url: RemotePath, options: Options = None, *, where: str = WHERE) -> bool:
    return object_info(url, options, where=where) is not None


def probe(url: RemotePath, options: Options = None, *, where: str = WHERE) -> bool:
    """Whether the object exists, checked before a run sends anything: wrong credentials, a refused
    access or a missing bucket raise one ``ObjectStoreError`` (exit code 2) here rather than failing the
    upload after every row was paid for."""
    with store_calls(url, options, where=where, action="write") as fs:
        try:
            fs.info(str(url), refresh=True) if _takes_refresh(fs) else fs.info(str(url))
            return True
        except FileNotFoundError:
            pass
        except PermissionError:  # a HEAD's 403 has no body: a 1-byte GET's answer names the reason
            fs.cat_file(str(url), start=0, end=1)
            raise
        bucket = f"{url.scheme}://{url.split('://', 1)[1].split('/', 1)[0]}"
        if not fs.exists(bucket):
            raise FileNotFoundError(f"{bucket}: the bucket does not exist")
    return False


def download(url: RemotePath, local: Path, options: Options = None, *, where: str = WHERE) -> None:
    """Fetch the object into ``local`` (written beside it and renamed, so ``local`` is never half a file)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
    os.close(fd)
    try:
        with store_calls(url, options, where=where, action="read") as fs:
            fs.get_file(str(url), name)
        os.replace(name, local)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)


def _takes_refresh(fs: Any) -> bool:
    return type(fs).__name__ in {"S3FileSystem", "GCSFileSystem"}


def _etag(info: Mapping[str, Any]) -> str | None:
    for key in ("ETag", "etag", "generation", "md5Hash"):
        if info.get(key):
            return str(info[key])
    return None


def _modified(info: Mapping[str, Any]) -> float | None:
    for key in ("LastModified", "last_modified", "updated", "mtime", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return None
