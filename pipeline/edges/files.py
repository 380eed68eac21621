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
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text", "published_mode"]

_PROC_STATUS = Path("/proc/self/status")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path`` to write; when the block ends without an error it is
    fsynced and renamed over ``path``, otherwise it is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temporary, published_mode())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_path(path) as temporary:
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
