"""Image pre-flight, the async edge: where an image comes from (local file, file:// or http(s) URL, or an
object store: ``s3://``, ``gs://``, ``az://`` ..., or a relative key under a manifest that lives on one),
path safety under ``input.root``, downloads (``downloads.py``, behind the SSRF guard), object reads
(``storage.py``: fsspec's async interface on the run's loop, ``input.store_concurrency`` in flight), and the
worker pool that keeps pixel work off the event loop.

``ImageLoader.load`` turns one manifest ``path`` value into an ``ImagePayload`` or raises ``ImageError``
for that row alone; the pixel decisions live in ``preflight.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import urllib.parse
from concurrent.futures import BrokenExecutor, Executor, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from pipeline.core.config import Egress, ImagesConfig
from pipeline.core.errors import ImageError, ObjectStoreError
from pipeline.core.redact import redact_url
from pipeline.edges import preflightjob, storage
from pipeline.edges.preflight import (
    MIME_BY_FORMAT,
    PixelPolicy,
    pass_through,
    sniff_mime,
)
from pipeline.edges.preflightjob import (
    ImagePayload,
    prepare_bytes,
    read_and_prepare,
    read_image_file,
    to_payload,
)

if TYPE_CHECKING:
    from pipeline.edges.downloads import Downloader

__all__ = ["REPORT_KEYS", "ImageLoader", "ImagePayload", "fingerprints", "read_image_file", "sniff_mime"]

#: The report columns every payload carries (``results.ResultRow`` has the same names).
REPORT_KEYS = ("image_format", "image_width", "image_height", "image_bytes", "sent_format", "sent_width",
               "sent_height", "sent_bytes", "image_action")

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
#: Types whose original bytes may be sent, so worth a header look on the event loop.
_PASSABLE_MIMES = frozenset(MIME_BY_FORMAT.values())


PoolKind = Literal["process", "thread"]


class ImageLoader:
    """Loads images for one run: one worker pool for pixel work, one lazily opened download session.

    Processes by default (``run.preflight_pool``): Pillow releases the GIL only inside each C call (a
    64 KB slice of JPEG decode, one resize pass) and takes it back in between, so pixel work in threads
    competes with the event loop and with itself (12 MP photos on two cores: threads 1.56-1.98x of one,
    processes 1.86-1.95x; docs/performance.md, scenario (e)). A worker reads a local file itself and hands
    back the finished data URI, so neither the file nor its pixels cross the pipe. The pool starts on the
    first image that needs pixels: a job whose images all go as they are never starts one.
    """

    def __init__(self, images: ImagesConfig, *, root: Path | None = None, workers: int | None = None,
                 inline_bytes: int = 256 * 1024, use_draft: bool = True, egress: Egress | None = None,
                 store: storage.AsyncStore | None = None, store_concurrency: int = 32,
                 pool: PoolKind = "process") -> None:
        """``workers`` defaults to the cores. Files up to ``inline_bytes`` are read and header-checked on the
        event loop (a pool hop costs more CPU than that work); anything needing pixels goes to the pool
        (``pool``: worker processes, or threads in this one). ``use_draft=False`` (full-scale JPEG decode)
        is for benchmarks. ``store`` reads object-store images (with ``input.storage_options``), at most
        ``store_concurrency`` at once."""
        self._policy = images
        self._pixel_policy = PixelPolicy.of(images)  # what the pool gets: a worker never imports the config
        self._store = store if store is not None else storage.AsyncStore({}, where=storage.INPUT_OPTIONS)
        self._store_slots = asyncio.Semaphore(store_concurrency)
        self._inline_bytes = inline_bytes
        self._use_draft = use_draft
        self._root = Path(os.path.realpath(root)) if root is not None else None
        self._workers = workers or _cores()
        self._pool_kind: PoolKind = pool
        self._pool: Executor | None = None  # started by the first image that needs pixels
        self._pool_lock = asyncio.Lock()  # one start at a time, and none racing aclose
        self._egress = egress  # proxies and TLS for downloads
        self._downloader: Downloader | None = None  # opened on the first http(s) image: aiohttp costs ~0.15 s

    async def __aenter__(self) -> ImageLoader:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the download session and stop the pool: queued work is dropped; worker processes finish
        the image in hand and are waited for (off the loop), so none outlives the job."""
        if self._downloader is not None:
            await self._downloader.aclose()
        await self._store.aclose()
        async with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pool_kind == "process":
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        elif pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    async def load(self, source: str, base_dir: Path | str, data: bytes | None = None) -> ImagePayload:
        """One manifest ``path`` value (relative paths resolve against ``base_dir``) -> what to send; or,
        with ``data`` (an in-memory table's image cell), those bytes, ``source`` being only their label."""
        if data is not None:
            return await self._load_bytes(data, source)
        if not source:
            raise ImageError("the image path is empty for this row; fill in the path column",
                             error_type="image_missing")
        if "\0" in source:
            raise ImageError(f"{source!r}: the image path contains a NUL byte; fix the manifest row",
                             error_type="image_unreadable")
        if ":" not in source and not isinstance(base_dir, str):  # a plain path beside a local manifest: most rows
            return await self._load_local(os.path.join(base_dir, source), source)
        url = storage.store_location(source, base_dir)
        if url is not None:
            return await self._load_store(url)
        scheme = _scheme(source)
        if scheme is None:
            return await self._load_local(Path(base_dir) / source, source)
        label = redact_url(source)
        if scheme not in self._policy.allow_schemes:
            raise ImageError(
                f"{label}: {scheme}:// images are refused; allowed schemes: "
                f"{', '.join(self._policy.allow_schemes)} (set images.allow_schemes to enable more)",
                error_type="image_scheme_refused",
            )
        if scheme == "file":
            return await self._load_local(file_url_path(source), source)
        if self._policy.remote == "pass_through":
            report: dict[str, Any] = dict.fromkeys(REPORT_KEYS)
            report["image_action"] = "remote_url"
            return ImagePayload(source, hashlib.sha256(source.encode("utf-8")).hexdigest(), report)
        if self._downloader is None:
            from pipeline.edges.downloads import Downloader

            self._downloader = Downloader(self._policy, self._egress)
        data = await self._downloader.get(source, label)
        return self._quick_payload(data, label) or await self._in_pool(label, prepare_bytes, data, label)

    async def _load_bytes(self, data: bytes, label: str) -> ImagePayload:
        """Image bytes handed in by the caller: the same checks and pre-flight as a file's bytes."""
        if not data:
            raise ImageError(f"{label}: no image bytes in this row's image column (None or empty); fill it in",
                             error_type="image_missing")
        limit = self._policy.max_source_bytes
        if len(data) > limit:
            raise ImageError(f"{label}: image is {len(data)} bytes, over images.max_source_bytes={limit}",
                             error_type="image_too_large")
        return self._quick_payload(data, label) or await self._in_pool(label, prepare_bytes, data, label)

    # -- object stores: one ranged GET per image, many in flight --------------------------------

    async def _load_store(self, url: str) -> ImagePayload:
        """Read an object (at most ``max_source_bytes`` + 1 bytes, so the cap holds without a size request)
        and prepare it like a local file; a missing object fails its row, a refused credential says so."""
        label = redact_url(url)
        cap = self._policy.max_source_bytes
        async with self._store_slots:
            try:
                data = await self._read_object(url, cap + 1)
            except ObjectStoreError as exc:
                raise _row_store_error(exc) from None
        if len(data) > cap:
            raise ImageError(f"{label}: object is over images.max_source_bytes={cap}", error_type="image_too_large")
        return self._quick_payload(data, label) or await self._in_pool(label, prepare_bytes, data, label)

    async def _read_object(self, url: str, end: int) -> bytes:
        try:
            return await self._store.read(url, end)
        except ObjectStoreError as exc:
            if exc.problem != "other" or "range" not in exc.message.lower():
                raise
        # an empty object cannot serve the byte range 0-N (HTTP 416): ask its size to be sure
        if (await self._store.info(url)).get("size") == 0:
            return b""
        raise ImageError(f"{redact_url(url)}: the store refused a ranged read", error_type="image_unreadable")

    # -- local files: small ones inline while no pixels are needed, the rest in one pool hop --------

    async def _load_local(self, path: str | Path, source: str) -> ImagePayload:
        if self._root is not None:
            path = self._inside_root(Path(path), source)
        data = read_image_file(path, source, self._policy.max_source_bytes, only_up_to=self._inline_bytes,
                               no_follow=self._root is not None)
        if data is None:
            return await self._in_pool(source, read_and_prepare, str(path), source, self._root is not None)
        return self._quick_payload(data, source) or await self._in_pool(source, prepare_bytes, data, source)

    async def _in_pool(self, label: str, fn: Any, *args: Any) -> ImagePayload:
        """``fn(pixel_policy, use_draft, *args)`` in the pool. A worker process that dies (a decoder crash, the
        OOM killer) breaks the whole pool: a fresh one takes the row once more, then the row fails."""
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            pool = await self._executor()
            try:
                return await loop.run_in_executor(pool, fn, self._pixel_policy, self._use_draft, *args)
            except BrokenExecutor:  # BrokenProcessPool
                if self._pool is pool:
                    self._pool = None
                    pool.shutdown(wait=False, cancel_futures=True)
                if attempt == 2:
                    raise ImageError(f"{label}: the pre-flight worker process died twice while preparing this "
                                     "image (a decoder crash or out of memory); check or re-export the file",
                                     error_type="image_corrupt") from None
        raise AssertionError("unreachable")

    async def _executor(self) -> Executor:
        """The pool, started in a thread: starting the fork server blocks until it has imported pre-flight
        (0.2-0.5 s), which on the loop would stall every stream in flight."""
        async with self._pool_lock:
            if self._pool is None:
                self._pool = await asyncio.to_thread(_new_pool, self._pool_kind, self._workers)
            return self._pool

    def _inside_root(self, path: Path, source: str) -> Path:
        """The real path (symlinks followed) if it lies under ``input.root``, else a per-row error."""
        assert self._root is not None
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._root):
            raise ImageError(
                f"{source}: resolves to {real}, outside input.root {self._root}; a manifest may only "
                "point at files under the root: fix the row or move the file",
                error_type="image_path_outside_root",
            )
        return real

    def _quick_payload(self, data: bytes, label: str) -> ImagePayload | None:
        """The fast path on the event loop: header only, original bytes; None when pixels are needed."""
        if len(data) > self._inline_bytes or sniff_mime(data[:16]) not in _PASSABLE_MIMES:
            return None
        prepared = pass_through(data, label, self._policy)
        return to_payload(data, prepared) if prepared is not None else None


