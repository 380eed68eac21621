"""The streaming chat client: ``stream_chat()`` sends one attempt and returns the rebuilt answer.

The SSE decoder and the accumulator run inside the connection's ``data_received`` (see ``http.py``),
so an answer costs one task wake-up however many chunks it streams. This is the only place that sees
socket, TLS and timeout failures; each one is translated here into the ``errors`` taxonomy. Timeouts
fit streaming: connect, first byte (headers and the first body bytes), idle gap between reads, and a
total deadline; one timer per attempt, pushed out lazily rather than on every read.
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

from pipeline.core.accumulate import ChoiceAccumulator, Completion
from pipeline.core.config import EndpointConfig, Timeouts
from pipeline.core.errors import (
    ConfigError,
    ConnectError,
    EndpointError,
    EndpointTimeout,
    MalformedChunk,
    PipelineError,
    ProtocolError,
    TruncatedStream,
    error_for_status,
)
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
    request_head,
)

log = logging.getLogger("pipeline")

_ERROR_BODY_LIMIT = 64 * 1024
_JSON_BODY_LIMIT = 32 * 1024 * 1024
_MESSAGE_LIMIT = 500


@dataclass(frozen=True, slots=True)
class StreamOutcome:
    completion: Completion
    ttft_ms: float | None  # request sent -> first streamed chunk
    latency_ms: float  # request sent -> [DONE]
    rate_limits: RateLimitHeaders = RateLimitHeaders()  # x-ratelimit-* of the answer, to steer concurrency


class ChatClient:
    """Sends streaming Chat Completions requests over a pool of keep-alive connections."""

    def __init__(self, endpoint: EndpointConfig, *, base_url: str | None = None, pool_size: int = 100) -> None:
        self.endpoint = endpoint
        root = (base_url or endpoint.base_url).rstrip("/")
        self.url = URL(f"{root}/chat/completions").update_query(endpoint.query or None)
        self.host = f"{self.url.host}:{self.url.port}"
        self.pool_size = pool_size
        self._pool: ConnectionPool | None = None
        try:
            self._head = request_head("POST", self.url, self._headers())
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
        self._pool = ConnectionPool(self.url, max_idle=self.pool_size)
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
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        head = self._head + b"%d\r\n\r\n" % len(payload)
        loop = asyncio.get_running_loop()
        exchange = _ChatExchange(self.endpoint.timeout, self.host, loop, loop.time(), on_answer)
        try:
            exchange.begin(await self._connect(exchange), head, payload)
            return await exchange.result
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
            raise EndpointTimeout(f"connect timeout after {timeouts.connect:g}s to {self.host}",
                                  phase="connect") from None
        except OSError as exc:
            raise _connect_error(exc, self.host) from None


def _connect_error(exc: OSError, host: str) -> ConnectError:
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve {host.rsplit(':', 1)[0]}: {exc.strerror or exc}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConnectError(f"TLS handshake with {host} failed: certificate verify failed ({exc.verify_message}); "
                            "behind a private CA? point SSL_CERT_FILE at its bundle")
    if isinstance(exc, ssl.SSLError):
        hint = " (the server speaks plain HTTP? use http:// in base_url)" if exc.reason == "WRONG_VERSION_NUMBER" else ""
        return ConnectError(f"TLS handshake with {host} failed: {exc.reason or exc}{hint}")
    return ConnectError(f"cannot connect to {host}: {exc.strerror or exc}")


class _ChatExchange:
    """One attempt on one connection: decodes the answer as it arrives; ``result`` resolves once.

    Every ``on_*`` call comes from the connection's protocol callbacks, so nothing here awaits.
    """

    def __init__(self, timeouts: Timeouts, host: str, loop: asyncio.AbstractEventLoop, start: float,
                 on_answer: Callable[[StreamOutcome], None] | None = None) -> None:
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
        self.body = bytearray()  # everything but SSE is collected, up to a limit
        self._connection: HTTPConnection | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._decoder = SSEDecoder()
        self._accumulator = ChoiceAccumulator()
        self._inflate: Any = None

    # -- driven by the client ------------------------------------------------------------------

    def begin(self, connection: HTTPConnection, head: bytes, payload: bytes) -> None:
        self._connection = connection
        self._timer = self.loop.call_at(self.first_byte_at, self._on_timer)
        connection.send(head, payload, self)

    def end(self) -> None:
        """The caller is leaving (answer in hand, failure, or cancellation): stop the timer, and drop the
        connection if the exchange never finished with it."""
        if self._timer is not None:
            self._timer.cancel()
        if self._connection is not None:  # not handed back by _succeed / _fail: the caller was cancelled
            self._connection.abort()
            self._connection = None
        if not self.result.done():
            self.result.cancel()

    # -- connection callbacks ------------------------------------------------------------------

    def on_head(self, head: ResponseHead) -> None:
        self.head = head
        self.kind = _body_kind(head)
        encoding = head.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib framing, detected
        elif encoding not in ("identity", ""):
            self._fail(MalformedChunk(f"endpoint answered with Content-Encoding {encoding}, which this client "
                                      "does not decode (it asks for identity)"))
        elif self.kind == "json" and _declared_length(head) > _JSON_BODY_LIMIT:
            self._fail(MalformedChunk(f"endpoint answered 200 with a JSON body over {_JSON_BODY_LIMIT} bytes"))

    def on_body(self, data: bytes) -> None:
        now = self.loop.time()
        self.last = now
        self.reads += 1
        if self.ttft is None:
            self.ttft = (now - self.start) * 1000
            self.phase = "idle"
            self._arm_idle_timer(now)
        try:
            self._take(self._inflate.decompress(data) if self._inflate is not None else data)
        except PipelineError as exc:
            self._fail(exc)
        except zlib.error as exc:
            self._fail(MalformedChunk(f"endpoint sent a compressed body that does not decode: {exc}"))

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
            self._fail(ConnectError(f"{self.host} closed the connection before answering"))
        elif self.head.close_delimited and self.kind in ("sse", "json") and exc is None:
            self.on_end()  # the close is the end of such a body
        elif self.kind == "error":
            self._fail(self._status_error())  # the status is known; the message may be cut short
        elif self.reads:
            self._fail(TruncatedStream(f"connection lost after {self.reads} read(s), before [DONE]"))
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
        return _feed(self._decoder.feed(data), self._accumulator)

    def _take(self, data: bytes) -> None:
        """Body bytes (decompressed): decoded as events for a stream, collected for anything else."""
        if not data:
            return
        if self.kind == "sse":
            if self._read_events(data):
                self._succeed()
        else:
            self._collect(data)

    def _finish_stream(self) -> None:
        if not self._accumulator.done:
            _feed(self._decoder.flush(), self._accumulator)
        self._succeed(self._accumulator.close())

    def _succeed(self, completion: Completion | None = None) -> None:
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
        self._done_with_connection()
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
            return
        if self._timer is not None:
            self._timer.cancel()
        if self._connection is not None:
            self._connection.abort()
            self._connection = None

    def _done_with_connection(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
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
        message, code = _error_message(bytes(self.body[:_ERROR_BODY_LIMIT]), head.reason)
        if 300 <= head.status < 400 and (location := head.headers.get("location")):
            message = f"the endpoint redirects to {location}; set endpoint.base_url to that (requests are not redirected)"
        return error_for_status(head.status, message, retry_after=server_wait(head.headers, head.status), code=code)

    def _unexpected_body(self) -> MalformedChunk:
        return MalformedChunk(
            f"endpoint answered 200 with Content-Type {self.kind}, not an event stream "
            f"(a proxy or a wrong base_url? it usually ends in /v1): {bytes(self.body[:200])!r}"
        )


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


def _error_message(raw: bytes, reason: str) -> tuple[str, str | None]:
    """The human message from OpenAI-, vLLM- or FastAPI-shaped error bodies, else the text itself."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    code = None
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            code = err.get("code") if isinstance(err.get("code"), str) else None
            text = str(err.get("message") or err.get("detail") or err.get("msg") or text)
        elif isinstance(err, str):
            text = err
        if "detail" in body and not isinstance(body.get("error"), dict):
            text = str(body["detail"])
    text = " ".join(text.split()) or reason or "no message"
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 3] + "..."
    return text, code
