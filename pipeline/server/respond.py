"""Writing one chat answer to the wire, with the chosen fault (if any) applied at the right moment.

Faults happen at three points: before the headers (delays, error statuses, dropped connections), between
stream frames (stall, truncate, error event, malformed line), and per frame (slow). All waits end early
when the endpoint is stopping, so ``LocalEndpoint.stop()`` never waits for a long stall.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from pipeline.server.chunks import DONE_FRAME, first_finish_position, sse_frame
from pipeline.server.faults import LIMIT_KINDS, FaultPlan, FaultRule
from pipeline.server.protocol import ApiError, error_type_for_status
from pipeline.server.stats import EndpointStats

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
MALFORMED_FRAME = b'data: {"choices": [\n\n'
MALFORMED_BODY = b'{"choices": ['
HTML_PAGE = "<html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1></body></html>"

#: Faults that happen at a position inside the stream (``after=N`` frames).
MID_STREAM_KINDS = frozenset({"truncate", "stall", "error_event", "malformed"})


class EndpointClosing(Exception):
    """The endpoint is stopping: abandon this response and hang up."""


@dataclass
class Exchange:
    """One chat request being answered, with the fault chosen for it."""

    request: web.Request
    plan: FaultPlan
    stats: EndpointStats
    closing: asyncio.Event
    rule: FaultRule | None
    image_keys: tuple[str, ...]
    #: Rate-limit headers computed when the rule was picked (``rpm_limit`` with ``headers=1``).
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str | None:
        return self.rule.kind if self.rule else None

    def frame_delay(self) -> float:
        """Seconds to wait before each frame: the global knob plus a ``slow`` rule's delay."""
        slow = self.rule.delay if self.rule is not None and self.rule.kind == "slow" else 0.0
        return self.plan.chunk_delay + slow


