"""The local endpoint: an aiohttp.web app speaking OpenAI Chat Completions, plus admin routes.

It stands in for a vision model when none is reachable (and for tests, which drive its fault plan over
real HTTP). It is honest about what it is: answers are measured image facts, not model output.
"""

from __future__ import annotations

import asyncio
import hmac
import signal
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from aiohttp import web

from pipeline.server.answer import plan_answer
from pipeline.server.chunks import CompletionHeader, completion_body, stream_chunks
from pipeline.server.describe import FactsCache, ImageFacts, UnreadableImage
from pipeline.server.faults import (
    LIMIT_KINDS,
    FaultPlan,
    FaultRule,
    RequestTraits,
    parse_fault_spec,
)
from pipeline.server.protocol import (
    ApiError,
    ChatRequest,
    ImagePart,
    error_body,
    invalid,
    parse_body,
    parse_chat_request,
)
from pipeline.server.respond import (
    EndpointClosing,
    Exchange,
    answer_before_headers,
    hang_up,
    send_json,
    send_stream,
)
from pipeline.server.stats import EndpointStats

DEFAULT_MODEL_ID = "local-vision"
#: Request bodies carry base64 images; allow big ones (aiohttp's default is 1 MiB).
MAX_BODY_BYTES = 64 * 1024 * 1024
#: Above this many bytes, JSON parsing and image decoding move to a worker thread.
OFFLOAD_BYTES = 256 * 1024
#: How long ``stop()`` lets in-flight handlers finish before aiohttp cancels them.
SHUTDOWN_GRACE_S = 2.0


@dataclass
class EndpointState:
    """Everything the handlers share; one per app."""

    faults: FaultPlan
    stats: EndpointStats
    api_key: str | None = None
    model_id: str = DEFAULT_MODEL_ID
    cache: FactsCache = field(default_factory=FactsCache)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    #: Requests being answered now, not counting those a limit rule turned away (for concurrency_limit).
    answering: int = 0


STATE = web.AppKey("endpoint_state", EndpointState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_error_response(error: ApiError) -> web.Response:
    return web.json_response(error.body(), status=error.status, headers=error.headers)


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give every error (404, 405, 413, ApiError) the OpenAI ``{"error": {...}}`` shape."""
    try:
        return await handler(request)
    except ApiError as error:
        return api_error_response(error)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {404: f"Invalid URL ({request.method} {request.path})",
                   405: f"Method {request.method} is not allowed for {request.path}"}.get(exc.status, exc.reason)
        code = {404: "unknown_url", 405: "method_not_allowed"}.get(exc.status)
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        body = error_body(message, "invalid_request_error", code=code)
        return web.json_response(body, status=exc.status, headers=headers)


def check_api_key(request: web.Request, api_key: str | None) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (the key is never echoed)."""
    if api_key is None:
        return
    supplied = request.headers.get("Authorization", "")
    scheme, _, token = supplied.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return
    message = "Incorrect API key provided." if supplied else "You didn't provide an API key."
    raise ApiError(401, message, code="invalid_api_key")


# --- chat completions -------------------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions: count it, answer it, and record the status it got."""
    state = request.app[STATE]
    state.stats.request_started()
    try:
        return await _answer_chat(request, state)
    except ApiError as error:
        state.stats.responded(error.status)
        return api_error_response(error)
    except EndpointClosing:
        return hang_up(request)
    finally:
        state.stats.request_finished()


async def _answer_chat(request: web.Request, state: EndpointState) -> web.StreamResponse:
    check_api_key(request, state.api_key)
    header_rule = _header_fault(request)
    chat = await _read_chat_request(request)
    facts = await _describe_images(state.cache, chat.images)
    rule = state.faults.pick(RequestTraits(chat.text, chat.image_keys, state.answering), header_rule)
    if rule is not None:
        state.stats.fault_injected(rule.kind)
    exchange = Exchange(request, state.faults, state.stats, state.closing, rule, chat.image_keys,
                        state.faults.rate_limit_headers())
    admitted = rule is None or rule.kind not in LIMIT_KINDS
    state.answering += admitted
    try:
        early = await answer_before_headers(exchange)
        if early is not None:
            return early
        answer = plan_answer(chat, facts, rule.text if rule is not None and rule.kind == "say" else None)
        header = CompletionHeader.new(chat.model, int(time.time()))
        if chat.stream:
            return await send_stream(exchange, stream_chunks(answer, header, include_usage=chat.include_usage))
        return await send_json(exchange, completion_body(answer, header))
    finally:
        state.answering -= admitted


def _header_fault(request: web.Request) -> FaultRule | None:
    """A one-request fault from the ``X-Fault`` header (handy with curl)."""
    spec = request.headers.get("X-Fault")
    if not spec:
        return None
    try:
        return parse_fault_spec(spec)
    except ValueError as exc:
        raise invalid("X-Fault", str(exc), "invalid_fault_spec") from None


async def _read_chat_request(request: web.Request) -> ChatRequest:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"The request body is larger than {MAX_BODY_BYTES} bytes.",
                       code="request_too_large") from None
    if len(raw) > OFFLOAD_BYTES:
        return await asyncio.to_thread(_parse_chat, raw)
    return _parse_chat(raw)


