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

from pipeline.core.errors import StorageError
from pipeline.core.locations import RemotePath
from pipeline.edges.files import storage_failure
from pipeline.edges.storage import filesystem, storage_error_text

__all__ = ["ObjectInfo", "download", "exists", "object_info", "staged_upload", "upload"]

Options = Mapping[str, Any] | None


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the store says about one object: its version tag (ETag / generation) and when it was written."""

    etag: str | None
    modified: float | None  # POSIX seconds
    size: int


def _fs(url: RemotePath, options: Options) -> tuple[Any, str]:
    return filesystem(url, options)


@contextmanager
def write_errors(url: RemotePath) -> Iterator[None]:
    """A failed write to the store as one ``StorageError`` naming the URL (credentials, network, bucket)."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - fsspec backends raise OSError, botocore and SDK errors alike
        raise storage_failure(url, storage_error_text(exc), "store") from exc  # type: ignore[arg-type]


def upload(local: Path, url: RemotePath, options: Options = None) -> None:
    """Upload ``local`` whole to ``url`` (one PUT, or a multipart upload completed at the end)."""
    with write_errors(url):
        fs, path = _fs(url, options)
        fs.put_file(str(local), path)


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


def object_info(url: RemotePath, options: Options = None) -> ObjectInfo | None:
    """The object's metadata, or None when there is no such object."""
    with write_errors(url):
        fs, path = _fs(url, options)
        try:
            info = fs.info(path, refresh=True) if _takes_refresh(fs) else fs.info(path)
        except FileNotFoundError:
            return None
    if info.get("type") == "directory":
        return None
    return ObjectInfo(etag=_etag(info), modified=_modified(info), size=int(info.get("size") or 0))


def exists(url: RemotePath, options: Options = None) -> bool:
    return object_info(url, options) is not None


def download(url: RemotePath, local: Path, options: Options = None) -> None:
    """Fetch the object into ``local`` (written beside it and renamed, so ``local`` is never half a file)."""
    local.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
    os.close(fd)
    try:
        with write_errors(url):
            fs, path = _fs(url, options)
            fs.get_file(path, name)
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
