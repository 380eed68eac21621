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
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import httptools
from yarl import URL

from pipeline.core.errors import ProtocolError, ProxyAuthError, ProxyError, ProxyRefused
from pipeline.core.proxy import ProxyURL

__all__ = ["ConnectionPool", "Exchange", "HTTPConnection", "Resolved", "ResponseHead", "proxy_auth_message",
           "request_head"]

_P = TypeVar("_P", bound=asyncio.BaseProtocol)

#: How long a connection whose answer is in hand may take to finish its response (say the zero-length
#: chunk after ``[DONE]``) and go back to the pool; after that it is closed.
DRAIN_GRACE_S = 1.0
#: How long a pool reuses its lookup of a host name for new connections (aiohttp's default DNS cache time).
RESOLVE_TTL_S = 10.0


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


def request_head(method: str, url: URL, headers: dict[str, str], *, absolute: bool = False) -> bytes:
    """The request line and headers up to (and including) ``Content-Length: ``, built once per client.

    ``absolute``: the request line carries the whole URL (``POST http://host/path``), as a proxy needs
    for a plain-HTTP origin. Raises ValueError for a header that cannot go on the wire (a line break, or
    a non-Latin-1 character).
    """
    target = str(url.with_user(None).with_fragment(None)) if absolute else url.raw_path_qs
    lines = [f"{method} {target} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
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
        body = self._body
        if body:  # _deliver, spelled out: this runs once per network read
            piece = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            if self.exchange is not None:
                self.exchange.on_body(piece)
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
    """Keep-alive connections to one origin, most recently used first; directly or through a proxy.

    Through a proxy, an https origin is reached through a ``CONNECT`` tunnel with TLS to the origin inside
    it (the origin's name for SNI and certificate checks), and the tunnel is pooled like any connection;
    an http origin gets absolute-form requests on a connection to the proxy (``request_head(absolute=True)``).
    Either way, once connected, a pooled connection is the same ``HTTPConnection``: the proxy costs the
    answer path nothing.
    """

    def __init__(self, url: URL, *, max_idle: int, ssl_context: ssl.SSLContext | None = None,
                 server_name: str | None = None, proxy: ProxyURL | None = None,
                 proxy_ssl: ssl.SSLContext | None = None) -> None:
        self.host = url.raw_host or ""
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.max_idle = max_idle
        https = url.scheme == "https"
        self._ssl: ssl.SSLContext | None = (ssl_context or ssl.create_default_context()) if https else None
        self._server_name = (server_name or self.host) if https else None
        self.proxy = proxy
        self._proxy_ssl = (proxy_ssl or ssl.create_default_context()) if proxy and proxy.scheme == "https" else None
        self._idle: list[HTTPConnection] = []
        self._open: set[HTTPConnection] = set()
        self.connects = 0  # connections opened, for tests and the bench
        self._origin = Resolved(self.host, self.port)
        self._proxy_at = Resolved(proxy.host, proxy.port) if proxy is not None else None

    @property
    def lookups(self) -> int:
        """Name lookups made for new connections (origin and proxy), for tests and the bench."""
        return self._origin.lookups + (self._proxy_at.lookups if self._proxy_at is not None else 0)

    def take_idle(self) -> HTTPConnection | None:
        """The most recently used idle connection that is still open, if any."""
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.closed and connection.transport is not None and not connection.transport.is_closing():
                return connection
        return None

    async def connect(self) -> HTTPConnection:
        """A new connection. Raises OSError (refused, unreachable, name not resolved, TLS failure with the
        origin), or ``ProxyError`` / ``ProxyRefused`` / ``ProxyAuthError`` for what happens at the proxy."""
        loop = asyncio.get_running_loop()
        if self.proxy is None:
            _, connection = await self._origin.open(
                lambda: HTTPConnection(self), tls=self._ssl, server_hostname=self._server_name)
        elif self._ssl is None:
            _, connection = await self._dial_proxy(lambda: HTTPConnection(self))
        else:
            connection = await self._tunnel(loop)
        self.connects += 1
        self._open.add(connection)
        return connection

    async def _dial_proxy(self, factory: Callable[[], _P]) -> tuple[asyncio.Transport, _P]:
        """A connection to the proxy itself (TLS to it for an https:// proxy)."""
        proxy = self.proxy
        assert proxy is not None and self._proxy_at is not None
        try:
            return await self._proxy_at.open(factory, tls=self._proxy_ssl,
                                             server_hostname=proxy.host if self._proxy_ssl is not None else None)
        except ssl.SSLError as exc:
            raise ProxyError(f"TLS handshake with the proxy {proxy} failed: {_tls_reason(exc)}; for a proxy "
                             "with a private CA set endpoint.tls.ca_file (or SSL_CERT_FILE)") from None
        except OSError as exc:
            raise ProxyError(f"cannot connect to the proxy {proxy}: {os_reason(exc)}; check the proxy "
                             "URL (endpoint.proxy, or HTTPS_PROXY / HTTP_PROXY / ALL_PROXY) and that the proxy "
                             "is up") from None

    async def _tunnel(self, loop: asyncio.AbstractEventLoop) -> HTTPConnection:
        """``CONNECT host:port`` through the proxy, then TLS with the origin inside the tunnel."""
        transport, setup = await self._dial_proxy(lambda: _TunnelSetup(loop))
        try:
            transport.write(connect_request(self.host, self.port, self.proxy))  # type: ignore[arg-type]
            status, reason, headers = await setup.answer
            check_tunnel_answer(status, reason, headers, self.proxy, f"{self.host}:{self.port}")  # type: ignore[arg-type]
            connection = HTTPConnection(self)
            tls = await loop.start_tls(transport, connection, self._ssl,  # type: ignore[arg-type]
                                       server_hostname=self._server_name)
        except (ssl.SSLEOFError, ConnectionError) as exc:  # the tunnel closed under the handshake
            transport.close()
            raise ProxyError(f"the tunnel through the proxy {self.proxy} to {self.host}:{self.port} closed during "
                             f"the TLS handshake ({os_reason(exc)})") from None
        except BaseException:  # a certificate problem is the endpoint's: the client names it
            transport.close()
            raise
        if tls is None:
            raise ProxyError(f"the tunnel through the proxy {self.proxy} to {self.host}:{self.port} closed")
        connection.connection_made(tls)
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


class Resolved:
    """A host name's addresses for one pool's new connections, looked up at most once per ``RESOLVE_TTL_S``.

    Why: at the start of a run thousands of connections open at once, and ``create_connection`` given a
    name looks it up for each of them (a thread-pool job each, and a DNS query each where nothing caches):
    2,048 connections to ``localhost`` cost 55 us of CPU each against 30 us to ``127.0.0.1`` (issue 16 (f)).
    Here the first connection that needs the addresses looks them up and the others wait for that lookup;
    an IP literal is never looked up. The addresses are tried in the resolver's order, as
    ``create_connection`` does; a failed connection drops them, so the next one looks the name up again.
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.lookups = 0
        self._literal = _is_ip_literal(host)
        self._lookup: asyncio.Task[list[str]] | None = None
        self._until = 0.0

    async def open(self, factory: Callable[[], _P], *, tls: ssl.SSLContext | None,
                   server_hostname: str | None) -> tuple[asyncio.Transport, _P]:
        """``loop.create_connection`` to each address in turn until one connects; raises what it raises
        (a TLS failure at once, as it does, without trying the next address)."""
        loop = asyncio.get_running_loop()
        errors: list[OSError] = []
        for host in [self.host] if self._literal else await self._hosts(loop):
            try:
                return await loop.create_connection(factory, host, self.port, ssl=tls,  # type: ignore[return-value]
                                                    server_hostname=server_hostname)
            except ssl.SSLError:
                self.forget()
                raise
            except OSError as exc:
                errors.append(exc)
        self.forget()
        if all(str(exc) == str(errors[0]) for exc in errors):
            raise errors[0]
        raise OSError("Multiple exceptions: {}".format(", ".join(str(exc) for exc in errors)))

    def forget(self) -> None:
        """Look the name up again for the next connection."""
        if self._lookup is not None and self._lookup.done():
            self._lookup = None

    async def _hosts(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        lookup = self._lookup
        if lookup is None or (lookup.done() and loop.time() >= self._until):
            lookup = self._lookup = loop.create_task(self._resolve(loop))
            lookup.add_done_callback(_retrieved)
        return await asyncio.shield(lookup)  # a connection that gives up (its timeout) leaves it to the others

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        self.lookups += 1
        self._until = 0.0  # kept only if this lookup succeeds
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        self._until = loop.time() + RESOLVE_TTL_S
        hosts = list(dict.fromkeys(str(info[4][0]) for info in infos))  # the resolver's order, each once
        if not hosts:
            raise OSError("getaddrinfo() returned empty list")
        return hosts


def _retrieved(task: asyncio.Task[list[str]]) -> None:
    """Mark a lookup's failure as seen: every connection waiting for it may have given up already."""
    if not task.cancelled():
        task.exception()


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- proxy tunnels --------------------------------------------------------------------------------

#: The most a proxy's answer to CONNECT may take before its blank line.
_TUNNEL_HEAD_LIMIT = 64 * 1024


def connect_request(host: str, port: int, proxy: ProxyURL) -> bytes:
    """The ``CONNECT`` request for ``host:port``, with the proxy's credentials when it has some."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization is not None:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _TunnelSetup(asyncio.Protocol):
    """Reads the proxy's answer to ``CONNECT``: a status line and headers, nothing after them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[tuple[int, str, dict[str, str]]] = loop.create_future()
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _TUNNEL_HEAD_LIMIT:
                self.answer.set_exception(ProxyError("the proxy's answer to CONNECT is not HTTP (no end of headers)"))
            return
        try:
            self.answer.set_result(parse_status_head(bytes(self._buffer[:end])))
        except ValueError as exc:
            self.answer.set_exception(ProxyError(f"the proxy's answer to CONNECT is not HTTP: {exc}"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ProxyError("the proxy closed the connection before answering CONNECT"))


def parse_status_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    """``HTTP/1.1 200 Connection established`` and its headers (lower-case names)."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/") or not code.isdigit():
        raise ValueError(f"status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return int(code), reason.strip(), headers


def check_tunnel_answer(status: int, reason: str, headers: dict[str, str], proxy: ProxyURL, target: str) -> None:
    """Raise what a non-2xx answer to ``CONNECT`` means, naming the proxy and what to do."""
    if 200 <= status < 300:
        return
    said = f"HTTP {status} {reason}".strip()
    if status == 407:
        raise ProxyAuthError(proxy_auth_message(proxy, headers.get("proxy-authenticate", "")), status=status)
    if status in (502, 503, 504):
        raise ProxyError(f"the proxy {proxy} could not reach {target}: {said}", status=status)
    raise ProxyRefused(f"the proxy {proxy} refused to open a tunnel to {target}: {said}; the proxy's policy "
                       "must allow this host and port (ask its administrators), or add the host to NO_PROXY "
                       "/ endpoint.no_proxy if it is reachable directly", status=status)


def proxy_auth_message(proxy: ProxyURL, challenge: str) -> str:
    """What a 407 means here: no credentials, refused credentials, or a scheme other than Basic."""
    scheme = challenge.split(" ", 1)[0].strip()
    if scheme and scheme.lower() != "basic" and "basic" not in challenge.lower():
        return (f"the proxy {proxy} requires {scheme} authentication (HTTP 407), which pipeline does not speak; "
                "use an account the proxy accepts with Basic authentication, or a local helper proxy that "
                "authenticates for you")
    if proxy.authorization is None:
        return (f"the proxy {proxy} requires authentication (HTTP 407); put the credentials in the proxy URL: "
                "http://USER:PASSWORD@host:port in HTTPS_PROXY / HTTP_PROXY or endpoint.proxy "
                "(percent-encode special characters)")
    return (f"the proxy {proxy} refused the credentials given in the proxy URL (HTTP 407); check the user "
            "and password in HTTPS_PROXY / HTTP_PROXY or endpoint.proxy")


def os_reason(exc: OSError) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed ('10.0.0.1', 3128)``."""
    if isinstance(exc, ssl.SSLError):  # its errno is an SSL error code, not an OS one
        return exc.reason or str(exc)
    return os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)


def _tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed ({exc.verify_message})"
    return exc.reason or str(exc)
