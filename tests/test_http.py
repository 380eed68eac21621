"""The streaming client's own HTTP/1.1 layer (pipeline/http.py + client.py) against real sockets.

A scripted raw server on 127.0.0.1 sends exactly the bytes each test needs (split reads, interim 1xx
heads, close-delimited and gzip bodies, garbage, stalls), which no well-behaved server framework would;
the embedded endpoint covers keep-alive reuse and the ordinary answers.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
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
    ResponseTooLarge,
    ServerError,
    StreamErrorEvent,
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


def client_for(base_url: str, max_response_bytes: int | None = None, **timeouts: float) -> ChatClient:
    limits = {"connect": 5, "first_byte": 5, "idle": 5, "total": 20, **timeouts}
    config = EndpointConfig(base_url=base_url, api_key="sk-test-secret", timeout=limits)
    if max_response_bytes is None:
        return ChatClient(config)
    return ChatClient(config, max_response_bytes=max_response_bytes)


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[ScriptedServer]:
    async with ScriptedServer(request.param) as server:
        yield server


async def answer(server: ScriptedServer, max_response_bytes: int | None = None, **timeouts: float) -> Any:
    async with client_for(server.base_url, max_response_bytes, **timeouts) as client:
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


# ---- huge answers ------------------------------------------------------------------------------------

async def test_a_stream_over_max_response_bytes_stops_reading_and_drops_the_connection() -> None:
    flood = chunked(sse_events(["x" * 1000] * 50, done=False))[:-1]  # ~55 KB of content, then silence
    async with ScriptedServer([Reply([SSE_HEAD, *flood], hang=True)]) as server:
        with pytest.raises(ResponseTooLarge, match=r"request\.max_response_bytes \(8192\)") as caught:
            await answer(server, max_response_bytes=8192)
        await asyncio.wait_for(server.closed_by_client.wait(), 5)  # the client hung up, not the server
    assert caught.value.error_type == "response_too_large" and not caught.value.retryable


async def test_an_announced_length_over_the_cap_is_refused_before_reading() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
    async with ScriptedServer([Reply([head], hang=True)]) as server:
        with pytest.raises(ResponseTooLarge, match="announced an answer of 50000000 bytes"):
            await answer(server, max_response_bytes=1 << 20)
        await asyncio.wait_for(server.closed_by_client.wait(), 5)


async def test_a_small_gzip_body_that_inflates_past_the_cap_is_too_large() -> None:
    packed = gzip.compress(b"data: " + b" " * 4_000_000 + b"\n\n")  # ~4 KB on the wire, 4 MB inflated
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: gzip\r\n" \
           b"Content-Length: %d\r\n\r\n" % len(packed)
    async with ScriptedServer([Reply([head, packed])]) as server:
        with pytest.raises(ResponseTooLarge):
            await answer(server, max_response_bytes=64 * 1024)


async def test_an_answer_under_the_cap_is_untouched() -> None:
    async with ScriptedServer([Reply([SSE_HEAD, *chunked(sse_events(["x" * 1000] * 5))])]) as server:
        outcome = await answer(server, max_response_bytes=64 * 1024)
    assert outcome.completion.choices[0].content == "x" * 5000


# ---- endpoints that bend the protocol ----------------------------------------------------------------

def json_reply(body: bytes, ctype: bytes = b"application/json", status: bytes = b"200 OK") -> Reply:
    return Reply([b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                  % (status, ctype, len(body), body)])


@pytest.mark.parametrize("ctype", [b"application/json", b"text/event-stream"])
@pytest.mark.parametrize("error, retryable", [
    (b'{"error":{"message":"Invalid image data","type":"invalid_request_error","code":400}}', False),
    (b'{"error":{"message":"Worker crashed","type":"server_error","code":500}}', True),
])
async def test_a_200_json_error_object_fails_with_the_endpoints_message(ctype: bytes, error: bytes,
                                                                        retryable: bool) -> None:
    async with ScriptedServer([json_reply(error, ctype)]) as server:
        with pytest.raises(StreamErrorEvent, match="endpoint answered 200 with an error: ") as caught:
            await answer(server)
    assert json.loads(error)["error"]["message"] in str(caught.value)
    assert caught.value.retryable is retryable


async def test_a_json_completion_under_an_event_stream_type_is_accepted() -> None:
    body = json.dumps({"id": "x", "model": "m", "choices": [{"index": 0, "message": {"role": "assistant",
                       "content": "whole"}, "finish_reason": "stop"}]}).encode()
    async with ScriptedServer([json_reply(body, b"text/event-stream")]) as server:
        outcome = await answer(server)
    assert outcome.completion.choices[0].content == "whole"


async def test_llama_cpp_error_line_fails_the_row_with_its_message() -> None:
    error = b'error: {"code":400,"message":"the request exceeds the available context size","type":' \
            b'"invalid_request_error"}\n\n'
    first = chunked(sse_events(["a"]))[0]
    async with ScriptedServer([Reply([SSE_HEAD, first, *chunked([error])])]) as server:
        with pytest.raises(StreamErrorEvent, match="exceeds the available context size") as caught:
            await answer(server)
    assert caught.value.retryable is False


@pytest.mark.parametrize("reply", [
    json_reply(b"upstream connect error or disconnect/reset before headers", b"text/plain"),
    Reply([b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nConnection: close\r\n\r\n", b"<html>Gateway</html>"],
          close=True),  # close-delimited: the end of the body is the close
    Reply([b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"<html>Gateway</html>"], close=True),
])
async def test_a_200_that_is_neither_sse_nor_json_names_its_content_type(reply: Reply) -> None:
    ctype = reply.pieces[0].partition(b"Content-Type: ")[2].partition(b"\r\n")[0].decode() or "(none)"
    async with ScriptedServer([reply]) as server:
        with pytest.raises(MalformedChunk, match=rf"Content-Type {re.escape(ctype)}, not an event stream nor JSON"):
            await answer(server)


async def test_x_should_retry_false_makes_a_5xx_final() -> None:
    body = b'{"error":{"message":"do not bother","type":"server_error"}}'
    reply = Reply([b"HTTP/1.1 503 Service Unavailable\r\nx-should-retry: false\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body)])
    async with ScriptedServer([reply]) as server:
        with pytest.raises(ServerError, match="do not bother.*x-should-retry: false") as caught:
            await answer(server)
    assert caught.value.retryable is False


async def test_x_should_retry_true_makes_a_4xx_retryable() -> None:
    body = b'{"error":{"message":"conflict","type":"invalid_request_error"}}'
    reply = Reply([b"HTTP/1.1 400 Bad Request\r\nx-should-retry: true\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(body), body)])
    async with ScriptedServer([reply]) as server:
        with pytest.raises(PermanentEndpointError) as caught:
            await answer(server)
    assert caught.value.retryable is True and caught.value.row_specific is False


@pytest.mark.parametrize("limit_type, wait", [(b"requests", 1.0), (b"tokens", 360.0)])
async def test_a_429_waits_for_the_budget_its_error_type_names(limit_type: bytes, wait: float) -> None:
    body = b'{"error":{"message":"Rate limit reached on %s per min","type":"%s","param":null,' \
           b'"code":"rate_limit_exceeded"}}' % (limit_type, limit_type)
    head = b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n" \
           b"x-ratelimit-remaining-requests: 0\r\nx-ratelimit-reset-requests: 1s\r\n" \
           b"x-ratelimit-remaining-tokens: 0\r\nx-ratelimit-reset-tokens: 6m0s\r\nContent-Length: %d\r\n\r\n"
    async with ScriptedServer([Reply([head % len(body), body])]) as server:
        with pytest.raises(RateLimited) as caught:
            await answer(server)
    assert caught.value.retry_after == wait


class KeepAlive(ScriptedServer):
    """Streams an answer whose choice finishes, then only ``: keep-alive`` comments (never ``[DONE]``) at the
    server's own pace until the client hangs up."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0]))
        try:
            writer.write(SSE_HEAD + b"".join(chunked(sse_events(["done"], done=False))[:-1]))
            while not writer.is_closing():
                writer.write(chunked([b": keep-alive\n\n"])[0])
                await writer.drain()
                await asyncio.sleep(0.02)  # the server's pace, not a synchronisation
        except ConnectionError:
            pass
        finally:
            self.closed_by_client.set()
            writer.close()


async def test_finished_choices_then_only_keep_alives_complete_after_the_grace() -> None:
    async with KeepAlive([]) as server:
        outcome = await asyncio.wait_for(answer(server, finish_grace=0.05, idle=30, total=60), 20)
        await asyncio.wait_for(server.closed_by_client.wait(), 5)  # the still-open stream was dropped
    assert outcome.completion.choices[0].content == "done"
    assert outcome.completion.choices[0].finish_reason == "stop"


async def test_keep_alives_before_every_choice_finished_do_not_end_the_stream() -> None:
    events = sse_events(["a", "b"])
    wire = [SSE_HEAD, *chunked([events[0], b": keep-alive\n\n", b": keep-alive\n\n", *events[1:]])]
    async with ScriptedServer([Reply(wire)]) as server:
        outcome = await answer(server, finish_grace=0.05)
    assert outcome.completion.choices[0].content == "ab"
