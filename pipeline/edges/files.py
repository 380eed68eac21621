"""Atomic file replacement, the one mechanism for every file the pipeline publishes.

Outputs, run reports, the Prometheus textfile and scheduler units are read by other programs at any
moment (a dashboard, node_exporter, systemd), so each is written to a temporary file beside its target,
fsynced, and renamed over it: a reader sees the old file or the new one, never half of one. The temporary
name starts with a dot and ends in ``.tmp``, so a collector globbing ``*.prom`` or ``*.parquet`` never
picks it up, and it is removed if writing fails.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_text"]

#: Published files are readable by the collectors that watch them, whatever mode ``mkstemp`` chose.
FILE_MODE = 0o644


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
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