def _parse_chat(raw: bytes) -> ChatRequest:
    return parse_chat_request(parse_body(raw))


async def _describe_images(cache: FactsCache, images: Sequence[ImagePart]) -> dict[str, ImageFacts]:
    """Facts per image digest, decoded in a worker thread when the images are big."""
    unique = list({image.sha256: image for image in images}.values())
    if sum(len(image.data) for image in unique) > OFFLOAD_BYTES:
        return await asyncio.to_thread(_describe_all, cache, unique)
    return _describe_all(cache, unique)


def _describe_all(cache: FactsCache, images: Sequence[ImagePart]) -> dict[str, ImageFacts]:
    facts = {}
    for image in images:
        try:
            facts[image.sha256] = cache.describe(image.data)
        except UnreadableImage as exc:
            raise invalid(image.param, f"the image could not be decoded ({exc})", "invalid_image") from None
    return facts


# --- models and admin -------------------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_api_key(request, state.api_key)
    model = {"id": state.model_id, "object": "model", "created": 0, "owned_by": "pipeline"}
    return web.json_response({"object": "list", "data": [model]})


async def admin_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_api_key(request, state.api_key)
    return web.json_response(state.stats.snapshot())


async def admin_get_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    check_api_key(request, state.api_key)
    return web.json_response(state.faults.snapshot())


async def admin_set_faults(request: web.Request) -> web.Response:
    """``{"rules": [spec, ...], "clear": bool}``: replace (clear=true) or append rules."""
    state = request.app[STATE]
    check_api_key(request, state.api_key)
    body = parse_body(await request.read())
    specs = body.get("rules", [])
    if not isinstance(specs, list) or not all(isinstance(spec, str) for spec in specs):
        raise invalid("rules", "'rules' must be an array of fault spec strings")
    rules = [_parse_admin_spec(spec, i) for i, spec in enumerate(specs)]
    if body.get("clear", False):
        state.faults.replace(rules)
    else:
        state.faults.add(*rules)
    return web.json_response(state.faults.snapshot())


def _parse_admin_spec(spec: str, index: int) -> FaultRule:
    try:
        return parse_fault_spec(spec)
    except ValueError as exc:
        raise invalid(f"rules[{index}]", str(exc), "invalid_fault_spec") from None


async def admin_set_latency(request: web.Request) -> web.Response:
    """``{"chunk_delay": s, "first_byte_delay": s}``; either key may be left out."""
    state = request.app[STATE]
    check_api_key(request, state.api_key)
    body = parse_body(await request.read())
    for name in ("chunk_delay", "first_byte_delay"):
        if name in body:
            value = body[name]
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 3600:
                raise invalid(name, f"'{name}' must be a number of seconds between 0 and 3600")
            setattr(state.faults, name, float(value))
    return web.json_response(state.faults.snapshot())