async def pause(closing: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds``, or raise :class:`EndpointClosing` as soon as the endpoint starts stopping."""
    if closing.is_set():
        raise EndpointClosing
    if seconds <= 0:
        return
    try:
        await asyncio.wait_for(closing.wait(), seconds)
    except TimeoutError:
        return
    raise EndpointClosing


def hang_up(request: web.Request) -> web.Response:
    """Close the connection without (further) response bytes; the returned object is never sent."""
    if request.transport is not None:
        request.transport.close()
    return web.Response()


async def answer_before_headers(ex: Exchange) -> web.StreamResponse | None:
    """Apply first-byte delays and the faults that replace the whole response; None to go on."""
    rule = ex.rule
    stall = rule.seconds if rule is not None and rule.kind == "stall_first_byte" else 0.0
    await pause(ex.closing, ex.plan.first_byte_delay + stall)
    if rule is None:
        return None
    if rule.kind == "drop" or (rule.kind == "down" and rule.mode == "drop"):
        return hang_up(ex.request)
    if rule.kind == "down":
        raise ApiError(rule.status, "The local endpoint is down for a while (injected 'down' fault).",
                       code="service_unavailable")
    if rule.kind == "status":
        raise _status_error(rule)
    if rule.kind in LIMIT_KINDS:
        raise _limit_error(ex)
    if rule.kind == "html":  # a proxy or captive portal answering in place of the API
        return web.Response(text=HTML_PAGE, content_type="text/html")
    if rule.kind == "echo_auth":
        raise _echo_error(ex.request, rule.status)
    return None


def _echo_error(request: web.Request, status: int) -> ApiError:
    """What a careless gateway answers: the credentials it got, quoted back (the Authorization header's
    token, ``api-key`` and every ``X-*`` header, the query string), so a test can prove none is stored."""
    auth = request.headers.get("Authorization", "")
    quoted = [f"Incorrect API key provided: {auth.partition(' ')[2] or auth or '(none)'}"]
    quoted += [f"{name} was {value}" for name, value in request.headers.items()
               if name.lower() == "api-key" or (name.lower().startswith("x-") and name.lower() != "x-fault")]
    if request.query_string:
        quoted.append(f"query was {request.query_string}")
    return ApiError(status, "; ".join(quoted), code="invalid_api_key", error_type=error_type_for_status(status))


def _status_error(rule: FaultRule) -> ApiError:
    status = rule.status
    default_code = "rate_limit_exceeded" if status == 429 else None
    message = rule.message or (
        "Rate limit reached (injected by the local endpoint)." if status == 429
        else f"Injected fault: HTTP {status} from the local endpoint."
    )
    return ApiError(status, message, code=rule.error_code or default_code,
                    error_type=rule.error_type or error_type_for_status(status), headers=rule.headers())


def _limit_error(ex: Exchange) -> ApiError:
    """429 from a ``concurrency_limit`` / ``rpm_limit`` rule; headers only where the rule discloses them."""
    assert ex.rule is not None
    what = ("too many requests in flight" if ex.rule.kind == "concurrency_limit"
            else "requests per minute limit reached")
    return ApiError(429, f"Rate limit reached: {what} (local endpoint).", code="rate_limit_exceeded",
                    error_type="rate_limit_error", headers=ex.headers or None)


def _error_object(rule: FaultRule) -> dict[str, Any]:
    return {"error": {
        "message": rule.message or "The local endpoint injected an error into the stream.",
        "type": rule.error_type or "server_error",
        "code": rule.error_code,
    }}


# --- streaming --------------------------------------------------------------------------------------


def _fault_position(ex: Exchange, chunks: list[dict[str, Any]]) -> int | None:
    """Frame index where a mid-stream fault fires; a truncation never reaches a finish_reason."""
    if ex.rule is None or ex.rule.kind not in MID_STREAM_KINDS:
        return None
    if ex.rule.kind == "truncate":
        return min(ex.rule.after, first_finish_position(chunks))
    return min(ex.rule.after, len(chunks))


async def send_stream(ex: Exchange, chunks: list[dict[str, Any]]) -> web.StreamResponse:
    """Stream ``chunks`` as SSE and ``[DONE]``, with any mid-stream fault applied."""
    response = web.StreamResponse(headers={**SSE_HEADERS, **ex.headers})
    await response.prepare(ex.request)
    ex.stats.responded(200)
    frames = [sse_frame(chunk) for chunk in chunks] + [DONE_FRAME]
    fault_at = _fault_position(ex, chunks)
    try:
        for position, frame in enumerate(frames):
            if position == fault_at and await _mid_stream_fault(ex, response):
                return response
            await pause(ex.closing, ex.frame_delay())
            await response.write(frame)
    except ConnectionResetError:  # the client went away mid-stream (its run stopped): nobody to tell
        return response
    ex.stats.answer_completed(ex.image_keys, streamed=True)
    if ex.kind == "linger":  # [DONE] sent, connection held open: clients must stop reading at [DONE]
        await pause(ex.closing, ex.rule.seconds if ex.rule else 0.0)
    await response.write_eof()
    return response


async def _mid_stream_fault(ex: Exchange, response: web.StreamResponse) -> bool:
    """Apply the rule at its position; True when the stream has ended because of it."""
    rule = ex.rule
    assert rule is not None
    if rule.kind == "stall":
        await pause(ex.closing, rule.seconds)
        return False
    if rule.kind == "malformed":
        await response.write(MALFORMED_FRAME)
        return False
    if rule.kind == "error_event":
        await response.write(sse_frame(_error_object(rule), "error" if rule.style == "event" else None))
        await response.write_eof()
        return True
    if rule.mode == "eof":  # truncate, ending the HTTP body cleanly
        await response.write_eof()
    else:
        hang_up(ex.request)
    return True


# --- non-streaming ----------------------------------------------------------------------------------


async def send_json(ex: Exchange, body: dict[str, Any]) -> web.StreamResponse:
    """Send the ``chat.completion`` body; stream-style faults map onto the single body."""
    payload = _json_payload(ex, body)
    response = web.StreamResponse(headers={"Content-Type": "application/json", **ex.headers})
    response.content_length = len(payload)
    await response.prepare(ex.request)
    ex.stats.responded(200)
    stall = ex.rule.seconds if ex.rule is not None and ex.rule.kind == "stall" else 0.0
    await pause(ex.closing, ex.frame_delay() + stall)
    if ex.kind == "truncate":
        await response.write(payload[: len(payload) // 2])
        hang_up(ex.request)
        return response
    await response.write(payload)
    await response.write_eof()
    if ex.kind not in ("error_event", "malformed"):
        ex.stats.answer_completed(ex.image_keys, streamed=False)
    return response


def _json_payload(ex: Exchange, body: dict[str, Any]) -> bytes:
    if ex.rule is not None and ex.rule.kind == "error_event":
        return json.dumps(_error_object(ex.rule)).encode()
    if ex.kind == "malformed":
        return MALFORMED_BODY
    return json.dumps(body).encode()
