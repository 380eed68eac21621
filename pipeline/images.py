"""Image loading and encoding: bytes from disk, the real type from magic bytes, a Base64 data URI.

Every failure is an ``ImageError`` for that row alone, with an ``error_type`` that says what to fix.
"""

from __future__ import annotations

import asyncio
import base64
import errno
from dataclasses import dataclass
from pathlib import Path

import aiofiles

from .errors import ImageError

#: Files larger than this are encoded in a worker thread so the event loop keeps streaming.
_THREAD_THRESHOLD = 1 << 20


@dataclass(frozen=True, slots=True)
class ImagePayload:
    """What goes on the wire for one image, and what the output reports about it."""

    data_uri: str
    mime: str
    nbytes: int


def sniff_mime(head: bytes) -> str | None:
    """The image type from the first bytes; the file name's suffix is never trusted."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


async def read_image_file(path: Path) -> bytes:
    """Read a local image, turning every OS failure into a precise, per-row ``ImageError``."""
    try:
        async with aiofiles.open(path, "rb") as handle:
            return await handle.read()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}", error_type="image_missing") from None
    except IsADirectoryError:
        raise ImageError(f"image path is a directory, not a file: {path}", error_type="image_unreadable") from None
    except PermissionError:
        raise ImageError(f"no permission to read image file: {path}", error_type="image_unreadable") from None
    except OSError as exc:
        kind = "image_missing" if exc.errno == errno.ENOENT else "image_unreadable"
        raise ImageError(f"cannot read image file {path}: {exc.strerror or exc}", error_type=kind) from None


def encode_image(data: bytes, source: str) -> ImagePayload:
    """Validate the bytes are a supported image and wrap them as a data URI."""
    if not data:
        raise ImageError(f"image file is empty (0 bytes): {source}", error_type="image_empty")
    mime = sniff_mime(data[:16])
    if mime is None:
        raise ImageError(
            f"not a JPEG, PNG, GIF or WebP image (starts with {data[:8]!r}): {source}",
            error_type="image_unsupported",
        )
    return ImagePayload(data_uri(data, mime), mime, len(data))


async def load_image(path: Path) -> ImagePayload:
    """Read and encode one local image; big files are encoded off the event loop."""
    data = await read_image_file(path)
    if len(data) >= _THREAD_THRESHOLD:
        return await asyncio.to_thread(encode_image, data, str(path))
    return encode_image(data, str(path))
