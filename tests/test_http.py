"""The streaming client's own HTTP/1.1 layer (pipeline/http.py + client.py) against real sockets.

A scripted raw server on 127.0.0.1 sends exactly the bytes each test needs (split reads, interim 1xx
heads, close-delimited and gzip bodies, garbage, stalls), which no well-behaved server framework would;
the embedded endpoint covers keep-alive reuse and the ordinary answers.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
from yarl import URL

from pipeline.core.config import EndpointConfig
from pipeline.core.errors import (
    ConfigError,
    ConnectError,
    EndpointTimeout,
    MalformedChunk,
    PermanentEndpointError,
    RateLimited,
    ServerError,
    TruncatedStream,
)
from pipeline.edges.client import ChatClient
from pipeline.edges.http import request_head
from pipeline.server import LocalEndpoint

BODY = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


def sse_events(pieces: list[str], *, done: bool = True) -> list[bytes]:
    """One SSE event per content piece, a finish chunk, and ``[DONE]``."""
    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"
    events = [event({"role": "assistant", "content": ""})] + [event({"content": p}) for p in pieces]
    events.append(event({}, "stop"))
    if done:
        events.append(b"data: [DONE]\n\n")
    return events


def chunked(parts: list[bytes]) -> list[bytes]:
    return [b"%x\r\n%s\r\n" % (len(p), p) for p in parts] + [b"0\r\n\r\n"]


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


@dataclass
class Reply:
    pieces: list[bytes]  # written one by one, each followed by a drain
    close: bool = False  # close the connection after the last piece
    hang: bool = False  # after the last piece, keep the connection open and silent


@dataclass
class ScriptedServer:
    """Answers the n-th request with ``replies[n]``; counts connections and keeps request heads."""

    replies: list[Reply]
    tls: ssl.SSLContext | None = None
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)  # a request has arrived
    closed_by_client: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/v1"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                self.heads.append(head)
                self.received.set()
                reply = self.replies.pop(0)
                for piece in reply.pieces:
                    writer.write(piece)
                    await writer.drain()
                if reply.hang:
                    await reader.read()  # returns b"" once the client closes
                    self.closed_by_client.set()
                    return
                if reply.close:
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed_by_client.set()
        finally:
            writer.close()


def client_for(base_url: str, **timeouts: float) -> ChatClient:
    limits = {"connect": 5, "first_byte": 5, "idle": 5, "total": 20, **timeouts}
    return ChatClient(EndpointConfig(base_url=base_url, api_key="sk-test-secret", timeout=limits))


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer(request.param) as server:
        yield server


async def answer(server: ScriptedServer, **timeouts: float) -> Any:
    async with client_for(server.base_url, **timeouts) as client:
        return await client.stream_chat(BODY)


# ---- framing ----------------------------------------------------------------------------------------

async def test_an_answer_split_into_one_byte_reads_is_rebuilt() -> None:
    wire = SSE_HEAD + b"".join(chunked(sse_events(["Hello", ", ", "world"])))
    async with ScriptedServer([Reply([wire[i:i + 1] for i in range(len(wire))])]) as server:
        outcome = await answer(server)
    assert outcome.completion.choices[0].content == "Hello, world"
    assert outcome.completion.choices[0].finish_reason == "stop"
    assert outcome.ttft_ms is not None and outcome.latency_ms >= outcome.ttft_ms


async def test_interim_1xx_heads_are_skipped() -> None:
    wire = b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + SSE_HEAD
    async with ScriptedServer([Reply([wire, *chunked(sse_events(["ok"]))])]) as server:
        outcome = await answer(server)
    assert outcome.completion.choices[0].content == "ok"


async def test_a_close_delimited_stream_ends_at_the_close() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    async with ScriptedServer([Reply([head, *sse_events(["a", "b"], done=False)], close=True)]) as server:
        outcome = await answer(server)
    assert outcome.completion.choices[0].content == "ab"


async def test_a_gzip_compressed_stream_is_decoded() -> None:
    packed = gzip.compress(b"".join(sse_events(["zipped"])))
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n" \
           b"Content-Length: %d\r\n\r\n" % len(packed)
    async with ScriptedServer([Reply([head, packed[:10], packed[10:]])]) as server:
        outcome = await answer(server)
    assert outcome.completion.choices[0].content == "zipped"


async def test_a_plain_json_answer_with_content_length_is_accepted() -> None:
    body = json.dumps({"id": "x", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant",
                       "content": "whole"}, "finish_reason": "stop"}]}).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    async with ScriptedServer([Reply([head, body])]) as server:
        outcome = await answer(server)
    assert outcome.completion.choices[0].content == "whole" and outcome.ttft_ms is None


async def test_garbage_instead_of_http_is_a_connect_error_naming_the_host() -> None:
    async with ScriptedServer([Reply([b"SSH-2.0-OpenSSH_9.6\r\n\r\n"], close=True)]) as server:
        with pytest.raises(ConnectError, match=rf"127\.0\.0\.1:{server.port} sent invalid HTTP response"):
            await answer(server)


async def test_a_request_head_carries_auth_length_and_no_compression() -> None:
    async with ScriptedServer([Reply([SSE_HEAD, *chunked(sse_events(["x"]))])]) as server:
        await answer(server)
    head = server.heads[0].decode("latin-1")
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert f"Host: 127.0.0.1:{server.port}\r\n" in head and "Authorization: Bearer sk-test-secret\r\n" in head
    assert f"Content-Length: {len(json.dumps(BODY, separators=(',', ':')))}\r\n" in head
    assert "Accept-Encoding: identity\r\n" in head


def test_a_header_that_would_split_the_request_is_a_config_error_without_its_value() -> None:
    headers = {"X-Team": "a\r\nX-Evil: 1"}
    with pytest.raises(ValueError, match="the value of headers.X-Team contains a line break") as refused:
        EndpointConfig(base_url="http://127.0.0.1:1/v1", headers=headers)  # validation refuses it first
    config = EndpointConfig.model_construct(base_url="http://127.0.0.1:1/v1", headers=headers)
    with pytest.raises(ConfigError, match="endpoint.headers: header 'X-Team'") as caught:
        ChatClient(config)  # and the client, which builds the head, still would
    assert "Evil" not in str(caught.value) and "Evil" not in str(refused.value)


def test_request_head_brackets_ipv6_hosts_and_keeps_the_query() -> None:
    head = request_head("POST", URL("http://[::1]:8080/v1/chat/completions?api-version=2024"), {})
    assert head.startswith(b"POST /v1/chat/completions?api-version=2024 HTTP/1.1\r\nHost: [::1]:8080\r\n")


# ---- errors and connection reuse -------------------------------------------------------------------

async def test_an_error_status_keeps_its_message_and_retry_after_and_the_connection() -> None:
    error = b'{"error":{"message":"slow down","type":"rate_limit","code":"rate_limit_exceeded"}}'
    head = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\nRetry-After: 7\r\n" \
           b"Transfer-Encoding: chunked\r\n\r\n"
    replies = [Reply([head, *chunked([error[:5], error[5:]])]), Reply([SSE_HEAD, *chunked(sse_events(["fine"]))])]
    async with ScriptedServer(replies) as server, client_for(server.base_url) as client:
        with pytest.raises(RateLimited) as caught:
            await client.stream_chat(BODY)
        assert caught.value.retry_after == 7 and "slow down" in str(caught.value)
        assert caught.value.code == "rate_limit_exceeded"
        outcome = await client.stream_chat(BODY)
        assert outcome.completion.choices[0].content == "fine"
        assert server.connections == 1 and client.connects == 1


async def test_a_redirect_names_where_base_url_should_point() -> None:
    head = b"HTTP/1.1 308 Permanent Redirect\r\nLocation: https://api.example.test/v1/chat/completions\r\n" \
           b"Content-Length: 0\r\n\r\n"
    async with ScriptedServer([Reply([head])]) as server:
        with pytest.raises(PermanentEndpointError, match=r"HTTP 308: the endpoint redirects to "
                                                         r"https://api\.example\.test/v1/chat/completions; set "
                                                         r"endpoint\.base_url"):
            await answer(server)


async def test_an_error_status_cut_off_mid_body_still_reports_the_status() -> None:
    head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
    async with ScriptedServer([Reply([head, b'{"error":{"mess'], close=True)]) as server:
        with pytest.raises(ServerError, match="HTTP 503"):
            await answer(server)


async def test_keep_alive_carries_many_answers_on_one_connection(local_endpoint: LocalEndpoint) -> None:
    async with client_for(local_endpoint.base_url) as client:
        for _ in range(5):
            outcome = await client.stream_chat(BODY)
            assert outcome.completion.choices[0].finish_reason == "stop"
        assert client.connects == 1


async def test_answer_returns_at_done_even_if_the_server_lingers_and_the_connection_is_not_reused() -> None:
    lingering = Reply([SSE_HEAD, *chunked(sse_events(["early"]))[:-1]], hang=True)  # no terminating chunk
    replies = [lingering, Reply([SSE_HEAD, *chunked(sse_events(["next"]))])]
    async with ScriptedServer(replies) as server, client_for(server.base_url, idle=30) as client:
        first = await asyncio.wait_for(client.stream_chat(BODY), 5)  # well before the 30 s idle timeout
        second = await client.stream_chat(BODY)
        await asyncio.wait_for(server.closed_by_client.wait(), 5)  # the lingering one was closed
    assert first.completion.choices[0].content == "early" and second.completion.choices[0].content == "next"
    assert server.connections == 2


async def test_connection_lost_mid_stream_is_a_truncated_stream() -> None:
    wire = chunked(sse_events(["a", "b", "c"]))
    async with ScriptedServer([Reply([SSE_HEAD, *wire[:3]], close=True)]) as server:
        with pytest.raises(TruncatedStream, match="connection lost after"):
            await answer(server)


async def test_a_closed_port_is_a_connect_error() -> None:
    async with ScriptedServer([]) as server:
        port = server.port
    async with client_for(f"http://127.0.0.1:{port}/v1") as client:
        with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
            await client.stream_chat(BODY)


async def test_an_unexpected_content_type_is_named_with_a_preview() -> None:
    page = b"<html><body>Sign in to continue</body></html>"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(page)
    async with ScriptedServer([Reply([head, page])]) as server:
        with pytest.raises(MalformedChunk, match="Content-Type text/html.*Sign in"):
            await answer(server)


# ---- timeouts and cancellation ---------------------------------------------------------------------

async def test_no_answer_is_a_first_byte_timeout() -> None:
    async with ScriptedServer([Reply([], hang=True)]) as server:
        with pytest.raises(EndpointTimeout, match="first_byte timeout of 0.2s") as caught:
            await answer(server, first_byte=0.2)
        await asyncio.wait_for(server.closed_by_client.wait(), 5)
    assert caught.value.phase == "first_byte"


async def test_a_stall_mid_stream_is_an_idle_timeout_after_the_reads_so_far() -> None:
    wire = chunked(sse_events(["a", "b"]))
    async with ScriptedServer([Reply([SSE_HEAD, wire[0], wire[1]], hang=True)]) as server:
        started = time.monotonic()
        with pytest.raises(EndpointTimeout, match=r"no data for 0.2s \(idle timeout\)") as caught:
            await answer(server, idle=0.2, first_byte=60)
    assert caught.value.phase == "idle"
    # the stall is noticed one idle gap after the last read, not at the (much later) first-byte deadline
    assert time.monotonic() - started < 30


async def test_a_stream_that_keeps_trickling_is_cut_by_the_total_timeout() -> None:
    pieces = [SSE_HEAD, *chunked(sse_events(["x"] * 2000))]

    class Slow(ScriptedServer):
        async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
            try:
                for piece in pieces:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.01)  # the server's pace, not a synchronisation
            except ConnectionError:
                pass
            finally:
                writer.close()

    async with Slow([]) as server:
        with pytest.raises(EndpointTimeout, match="total timeout of 0.3s") as caught:
            await answer(server, idle=5, total=0.3, first_byte=0.3)
    assert caught.value.phase == "total"


async def test_cancelling_a_request_closes_its_connection() -> None:
    wire = chunked(sse_events(["a"]))
    async with ScriptedServer([Reply([SSE_HEAD, wire[0]], hang=True)]) as server, \
            client_for(server.base_url) as client:
        task = asyncio.create_task(client.stream_chat(BODY))
        await asyncio.wait_for(server.received.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.closed_by_client.wait(), 5)


# ---- TLS ---------------------------------------------------------------------------------------------

def tls_server(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_https_works_with_a_ca_the_system_trusts(tmp_path, monkeypatch) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))  # how OpenSSL is told of a private CA
    replies = [Reply([SSE_HEAD, *chunked(sse_events(["secure"]))]), Reply([SSE_HEAD, *chunked(sse_events(["again"]))])]
    async with ScriptedServer(replies, tls=tls_server(ca)) as server, client_for(server.base_url) as client:
        assert (await client.stream_chat(BODY)).completion.choices[0].content == "secure"
        assert (await client.stream_chat(BODY)).completion.choices[0].content == "again"
        assert client.connects == 1  # the TLS connection is kept alive too


async def test_an_untrusted_certificate_is_a_connect_error_that_says_tls() -> None:
    async with ScriptedServer([], tls=tls_server(trustme.CA())) as server:
        with pytest.raises(ConnectError, match=rf"TLS handshake with 127\.0\.0\.1:{server.port} failed: "
                                               r"certificate verify failed"):
            await answer(server)


async def test_https_to_a_plain_http_port_says_so() -> None:
    class PlainHTTP(ScriptedServer):
        async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(5)  # the TLS hello is not HTTP: a plain server answers 400 and closes
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()

    async with PlainHTTP([]) as plain:
        async with client_for(f"https://127.0.0.1:{plain.port}/v1") as client:
            with pytest.raises(ConnectError, match=r"TLS handshake .* failed: .*use http:// in base_url"):
                await client.stream_chat(BODY)
