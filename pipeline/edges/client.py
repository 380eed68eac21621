"""The streaming chat client: ``stream_chat()`` sends one attempt and returns the rebuilt answer.

The SSE decoder and the accumulator run inside the connection's ``data_received`` (see ``http.py``),
so an answer costs one task wake-up however many chunks it streams. This is the only place that sees
socket, TLS and timeout failures; each one is translated here into the ``errors`` taxonomy. Timeouts
fit streaming: connect, first byte (headers and the first body bytes), idle gap between reads, and a
total deadline; one timer per attempt, pushed out lazily rather than on every read.

Endpoints bend the protocol; what this client makes of it:

* one answer is capped at ``request.max_response_bytes`` (counted after decompression): over it, reading
  stops, the connection is dropped and the row fails as ``response_too_large`` (not retried);
* a 200 whose body is a JSON object (also under ``text/event-stream``) is read as one JSON answer, and
  an error object there fails the row with the endpoint's message (retryable only when 5xx-like);
* a 200 body that is neither SSE nor JSON is reported with its content type and first bytes;
* every choice finished, then only keep-alive comments and no ``[DONE]``: the answer is complete after
  ``endpoint.timeout.finish_grace`` seconds, and the connection (still streaming) is dropped;
* an error response with ``x-should-retry: false`` is not retried (``true`` makes it retryable).

Per read, the cap adds one addition and one comparison; the other checks run once per answer, or only
on reads that are not plain ``data:`` events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import orjson
from yarl import URL

from pipeline.core.accumulate import ChoiceAccumulator, Completion, error_in_answer
from pipeline.core.config import (
    DEFAULT_MAX_RESPONSE_BYTES,
    EndpointConfig,
    Timeouts,
    TLSConfig,
)
from pipeline.core.errors import (
    ConfigError,
    ConnectError,
    EndpointError,
    EndpointTimeout,
    MalformedChunk,
    PipelineError,
    ProtocolError,
    ProxyAuthError,
    ResponseTooLarge,
    TruncatedStream,
    error_for_status,
)
from pipeline.core.proxy import ProxyURL
from pipeline.core.ratelimit import (
    RateLimitHeaders,
    parse_rate_limit_headers,
    server_wait,
)
from pipeline.core.redact import redact_url
from pipeline.core.sse import SSEDecoder
from pipeline.core.version import __version__
from pipeline.edges.http import (
    ConnectionPool,
    HTTPConnection,
    ResponseHead,
    os_reason,
    proxy_auth_message,
    request_head,
)
from pipeline.edges.tls import client_context, warn_unverified

log = logging.getLogger("pipeline")

_ERROR_BODY_LIMIT = 64 * 1024
_JSON_BODY_LIMIT = 32 * 1024 * 1024
_MESSAGE_LIMIT = 500
_PREVIEW_BYTES = 200
#: How an event stream may begin (after a BOM or blank lines): a field name or a comment.
_SSE_STARTS = (b"data", b"event", b"id", b"retry", b":", b"error")


@dataclass(frozen=True, slots=True)
class StreamOutcome:
    completion: Completion
    ttft_ms: float | None  # request sent -> first streamed chunk
    latency_ms: float  # request sent -> [DONE]
    rate_limits: RateLimitHeaders = RateLimitHeaders()  # x-ratelimit-* of the answer, to steer concurrency


class ChatClient:
    """Sends streaming Chat Completions requests over a pool of keep-alive connections."""

    def __init__(self, endpoint: EndpointConfig, *, base_url: str | None = None, pool_size: int = 100,
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self.endpoint = endpoint
        self.max_response_bytes = max_response_bytes
        root = (base_url or endpoint.base_url).rstrip("/")
        self.url = URL(f"{root}/chat/completions").update_query(endpoint.query or None)
        self.proxy = endpoint.proxy_for(str(self.url))
        self.host = f"{self.url.host}:{self.url.port}"
        self.where = f"{self.host} through the proxy {self.proxy}" if self.proxy else self.host  # for messages
        self.pool_size = pool_size
        self._pool: ConnectionPool | None = None
        self._proxy_refused: str | None = None  # the proxy's 407: later requests fail without being sent
        # a plain-HTTP origin through a proxy: absolute-form requests that carry the proxy's credentials
        absolute = self.proxy is not None and self.url.scheme == "http"
        self._tls_client = None if self.url.scheme != "https" else "sent" if endpoint.tls.client_cert else "none"
        headers = self._headers()
        if absolute and self.proxy is not None and self.proxy.authorization is not None:
            headers["Proxy-Authorization"] = self.proxy.authorization
        try:
            self._head = request_head("POST", self.url, headers, absolute=absolute)
        except ValueError as exc:  # names the header, never its value
            raise ConfigError(f"endpoint.headers: {exc}") from None

    def __repr__(self) -> str:  # never shows the key, nor query values (a signature, a key)
        return f"ChatClient(url={redact_url(str(self.url))!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": f"pipeline/{__version__}", "Accept": "text/event-stream",
                   "Accept-Encoding": "identity", "Content-Type": "application/json", **self.endpoint.headers}
        key = self.endpoint.api_key.get_secret_value() if self.endpoint.api_key else None
        if key and self.endpoint.auth_scheme == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        elif key and self.endpoint.auth_scheme == "api-key":
            headers["api-key"] = key
        return headers

    async def __aenter__(self) -> Self:
        tls = self.endpoint.tls
        https = self.url.scheme == "https"
        if https:
            warn_unverified(tls, "endpoint.tls", "the endpoint's")
        proxy_tls = TLSConfig(ca_file=tls.ca_file, verify=tls.verify)  # a proxy gets no client certificate
        self._pool = ConnectionPool(
            self.url, max_idle=self.pool_size, ssl_context=client_context(tls) if https else None,
            server_name=tls.server_name, proxy=self.proxy,
            proxy_ssl=client_context(proxy_tls) if self.proxy and self.proxy.scheme == "https" else None)
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def connects(self) -> int:
        """Connections opened so far (keep-alive reuse shows as a small number)."""
        return self._pool.connects if self._pool is not None else 0

    async def stream_chat(self, body: dict[str, Any] | bytes,
                          on_answer: Callable[[StreamOutcome], None] | None = None) -> StreamOutcome:
        """One attempt: POST the body (a dict, or JSON bytes from ``RequestBuilder.build_payload``), read
        the SSE stream to ``[DONE]``, return the rebuilt completion.

        ``on_answer`` sees the outcome inside the read that completed it, before the caller wakes up: the
        runner stages the answer for the ledger there, so one commit serves a whole burst of answers."""
        if self._pool is None:
            raise RuntimeError("ChatClient is not open; use 'async with ChatClient(...)'")
        if self._proxy_refused is not None:  # never retry refused proxy credentials: proxies lock accounts
            raise ProxyAuthError(f"{self._proxy_refused} (not sent: the proxy refused this run's credentials "
                                 "already)", status=407)
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        head = self._head + b"%d\r\n\r\n" % len(payload)
        loop = asyncio.get_running_loop()
        exchange = _ChatExchange(self.endpoint.timeout, self.where, loop, loop.time(), on_answer,
                                 self.max_response_bytes)
        exchange.proxy = self.proxy
        exchange.tls_client = self._tls_client
        try:
            exchange.begin(await self._connect(exchange), head, payload)
            return await exchange.result
        except ProxyAuthError as exc:
            self._proxy_refused = exc.message
            raise
        finally:
            exchange.end()

    async def _connect(self, exchange: _ChatExchange) -> HTTPConnection:
        assert self._pool is not None
        if (connection := self._pool.take_idle()) is not None:
            return connection
        timeouts = self.endpoint.timeout
        limit = min(timeouts.connect, exchange.first_byte_at - exchange.loop.time())
        try:
            async with asyncio.timeout(max(limit, 0)):
                return await self._pool.connect()
        except TimeoutError:
            if limit < timeouts.connect:
                raise exchange.timeout_error() from None
            raise EndpointTimeout(f"connect timeout after {timeouts.connect:g}s to {self.where}",
                                  phase="connect") from None
        except OSError as exc:
            raise _connect_error(exc, self.host, self.endpoint.tls) from None


def _connect_error(exc: OSError, host: str, tls: TLSConfig) -> ConnectError:
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve {host.rsplit(':', 1)[0]}: {exc.strerror or exc}; behind a proxy? "
                            "set HTTPS_PROXY / HTTP_PROXY or endpoint.proxy")
    if isinstance(exc, ssl.SSLCertVerificationError):
        if "mismatch" in str(exc.verify_message):
            hint = ("the certificate is for another name: use that name in base_url, or set endpoint.tls.server_name "
                    "to it")
        elif tls.ca_file is not None:
            hint = "is endpoint.tls.ca_file the CA that signed it?"
        else:
            hint = "behind a private CA? set endpoint.tls.ca_file (or SSL_CERT_FILE) to its PEM bundle"
        return ConnectError(f"TLS handshake with {host} failed: certificate verify failed ({exc.verify_message}); "
                            f"{hint}")
    if isinstance(exc, ssl.SSLError) and tls.client_cert is None and "CERTIFICATE_REQUIRED" in str(exc.reason):
        return ConnectError(f"TLS handshake with {host} failed: the server requires a client certificate; "
                            "set endpoint.tls.client_cert and client_key")
    if isinstance(exc, ssl.SSLError):
        hint = " (the server speaks plain HTTP? use http:// in base_url)" if exc.reason == "WRONG_VERSION_NUMBER" else ""
        return ConnectError(f"TLS handshake with {host} failed: {exc.reason or exc}{hint}")
    return ConnectError(f"cannot connect to {host}: {os_reason(exc)}")


def _closed_unanswered(host: str, exc: BaseException | None, tls_client: str | None) -> ConnectError:
    """The server closed before any answer. Under TLS 1.3 a server refuses a client certificate (or the lack
    of one) only after the handshake: an alert, if it sends one, else just this close; so say what to check.
    ``tls_client``: None for plain HTTP, else whether a client certificate was sent."""
    reason = (exc.reason or "") if isinstance(exc, ssl.SSLError) else ""
    message = f"{host} closed the connection before answering" + (f" (TLS alert {reason})" if reason else "")
    if tls_client == "none":
        message += ("; if the server requires a client certificate (mutual TLS), set endpoint.tls.client_cert and "
                    "client_key")
    elif tls_client == "sent" and (reason or exc is None):
        message += "; if the server checks client certificates, does it trust endpoint.tls.client_cert?"
    return ConnectError(message)


class _ChatExchange:
    """One attempt on one connection: decodes the answer as it arrives; ``result`` resolves once.

    Every ``on_*`` call comes from the connection's protocol callbacks, so nothing here awaits.
    """

    def __init__(self, timeouts: Timeouts, host: str, loop: asyncio.AbstractEventLoop, start: float,
                 on_answer: Callable[[StreamOutcome], None] | None = None,
                 max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> None:
        self.timeouts = timeouts
        self.on_answer = on_answer
        self.host = host
        self.loop = loop
        self.start = start
        self.deadline = start + timeouts.total
        self.first_byte_at = min(start + timeouts.first_byte, self.deadline)
        self.result: asyncio.Future[StreamOutcome] = loop.create_future()
        self.phase = "first_byte"
        self.reads = 0
        self.ttft: float | None = None
        self.last = start  # time of the last body read, for the idle timeout
        self.head: ResponseHead | None = None
        self.kind = ""  # sse, json, error, or the unexpected content type
        self.ctype = ""  # the media type as sent (no parameters), for messages
        self.body = bytearray()  # everything but SSE is collected, up to a limit
        self.max_bytes = max_bytes
        self.size = 0  # body bytes so far (after decompression)
        self.preview = b""  # the first bytes of the body, to name what came when it is not a stream
        self._connection: HTTPConnection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._grace: asyncio.TimerHandle | None = None  # every choice finished, waiting for [DONE]
        self._grace_chunks = 0
        self._decoder = SSEDecoder()
        self._accumulator = ChoiceAccumulator()
        self._inflate: Any = None
        self.proxy: ProxyURL | None = None  # the proxy a plain-HTTP request went through (its 407s)
        self.tls_client: str | None = None  # https: whether a client certificate is configured (messages)

    # -- driven by the client ------------------------------------------------------------------

    def begin(self, connection: HTTPConnection, head: bytes, payload: bytes) -> None:
        self._connection = connection
        self._timer = self.loop.call_at(self.first_byte_at, self._on_timer)
        connection.send(head, payload, self)

    def end(self) -> None:
        """The caller is leaving (answer in hand, failure, or cancellation): stop the timer, and drop the
        connection if the exchange never finished with it."""
        self._stop_timers()
        if self._connection is not None:  # not handed back by _succeed / _fail: the caller was cancelled
            self._connection.abort()
            self._connection = None
        if not self.result.done():
            self.result.cancel()

    # -- connection callbacks ------------------------------------------------------------------

    def on_head(self, head: ResponseHead) -> None:
        self.head = head
        self.kind = _body_kind(head)
        self.ctype = head.headers.get("content-type", "").split(";")[0].strip()
        encoding = head.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib framing, detected
        elif encoding not in ("identity", ""):
            self._fail(MalformedChunk(f"endpoint answered with Content-Encoding {encoding}, which this client "
                                      "does not decode (it asks for identity)"))
        elif self.kind != "error" and (declared := _declared_length(head)) > self.max_bytes:
            self._fail(ResponseTooLarge(f"the endpoint announced an answer of {declared} bytes, more than "
                                        f"request.max_response_bytes ({self.max_bytes}); not read"))
        elif self.kind == "json" and _declared_length(head) > _JSON_BODY_LIMIT:
            self._fail(MalformedChunk(f"endpoint answered 200 with a JSON body over {_JSON_BODY_LIMIT} bytes"))

    def on_body(self, data: bytes) -> None:
        now = self.loop.time()
        self.last = now
        self.reads += 1
        first = self.ttft is None
        if first:
            self.ttft = (now - self.start) * 1000
            self.phase = "idle"
        try:
            size = self.size + len(data)
            if self.kind == "sse" and self._inflate is None and self.size and size <= self.max_bytes:
                self.size = size  # the read of a stream under way (most reads): _take's work, in short
                value = self._decoder.feed_one(data)
                if self._accumulator.add_value(value) if value is not None else self._read_events(data):
                    self._succeed()
            else:
                self._take(self._inflate_read(data) if self._inflate is not None else data)
        except PipelineError as exc:
            self._fail(exc)
        except zlib.error as exc:
            self._fail(MalformedChunk(f"endpoint sent a compressed body that does not decode: {exc}"))
        if first:  # after the read: a short answer ends in its first read and never needs the idle timer
            self._arm_idle_timer(now)

    def on_end(self) -> None:
        if self.result.done():
            self._done_with_connection()
            return
        try:
            if self._inflate is not None:
                self._take(self._inflate.flush())
            if self.kind == "sse":
                self._finish_stream()
            elif self.kind == "json":
                self._succeed(_plain_json(bytes(self.body)))
            elif self.kind == "error":
                self._fail(self._status_error(), reuse=True)
            else:
                self._fail(self._unexpected_body(), reuse=True)
        except PipelineError as exc:
            self._fail(exc)
        except zlib.error as exc:
            self._fail(MalformedChunk(f"endpoint sent a compressed body that does not decode: {exc}"))

    def on_lost(self, exc: BaseException | None) -> None:
        self._connection = None
        if self.result.done():
            return
        if isinstance(exc, ProtocolError):
            self._fail(ConnectError(f"{self.host} sent {exc}"))
        elif self.head is None:
            self._fail(_closed_unanswered(self.host, exc, self.tls_client))
        elif self.head.close_delimited and self.kind in ("sse", "json") and exc is None:
            self.on_end()  # the close is the end of such a body
        elif self.kind == "error":
            self._fail(self._status_error())  # the status is known; the message may be cut short
        elif self.reads:
            self._fail(self._lost_midway())
        else:
            self._fail(ConnectError(f"{self.host} closed the connection before answering"))

    # -- internals -----------------------------------------------------------------------------

    def _collect(self, data: bytes) -> None:
        limit = _ERROR_BODY_LIMIT if self.kind != "json" else _JSON_BODY_LIMIT
        self.body += data
        if self.kind not in ("json", "error") and len(self.body) >= 200:
            self._fail(self._unexpected_body())
        elif len(self.body) >= limit:
            if self.kind == "json":
                self._fail(MalformedChunk(f"endpoint answered 200 with a JSON body over {limit} bytes"))
            else:
                self._fail(self._status_error())

    def _read_events(self, data: bytes) -> bool:
        """Decode and accumulate one read; True once ``[DONE]`` arrives."""
        values = self._decoder.feed_data(data)
        if values is not None:  # the common read: whole data events, JSON parsed from the bytes
            return self._accumulator.add_data(values)
        events = self._decoder.feed(data)
        if events:
            return _feed(events, self._accumulator)
        if self._grace is None and self._decoder.between_events and self._accumulator.finished():
            self._arm_grace()  # a keep-alive comment after every choice finished: [DONE] may never come
        return False

    def _arm_grace(self) -> None:
        self._grace_chunks = self._accumulator.chunks
        self._grace = self.loop.call_later(self.timeouts.finish_grace, self._on_grace)

    def _on_grace(self) -> None:
        """The grace after the last choice finished is over: done, unless a chunk came meanwhile (then the
        next keep-alive-only read starts the wait again)."""
        self._grace = None
        if self.result.done() or self._accumulator.chunks != self._grace_chunks:
            return
        if self._accumulator.finished():
            self._succeed(self._accumulator.close(), reuse=False)  # the server is still streaming: drop it

    def _inflate_read(self, data: bytes) -> bytes:
        """Decompress one read, never past one byte over the cap (a small gzip body can expand hugely)."""
        limit = 0 if self.kind == "error" else self.max_bytes - self.size + 1
        return self._inflate.decompress(data, limit)

    def _take(self, data: bytes) -> None:
        """Body bytes (decompressed): decoded as events for a stream, collected for anything else."""
        if not data:
            return
        size = self.size + len(data)
        if size > self.max_bytes or not self.size:  # over the cap, or the first bytes: both rare
            self._check_read(data, size)
        self.size = size
        if self.kind == "sse":
            if self._read_events(data):
                self._succeed()
        else:
            self._collect(data)

    def _check_read(self, data: bytes, size: int) -> None:
        """Stop at the cap; on the first bytes keep a preview, and read a JSON object sent under an event
        stream's type (no ``data:`` framing) as the JSON answer it is."""
        if size > self.max_bytes and self.kind != "error":
            raise ResponseTooLarge(
                f"the answer grew past request.max_response_bytes ({self.max_bytes}) after {self.reads} read(s); "
                "reading stopped and the connection was dropped (raise the limit if such answers are expected)")
        if not self.size:
            self.preview = data[:_PREVIEW_BYTES]
            if self.kind == "sse" and data[:64].lstrip()[:1] == b"{":
                self.kind = "json"

    def _finish_stream(self) -> None:
        if not self._accumulator.done:
            _feed(self._decoder.flush(), self._accumulator)
        if (odd := self._not_a_stream()) is not None:
            raise odd
        self._succeed(self._accumulator.close())

    def _not_a_stream(self) -> MalformedChunk | None:
        """A mislabelled 200 body (``text/plain``, none, ...) that produced no chunk and does not begin the
        way an event stream does: name what it is rather than call it a truncated stream."""
        if self._accumulator.chunks or self._accumulator.done:
            return None
        start = self.preview.lstrip(b"\xef\xbb\xbf \t\r\n")
        if not start or start.startswith(_SSE_STARTS):
            return None
        return self._unexpected_body()

    def _lost_midway(self) -> PipelineError:
        if self.kind not in ("sse", "json"):
            return self._unexpected_body()
        if self.kind == "sse" and (odd := self._not_a_stream()) is not None:
            return odd
        return TruncatedStream(f"connection lost after {self.reads} read(s), before [DONE]")

    def _succeed(self, completion: Completion | None = None, *, reuse: bool = True) -> None:
        if self.result.done():
            return
        if completion is None:
            completion = self._accumulator.close()
        head = self.head
        assert head is not None
        latency = (self.loop.time() - self.start) * 1000
        outcome = StreamOutcome(completion, self.ttft if self.kind == "sse" else None, latency,
                                parse_rate_limit_headers(head.headers))
        self.result.set_result(outcome)
        if completion.warnings:
            log.warning("answer %s from %s: %s", completion.id or "(no id)", self.host, "; ".join(completion.warnings))
        if reuse:
            self._done_with_connection()
        else:
            self._drop_connection()
        if self.on_answer is not None:
            try:
                self.on_answer(outcome)
            except Exception:  # the caller still gets the outcome and handles it the slow way
                log.exception("on_answer failed; the answer is handled when its worker runs")

    def _fail(self, exc: BaseException, *, reuse: bool = False) -> None:
        if not self.result.done():
            self.result.set_exception(exc)
        if reuse:  # the response ended cleanly: its connection can carry the next request
            self._done_with_connection()
        else:
            self._drop_connection()

    def _drop_connection(self) -> None:
        self._stop_timers()
        if self._connection is not None:
            self._connection.abort()
            self._connection = None

    def _stop_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    def _done_with_connection(self) -> None:
        self._stop_timers()
        if self._connection is not None:
            self._connection.done()
            self._connection = None

    def _arm_idle_timer(self, now: float) -> None:
        """The first body bytes end the first-byte wait: from now on a gap longer than ``idle`` is a stall,
        so the timer must not sleep on until the (usually much later) first-byte deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self.loop.call_at(min(now + self.timeouts.idle, self.deadline), self._on_timer)

    def _on_timer(self) -> None:
        now = self.loop.time() + 0.001  # the loop may run a timer up to its clock resolution early
        wake = min(self.last + self.timeouts.idle, self.deadline)
        if self.phase == "first_byte" or wake <= now:
            self._timer = None
            self._fail(self.timeout_error())
            return
        self._timer = self.loop.call_at(wake, self._on_timer)  # data came since: wake when this gap is too long

    def timeout_error(self) -> EndpointTimeout:
        if self.phase == "first_byte":
            limit = self.timeouts.first_byte
            if self.first_byte_at < self.start + limit:
                return EndpointTimeout(f"no complete answer within the total timeout of {self.timeouts.total:g}s",
                                       phase="total")
            return EndpointTimeout(f"no response within first_byte timeout of {limit:g}s", phase="first_byte")
        if self.loop.time() + 0.001 >= self.deadline:
            return EndpointTimeout(
                f"no complete answer within the total timeout of {self.timeouts.total:g}s "
                f"({self.reads} read(s) so far)", phase="total")
        return EndpointTimeout(
            f"stream stalled: no data for {self.timeouts.idle:g}s (idle timeout) after {self.reads} read(s)",
            phase="idle",
        )

    def _status_error(self) -> EndpointError:
        head = self.head
        assert head is not None
        message, code, kind = _error_message(bytes(self.body[:_ERROR_BODY_LIMIT]), head.reason)
        if 300 <= head.status < 400 and (location := head.headers.get("location")):
            message = f"the endpoint redirects to {location}; set endpoint.base_url to that (requests are not redirected)"
        if head.status == 407 and self.proxy is not None:
            return ProxyAuthError(proxy_auth_message(self.proxy, head.headers.get("proxy-authenticate", "")),
                                  status=407)
        wait = server_wait(head.headers, head.status, limit_type=kind)
        return _should_retry(error_for_status(head.status, message, retry_after=wait, code=code), head)

    def _unexpected_body(self) -> MalformedChunk:
        preview = bytes(self.body[:_PREVIEW_BYTES]) if self.body else self.preview
        return MalformedChunk(
            f"endpoint answered 200 with Content-Type {self.ctype or '(none)'}, not an event stream nor JSON "
            f"(a proxy or a wrong base_url? it usually ends in /v1): {preview!r}"
        )


def _should_retry(error: EndpointError, head: ResponseHead) -> EndpointError:
    """Honour ``x-should-retry`` (OpenAI's servers send it): the server knows whether another try can help."""
    said = head.headers.get("x-should-retry", "").strip().lower()
    if said == "false" and error.retryable:
        error.retryable = False  # type: ignore[misc]
        error.message += " (the endpoint sent x-should-retry: false; not retried)"
    elif said == "true" and not error.retryable:
        error.retryable = True  # type: ignore[misc]
        error.row_specific = False  # type: ignore[misc]
    return error


def _feed(events: list[Any], accumulator: ChoiceAccumulator) -> bool:
    """Hand events to the accumulator; True once ``[DONE]`` arrives."""
    for event in events:
        if accumulator.add_event(event):
            return True
    return False


def _body_kind(head: ResponseHead) -> str:
    """``error`` for a status other than 200; else ``sse`` (also for a missing or text/plain type: some
    servers mislabel), ``json``, or the type itself."""
    if head.status != 200:
        return "error"
    ctype = head.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("", "text/event-stream", "text/plain", "application/octet-stream"):
        return "sse"
    return "json" if ctype.endswith("json") else ctype or "unknown"


def _declared_length(head: ResponseHead) -> int:
    try:
        return int(head.headers.get("content-length", "0"))
    except ValueError:
        return 0


def _plain_json(raw: bytes) -> Completion:
    """Some servers ignore ``stream: true`` and answer with one JSON completion; accept it."""
    try:
        body = json.loads(raw)
    except ValueError:
        raise MalformedChunk(f"endpoint answered 200 with invalid JSON: {raw[:200]!r}") from None
    if isinstance(body, dict) and (error := error_in_answer(body)) is not None:
        raise error
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        raise MalformedChunk(f"endpoint answered 200 without choices: {raw[:200]!r}")
    accumulator = ChoiceAccumulator()
    choices = []
    for position, choice in enumerate(body["choices"]):
        message = dict(choice.get("message") or {})
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message["tool_calls"] = [{"index": i, **call} for i, call in enumerate(calls)]
        choices.append({"index": choice.get("index", position), "delta": message,
                        "finish_reason": choice.get("finish_reason") or "stop"})
    accumulator.add({**body, "choices": choices})
    return accumulator.close()


def _error_message(raw: bytes, reason: str) -> tuple[str, str | None, str | None]:
    """The human message, the code and the type from OpenAI-, vLLM- or FastAPI-shaped error bodies, else
    the text itself (the type of a 429 says which budget ran out: ``requests`` or ``tokens``)."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    code = kind = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            code = err.get("code") if isinstance(err.get("code"), str) else None
            kind = err.get("type") if isinstance(err.get("type"), str) else None
            text = str(err.get("message") or err.get("detail") or err.get("msg") or text)
        elif isinstance(err, str):
            text = err
        if "detail" in body and not isinstance(body.get("error"), dict):
            text = str(body["detail"])
    text = " ".join(text.split()) or reason or "no message"
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 3] + "..."
    return text, code, kind
