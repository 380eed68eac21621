"""What the pre-flight pool runs for one image: read a local file, prepare it, wrap it as the payload to send.

Kept apart from ``images.py`` (downloads, object stores, aiohttp) so that a worker process imports only
what pixel work needs: the fork server that starts the workers imports this module once, ~0.05 CPU-s
(Pillow) instead of ~0.5 s for ``images``; the policy comes as a ``PixelPolicy``, so neither pydantic nor
the config schema is imported (that was 0.15 s of it). Everything here is module-level, so a worker
process can unpickle it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import signal
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import ImageError
from pipeline.edges.preflight import Policy, Prepared, prepare

try:  # ~35x faster than the stdlib on a 48 KB image (1.4 us vs 52 us); optional, same output
    import pybase64 as _fast_base64  # type: ignore[import-not-found]
except ImportError:
    _fast_base64 = None


@dataclass(frozen=True, slots=True)
class ImagePayload:
    """What goes on the wire for one image, its identity, and what the output reports about it."""

    url: str  # the data URI to send, or the original URL with remote: pass_through
    sha256: str  # hex sha256 of the original source bytes (of the URL string for pass_through)
    report: dict[str, Any]  # exactly REPORT_KEYS, None where unknown


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def start_worker() -> None:
    """A worker process's initializer: Ctrl-C ignored (``ignore_interrupts``), the per-photo buffers kept."""
    ignore_interrupts()
    keep_big_buffers()


def keep_big_buffers() -> None:
    """Let glibc keep a photo's buffers (the 4 MB file, 12 MB of decoded pixels, the resized copies) in the
    heap for the next photo instead of mapping each afresh and unmapping it when freed, which its default
    (a 128 KB threshold, raised only as big blocks happen to be freed) does at random: a worker forked
    from a fork server that had imported pydantic page-faulted ~2,100 times per 12 MP photo. Buffers
    over 64 MB (a huge image) are still mapped and given back; at most 128 MB of free heap is kept.
    A no-op where the C library has no ``mallopt`` (musl, macOS)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 64 << 20)
    mallopt(_M_TRIM_THRESHOLD, 128 << 20)


def ignore_interrupts() -> None:
    """A worker's initializer: Ctrl-C reaches the whole process group, but stopping is the run's decision
    (``run.stop_grace``); a worker that died of it would break the pool under the rows still in flight."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def prepare_bytes(policy: Policy, use_draft: bool, data: bytes, label: str) -> ImagePayload:
    """Bytes already in hand (a download, an object, a table cell): they cross the pipe once."""
    return to_payload(data, prepare(data, label, policy, use_draft=use_draft))


def read_and_prepare(policy: Policy, use_draft: bool, path: str, source: str, no_follow: bool) -> ImagePayload:
    """Read and prepare in one hop: in a worker process the file's bytes never cross the pipe."""
    data = read_image_file(Path(path), source, policy.max_source_bytes, no_follow=no_follow)
    assert data is not None  # no only_up_to: always read
    return prepare_bytes(policy, use_draft, data, source)


def to_payload(original: bytes, prepared: Prepared) -> ImagePayload:
    return ImagePayload(f"data:{prepared.mime};base64,{_base64_text(prepared.data)}",
                        hashlib.sha256(original).hexdigest(), prepared.report)


def _base64_text(data: bytes) -> str:
    if _fast_base64 is not None:
        return _fast_base64.b64encode_as_string(data)  # type: ignore[no-any-return]
    return base64.b64encode(data).decode("ascii")


def read_image_file(path: str | Path, source: str, max_bytes: int, *, only_up_to: int | None = None,
                    no_follow: bool = False) -> bytes | None:
    """Read a local image; every OS failure becomes a precise per-row ``ImageError``.

    Opened non-blocking and checked with ``fstat``: a FIFO or device named in a manifest fails at once
    instead of hanging a worker, and the size is checked before anything is read. Returns None, reading
    nothing, when the file is larger than ``only_up_to``. ``no_follow`` opens an already-resolved path so
    that a symlink swapped in after the ``input.root`` check is refused, not followed.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if no_follow else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ImageError(f"{source}: image file not found (looked at {path})", error_type="image_missing") from None
    except NotADirectoryError:
        raise ImageError(f"{source}: cannot read {path}: a part of the path is a file, not a folder",
                         error_type="image_unreadable") from None
    except PermissionError:
        raise ImageError(f"{source}: no permission to read {path}", error_type="image_unreadable") from None
    except OSError as exc:
        kind = "image_missing" if exc.errno == errno.ENOENT else "image_unreadable"
        raise ImageError(f"{source}: cannot open {path}: {exc.strerror or exc}", error_type=kind) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ImageError(f"{source}: {path} is a directory, not an image file", error_type="image_unreadable")
        if not stat.S_ISREG(info.st_mode):
            raise ImageError(f"{source}: {path} is not a regular file (a FIFO, socket or device); point the "
                             "row at an image file", error_type="image_unreadable")
        if info.st_size > max_bytes:
            raise ImageError(f"{source}: file is {info.st_size} bytes, over images.max_source_bytes={max_bytes}",
                             error_type="image_too_large")
        if only_up_to is not None and info.st_size > only_up_to:
            return None
        return _read_all(fd, info.st_size, max_bytes, source, path)
    finally:
        os.close(fd)


def _read_all(fd: int, expected: int, max_bytes: int, source: str, path: str | Path) -> bytes:
    """One read in the usual case; a file that grows while being read is still capped."""
    try:
        data = os.read(fd, expected + 1)
        if len(data) <= expected:
            return data
        rest = [data]
        total = len(data)
        while chunk := os.read(fd, 1 << 20):
            total += len(chunk)
            if total > max_bytes:
                raise ImageError(f"{source}: file grew past images.max_source_bytes={max_bytes} while being read",
                                 error_type="image_too_large")
            rest.append(chunk)
        return b"".join(rest)
    except OSError as exc:
        raise ImageError(f"{source}: cannot read {path}: {exc.strerror or exc}",
                         error_type="image_unreadable") from None
