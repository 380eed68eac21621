"""proxy.py plugins for the test forward proxy (loaded by ``proxy.py`` itself, see tests/proxies.py).

They run inside the proxy's subprocess, never in the test process. ``tests/proxies.py`` writes a JSON
file and passes its path with ``--harness-config`` (a flag these plugins register, the way proxy.py's
own plugins add theirs). The file says:

* ``host_map``: ``{name: [ip, port]}``, names only the proxy can resolve (CONNECT and absolute-form);
* ``refuse_connect_ports``: CONNECT to these ports gets ``403 Forbidden``;
* ``close_connect_ports``: CONNECT to these ports gets no answer: the proxy closes the connection;
* ``log``: a file where every request that reached the proxy is appended as one JSON line
  ``{"method", "target", "status"}``, written *before* the proxy answers the client (so a test that got
  its answer finds the entry), except when connecting upstream fails for another reason than an unknown
  name (refused, unreachable): that 502 is written when the proxy closes the client connection.

Why our own log: proxy.py's access log is one line per *client connection*, written when it closes,
so keep-alive requests after the first never show and a test cannot know when the line will appear.
"""

from __future__ import annotations

import json
import os
import socket
from functools import cache
from typing import Any

from proxy.common.flag import flags
from proxy.http.exception import HttpRequestRejected, ProxyAuthenticationFailed
from proxy.http.parser import HttpParser
from proxy.http.proxy import HttpProxyBasePlugin
from proxy.http.proxy.auth import AuthPlugin

flags.add_argument("--harness-config", type=str, default=None,
                   help="JSON file with the test harness settings (tests/proxy_plugins.py).")


@cache
def _settings(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("latin-1")


def _target(request: HttpParser) -> str:
    """``host:port`` for CONNECT, the absolute URL as the client sent it otherwise."""
    if request.is_https_tunnel:
        return f"{_text(request.host)}:{request.port}"
    return f"http://{_text(request.host)}:{request.port}{_text(request.path)}"


def _record(flags_: Any, request: HttpParser, status: int | None, target: str | None = None) -> None:
    """Append one JSON line; O_APPEND and one write keep lines whole across the proxy's processes."""
    line = json.dumps({"method": _text(request.method), "target": target or _target(request), "status": status})
    fd = os.open(_settings(flags_.harness_config)["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


class RecordingAuthPlugin(AuthPlugin):
    """proxy.py's own basic-auth check (``--basic-auth``), recording the 407s it answers."""

    def before_upstream_connection(self, request: HttpParser) -> HttpParser | None:
        try:
            return super().before_upstream_connection(request)
        except ProxyAuthenticationFailed:
            _record(self.flags, request, 407)
            raise


class HarnessPlugin(HttpProxyBasePlugin):
    """Private names, refused or dropped CONNECTs, and the request log."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._settings = _settings(self.flags.harness_config)
        #: Requests not answered yet, with their target as the client sent it (before any host_map rewrite).
        self._pending: list[tuple[HttpParser, str]] = []
        self._connected = False

    def before_upstream_connection(self, request: HttpParser) -> HttpParser | None:
        if request.is_https_tunnel and request.port in self._settings["refuse_connect_ports"]:
            _record(self.flags, request, 403)
            raise HttpRequestRejected(status_code=403, reason=b"Forbidden", body=b"CONNECT refused by test proxy")
        if request.is_https_tunnel and request.port in self._settings["close_connect_ports"]:
            _record(self.flags, request, None)
            raise HttpRequestRejected()  # no status: proxy.py closes the connection without answering
        self._pending.append((request, _target(request)))
        mapped = self._settings["host_map"].get(_text(request.host).lower())
        if mapped is not None:
            request.port = int(mapped[1])  # resolve_dns() below gives the address
        return request

    def resolve_dns(self, host: str, port: int) -> tuple[str | None, None]:
        mapped = self._settings["host_map"].get(host.lower())
        if mapped is not None:
            return str(mapped[0]), None
        try:
            socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except OSError:
            self._flush_pending(502)  # proxy.py answers 502 Bad Gateway next; record it first
        return None, None

    def handle_client_request(self, request: HttpParser) -> HttpParser | None:
        self._connected = True  # proxy.py calls this only once the upstream connection is made
        if request.is_https_tunnel:
            self._flush_pending(200)  # "Connection established" is queued right after this hook
        elif all(request is not seen for seen, _ in self._pending):
            self._pending.append((request, _target(request)))  # a later request on a kept-alive connection
        return request

    def handle_upstream_chunk(self, chunk: memoryview) -> memoryview | None:
        head = bytes(chunk[:12])
        if self._pending and not self._pending[0][0].is_https_tunnel and head.startswith(b"HTTP/1."):
            request, target = self._pending.pop(0)
            _record(self.flags, request, int(head[9:12]), target)
        return chunk

    def on_upstream_connection_close(self) -> None:
        """Requests still unanswered: 502 if the upstream connection failed, None if it said nothing."""
        self._flush_pending(None if self._connected else 502)

    def _flush_pending(self, status: int | None) -> None:
        while self._pending:
            request, target = self._pending.pop(0)
            _record(self.flags, request, status, target)
