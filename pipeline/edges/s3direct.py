"""S3 reads without botocore's per-request machinery: the fast path of ``AsyncStore.read`` and ``infos``.

Why: an image read through s3fs is one ``get_object`` call (and its resume check one ``head_object``), and
botocore spends ~1.5-2 ms of CPU on each (parameter validation, endpoint rules, event hooks, retry
handlers, aiohttp) against ~0.4-0.8 ms for the same signed request sent here. At hundreds of images per
second that was most of the client's core (docs/performance.md, scenario (s3)).

What stays botocore's: everything that decides *what* to send. The s3fs client (made from the section's
``storage_options``, so endpoint_url, region, profile, session tokens and the SDK's credential chain are
exactly s3fs's) resolves each bucket's address once (virtual-hosted or path style, MinIO/R2 endpoints,
``addressing_style``), by presigning a throw-away key locally; its request signer supplies the (refreshed)
credentials and botocore's SigV4 signer signs each GET. What is done here: one ``Range`` GET per object on
the project's keep-alive ``ConnectionPool``, with the CA bundle botocore would use. An object's listing
entry (``info``) comes from a 1-byte GET's headers: httptools cannot frame the answer to a HEAD.

Only a 200/206 answer is used. Anything else (a missing object, refused credentials, a 416 for an empty
object, a 5xx, a lost connection, a timeout) returns None and the caller asks s3fs, whose retries and
error translation then apply unchanged: the fast path never produces an error of its own. A bucket that
answers 301/307/400 (another region, a request it did not expect), one where s3fs succeeded ``MISS_LIMIT``
times after this path did not (a store that takes botocore's requests but not these), and an endpoint
that cannot be connected to are left to s3fs for the rest of the run. Signatures travel in headers,
never in a URL.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any
from urllib.parse import urlsplit

from botocore.awsrequest import AWSRequest
from botocore.utils import parse_timestamp, percent_encode
from yarl import URL

from pipeline.core.errors import ProtocolError
from pipeline.edges.http import (
    ConnectionPool,
    HTTPConnection,
    ResponseHead,
    request_head,
)

__all__ = ["DirectS3"]

#: Answers after which a bucket is read through s3fs for the rest of the run: the bucket lives in another
#: region (301, 307) or the store did not take the request as sent (400: say a signing region it refuses).
_REROUTE = frozenset({301, 307, 400})
#: Reads of a bucket that s3fs answered after the fast path did not, before s3fs does them all: a store
#: that refuses these requests but takes botocore's must not pay two requests per object for the run.
MISS_LIMIT = 5
#: The key presigned (locally, never sent) to learn a bucket's address.
_PROBE_KEY = "k"


class DirectS3:
    """Signed ranged GETs for one s3fs filesystem's client; ``open`` says whether it applies at all."""

    def __init__(self, client: Any, verify: str | bool, *, connections: int, timeout: float) -> None:
        self._client = client
        self._signer = client._request_signer
        self._region = client.meta.region_name
        self._proxies = client._endpoint.http_session._proxy_config
        self._verify = verify
        self._connections = connections  # the SDK's max_pool_connections, as s3fs has them
        self._slots = asyncio.Semaphore(connections)
        self._timeout = timeout
        self._routes: dict[str, tuple[str, ConnectionPool] | None] = {}
        self._pools: dict[str, ConnectionPool] = {}
        self._misses: dict[str, int] = {}

    @classmethod
    def open(cls, fs: Any) -> DirectS3 | None:
        """The fast path for an s3fs filesystem whose session is set, or None where s3fs must do the work:
        unsigned (``anon``) or non-SigV4 clients, version-aware reads, requester-pays or SSE-C request
        arguments, proxies and client certificates, certificate checks turned off."""
        client = getattr(fs, "_s3", None)
        session = getattr(getattr(client, "_endpoint", None), "http_session", None)
        if client is None or session is None or not hasattr(client, "_request_signer"):
            return None
        config = client.meta.config
        verify = getattr(session, "_verify", None)
        if (fs.version_aware or fs.req_kw or fs.s3_additional_kwargs or config.signature_version not in (None, "s3v4")
                or not isinstance(verify, str | bool) or verify is False or getattr(session, "_cert_file", None)
                or not client.meta.region_name):
            return None
        return cls(client, verify, connections=max(1, config.max_pool_connections or 10),
                   timeout=(config.connect_timeout or 60) + (config.read_timeout or 60))

    async def read(self, bucket: str, key: str, end: int) -> bytes | None:
        """The object's first ``end`` bytes, or None: ask s3fs (see the module docstring)."""
        answer = await self._get(bucket, key, end)
        return answer[2] if answer is not None else None

    async def info(self, bucket: str, key: str) -> dict[str, Any] | None:
        """s3fs's listing entry for an object (``_info``: ETag, LastModified, size...), from the headers of a
        1-byte ranged GET (httptools cannot frame the answer to a HEAD), or None: ask s3fs."""
        answer = await self._get(bucket, key, 1)
        if answer is None:
            return None
        headers = answer[1]
        total = headers.get("content-range", "").rpartition("/")[2]
        if not total.isdigit() or "last-modified" not in headers:
            return None
        return {"ETag": headers.get("etag", ""), "LastModified": parse_timestamp(headers["last-modified"]),
                "size": int(total), "name": f"{bucket}/{key}", "type": "file",
                "StorageClass": headers.get("x-amz-storage-class", "STANDARD"),
                "VersionId": headers.get("x-amz-version-id"), "ContentType": headers.get("content-type")}

    def missed(self, bucket: str) -> None:
        """s3fs answered a request this path did not: after ``MISS_LIMIT`` of them the bucket is s3fs's."""
        self._misses[bucket] = misses = self._misses.get(bucket, 0) + 1
        if misses >= MISS_LIMIT:
            self._routes[bucket] = None

    async def _get(self, bucket: str, key: str, end: int) -> tuple[int, dict[str, str], bytes] | None:
        """A signed GET of bytes ``0..end-1``: the 200/206 answer, else None (and maybe the route dropped)."""
        route = self._routes[bucket] if bucket in self._routes else await self._route(bucket)
        if route is None:
            return None
        base, pool = route
        try:
            request = AWSRequest("GET", f"{base}/{percent_encode(key, safe='/~')}",
                                 headers={"Range": f"bytes=0-{end - 1}"})
            auth = await self._signer.get_auth_instance("s3", self._region, "s3v4")
            auth.add_auth(request)  # botocore's SigV4: X-Amz-Date, payload hash, session token, Authorization
            url = URL(request.url, encoded=True)
            head = request_head("GET", url, dict(request.headers.items())) + b"0\r\n\r\n"
        except Exception:  # noqa: BLE001 - no credentials, a key that cannot go on the wire: s3fs says why
            return None
        async with self._slots:
            try:
                async with asyncio.timeout(self._timeout):
                    answer = await self._exchange(bucket, pool, head)
            except (OSError, TimeoutError, ProtocolError):
                return None
        if answer[0] in (200, 206):
            return answer
        if answer[0] in _REROUTE:
            self._routes[bucket] = None
        return None

    async def _exchange(self, bucket: str, pool: ConnectionPool, head: bytes) -> tuple[int, dict[str, str], bytes]:
        connection = pool.take_idle()
        if connection is None:
            try:
                connection = await pool.connect()
            except OSError:  # refused, unreachable, TLS failure: the endpoint is s3fs's to report
                self._routes[bucket] = None
                raise
        exchange = _Get(connection)
        try:
            connection.send(head, b"", exchange)
            return await exchange.answer
        finally:
            if not exchange.answer.done() or exchange.answer.cancelled():  # cancelled or timed out mid-answer
                connection.abort()

    async def _route(self, bucket: str) -> tuple[str, ConnectionPool] | None:
        """The bucket's address as botocore resolves it (from a locally presigned URL, never sent or shown)
        and the pool for its origin; None for buckets botocore addresses specially (ARNs, directory
        buckets) or behind a proxy."""
        route = None
        if ":" not in bucket and not bucket.endswith("--x-s3"):
            try:
                signed = await self._client.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": _PROBE_KEY}, ExpiresIn=60)
            except Exception:  # noqa: BLE001 - s3fs meets the same problem and reports it
                signed = ""
            parts = urlsplit(signed)
            origin = f"{parts.scheme}://{parts.netloc}"
            if (parts.scheme in ("http", "https") and parts.path.endswith(f"/{_PROBE_KEY}")
                    and not self._proxies.proxy_url_for(origin)):
                route = (origin + parts.path[:-len(_PROBE_KEY) - 1], self._pool(origin))
        self._routes[bucket] = route
        return route

    def _pool(self, origin: str) -> ConnectionPool:
        pool = self._pools.get(origin)
        if pool is None:
            url = URL(origin)  # https: the CA bundle botocore was given (loading one costs ~20 ms: only here)
            context = None
            if url.scheme == "https":
                context = ssl.create_default_context(cafile=self._verify if isinstance(self._verify, str) else None)
            pool = self._pools[origin] = ConnectionPool(url, max_idle=self._connections, ssl_context=context)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


class _Get:
    """One GET on one connection: the whole answer (status and body), delivered once it has ended."""

    __slots__ = ("answer", "body", "connection", "head")

    def __init__(self, connection: HTTPConnection) -> None:
        self.connection = connection
        self.answer: asyncio.Future[tuple[int, dict[str, str], bytes]] = asyncio.get_running_loop().create_future()
        self.head = ResponseHead(0, "", {})
        self.body: list[bytes] = []

    def on_head(self, head: ResponseHead) -> None:
        self.head = head

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_end(self) -> None:
        self.connection.done()
        if not self.answer.done():
            self.answer.set_result((self.head.status, self.head.headers, b"".join(self.body)))

    def on_lost(self, exc: BaseException | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError(f"connection lost: {exc}"))
