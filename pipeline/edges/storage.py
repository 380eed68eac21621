"""Object stores through fsspec: the one place that turns a path or URL into something readable or writable.

A plain path or a ``file://`` URL stays on the local code (``open``, ``os.stat``): this module imports
fsspec only when a URL (``s3://``, ``gs://``, ``az://``, ``abfs://``, ``memory://``) is used, so a job with
local files pays nothing for it. For a URL:

- ``filesystem(url, options)`` opens the fsspec filesystem with the section's ``storage_options``, cached
  per protocol and options for the process (``clear_cache`` drops them: a scheduler between runs).
  Its methods are blocking: call them from a thread (the manifest readers run in one).
- ``AsyncStore`` opens the same filesystem in fsspec's asynchronous mode on the running event loop, for
  image reads with many requests in flight and no thread per request (s3fs, gcsfs and adlfs are async).
- ``store_error`` turns whatever the SDK raised into one ``ObjectStoreError`` (a ``ConfigError``: exit
  code 2) whose message names the URL (without credentials or query), what went wrong, and the
  ``storage_options`` key to check; never a secret value. A missing backend names its extra
  (``pip install 'pipeline[s3]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.core.errors import ImageError, ObjectStoreError, PipelineError
from pipeline.core.locations import (
    is_url,
    option_secrets,
    url_join,
    url_parent,
    url_protocol,
)
from pipeline.core.redact import redact, redact_url

__all__ = ["BACKENDS", "AsyncStore", "ObjectStoreError", "check_readable", "clear_cache", "filesystem", "infos",
           "is_url", "open_input", "store_error", "store_location", "translated", "url_join", "url_parent"]

#: protocol -> (the package fsspec needs for it, the pipeline extra that installs it)
BACKENDS: dict[str, tuple[str, str]] = {
    "s3": ("s3fs", "s3"), "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"), "abfs": ("adlfs", "azure"), "abfss": ("adlfs", "azure"),
    "memory": ("fsspec", ""),  # in-process, for tests and examples
}

#: The config key that input URLs take their options from, for messages (the top-level one applies too).
INPUT_OPTIONS = "input.storage_options"

_cache: dict[tuple[str, str], Any] = {}
_cache_lock = threading.Lock()


def _options_key(options: Mapping[str, Any]) -> str:
    return json.dumps(options, sort_keys=True, default=repr)


def _filesystem_class(url: str, where: str) -> Any:
    """fsspec's class for the URL's protocol; a missing backend is one ConfigError naming the extra."""
    protocol = url_protocol(url) or ""
    shown = redact_url(url)
    if protocol not in BACKENDS:
        known = ", ".join(f"{p}://" for p in BACKENDS)
        raise ObjectStoreError(
            f"{shown}: {protocol}:// is not an object store the pipeline reads or writes (known: {known}); "
            "use a local path, or download the file first", url=shown, problem="backend")
    package, extra = BACKENDS[protocol]
    try:
        import fsspec

        return fsspec.get_filesystem_class(protocol)
    except ImportError:
        raise ObjectStoreError(
            f"{shown}: {protocol}:// needs the {package} package, which is not installed; "
            f"install it with: pip install 'pipeline[{extra}]'", url=shown, problem="backend") from None


def filesystem(url: str, options: Mapping[str, Any], *, where: str = "storage_options") -> Any:
    """The (blocking) fsspec filesystem for ``url``, opened with ``options``; one per protocol and options.

    ``where`` names the config key the options come from (``input.storage_options``), for messages.
    """
    key = (url_protocol(url) or "", _options_key(options))
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    cls = _filesystem_class(url, where)
    try:
        fs = cls(**options, skip_instance_cache=True)
    except (TypeError, ValueError, KeyError) as exc:
        raise _bad_options(url, where, exc, options) from None
    with _cache_lock:
        return _cache.setdefault(key, fs)


def clear_cache() -> None:
    """Forget the opened filesystems (and so their listing caches): a long-lived process between runs."""
    with _cache_lock:
        _cache.clear()
        directs = list(_loop_directs.values())
        _loop_directs.clear()
    for fs, direct in directs:  # their connections belong to fsspec's loop: closed there
        if direct is not None:
            fs.loop.call_soon_threadsafe(direct.close)


def _bad_options(url: str, where: str, exc: BaseException, options: Mapping[str, Any]) -> ObjectStoreError:
    detail = redact(str(exc), option_secrets(options))
    return ObjectStoreError(f"{redact_url(url)}: {where} was refused by the {url_protocol(url)}:// backend: "
                            f"{detail}; fix that key", url=redact_url(url), problem="options")


@contextmanager
def translated(url: str, options: Mapping[str, Any], *, where: str, action: str) -> Iterator[None]:
    """Every SDK failure inside becomes ``store_error(...)`` (exception types of the pipeline pass)."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:  # noqa: BLE001 - each SDK has its own tree: store_error sorts them
        raise store_error(exc, url, options, where=where, action=action) from None


