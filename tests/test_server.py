"""The embedded local endpoint over real HTTP on 127.0.0.1: protocol shape, validation, faults, counters."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from pipeline.server import (
    FaultPlan,
    LocalEndpoint,
    caption,
    describe_image,
    parse_fault_spec,
)
from pipeline.server.answer import image_tokens, split_pieces
from pipeline.server.describe import UnreadableImage
from pipeline.server.faults import format_duration

QUICK = aiohttp.ClientTimeout(total=5)
SHORT_READ = aiohttp.ClientTimeout(total=5, sock_read=0.3)


# --- helpers ----------------------------------------------------------------------------------------


def image_bytes(color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (320, 240),
                fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, fmt)
    return buffer.getvalue()


RED_JPEG = image_bytes()
BLUE_PNG = image_bytes((0, 0, 255), (64, 96), "PNG")


def data_uri(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(*images: bytes, text: str = "Describe the image.", **extra: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    parts += [{"type": "image_url", "image_url": {"url": data_uri(image)}} for image in images]
    return {"model": "some-model", "messages": [{"role": "user", "content": parts}], **extra}


def parse_sse(raw: str) -> list[tuple[str | None, str]]:
    """(event, data) pairs: blocks split on blank lines, ``data:`` lines joined."""
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        event, data = None, []
        for line in block.split("\n"):
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        events.append((event, "\n".join(data)))
    return events


def chunk_objects(raw: str) -> list[dict[str, Any]]:
    """JSON objects of a complete stream (asserts it ends with [DONE])."""
    events = parse_sse(raw)
    assert events[-1] == (None, "[DONE]")
    return [json.loads(data) for _, data in events[:-1]]


def contents(chunks: list[dict[str, Any]], index: int = 0) -> list[str]:
    return [c["choices"][0]["delta"]["content"] for c in chunks
            if c["choices"] and c["choices"][0]["index"] == index and c["choices"][0]["delta"].get("content")]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=QUICK) as client:
        yield client


async def post(session: aiohttp.ClientSession, endpoint: LocalEndpoint, body: Any,
               headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """POST a chat request and read the whole answer: (status, headers, text)."""
    kwargs: dict[str, Any] = {"data": body} if isinstance(body, (str, bytes)) else {"json": body}
    async with session.post(f"{endpoint.base_url}/chat/completions", headers=headers, **kwargs) as response:
        return response.status, response.headers, await response.text()


async def read_raw(response: aiohttp.ClientResponse) -> tuple[str, BaseException | None]:
    """Everything the server sent before the body ended or the connection broke."""
    received = bytearray()
    try:
        async for piece in response.content.iter_any():
            received.extend(piece)
    except (TimeoutError, aiohttp.ClientError) as exc:
        return received.decode(), exc
    return received.decode(), None


# --- describing images ------------------------------------------------------------------------------


def test_describe_red_image_reports_size_and_colour() -> None:
    facts = describe_image(RED_JPEG)
    assert (facts.width, facts.height, facts.format, facts.orientation) == (320, 240, "JPEG", "landscape")
    assert facts.colors[0] == "red"
    text = caption(facts)
    assert "320x240" in text and "red" in text
    assert caption(facts, 1) != text and caption(facts, 1) == caption(describe_image(RED_JPEG), 1)


def test_describe_portrait_square_and_transparency() -> None:
    assert describe_image(BLUE_PNG).orientation == "portrait"
    assert describe_image(image_bytes(size=(50, 50), fmt="WEBP")).format == "WEBP"
    buffer = io.BytesIO()
    Image.new("RGBA", (40, 40), (0, 255, 0, 0)).save(buffer, "PNG")
    facts = describe_image(buffer.getvalue())
    assert facts.orientation == "square" and facts.has_transparency


def test_describe_rejects_non_images() -> None:
    with pytest.raises(UnreadableImage):
        describe_image(b"definitely not an image")
    assert issubclass(UnreadableImage, ValueError)


def test_split_pieces_and_image_tokens() -> None:
    assert split_pieces("A red  image.") == ("A", " red", "  image.")
    assert image_tokens(320, 240, "auto") == 85 + 170
    assert image_tokens(4096, 4096, "high") == 85 + 170 * 4  # 2048 -> 768x768 -> 2x2 tiles
    assert image_tokens(4096, 4096, "low") == 85


# --- protocol ---------------------------------------------------------------------------------------


async def test_models_list(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{local_endpoint.base_url}/models") as response:
        assert response.status == 200
        assert await response.json() == {
            "object": "list", "data": [{"id": "local-vision", "object": "model", "created": 0, "owned_by": "pipeline"}]}


async def test_non_stream_answer(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    status, _, text = await post(session, local_endpoint, chat_body(RED_JPEG))
    assert status == 200
    body = json.loads(text)
    assert body["object"] == "chat.completion" and body["model"] == "some-model"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == caption(describe_image(RED_JPEG))
    assert "320x240" in choice["message"]["content"] and "red" in choice["message"]["content"]
    usage = body["usage"]
    assert usage["prompt_tokens"] == round(3 * 1.3) + 85 + 170
    assert usage["completion_tokens"] == len(split_pieces(choice["message"]["content"]))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_no_image_gets_an_honest_answer(local_endpoint: LocalEndpoint,
                                              session: aiohttp.ClientSession) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    _, _, text = await post(session, local_endpoint, body)
    assert "No image was provided" in json.loads(text)["choices"][0]["message"]["content"]


async def test_several_images_are_each_described(local_endpoint: LocalEndpoint,
                                                  session: aiohttp.ClientSession) -> None:
    _, _, text = await post(session, local_endpoint, chat_body(RED_JPEG, BLUE_PNG))
    content = json.loads(text)["choices"][0]["message"]["content"]
    assert content.startswith("Image 1: A 320x240") and "Image 2: A 64x96" in content


async def test_stream_shape(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    body = chat_body(RED_JPEG, stream=True, stream_options={"include_usage": True})
    status, headers, raw = await post(session, local_endpoint, body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    chunks = chunk_objects(raw)
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" and c["system_fingerprint"] == "fp_local" for c in chunks)
    assert all("usage" in c for c in chunks)
    first, *middle, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    words = [c["choices"][0]["delta"]["content"] for c in middle]
    assert all(w.startswith(" ") for w in words[1:]) and not words[0].startswith(" ")
    assert "".join(words) == caption(describe_image(RED_JPEG))
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *middle])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(words)
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_stream_without_usage_has_no_usage_chunk(local_endpoint: LocalEndpoint,
                                                       session: aiohttp.ClientSession) -> None:
    _, _, raw = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True))
    chunks = chunk_objects(raw)
    assert all(c["choices"] and "usage" not in c for c in chunks)


async def test_n2_choices_are_interleaved_and_differ(local_endpoint: LocalEndpoint,
                                                      session: aiohttp.ClientSession) -> None:
    _, _, raw = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True, n=2))
    chunks = chunk_objects(raw)
    indexes = [c["choices"][0]["index"] for c in chunks]
    assert indexes[:4] == [0, 1, 0, 1]
    texts = ["".join(contents(chunks, i)) for i in (0, 1)]
    facts = describe_image(RED_JPEG)
    assert texts == [caption(facts, 0), caption(facts, 1)] and texts[0] != texts[1]
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                for c in chunks if c["choices"][0]["finish_reason"]}
    assert finishes == {0: "stop", 1: "stop"}


TOOLS = [
    {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {"name": "record_caption", "parameters": {
        "type": "object",
        "properties": {"alt_text": {"type": "string"}, "width": {"type": "integer"},
                       "colors": {"type": "array", "items": {"type": "string"}}}}}},
]


async def test_tools_stream_a_function_call(local_endpoint: LocalEndpoint,
                                            session: aiohttp.ClientSession) -> None:
    choice = {"type": "function", "function": {"name": "record_caption"}}
    body = chat_body(RED_JPEG, stream=True, tools=TOOLS, tool_choice=choice)
    _, _, raw = await post(session, local_endpoint, body)
    chunks = chunk_objects(raw)
    head = chunks[0]["choices"][0]["delta"]
    assert head["role"] == "assistant" and head["content"] is None
    call = head["tool_calls"][0]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "record_caption", "arguments": ""}
    fragments = [c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]]
    assert len(fragments) > 3
    arguments = json.loads("".join(fragments))
    assert arguments == {"alt_text": caption(describe_image(RED_JPEG)), "width": 320, "colors": ["red"]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_tools_default_to_first_and_none_means_text(local_endpoint: LocalEndpoint,
                                                          session: aiohttp.ClientSession) -> None:
    _, _, text = await post(session, local_endpoint, chat_body(RED_JPEG, tools=TOOLS))
    message = json.loads(text)["choices"][0]["message"]
    assert message["content"] is None and message["tool_calls"][0]["function"]["name"] == "other"
    assert json.loads(message["tool_calls"][0]["function"]["arguments"])["description"].startswith("A 320x240")
    _, _, text = await post(session, local_endpoint, chat_body(RED_JPEG, tools=TOOLS, tool_choice="none"))
    assert json.loads(text)["choices"][0]["message"]["content"].startswith("A 320x240")


async def test_max_tokens_cuts_with_length(local_endpoint: LocalEndpoint,
                                           session: aiohttp.ClientSession) -> None:
    for limit_name in ("max_tokens", "max_completion_tokens"):
        limit: dict[str, Any] = {limit_name: 3}
        _, _, raw = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True, **limit))
        chunks = chunk_objects(raw)
        assert contents(chunks) == ["A", " 320x240", " landscape"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_stop_sequence_cuts_before_it(local_endpoint: LocalEndpoint,
                                            session: aiohttp.ClientSession) -> None:
    _, _, text = await post(session, local_endpoint, chat_body(RED_JPEG, stop=["JPEG", "zzz"]))
    choice = json.loads(text)["choices"][0]
    assert choice["message"]["content"] == "A 320x240 landscape " and choice["finish_reason"] == "stop"


async def test_json_modes(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    _, _, text = await post(session, local_endpoint, chat_body(RED_JPEG, response_format={"type": "json_object"}))
    facts = json.loads(json.loads(text)["choices"][0]["message"]["content"])
    assert facts["width"] == 320 and facts["height"] == 240 and facts["caption"].startswith("A 320x240")
    schema = {"type": "object", "properties": {"summary": {"type": "string"}, "height": {"type": "integer"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    _, _, text = await post(session, local_endpoint, chat_body(RED_JPEG, response_format=response_format))
    filled = json.loads(json.loads(text)["choices"][0]["message"]["content"])
    assert set(filled) == {"summary", "height"} and filled["height"] == 240


async def test_same_request_same_answer(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    answers = []
    for _ in range(2):
        _, _, raw = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True, n=2))
        chunks = chunk_objects(raw)
        answers.append([contents(chunks, 0), contents(chunks, 1)])
    assert answers[0] == answers[1]


BAD_BODIES = [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages[0].content[0].type"),
    (chat_body(temperature=2.5), "temperature"),
    (chat_body(top_p=-0.1), "top_p"),
    (chat_body(presence_penalty=3), "presence_penalty"),
    (chat_body(frequency_penalty=-2.5), "frequency_penalty"),
    (chat_body(n=0), "n"),
    (chat_body(n=17), "n"),
    (chat_body(stop=["a", "b", "c", "d", "e"]), "stop"),
    (chat_body(logit_bias={"50256": 101}), "logit_bias"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(max_completion_tokens=True), "max_completion_tokens"),
    (chat_body(response_format={"type": "yaml"}), "response_format"),
    (chat_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
]


@pytest.mark.parametrize(("body", "param"), BAD_BODIES)
async def test_validation_names_the_param(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession,
                                          body: dict[str, Any], param: str) -> None:
    status, _, text = await post(session, local_endpoint, body)
    assert status == 400
    error = json.loads(text)["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
async def test_body_must_be_a_json_object(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession,
                                          raw: bytes) -> None:
    status, _, text = await post(session, local_endpoint, raw)
    assert status == 400 and json.loads(text)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("url", [
    "data:image/png;base64,@@@not-base64@@@",
    data_uri(b"GIF89a but then garbage", "image/gif"),
    data_uri(RED_JPEG[: len(RED_JPEG) // 3]),
])
async def test_bad_image_is_invalid_image(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession,
                                          url: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    status, _, text = await post(session, local_endpoint, body)
    error = json.loads(text)["error"]
    assert status == 400 and error["code"] == "invalid_image"
    assert error["param"] == "messages[0].content[0].image_url.url"


async def test_remote_image_urls_are_refused(local_endpoint: LocalEndpoint,
                                             session: aiohttp.ClientSession) -> None:
    part = {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    status, _, text = await post(session, local_endpoint, body)
    assert status == 400 and "does not fetch remote image URLs" in json.loads(text)["error"]["message"]


async def test_api_key_is_required_when_set(session: aiohttp.ClientSession) -> None:
    async with LocalEndpoint(api_key="sk-local-secret") as endpoint:
        for headers in (None, {"Authorization": "Bearer wrong"}):
            status, _, text = await post(session, endpoint, chat_body(RED_JPEG), headers)
            assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
            assert "sk-local-secret" not in text and "wrong" not in text
        status, _, _ = await post(session, endpoint, chat_body(RED_JPEG), {"Authorization": "Bearer sk-local-secret"})
        assert status == 200
        assert endpoint.stats.snapshot()["responses_by_status"] == {"401": 2, "200": 1}


async def test_unknown_path_and_method_are_openai_shaped(local_endpoint: LocalEndpoint,
                                                         session: aiohttp.ClientSession) -> None:
    async with session.get(f"{local_endpoint.base_url}/nothing-here") as response:
        assert response.status == 404 and (await response.json())["error"]["code"] == "unknown_url"
    async with session.get(f"{local_endpoint.base_url}/chat/completions") as response:
        assert response.status == 405 and "error" in await response.json()


# --- fault specs ------------------------------------------------------------------------------------


def test_parse_fault_spec_reads_options() -> None:
    rule = parse_fault_spec("status:code=429,retry_after=Wed, 21 Oct 2015 07:28:00 GMT,times=2")
    assert (rule.kind, rule.status, rule.times) == ("status", 429, 2)
    assert rule.headers() == {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}
    rule = parse_fault_spec("error_event:after=2,message=overloaded, try later,style=event")
    assert (rule.message, rule.style, rule.after) == ("overloaded, try later", "event", 2)
    assert parse_fault_spec("down").status == 503 and parse_fault_spec("stall").seconds == 3600


@pytest.mark.parametrize(("spec", "fragment"), [
    ("explode", "unknown kind 'explode'"),
    ("drop:after=2", "option 'after' is not valid for 'drop'"),
    ("status:code=abc", "option code='abc'"),
    ("status:code=200", "between 400 and 599"),
    ("slow:delay=-1", "seconds >= 0"),
    ("truncate:after=1,after=2", "given twice"),
    ("truncate:mode=sideways", "mode='sideways'"),
    ("status:p=1.5", "probability"),
    ("status:retry_after=soon", "HTTP-date"),
    ("status:reset_tokens=6 minutes", "duration"),
    ("stall:oops", "expected key=value"),
])
def test_parse_fault_spec_errors_are_precise(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_fault_spec(spec)
    assert fragment in str(caught.value) and repr(spec) in str(caught.value)


# --- faults over HTTP -------------------------------------------------------------------------------


async def test_status_fault_sets_rate_limit_headers(local_endpoint: LocalEndpoint,
                                                    session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("status:code=429,retry_after=1,retry_after_ms=1500,reset_requests=1s,"
                              "reset_tokens=6m0s,remaining_requests=0,times=1")
    status, headers, text = await post(session, local_endpoint, chat_body(RED_JPEG))
    assert status == 429
    assert headers["Retry-After"] == "1" and headers["retry-after-ms"] == "1500"
    assert headers["x-ratelimit-reset-requests"] == "1s" and headers["x-ratelimit-reset-tokens"] == "6m0s"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    error = json.loads(text)["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    status, _, _ = await post(session, local_endpoint, chat_body(RED_JPEG))
    assert status == 200
    local_endpoint.faults.add("status:code=503,message=try again later")
    status, _, text = await post(session, local_endpoint, chat_body(RED_JPEG))
    assert status == 503 and json.loads(text)["error"] == {
        "message": "try again later", "type": "server_error", "param": None, "code": None}


async def test_say_answers_its_text_as_the_caption(local_endpoint: LocalEndpoint,
                                                  session: aiohttp.ClientSession) -> None:
    """``say:text=`` replaces the description (markup and commas kept), streamed like any answer, only for
    the requests it matches; without text it is refused with a precise message."""
    local_endpoint.faults.add("say:text=<script>alert(1)</script>, as text,match=row-7")
    body = chat_body(RED_JPEG, text="Describe row-7.", stream=True, stream_options={"include_usage": True})
    status, _, raw = await post(session, local_endpoint, body)
    *chunks, usage = chunk_objects(raw)
    words = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert status == 200 and words == "<script>alert(1)</script>, as text"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and usage["usage"]["completion_tokens"] == 3
    status, _, text = await post(session, local_endpoint, chat_body(RED_JPEG, text="Describe row-8."))
    assert json.loads(text)["choices"][0]["message"]["content"] == caption(describe_image(RED_JPEG))
    with pytest.raises(ValueError, match="say needs text=TEXT"):
        parse_fault_spec("say:match=row-7")


async def test_drop_closes_without_response(local_endpoint: LocalEndpoint,
                                            session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("drop:times=1")
    with pytest.raises(aiohttp.ClientError):
        await post(session, local_endpoint, chat_body(RED_JPEG, stream=True))
    status, _, _ = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True))
    assert status == 200
    assert local_endpoint.stats.snapshot()["faults_injected"] == {"drop": 1}


async def test_truncate_ends_without_finish_or_done(local_endpoint: LocalEndpoint,
                                                    session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("truncate:after=3,times=1", "truncate:after=99,mode=eof,times=1")
    async with session.post(f"{local_endpoint.base_url}/chat/completions",
                            json=chat_body(RED_JPEG, stream=True)) as response:
        raw, error = await read_raw(response)
    assert isinstance(error, aiohttp.ClientPayloadError)
    events = parse_sse(raw)
    assert len(events) == 3 and all(data != "[DONE]" for _, data in events)
    async with session.post(f"{local_endpoint.base_url}/chat/completions",
                            json=chat_body(RED_JPEG, stream=True)) as response:
        raw, error = await read_raw(response)
    assert error is None  # mode=eof: the HTTP body ends cleanly, but the stream is still unfinished
    chunks = [json.loads(data) for _, data in parse_sse(raw)]
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert local_endpoint.stats.snapshot()["streams_completed"] == 0


async def test_stall_first_byte_is_cut_by_client_timeout(local_endpoint: LocalEndpoint,
                                                         session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("stall_first_byte:seconds=60,times=1")
    with pytest.raises(asyncio.TimeoutError):
        async with session.post(f"{local_endpoint.base_url}/chat/completions",
                                json=chat_body(RED_JPEG, stream=True), timeout=SHORT_READ):
            pass
    await local_endpoint.stats.wait_until(lambda s: s.in_flight == 0)
    status, _, _ = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True))
    assert status == 200


async def test_stall_mid_stream_is_cut_by_client_timeout(local_endpoint: LocalEndpoint,
                                                         session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("stall:after=2,times=1")
    async with session.post(f"{local_endpoint.base_url}/chat/completions",
                            json=chat_body(RED_JPEG, stream=True), timeout=SHORT_READ) as response:
        raw, error = await read_raw(response)
    assert isinstance(error, asyncio.TimeoutError) and len(parse_sse(raw)) == 2
    await local_endpoint.stats.wait_until(lambda s: s.in_flight == 0)
    status, _, raw = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True))
    assert status == 200 and raw.endswith("data: [DONE]\n\n")


async def test_short_stall_then_continues(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("stall:after=1,seconds=0.01", "slow:delay=0.001")
    _, _, raw = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True))
    assert "".join(contents(chunk_objects(raw))) == caption(describe_image(RED_JPEG))


@pytest.mark.parametrize("style", ["data", "event"])
async def test_error_event_inside_the_stream(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession,
                                             style: str) -> None:
    local_endpoint.faults.add(f"error_event:after=2,message=upstream overloaded,style={style},error_code=overloaded")
    _, _, raw = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True))
    events = parse_sse(raw)
    assert len(events) == 3
    event, data = events[-1]
    assert event == ("error" if style == "event" else None)
    error = {"message": "upstream overloaded", "type": "server_error", "code": "overloaded"}
    assert json.loads(data) == {"error": error}


async def test_malformed_line_then_stream_continues(local_endpoint: LocalEndpoint,
                                                    session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("malformed:after=1")
    _, _, raw = await post(session, local_endpoint, chat_body(RED_JPEG, stream=True))
    events = parse_sse(raw)
    assert events[1] == (None, '{"choices": [') and events[-1] == (None, "[DONE]")
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[1][1])
    good = [json.loads(data) for _, data in events[:1] + events[2:-1]]
    assert "".join(contents(good)) == caption(describe_image(RED_JPEG))


async def test_down_then_recovers(session: aiohttp.ClientSession) -> None:
    now = [100.0]
    plan = FaultPlan(clock=lambda: now[0])
    async with LocalEndpoint(plan) as endpoint:
        plan.add("down:seconds=30")
        assert (await post(session, endpoint, chat_body(RED_JPEG)))[0] == 503
        now[0] += 29
        assert (await post(session, endpoint, chat_body(RED_JPEG)))[0] == 503
        now[0] += 2
        assert (await post(session, endpoint, chat_body(RED_JPEG)))[0] == 200
        plan.replace(["down:seconds=5,mode=drop"])
        with pytest.raises(aiohttp.ClientError):
            await post(session, endpoint, chat_body(RED_JPEG))
        now[0] += 5
        assert (await post(session, endpoint, chat_body(RED_JPEG)))[0] == 200
        assert endpoint.stats.snapshot()["faults_injected"] == {"down": 3}


async def test_times_limits_a_rule(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("status:code=500,times=2")
    statuses = [(await post(session, local_endpoint, chat_body(RED_JPEG)))[0] for _ in range(3)]
    assert statuses == [500, 500, 200]


async def test_per_image_faults_each_image_once(local_endpoint: LocalEndpoint,
                                                session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("status:code=502,per_image=1")
    order = [RED_JPEG, BLUE_PNG, RED_JPEG, BLUE_PNG, RED_JPEG]
    statuses = [(await post(session, local_endpoint, chat_body(image)))[0] for image in order]
    assert statuses == [502, 502, 200, 200, 200]


async def test_per_image_is_deterministic_under_concurrency(local_endpoint: LocalEndpoint,
                                                            session: aiohttp.ClientSession) -> None:
    images = [image_bytes((i * 20, 0, 0), (32, 32), "PNG") for i in range(6)]
    local_endpoint.faults.add("truncate:after=1,per_image=1")

    async def attempt(image: bytes) -> bool:
        async with session.post(f"{local_endpoint.base_url}/chat/completions",
                                json=chat_body(image, stream=True)) as response:
            raw, _ = await read_raw(response)
        return raw.endswith("data: [DONE]\n\n")

    first = await asyncio.gather(*(attempt(image) for image in images))
    second = await asyncio.gather(*(attempt(image) for image in images))
    assert first == [False] * 6 and second == [True] * 6
    assert set(local_endpoint.stats.snapshot()["completed_by_image"].values()) == {1}


async def test_match_targets_one_row(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("status:code=400,match=row-0007")
    statuses = [(await post(session, local_endpoint, chat_body(RED_JPEG, text=f"Caption row-{i:04d}")))[0]
                for i in range(5, 10)]
    assert statuses == [200, 200, 400, 200, 200]


async def test_probability_with_seed_is_reproducible(local_endpoint: LocalEndpoint,
                                                     session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("status:code=500,p=0.5,seed=7")
    statuses = [(await post(session, local_endpoint, chat_body(RED_JPEG)))[0] for _ in range(8)]
    rng = random.Random(7)
    assert statuses == [500 if rng.random() < 0.5 else 200 for _ in range(8)]
    assert 500 in statuses and 200 in statuses


async def test_x_fault_header_applies_to_one_request(local_endpoint: LocalEndpoint,
                                                      session: aiohttp.ClientSession) -> None:
    status, headers, _ = await post(session, local_endpoint, chat_body(RED_JPEG),
                                    {"X-Fault": "status:code=429,retry_after=2"})
    assert status == 429 and headers["Retry-After"] == "2"
    assert (await post(session, local_endpoint, chat_body(RED_JPEG)))[0] == 200
    status, _, text = await post(session, local_endpoint, chat_body(RED_JPEG), {"X-Fault": "nonsense"})
    assert status == 400 and json.loads(text)["error"]["param"] == "X-Fault"


async def test_non_stream_faults(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("truncate:times=1")
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(session, local_endpoint, chat_body(RED_JPEG))
    local_endpoint.faults.replace(["error_event:times=1"])
    _, _, text = await post(session, local_endpoint, chat_body(RED_JPEG))
    assert json.loads(text)["error"]["type"] == "server_error"


async def test_faults_leave_no_error_logs(caplog: pytest.LogCaptureFixture,
                                          session: aiohttp.ClientSession) -> None:
    caplog.set_level(logging.WARNING)
    async with LocalEndpoint() as endpoint:
        for spec in ("drop", "truncate:after=2", "stall:after=1"):
            endpoint.faults.replace([spec])
            try:
                async with session.post(f"{endpoint.base_url}/chat/completions",
                                        json=chat_body(RED_JPEG, stream=True), timeout=SHORT_READ) as response:
                    await read_raw(response)
            except aiohttp.ServerDisconnectedError:
                assert spec == "drop"
            await endpoint.stats.wait_until(lambda s: s.in_flight == 0)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_stop_ends_stalled_streams_promptly(session: aiohttp.ClientSession) -> None:
    endpoint = LocalEndpoint()
    await endpoint.start()
    endpoint.faults.add("stall:after=1")
    async with session.post(f"{endpoint.base_url}/chat/completions",
                            json=chat_body(RED_JPEG, stream=True)) as response:
        await response.content.readuntil(b"\n\n")
        await asyncio.wait_for(endpoint.stop(), 1.5)
        _, error = await read_raw(response)
    assert isinstance(error, aiohttp.ClientPayloadError)


# --- admin and counters -----------------------------------------------------------------------------


async def test_admin_endpoints(local_endpoint: LocalEndpoint, session: aiohttp.ClientSession) -> None:
    admin = local_endpoint.base_url.removesuffix("/v1") + "/_admin"
    async with session.post(f"{admin}/faults", json={"rules": ["status:code=503"]}) as response:
        assert response.status == 200 and (await response.json())["rules"][0]["spec"] == "status:code=503"
    assert (await post(session, local_endpoint, chat_body(RED_JPEG)))[0] == 503
    async with session.post(f"{admin}/faults", json={"rules": ["status:code=418"], "clear": True}) as response:
        assert [r["spec"] for r in (await response.json())["rules"]] == ["status:code=418"]
    assert (await post(session, local_endpoint, chat_body(RED_JPEG)))[0] == 418
    async with session.post(f"{admin}/faults", json={"rules": ["bogus"]}) as response:
        error = (await response.json())["error"]
        assert response.status == 400 and error["param"] == "rules[0]" and "bogus" in error["message"]
    async with session.get(f"{admin}/stats") as response:
        stats = await response.json()
    assert stats["requests"] == 2 and stats["responses_by_status"] == {"503": 1, "418": 1}
    assert stats["faults_injected"] == {"status": 2} and stats["in_flight"] == 0
    async with session.post(f"{admin}/latency", json={"chunk_delay": 0.001, "first_byte_delay": 0}) as response:
        assert (await response.json())["chunk_delay"] == 0.001
    async with session.post(f"{admin}/reset") as response:
        assert response.status == 200
    assert local_endpoint.faults.rules == () and local_endpoint.stats.snapshot()["requests"] == 0
    assert (await post(session, local_endpoint, chat_body(RED_JPEG)))[0] == 200


async def test_completed_by_image_counts_only_full_answers(local_endpoint: LocalEndpoint,
                                                          session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("truncate:after=1,times=1")
    for stream in (True, True, False):
        async with session.post(f"{local_endpoint.base_url}/chat/completions",
                                json=chat_body(RED_JPEG, stream=stream)) as response:
            await read_raw(response)
    stats = local_endpoint.stats.snapshot()
    assert stats["completed_by_image"] == {describe_image(RED_JPEG).sha256: 2}
    assert stats["streams_completed"] == 1 and stats["requests"] == 3


async def test_max_in_flight_tracks_concurrency(local_endpoint: LocalEndpoint,
                                                session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("stall:after=1")
    responses = []
    for _ in range(3):
        response = await session.post(f"{local_endpoint.base_url}/chat/completions",
                                       json=chat_body(RED_JPEG, stream=True))
        await response.content.readuntil(b"\n\n")
        responses.append(response)
    assert local_endpoint.stats.in_flight == 3
    for response in responses:
        response.close()
    await local_endpoint.stats.wait_until(lambda s: s.in_flight == 0)
    assert local_endpoint.stats.snapshot()["max_in_flight"] == 3


def test_run_server_prints_its_url_and_stops_on_sigterm() -> None:
    code = "from pipeline.server import run_server; run_server(port=0)"
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("serving on http://127.0.0.1:") and line.endswith("/v1")

            async def models() -> int:
                url = line.removeprefix("serving on ") + "/models"
                async with aiohttp.ClientSession(timeout=QUICK) as client, client.get(url) as response:
                    return response.status

            assert asyncio.run(models()) == 200
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=5) == 0
        finally:
            if process.poll() is None:
                process.kill()


# --- sample data ------------------------------------------------------------------------------------


def test_sample_data_is_deterministic(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "make_sample_data.py"
    for folder in ("a", "b"):
        subprocess.run([sys.executable, str(script), "--out", str(tmp_path / folder)], check=True,
                       capture_output=True, timeout=30)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    manifest = (tmp_path / "a" / "manifest.csv").read_text().splitlines()
    assert manifest[0] == "id,path,label" and manifest[1] == "img_001,img_001.jpg,gradient"
    paths = [line.split(",")[1] for line in manifest[1:]]
    assert len(paths) == 36 and sum((tmp_path / "a" / n).stat().st_size for n in names) < 600_000
    facts = [describe_image((tmp_path / "a" / path).read_bytes()) for path in paths]
    assert {f.format for f in facts} == {"JPEG", "PNG", "GIF", "WEBP"}
    assert {"portrait", "square", "landscape"} <= {f.orientation for f in facts}
    assert any(f.has_transparency for f in facts)


# --- limit knobs: concurrency_limit and rpm_limit ---------------------------------------------------

@pytest.mark.parametrize(("spec", "fragment"), [
    ("concurrency_limit", "concurrency_limit needs max=N"),
    ("concurrency_limit:max=0", "option max='0' must be a whole number >= 1"),
    ("rpm_limit", "rpm_limit needs rpm=N"),
    ("rpm_limit:rpm=0", "option rpm='0' must be a number > 0"),
    ("rpm_limit:rpm=60,headers=yes", "option headers='yes' must be 0 or 1"),
    ("rpm_limit:rpm=60,max=3", "option 'max' is not valid for 'rpm_limit'"),
])
def test_limit_specs_are_checked(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_fault_spec(spec)
    assert fragment in str(caught.value)


def test_limit_specs_read_options() -> None:
    rule = parse_fault_spec("rpm_limit:rpm=600,headers=1")
    assert (rule.rpm, rule.burst, rule.rate_headers) == (600, 10, True)  # burst: one second's worth
    assert parse_fault_spec("rpm_limit:rpm=30").burst == 1
    assert parse_fault_spec("concurrency_limit:max=8").max_in_flight == 8


@pytest.mark.parametrize(("seconds", "text"), [(0, "0ms"), (0.25, "250ms"), (1, "1s"), (1.5, "1.5s"),
                                               (59.9996, "60s"), (360, "6m0s"), (61.25, "1m1.25s")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


async def test_concurrency_limit_turns_away_requests_beyond_max(local_endpoint: LocalEndpoint,
                                                                session: aiohttp.ClientSession) -> None:
    local_endpoint.faults.add("concurrency_limit:max=2", "stall:after=1,match=hold")
    held = []
    for _ in range(2):
        response = await session.post(f"{local_endpoint.base_url}/chat/completions",
                                      json=chat_body(RED_JPEG, text="hold this", stream=True))
        await response.content.readuntil(b"\n\n")
        held.append(response)
    status, headers, text = await post(session, local_endpoint, chat_body(RED_JPEG))
    assert status == 429 and json.loads(text)["error"]["code"] == "rate_limit_exceeded"
    assert not [name for name in headers if name.lower().startswith(("x-ratelimit", "retry-after"))]
    held.pop().close()
    await local_endpoint.stats.wait_until(lambda s: s.in_flight == 1)
    assert (await post(session, local_endpoint, chat_body(RED_JPEG)))[0] == 200  # room again
    for response in held:
        response.close()
    stats = local_endpoint.stats.snapshot()
    assert stats["faults_injected"] == {"stall": 2, "concurrency_limit": 1}


async def test_rpm_limit_is_a_bucket_with_openai_headers(session: aiohttp.ClientSession) -> None:
    now = [100.0]
    plan = FaultPlan(["rpm_limit:rpm=60,burst=2,headers=1"], clock=lambda: now[0])
    async with LocalEndpoint(plan) as endpoint:
        answers = [await post(session, endpoint, chat_body(RED_JPEG, stream=True)) for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 429]
        assert [h["x-ratelimit-remaining-requests"] for _, h, _ in answers] == ["1", "0", "0"]
        assert answers[0][1]["x-ratelimit-limit-requests"] == "60"
        assert answers[0][1]["x-ratelimit-reset-requests"] == "1s"  # one request to refill at 1/s
        assert answers[2][1]["x-ratelimit-reset-requests"] == "2s"  # empty: 2 s until full again
        assert chunk_objects(answers[1][2])  # a full stream still comes with the headers
        now[0] += 1.0
        status, headers, _ = await post(session, endpoint, chat_body(RED_JPEG))
        assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"
        assert endpoint.stats.snapshot()["faults_injected"] == {"rpm_limit": 1}


async def test_rpm_limit_without_headers_is_undisclosed(session: aiohttp.ClientSession) -> None:
    now = [0.0]
    plan = FaultPlan(["rpm_limit:rpm=60"], clock=lambda: now[0])
    async with LocalEndpoint(plan) as endpoint:
        first, second = [await post(session, endpoint, chat_body(RED_JPEG)) for _ in range(2)]
        assert (first[0], second[0]) == (200, 429)
        for _, headers, _ in (first, second):
            assert not [name for name in headers if name.lower().startswith(("x-ratelimit", "retry-after"))]


async def test_limit_rules_are_checked_before_other_faults(session: aiohttp.ClientSession) -> None:
    now = [0.0]
    plan = FaultPlan(["status:code=500", "rpm_limit:rpm=60,burst=1"], clock=lambda: now[0])
    async with LocalEndpoint(plan) as endpoint:
        statuses = [(await post(session, endpoint, chat_body(RED_JPEG)))[0] for _ in range(2)]
        assert statuses == [500, 429]  # the first request used the limit's token, then met the fault