def _new_pool(kind: PoolKind, workers: int) -> Executor:
    """Worker processes come from a fork server that has imported pre-flight once (each worker is a cheap
    fork of it, not a fresh interpreter), never by forking this multi-threaded process itself. Blocking:
    call it off the event loop."""
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preflight")
    import multiprocessing  # here, not at the top: a job with no pixel work never needs it (start-up time)
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([preflightjob.__name__])
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=preflightjob.start_worker)
    for _ in range(workers):  # each submit with no idle worker starts one: all of them now, off the loop
        pool.submit(int)
    return pool


def _row_store_error(exc: ObjectStoreError) -> ImageError:
    """An object-store failure as this row's error: a missing object is the row's (``image_missing``);
    credentials, access or the network are the job's (``image_store_error``: the next run tries again)."""
    if exc.problem in ("not_found", "no_bucket"):
        return ImageError(f"{exc.message} (the image of this row)", error_type="image_missing")
    error = ImageError(exc.message, error_type="image_store_error")
    error.row_specific = False
    return error


def fingerprints(rows: list[tuple[str, Path | str]], options: dict[str, Any], *, limit: int) -> list[str]:
    """``image_fingerprint`` for a batch of (source, base_dir): objects on a store are asked all at once
    (``storage.infos``: ``limit`` in flight, nothing for a listed directory), local files one ``stat`` each."""
    located: list[str | None] = []
    for source, base_dir in rows:
        try:
            located.append(storage.store_location(source, base_dir))
        except ImageError:
            located.append(None)
    urls = list(dict.fromkeys(url for url in located if url is not None))
    found = storage.infos(urls, options, where=storage.INPUT_OPTIONS, limit=limit) if urls else {}
    return [image_fingerprint(source, base_dir) if url is None else _object_fingerprint(url, found[url])
            for (source, base_dir), url in zip(rows, located, strict=True)]


