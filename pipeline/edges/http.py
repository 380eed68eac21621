"""HTTP/1.1 connections for streamed answers: a keep-alive pool whose connections hand every piece of
a response body to the request that is waiting for it, inside ``data_received``.

Why not aiohttp on this path: its body stream wakes the reading task once per network read, and an
SSE answer arrives in about one read per token. At hundreds of concurrent streams those wake-ups were
most of the client's CPU (issue 7). Here the exchange decodes in the protocol callback, and the task
that sent the request wakes once, when the answer is complete. httptools (llhttp) does the framing:
status line, headers, chunked and length-delimited bodies.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Protocol

import httptools
from yarl import URL

from pipeline.core.errors import ProtocolError

__all__ = ["ConnectionPool", "Exchange", "HTTPConnection", "ResponseHead", "request_head"]

#: How long a connection whose answer is in hand may take to finish its response (say the zero-length
#: chunk after ``[DONE]``) and go back to the pool; after that it is closed.
DRAIN_GRACE_S = 1.0


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "

    @property
    def close_delimited(self) -> bool:
        """No length and not chunked: the body ends when the server closes the connection."""
        return "content-length" not in self.headers and "chunked" not in self.headers.get("transfer-encoding", "")


class Exchange(Protocol):
    """The request a connection is carrying; every call comes from the event loop."""

    def on_head(self, head: ResponseHead) -> None: ...

    def on_body(self, data: bytes) -> None: ...

    def on_end(self) -> None:  # the response is complete
        ...

    def on_lost(self, exc: BaseException | None) -> None:  # the connection closed before on_end
        ...


def request_head(method: str, url: URL, headers: dict[str, str]) -> bytes:
    """The request line and headers up to (and including) ``Content-Length: ``, built once per client.

    Raises ValueError for a header that cannot go on the wire (a line break, or a non-Latin-1 character).
    """
    lines = [f"{method} {url.raw_path_qs} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
    for name, value in headers.items():
        if not name or any(c in name + value for c in "\r\n\0") or ":" in name:
            raise ValueError(f"header {name!r} has a line break, NUL or colon where it cannot")
        try:
            (name + value).encode("latin-1")
        except UnicodeEncodeError:
            raise ValueError(f"header {name!r} has a character HTTP headers cannot carry (use Latin-1)") from None
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")


class HTTPConnection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self._reason = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []  # body pieces of the current read, not yet handed to the exchange
        self._interim = False  # a 1xx head: not the answer, skipped
        self._complete = True  # the last response was read to its end
        self._draining = False  # the exchange has its answer; the response has not ended yet
        self._drain_timer: asyncio.TimerHandle | None = None

    # -- used by the pool and the exchange ------------------------------------------------------

    def send(self, head: bytes, body: bytes, exchange: Exchange) -> None:
        self.exchange = exchange
        self._complete = self._draining = False
        assert self.transport is not None
        self.transport.writelines((head, body))

    def done(self) -> None:
        """The exchange has what it needs: back to the pool once the response ends, else closed."""
        self.exchange = None
        if self._complete:
            self._release()
        else:
            self._draining = True  # data_received arms the grace timer if the end is not in this read

    def abort(self) -> None:
        """Drop the connection (a timeout, a bad answer, a cancelled request)."""
        self.exchange = None
        self.close()

    def close(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if not self.closed:
            self.closed = True
            self._pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def _release(self) -> None:
        self._draining = False
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        if self.closed or not self._parser.should_keep_alive():
            self.close()
        else:
            self._pool.release(self)

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:  # includes an exchange's own bug surfacing here
            self._deliver()
            self._broken(exc)
            return
        self._deliver()
        if self._draining and self._drain_timer is None and not self.closed:
            self._drain_timer = self._loop.call_later(DRAIN_GRACE_S, self.close)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost tells the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed, self.closed = self.closed, True
        if not was_closed:
            self._pool.forget(self)
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.on_lost(exc)

    def _broken(self, exc: Exception) -> None:
        exchange, self.exchange = self.exchange, None
        self.close()
        if exchange is not None:
            cause = exc.__context__ if exc.__context__ is not None and not str(exc) else exc
            exchange.on_lost(ProtocolError(f"invalid HTTP response: {cause}"))

    # -- httptools callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reason = b""
        self._headers = {}

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._interim = 100 <= status < 200
        if self._interim or self.exchange is None:
            return
        self.exchange.on_head(ResponseHead(status, self._reason.decode("latin-1"), self._headers))

    def on_body(self, body: bytes) -> None:
        if self.exchange is not None:
            self._body.append(body)  # handed over once per read: an SSE answer is one HTTP chunk per event

    def _deliver(self) -> None:
        body = self._body
        if body:
            data = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            if self.exchange is not None:
                self.exchange.on_body(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._deliver()
        self._complete = True
        if self.exchange is not None:
            self.exchange.on_end()  # it calls done() or abort()
        elif self._draining:
            self._release()


class ConnectionPool:
    """Keep-alive connections to one origin, most recently used first."""

    def __init__(self, url: URL, *, max_idle: int) -> None:
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.max_idle = max_idle
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        self._idle: list[HTTPConnection] = []
        self._open: set[HTTPConnection] = set()
        self.connects = 0  # connections opened, for tests and the bench

    def take_idle(self) -> HTTPConnection | None:
        """The most recently used idle connection that is still open, if any."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def connect(self) -> HTTPConnection:
        """A new connection. Raises OSError (refused, unreachable, name not resolved, TLS failure)."""
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: HTTPConnection(self), self.host, self.port, ssl=self._ssl,
            server_hostname=self.host if self._ssl is not None else None,
        )
        self.connects += 1
        self._open.add(connection)
        return connection

    def release(self, connection: HTTPConnection) -> None:
        if len(self._idle) < self.max_idle:
            self._idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: HTTPConnection) -> None:
        self._open.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    def close(self) -> None:
        for connection in list(self._open):
            connection.close()
        self._idle.clear()
