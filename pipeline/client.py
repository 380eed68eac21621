"""The streaming HTTP client: one shared aiohttp session, one ``stream_chat()`` call per attempt.

This is the only place that sees aiohttp and asyncio failures; each one is translated here into the
``errors`` taxonomy. Timeouts fit streaming: connect, first byte (headers and the first body bytes),
idle gap between reads, and a total deadline.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

import aiohttp
import orjson
from yarl import URL

from .accumulate import ChoiceAccumulator, Completion
from .config import EndpointConfig
from .errors import (
    ConnectError,
    EndpointError,
    EndpointTimeout,
    MalformedChunk,
    PipelineError,
    TruncatedStream,
    error_for_status,
)
from .retry import RateLimitHeaders, parse_rate_limit_headers, server_wait
from .sse import SSEDecoder

_ERROR_BODY_LIMIT = 64 * 1024
_MESSAGE_LIMIT = 500


@dataclass(frozen=True, slots=True)
class StreamOutcome:
    completion: Completion
    ttft_ms: float | None  # request sent -> first streamed chunk
    latency_ms: float  # request sent -> [DONE]
    rate_limits: RateLimitHeaders = RateLimitHeaders()  # x-ratelimit-* of the answer, to steer concurrency


class ChatClient:
    """Sends streaming Chat Completions requests over a pooled keep-alive session."""

    def __init__(self, endpoint: EndpointConfig, *, base_url: str | None = None, pool_size: int = 100) -> None:
        self.endpoint = endpoint
        root = (base_url or endpoint.base_url).rstrip("/")
        self.url = URL(f"{root}/chat/completions").update_query(endpoint.query or None)
        self.pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(url={str(self.url)!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream", **self.endpoint.headers}
        key = self.endpoint.api_key.get_secret_value() if self.endpoint.api_key else None
        if key and self.endpoint.auth_scheme == "bearer":
            headers["Authorization"] = f"Bearer {key}"
        elif key and self.endpoint.auth_scheme == "api-key":
            headers["api-key"] = key
        return headers

    async def __aenter__(self) -> Self:
        timeout = self.endpoint.timeout
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size),
            timeout=aiohttp.ClientTimeout(total=None, connect=timeout.connect, sock_connect=timeout.connect),
            headers=self._headers(),
            auto_decompress=True,
        )
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def stream_chat(self, body: dict[str, Any] | bytes) -> StreamOutcome:
        """One attempt: POST the body (a dict, or JSON bytes from ``RequestBuilder.build_payload``), read
        the SSE stream to ``[DONE]``, return the rebuilt completion."""
        if self._session is None:
            raise RuntimeError("ChatClient is not open; use 'async with ChatClient(...)'")
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        reader = _StreamReader(self.endpoint)
        try:
            return await reader.read(self._session, self.url, payload)
        except PipelineError:
            raise
        except BaseException as exc:
            translated = reader.translate(exc)
            if translated is None:
                raise
            raise translated from None


class _StreamReader:
    """State of one attempt: which timeout phase it is in and how far the stream got."""

    def __init__(self, endpoint: EndpointConfig) -> None:
        self.timeouts = endpoint.timeout
        self.phase = "first_byte"
        self.chunks = 0
        self.host = ""

    async def read(self, session: aiohttp.ClientSession, url: URL, payload: bytes) -> StreamOutcome:
        self.host = f"{url.host}:{url.port}"
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.timeouts.total
        ttft: float | None = None
        async with asyncio.timeout_at(min(start + self.timeouts.first_byte, deadline)) as timer:
            async with session.post(url, data=payload) as response:
                if response.status != 200:
                    raise await _error_from_response(response)
                limits = parse_rate_limit_headers(response.headers)
                kind = _body_kind(response)
                if kind == "json":
                    completion = await _read_plain_json(response)
                    return StreamOutcome(completion, None, (loop.time() - start) * 1000, limits)
                if kind != "sse":
                    raise await _unexpected_body(response, kind)
                decoder = SSEDecoder()
                accumulator = ChoiceAccumulator()
                content = response.content
                idle = self.timeouts.idle
                armed = float("inf")  # when the timer fires; pushed out lazily, not on every read
                while True:
                    data = await content.readany()
                    if not data:
                        break
                    now = loop.time()
                    if ttft is None:
                        ttft = (now - start) * 1000
                        self.phase = "idle"
                    if armed - now < idle:  # re-arming costs a timer; do it once per idle/10 of reading
                        armed = min(now + idle * 1.1, deadline)  # so a stall is cut after idle..1.1 x idle
                        timer.reschedule(armed)
                    self.chunks += 1
                    if _feed(decoder.feed(data), accumulator):
                        break
                if not accumulator.done:
                    _feed(decoder.flush(), accumulator)
                completion = accumulator.close()
                return StreamOutcome(completion, ttft, (loop.time() - start) * 1000, limits)

    def translate(self, exc: BaseException) -> PipelineError | None:
        """aiohttp / asyncio failures -> the pipeline's error tree (None: not ours to translate)."""
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return EndpointTimeout(f"connect timeout after {self.timeouts.connect:g}s to {self.host}", phase="connect")
        if isinstance(exc, TimeoutError):
            return self._timeout()
        if isinstance(exc, aiohttp.ClientConnectorError):
            return ConnectError(f"cannot connect to {self.host}: {exc.os_error.strerror or exc.os_error}")
        if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError, aiohttp.ClientOSError)):
            if self.chunks:
                return TruncatedStream(f"connection lost after {self.chunks} read(s), before [DONE]")
            return ConnectError(f"{self.host} closed the connection before answering")
        if isinstance(exc, aiohttp.ClientError):
            return ConnectError(f"HTTP client error talking to {self.host}: {type(exc).__name__}: {exc}")
        return None

    def _timeout(self) -> EndpointTimeout:
        if self.phase == "first_byte":
            limit = self.timeouts.first_byte
            return EndpointTimeout(f"no response within first_byte timeout of {limit:g}s", phase="first_byte")
        return EndpointTimeout(
            f"stream stalled: no data for {self.timeouts.idle:g}s (idle timeout) after {self.chunks} read(s), "
            f"or the total timeout of {self.timeouts.total:g}s passed",
            phase="idle",
        )