@contextmanager
def open_input(location: Path | str, options: Mapping[str, Any], *, where: str, mode: str = "rb",
               **kwargs: Any) -> Iterator[IO[Any]]:
    """A local file through ``open``, an object through fsspec (streamed: read as it is consumed)."""
    if not is_url(location):
        with open(location, mode, **kwargs) as handle:
            yield handle
        return
    url = str(location)
    fs = filesystem(url, options, where=where)
    try:
        handle = fs.open(url, mode, **kwargs)
    except Exception as exc:  # noqa: BLE001 - sorted by store_error
        if _bare_denial(exc):  # a HEAD's 403 carries no reason: ask with a GET, whose answer names it
            with translated(url, options, where=where, action="open"):
                fs.cat_file(url, start=0, end=1)
        raise store_error(exc, url, options, where=where, action="open") from None
    with handle:
        try:
            yield handle
        except OSError as exc:  # a read of the object failed; the caller's own errors pass untouched
            if any(cls.__name__.startswith("Arrow") for cls in type(exc).__mro__):
                raise  # pyarrow's parse error about the content, not the store's
            raise store_error(exc, url, options, where=where) from None


def check_readable(url: str, options: Mapping[str, Any], *, where: str) -> None:
    """Raise the ``ObjectStoreError`` a read of ``url`` would meet for the whole job (credentials refused,
    access denied, no such bucket, endpoint unreachable); a missing object is the row's own problem and
    passes. One HEAD request (plus a 1-byte GET when the HEAD's 403 does not say why)."""
    fs = filesystem(url, options, where=where)
    try:
        fs.info(url)
    except Exception as exc:  # noqa: BLE001 - sorted by store_error
        if _bare_denial(exc):
            with translated(url, options, where=where, action="read"):
                fs.cat_file(url, start=0, end=1)
        error = store_error(exc, url, options, where=where)
        if error.problem != "not_found":
            raise error from None


def infos(urls: list[str], options: Mapping[str, Any], *, where: str,
          limit: int) -> dict[str, dict[str, Any] | ObjectStoreError]:
    """The listing entry (size, ETag, mtime...) of each URL, or the error that stands for it; blocking.

    An async backend (s3fs, gcsfs, adlfs) gets ``limit`` requests in flight on fsspec's own I/O loop, and
    an entry already in the filesystem's listing cache (a directory listed by the manifest reader) costs
    no request at all; any other backend is asked one URL at a time."""
    if not urls:
        return {}
    fs = filesystem(urls[0], options, where=where)
    out: dict[str, dict[str, Any] | ObjectStoreError] = {}
    if not fs.async_impl:
        for url in urls:
            try:
                out[url] = fs.info(url)
            except Exception as exc:  # noqa: BLE001 - sorted by store_error
                out[url] = store_error(exc, url, options, where=where)
        return out
    from fsspec.asyn import sync

    async def gather() -> list[Any]:
        slots = asyncio.Semaphore(limit)
        direct = await _loop_direct(fs)

        async def one(url: str) -> Any:
            async with slots:
                if direct is not None:  # s3://: a signed 1-byte GET unless a listing already knows the object
                    bucket, key, version = fs.split_path(url)
                    if key and not version and fs._ls_from_cache(f"{bucket}/{key}") is None:
                        found = await direct.info(bucket, key)
                        if found is not None:
                            return found
                        found = await fs._info(url)
                        direct.missed(bucket)  # s3fs answered where the fast path did not
                        return found
                return await fs._info(url)

        return await asyncio.gather(*(one(url) for url in urls), return_exceptions=True)

    for url, found in zip(urls, sync(fs.loop, gather), strict=True):
        out[url] = store_error(found, url, options, where=where) if isinstance(found, BaseException) else found
    return out


#: id(blocking s3fs filesystem) -> (it, its s3direct.DirectS3 or None), made on fsspec's I/O loop
_loop_directs: dict[int, tuple[Any, Any]] = {}


async def _loop_direct(fs: Any) -> Any:
    """The fast path of a blocking s3fs filesystem, on fsspec's loop (where ``infos`` runs); None elsewhere."""
    if fs.protocol not in (("s3", "s3a"), "s3"):
        return None
    with _cache_lock:
        made = _loop_directs.get(id(fs))
    if made is None or made[0] is not fs:
        from pipeline.edges import s3direct

        direct = None
        with contextlib.suppress(Exception):  # a session that cannot be set up: s3fs reports it
            await fs.set_session()
            direct = s3direct.DirectS3.open(fs)
        with _cache_lock:
            made = _loop_directs.setdefault(id(fs), (fs, direct))
    return made[1]


