"""Atomic file replacement, the one mechanism for every file the pipeline publishes.

Outputs, run reports, the Prometheus textfile and scheduler units are read by other programs at any
moment (a dashboard, node_exporter, systemd), so each is written to a temporary file beside its target,
fsynced, and renamed over it: a reader sees the old file or the new one, never half of one. The temporary
name starts with a dot and ends in ``.tmp``, so a collector globbing ``*.prom`` or ``*.parquet`` never
picks it up, and it is removed if writing fails.

Permissions: the temporary file is private (``mkstemp`` makes it 0600) while it is being written; just
before the rename it gets the mode a plain ``open()`` would have given the file, ``0666`` less the
process umask, so published files follow the umask like the ledger and the logs do. The umask is read
from ``/proc/self/status`` where there is one: setting it to read it back (the only portable way) would
change it, for a moment, for every thread of the process.

A write that fails at the OS level (disk full, I/O error, read-only file system) becomes one
``StorageError`` naming the target and the cause (``storage_error``): the run stops with a line a person
can act on, never a traceback.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import StorageError
from pipeline.core.targets import Target

__all__ = ["atomic_path", "atomic_write_text", "location_exists", "published", "published_mode", "storage_error",
           "storage_errors", "storage_failure"]

_PROC_STATUS = Path("/proc/self/status")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` to write; when the block ends without an error it is
    fsynced and renamed over ``path``, otherwise it is removed and ``path`` is left as it was."""
    with storage_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        with storage_errors(path):
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(temporary, published_mode())
            os.replace(temporary, path)
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:  # the file system went read-only or away: the write's own error is the news
            pass


@contextmanager
def published(path: Target, options: Mapping[str, Any] | None = None) -> Iterator[Path]:
    """``atomic_path`` for a local ``path``; for an object-store URL, a local temporary file uploaded whole
    when the block ends (``edges/remote.staged_upload``; fsspec is imported only then). ``options``: the
    store's ``storage_options``, unused for a local path."""
    if isinstance(path, Path):
        with atomic_path(path) as temporary:
            yield temporary
        return
    from pipeline.edges.remote import staged_upload

    with staged_upload(path, options) as temporary:
        yield temporary


def location_exists(path: Target, options: Mapping[str, Any] | None = None) -> bool:
    """``path.exists()``, also for an object-store URL (a metadata request; wrong credentials or a missing
    bucket raise ``ObjectStoreError``)."""
    if isinstance(path, Path):
        return path.exists()
    from pipeline.edges.remote import probe

    return probe(path, options)


def atomic_write_text(path: Target, text: str, options: Mapping[str, Any] | None = None) -> None:
    """Replace ``path`` (a local file or an object) with ``text`` (UTF-8) atomically."""
    with published(path, options) as temporary, storage_errors(path):  # type: ignore[arg-type]
        temporary.write_text(text, encoding="utf-8")


def published_mode() -> int:
    """The mode ``open(path, "w")`` would create a file with: ``0o666`` less the process umask."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process umask, read without changing it (Linux ``/proc``), else read once and cached."""
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _umask_at_first_use()


@functools.cache
def _umask_at_first_use() -> int:
    """Where there is no ``/proc``: set-and-restore, once per process (the moment another thread could
    create a file under a different umask is then once, at the first published file)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: What to do, by the kind of failure; each ends by saying the same command picks up where it stopped.
_ADVICE = {
    "full": "free space there (or point the path elsewhere in the config)",
    "read-only": "make that file system writable (or point the path elsewhere in the config)",
    "permission": "give this user write access there (or point the path elsewhere in the config)",
    "io": "check the disk (dmesg, SMART) or point the path elsewhere in the config",
}
_KINDS = {errno.ENOSPC: "full", errno.EDQUOT: "full", errno.EFBIG: "full", errno.EROFS: "read-only",
          errno.EACCES: "permission", errno.EPERM: "permission"}
_ERRNO_IN_TEXT = re.compile(r"\[errno (\d+)\]", re.IGNORECASE)  # pyarrow's OSErrors carry it only in the text


@contextmanager
def storage_errors(path: Path) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing ``path`` into a ``StorageError`` naming it."""
    try:
        yield
    except OSError as exc:
        raise storage_error(path, exc) from exc


def storage_error(path: Path, exc: OSError) -> StorageError:
    """One line for a failed write: the path, the cause (``No space left on device (ENOSPC)``), the advice."""
    code = exc.errno
    if code is None and (found := _ERRNO_IN_TEXT.search(str(exc))):
        code = int(found.group(1))
    if code is None:
        return storage_failure(path, str(exc) or type(exc).__name__, "io")
    cause = f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
    return storage_failure(path, cause, _KINDS.get(code, "io"))


def storage_failure(path: Path, cause: str, kind: str) -> StorageError:
    """``kind``: full, read-only, permission or io (picks the advice)."""
    return StorageError(
        f"cannot write {path}: {cause}; {_ADVICE.get(kind, _ADVICE['io'])}, then run the same command "
        "again: rows already finished are kept in the ledger and are not sent again",
        path=str(path), cause=cause)