def _feed(events: list[Any], accumulator: ChoiceAccumulator) -> bool:
    """Hand events to the accumulator; True once ``[DONE]`` arrives."""
    for event in events:
        if accumulator.add_event(event):
            return True
    return False


def _body_kind(response: aiohttp.ClientResponse) -> str:
    """``sse`` (also for a missing or text/plain type: some servers mislabel), ``json``, or the type."""
    ctype = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype in ("", "text/event-stream", "text/plain", "application/octet-stream"):
        return "sse"
    return "json" if ctype.endswith("json") else ctype


async def _unexpected_body(response: aiohttp.ClientResponse, ctype: str) -> MalformedChunk:
    raw = await response.content.read(200)
    return MalformedChunk(
        f"endpoint answered 200 with Content-Type {ctype}, not an event stream "
        f"(a proxy or a wrong base_url? it usually ends in /v1): {raw[:200]!r}"
    )


async def _read_plain_json(response: aiohttp.ClientResponse) -> Completion:
    """Some servers ignore ``stream: true`` and answer with one JSON completion; accept it."""
    raw = await response.read()
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


async def _error_from_response(response: aiohttp.ClientResponse) -> EndpointError:
    """A non-200 answer as a typed error carrying the endpoint's own message and Retry-After."""
    raw = await response.content.read(_ERROR_BODY_LIMIT)
    message, code = _error_message(raw, response.reason or "")
    return error_for_status(
        response.status, message, retry_after=server_wait(response.headers, response.status), code=code
    )


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