def store_location(source: str, base_dir: Path | str) -> str | None:
    """The object URL of a row's image when it is on an object store: an ``s3://`` (``gs://``, ...) URL, or
    a relative key under a manifest or directory that is on one. None for everything else (local paths,
    ``file://``, ``http(s)://``, data URIs), which keeps its own code path."""
    protocol = url_protocol(source)
    if protocol is not None:
        return source if protocol in BACKENDS else None
    if source[:5].lower() == "data:":
        return None
    if isinstance(base_dir, str) and is_url(base_dir) and source and not os.path.isabs(source):
        joined = url_join(base_dir, source)
        if joined is None:
            raise ImageError(f"{source}: climbs out of the bucket of {redact_url(base_dir)}; a relative key "
                             "must stay under the manifest's bucket", error_type="image_path_outside_root")
        return joined
    return None


# -- errors ---------------------------------------------------------------------------------------

#: SDK exception class names (anywhere in the MRO) -> the problem they mean. Names, not imports: the SDKs
#: are optional, and botocore, google-auth and azure-core each have their own trees.
_BY_NAME = {
    "NoCredentialsError": "credentials", "PartialCredentialsError": "credentials",
    "CredentialRetrievalError": "credentials", "DefaultCredentialsError": "credentials",
    "RefreshError": "credentials", "ClientAuthenticationError": "credentials", "ProfileNotFound": "credentials",
    "EndpointConnectionError": "unreachable", "ConnectTimeoutError": "unreachable",
    "ClientConnectorError": "unreachable", "ServiceRequestError": "unreachable",
    "ResourceNotFoundError": "not_found",
}
#: S3 error codes (from the ``ClientError`` s3fs keeps as the cause) that mean "these credentials are wrong".
_BAD_CREDENTIAL_CODES = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                                   "InvalidClientTokenId", "AuthorizationHeaderMalformed"})


def _bare_denial(exc: BaseException) -> bool:
    """A 403 without an error code: the answer to a HEAD request, which has no body to say why."""
    return isinstance(exc, PermissionError) and not _error_code(exc)