def _object_fingerprint(url: str, info: dict[str, Any] | ObjectStoreError) -> str:
    """An object's identity without reading it: ETag (or generation), size and modification time."""
    if isinstance(info, ObjectStoreError):
        return f"{'missing' if info.problem in ('not_found', 'no_bucket') else 'unreadable'}:{url}"
    tag = info.get("ETag") or info.get("etag") or info.get("generation") or info.get("md5Hash") or ""
    when = (info.get("LastModified") or info.get("last_modified") or info.get("updated") or info.get("mtime")
            or info.get("created"))
    if hasattr(when, "timestamp"):
        when = f"{when.timestamp():.6f}"
    return f"{url}|{str(tag).strip(chr(34))}|{info.get('size')}|{when}"


def image_fingerprint(source: str, base_dir: Path | str) -> str:
    """Cheap identity of the input for resume checks: one ``stat``, the file is never read."""
    if "://" in source:  # checked first: this runs once per manifest row on every resume
        if _scheme(source) != "file":
            return source
        try:
            absolute = os.path.abspath(file_url_path(source))
        except ImageError:  # a file:// URL naming another host: load() will say so
            return source
    else:
        absolute = os.path.abspath(os.path.join(base_dir, source))
    try:
        info = os.stat(absolute)
    except (OSError, ValueError):
        return f"missing:{absolute}"
    return f"{absolute}|{info.st_size}|{info.st_mtime_ns}"


def _cores() -> int:
    """CPUs this process may run on (affinity-aware where the OS tells)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _scheme(source: str) -> str | None:
    """``https`` for ``https://...``; ``data`` for a data URI; None for a plain path."""
    if source[:5].lower() == "data:":
        return "data"
    match = _URL_SCHEME.match(source)
    return match.group(1).lower() if match else None


def file_url_path(url: str) -> Path:
    """``file:///a/b%20c.jpg`` -> ``/a/b c.jpg`` (only local ``file://`` URLs: no host or localhost)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageError(f"{redact_url(url)}: file:// URLs must name a local path (file:///...), not host "
                         f"{parts.netloc!r}", error_type="image_scheme_refused")
    return Path(urllib.parse.unquote(parts.path))
