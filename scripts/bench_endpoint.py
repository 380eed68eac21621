"""A minimal, fast fake Chat Completions endpoint for ``scripts/bench.py`` (its own process).

Plain ``asyncio.Protocol`` HTTP/1.1 with keep-alive: ``POST .../chat/completions`` answers a streamed
``chat.completion.chunk`` sequence (role chunk, N content chunks, finish chunk, a usage chunk with
``choices: []`` when ``stream_options.include_usage`` is set, ``data: [DONE]``), as chunked transfer
encoding. The answer is a pure function of the request's image Base64 (see :func:`expected_content`),
so the bench can check every output row. ``GET /_stats`` returns the request counter and the process's
own CPU time; the same line is printed on SIGTERM / SIGINT.

Knobs: ``--chunks`` content chunks per answer, ``--first-token`` seconds before the first chunk,
``--chunk-delay`` seconds between content chunks. With both delays at zero the whole answer goes out
in one ``write`` (the cheapest possible server); otherwise each event is written at its own time.

Run: ``python scripts/bench_endpoint.py --port 0 --port-file PORTFILE [--chunks 40] ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
import zlib
from pathlib import Path

__all__ = ["digest_of", "expected_content", "content_pieces", "main"]

_MODEL = "bench-model"
_HEAD_OK = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
_B64_MARK = b";base64,"


# ---- the answer: a pure function of the image Base64, shared with the bench's verifier -------------

def digest_of(b64: bytes | memoryview) -> str:
    """16 hex characters identifying one image's Base64 text: its CRC-32 and its length (cheap: the
    endpoint computes it per request and must not be the bottleneck)."""
    return f"{zlib.crc32(b64):08x}{len(b64):08x}"


def content_pieces(digest: str, chunks: int) -> list[str]:
    """The content deltas of one answer: the digest first, then short token-like pieces."""
    pieces = [digest]
    for i in range(1, chunks):
        j = (2 * i) % 16
        pieces.append(f" {digest[j:j + 2]}{i}")
    return pieces


def expected_content(b64: bytes, chunks: int) -> str:
    """The whole answer text the endpoint streams for an image whose Base64 is ``b64``."""
    return "".join(content_pieces(digest_of(b64), chunks))


# ---- SSE frames ----------------------------------------------------------------------------------------

def _http_chunk(event: str) -> bytes:
    """One SSE event as one HTTP chunk (chunked transfer encoding)."""
    data = event.encode()
    return b"%x\r\n%s\r\n" % (len(data), data)


def _events(digest: str, chunks: int, usage: bool) -> list[bytes]:
    """All HTTP chunks of one answer in order, the terminating zero chunk last.

    The JSON is written from string templates rather than ``json.dumps`` per chunk: the digest and
    pieces are plain ASCII (hex digits, digits, spaces), so no escaping is ever needed, and this keeps
    the endpoint several times cheaper than any client it serves."""
    head = (f'data: {{"id":"chatcmpl-{digest}","object":"chat.completion.chunk","created":1700000000,'
            f'"model":"{_MODEL}","system_fingerprint":"fp_bench","choices":[')
    tail = ',"usage":null}\n\n' if usage else "}\n\n"
    out = [_http_chunk(f'{head}{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,'
                       f'"finish_reason":null}}]{tail}')]
    out += [_http_chunk(f'{head}{{"index":0,"delta":{{"content":"{piece}"}},"logprobs":null,'
                        f'"finish_reason":null}}]{tail}') for piece in content_pieces(digest, chunks)]
    out.append(_http_chunk(f'{head}{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}]{tail}'))
    if usage:
        out.append(_http_chunk(f'{head}],"usage":{{"prompt_tokens":85,"completion_tokens":{chunks},'
                               f'"total_tokens":{85 + chunks}}}}}\n\n'))
    out.append(_http_chunk("data: [DONE]\n\n"))
    out.append(b"0\r\n\r\n")
    return out


# ---- the server ------------------------------------------------------------------------------------------

class Stats:
    """Counters; ``first_at`` / ``last_at`` (CLOCK_MONOTONIC) frame the requests since the last reset."""

    requests = 0
    started = time.monotonic()
    first_at: float | None = None  # first request received
    last_at: float | None = None  # last answer completely written
    done_at: list[float] = []  # when each answer was completely written (``GET /_stats?times=1`` returns it)
    arrived_at: list[float] = []  # when each request was read in full (``times=1``: the ramp, request by request)
    first_out_at: float | None = None  # the first answer's first token written (``times=1``)
    opened_at: list[float] = []  # when each connection was accepted (``times=1``)

    @classmethod
    def as_dict(cls, times: bool = False) -> dict:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"requests": cls.requests, "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime,
                "cpu_s": ru.ru_utime + ru.ru_stime, "maxrss_kb": ru.ru_maxrss,
                "uptime_s": time.monotonic() - cls.started, "first_at": cls.first_at, "last_at": cls.last_at,
                **({"done_at": cls.done_at, "arrived_at": cls.arrived_at, "first_out_at": cls.first_out_at,
                    "opened_at": cls.opened_at}
                   if times else {})}

    @classmethod
    def answered(cls) -> None:
        cls.last_at = now = time.monotonic()
        cls.done_at.append(now)

    @classmethod
    def request(cls) -> None:
        cls.requests += 1
        now = time.monotonic()
        cls.arrived_at.append(now)
        if cls.first_at is None:
            cls.first_at = now

    @classmethod
    def reset(cls) -> None:
        cls.first_at = cls.last_at = cls.first_out_at = None
        cls.done_at, cls.arrived_at, cls.opened_at = [], [], []


class Options:
    chunks = 40
    first_token = 0.0
    chunk_delay = 0.0


class HTTPProtocol(asyncio.Protocol):
    """One keep-alive connection; requests are answered one after another."""

    __slots__ = ("transport", "buf", "need", "head_end", "busy", "closed")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1  # total bytes (head + body) of the request being read; -1: head not parsed
        self.head_end = 0
        self.busy = False  # a delayed answer is still being streamed
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        Stats.opened_at.append(time.monotonic())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._drain()

    def _drain(self) -> None:
        while not self.busy and not self.closed:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                length = _content_length(bytes(self.buf[:end]).lower())
                if length is None:
                    self._reply_plain(411, b"Length Required", b"Content-Length required")
                    self.transport.close()
                    return
                self.head_end = end + 4
                self.need = end + 4 + length
            if len(self.buf) < self.need:
                return
            head = bytes(self.buf[: self.head_end])
            body = bytes(self.buf[self.head_end: self.need])
            del self.buf[: self.need]
            self.need = -1
            self._handle(head, body)

    def _handle(self, head: bytes, body: bytes) -> None:
        line = head[: head.find(b"\r\n")]
        if line.startswith(b"GET /_stats"):
            self._reply_plain(200, b"OK", json.dumps(Stats.as_dict(b"times=1" in line)).encode(), b"application/json")
            if b"reset=1" in line:
                Stats.reset()
            return
        if not line.startswith(b"POST ") or b"/chat/completions" not in line:
            self._reply_plain(404, b"Not Found", b'{"error":{"message":"not found","type":"not_found"}}',
                              b"application/json")
            return
        Stats.request()
        start = body.find(_B64_MARK)
        if start < 0:
            self._reply_plain(400, b"Bad Request",
                              b'{"error":{"message":"no base64 image in the request","type":"invalid_request_error"}}',
                              b"application/json")
            return
        start += len(_B64_MARK)
        end = body.find(b'"', start)
        digest = digest_of(body[start:end])
        events = _events(digest, Options.chunks, _wants_usage(body))
        if Options.first_token == 0 and Options.chunk_delay == 0:
            self.transport.write(_HEAD_OK + b"".join(events))
            Stats.answered()
            Stats.first_out_at = Stats.first_out_at or Stats.last_at
            return
        self.busy = True
        self.transport.write(_HEAD_OK)
        loop = asyncio.get_running_loop()
        t0 = loop.time() + Options.first_token
        # at t0: role + first content chunk; then one content chunk per delay; the tail with the last
        schedule = [(t0, events[0] + events[1])]
        for k in range(2, Options.chunks + 1):
            schedule.append((t0 + (k - 1) * Options.chunk_delay, events[k]))
        last_at, last = schedule.pop()
        schedule.append((last_at, last + b"".join(events[Options.chunks + 1:])))
        loop.call_at(t0, self._send_next, schedule, 0)

    def _send_next(self, schedule: list[tuple[float, bytes]], i: int) -> None:
        if self.closed:
            return
        self.transport.write(schedule[i][1])
        if Stats.first_out_at is None:
            Stats.first_out_at = time.monotonic()
        if i + 1 < len(schedule):
            asyncio.get_running_loop().call_at(schedule[i + 1][0], self._send_next, schedule, i + 1)
        else:
            Stats.answered()
            self.busy = False
            self._drain()

    def _reply_plain(self, code: int, reason: bytes, body: bytes, ctype: bytes = b"text/plain") -> None:
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
                             % (code, reason, ctype, len(body), body))


def _content_length(head_lower: bytes) -> int | None:
    at = head_lower.find(b"\r\ncontent-length:")
    if at < 0:  # no body (a GET), unless it is chunked, which this server does not read
        return None if b"\r\ntransfer-encoding:" in head_lower else 0
    at += len(b"\r\ncontent-length:")
    end = head_lower.find(b"\r\n", at)
    return int(head_lower[at: end if end >= 0 else None].strip())


def _wants_usage(body: bytes) -> bool:
    at = body.rfind(b'"include_usage"')
    return at >= 0 and b"true" in body[at + 15: at + 24]


def _print_stats(file: str | None) -> None:
    line = json.dumps(Stats.as_dict())
    print(f"bench_endpoint stats: {line}", flush=True)
    if file:
        Path(file).write_text(line + "\n")


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HTTPProtocol, args.host, args.port, backlog=4096, reuse_address=True)
    port = server.sockets[0].getsockname()[1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(args.port_file)
    print(f"bench_endpoint listening on http://{args.host}:{port}/v1 (pid {os.getpid()})", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    deadline = args.max_seconds
    try:
        await asyncio.wait_for(stop.wait(), timeout=deadline if deadline > 0 else None)
    except TimeoutError:
        print("bench_endpoint: --max-seconds reached, exiting", flush=True)
    server.close()
    _print_stats(args.stats_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (see --port-file)")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--stats-file", help="write the final stats JSON here on exit")
    parser.add_argument("--chunks", type=int, default=40, help="content chunks per answer (default 40)")
    parser.add_argument("--first-token", type=float, default=0.0, help="seconds before the first chunk")
    parser.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between content chunks")
    parser.add_argument("--cpu", type=int, help="pin this process to this CPU core")
    parser.add_argument("--uvloop", action="store_true",
                        help="serve on uvloop (cheaper per write; scenario f's thousands of streams)")
    parser.add_argument("--max-seconds", type=float, default=3600.0,
                        help="exit by itself after this long (default 3600; 0: never)")
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("the bench endpoint only listens on the loopback interface")
    if args.chunks < 1:
        parser.error("--chunks must be >= 1")
    Options.chunks, Options.first_token, Options.chunk_delay = args.chunks, args.first_token, args.chunk_delay
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    if args.uvloop:
        import uvloop

        uvloop.run(_serve(args))
    else:
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