def _error_code(exc: BaseException) -> str:
    """The S3-style error code (``InvalidAccessKeyId``) of an exception or of the ClientError behind it."""
    for part in (exc, exc.__cause__):
        response = getattr(part, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            if code and not code.isdigit():
                return code
    return ""


def _classify(exc: BaseException) -> tuple[str, str]:
    """(problem, the SDK's own words) for an exception raised by fsspec or the SDK beneath it."""
    chain = [exc, *([exc.__cause__] if exc.__cause__ is not None else [])]
    code = _error_code(exc)
    names = {cls.__name__ for part in chain for cls in type(part).__mro__}
    detail = f"{code}: {_short(exc)}" if code and code not in _short(exc) else _short(exc)
    if code in _BAD_CREDENTIAL_CODES:
        return "credentials", detail
    if code == "NoSuchBucket" or (isinstance(exc, FileNotFoundError) and "bucket does not exist" in str(exc)):
        return "no_bucket", detail
    for name, problem in _BY_NAME.items():
        if name in names:
            return problem, detail
    if isinstance(exc, PermissionError):
        return "denied", detail
    if isinstance(exc, FileNotFoundError):
        return "not_found", detail
    if isinstance(exc, ConnectionError | TimeoutError) or getattr(exc, "errno", None) in (
            errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT):
        return "unreachable", detail
    return "other", detail


def store_error(exc: BaseException, url: str, options: Mapping[str, Any], *, where: str,
                action: str = "read") -> ObjectStoreError:
    """One precise ``ObjectStoreError`` for an SDK failure on ``url``: what happened, and what to check."""
    shown = redact_url(url)
    problem, detail = _classify(exc)
    detail = redact(detail, option_secrets(options))
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    at = f" at {redact_url(str(endpoint), keep_path=False)}" if endpoint else ""
    advice = {
        "credentials": f"the store{at} refused the credentials ({detail}); check the key and secret (or profile, "
                       f"token) in {where}, or the SDK's credential chain (environment, ~/.aws, instance role)",
        "denied": f"access denied{at} ({detail}); the credentials in {where} (or the SDK's chain) may not "
                  f"{action} this object: check them and the bucket's policy",
        "no_bucket": f"no such bucket{at} ({detail}); check the URL's bucket name and {where}.endpoint_url",
        "not_found": f"no such object{at}",
        "unreachable": f"cannot reach the store's endpoint ({detail}); check {where}.endpoint_url and the network",
        "other": f"cannot {action} it: {detail}",
    }[problem]
    return ObjectStoreError(f"{shown}: {advice}", url=shown, problem=problem)


def _short(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines and not isinstance(exc, OSError) else (
        lines[0] if lines else type(exc).__name__)


# -- asynchronous reads on the run's loop ---------------------------------------------------------

class AsyncStore:
    """Object reads from the running event loop through fsspec's asynchronous interface.

    One filesystem per protocol and options, opened lazily in ``asynchronous=True`` mode on the loop that
    uses it (an async filesystem belongs to one loop, so these are never shared with ``filesystem()``'s
    blocking ones), and closed by ``aclose``. A backend without an async implementation is run in threads.
    """

    def __init__(self, options: Mapping[str, Any], *, where: str) -> None:
        self.options = dict(options)
        self.where = where
        self._open: dict[str, Any] = {}
        self._direct: dict[str, Any] = {}  # protocol -> s3direct.DirectS3, or None where s3fs does every read
        self._direct_lock = asyncio.Lock()
        self.direct_tried = self.direct_reads = 0  # reads the fast path was asked / answered, for tests and the bench

    def filesystem(self, url: str) -> Any:
        """The async filesystem for ``url``'s protocol (opened on first use)."""
        protocol = url_protocol(url) or ""
        fs = self._open.get(protocol)
        if fs is None:
            cls = _filesystem_class(url, self.where)
            kwargs = {"asynchronous": True, "loop": asyncio.get_running_loop()} if cls.async_impl else {}
            try:
                fs = cls(**self.options, **kwargs, skip_instance_cache=True)
            except (TypeError, ValueError, KeyError) as exc:
                raise _bad_options(url, self.where, exc, self.options) from None
            self._open[protocol] = fs
        return fs

    async def info(self, url: str) -> dict[str, Any]:
        """The object's listing entry (size, ETag, mtime...): from the listing cache when it has one."""
        fs = self.filesystem(url)
        try:
            if fs.async_impl:
                return await fs._info(url)  # type: ignore[no-any-return]
            return await asyncio.to_thread(fs.info, url)  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001 - sorted by store_error
            if _bare_denial(exc):  # a HEAD's 403 carries no reason: a 1-byte GET's answer names it
                await self.read(url, 1)
            raise store_error(exc, url, self.options, where=self.where) from None

    async def read(self, url: str, end: int) -> bytes:
        """The object's first ``end`` bytes (all of it when smaller): one ranged GET, no size request.

        On s3:// the GET goes through ``s3direct`` (a fraction of botocore's CPU per request) when that
        applies; whatever it does not answer (an error, an exotic option) is asked through s3fs."""
        fs = self.filesystem(url)
        with translated(url, self.options, where=self.where, action="read"):
            if fs.async_impl:
                direct = await self._direct_reader(fs)
                if direct is not None:
                    bucket, key, version = fs.split_path(url)
                    self.direct_tried += 1
                    data = None if version or not key else await direct.read(bucket, key, end)
                    if data is not None:
                        self.direct_reads += 1
                        return data  # type: ignore[no-any-return]
                    data = await fs._cat_file(url, start=0, end=end)
                    direct.missed(bucket)  # s3fs read it where the fast path did not
                    return data  # type: ignore[no-any-return]
                return await fs._cat_file(url, start=0, end=end)  # type: ignore[no-any-return]
            return await asyncio.to_thread(fs.cat_file, url, start=0, end=end)  # type: ignore[no-any-return]

    async def _direct_reader(self, fs: Any) -> Any:
        """``s3direct.DirectS3`` for an s3fs filesystem (opened with its session), else None."""
        protocol = fs.protocol[0] if isinstance(fs.protocol, tuple | list) else fs.protocol
        if protocol not in self._direct:
            async with self._direct_lock:  # the first reads all wait for the one set-up
                if protocol not in self._direct:
                    self._direct[protocol] = None
                    if protocol == "s3":
                        from pipeline.edges import s3direct

                        with contextlib.suppress(Exception):  # a session that cannot be set up: s3fs reports it
                            await fs.set_session()
                            self._direct[protocol] = s3direct.DirectS3.open(fs)
        return self._direct[protocol]

    async def aclose(self) -> None:
        """Close the sessions opened on this loop (s3fs keeps an aiohttp session per filesystem)."""
        for direct in self._direct.values():
            if direct is not None:
                direct.close()
        self._direct.clear()
        for fs in self._open.values():
            client = getattr(fs, "_s3creator", None)
            close = getattr(client, "__aexit__", None)
            if close is not None:
                with contextlib.suppress(Exception):  # closing a session must not fail a finished run
                    await close(None, None, None)
        self._open.clear()