async def admin_reset(request: web.Request) -> web.Response:
    """Clear the fault rules and zero the counters."""
    state = request.app[STATE]
    check_api_key(request, state.api_key)
    state.faults.clear()
    state.stats.reset()
    return web.json_response({"ok": True})


def create_app(
    faults: FaultPlan | None = None,
    *,
    api_key: str | None = None,
    stats: EndpointStats | None = None,
    model_id: str = DEFAULT_MODEL_ID,
) -> web.Application:
    """The aiohttp application; pass ``faults``/``stats`` to share them with the caller."""
    app = web.Application(middlewares=[openai_errors], client_max_size=MAX_BODY_BYTES)
    app[STATE] = EndpointState(faults or FaultPlan(), stats or EndpointStats(), api_key, model_id)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/_admin/stats", admin_stats)
    app.router.add_get("/_admin/faults", admin_get_faults)
    app.router.add_post("/_admin/faults", admin_set_faults)
    app.router.add_post("/_admin/latency", admin_set_latency)
    app.router.add_post("/_admin/reset", admin_reset)
    return app


# --- running ----------------------------------------------------------------------------------------


class LocalEndpoint:
    """Start/stop the app on a real socket; tests and the pipeline use it in-process."""

    def __init__(
        self,
        faults: FaultPlan | None = None,
        *,
        api_key: str | None = None,
        chunk_delay: float = 0.0,
        first_byte_delay: float = 0.0,
    ) -> None:
        self.faults = faults if faults is not None else FaultPlan()
        if chunk_delay:
            self.faults.chunk_delay = chunk_delay
        if first_byte_delay:
            self.faults.first_byte_delay = first_byte_delay
        self.stats = EndpointStats()
        self._api_key = api_key
        self._app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._port: int | None = None

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT/v1`` once started (``https://`` when started with an ``ssl_context``)."""
        if self._base_url is None:
            raise RuntimeError("LocalEndpoint is not started")
        return self._base_url

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("LocalEndpoint is not started")
        return self._port

    async def start(self, host: str = "127.0.0.1", port: int = 0, *,
                    ssl_context: ssl.SSLContext | None = None) -> str:
        """Listen on ``host:port`` (0 picks a free port); returns the base URL.

        With ``ssl_context`` it serves https (the base URL says so): tests of private CAs and mTLS use it.
        """
        if self._runner is not None:
            raise RuntimeError("LocalEndpoint is already started")
        self._app = create_app(self.faults, api_key=self._api_key, stats=self.stats)
        runner = web.AppRunner(self._app, access_log=None, handler_cancellation=True,
                               shutdown_timeout=SHUTDOWN_GRACE_S)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        scheme = "https" if ssl_context is not None else "http"
        self._base_url = f"{scheme}://{url_host}:{self._port}/v1"
        return self._base_url

    async def stop(self) -> None:
        """Stop listening; stalled responses end at once (their connections are closed)."""
        if self._runner is None or self._app is None:
            return
        self._app[STATE].closing.set()
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> LocalEndpoint:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


def run_server(
    host: str = "127.0.0.1",
    port: int = 8089,
    *,
    fault_specs: Sequence[str] = (),
    api_key: str | None = None,
    chunk_delay: float = 0.0,
    first_byte_delay: float = 0.0,
) -> None:
    """Serve until SIGINT/SIGTERM; prints ``serving on <base_url>`` once listening (tests read the port)."""
    plan = FaultPlan(fault_specs, chunk_delay=chunk_delay, first_byte_delay=first_byte_delay)
    endpoint = LocalEndpoint(plan, api_key=api_key)
    asyncio.run(_serve_until_signalled(endpoint, host, port))


async def _serve_until_signalled(endpoint: LocalEndpoint, host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        url = await endpoint.start(host, port)
        print(f"serving on {url}", flush=True)
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await endpoint.stop()

