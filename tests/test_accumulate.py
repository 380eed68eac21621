"""ChoiceAccumulator: chunks in, one rebuilt completion (or the right error) out."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.core.accumulate import (
    Choice,
    ChoiceAccumulator,
    Completion,
    ToolCall,
    Usage,
)
from pipeline.core.errors import (
    MalformedChunk,
    StreamError,
    StreamErrorEvent,
    TruncatedStream,
)
from pipeline.core.sse import ServerSentEvent, SSEDecoder

HEADER = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1700000000,
          "model": "vision-1", "system_fingerprint": "fp_1"}


def chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**HEADER, "choices": list(choices), **top}


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish}


def run(*chunks: dict[str, Any], done: bool = True) -> Completion:
    """Feed chunks as SSE events (through the real decoder), then close."""
    acc = ChoiceAccumulator()
    stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + ("data: [DONE]\n\n" if done else "")
    decoder = SSEDecoder()
    for event in decoder.feed(stream.encode()) + decoder.flush():
        if acc.add_event(event):
            break
    return acc.close()


# --- rebuilding --------------------------------------------------------------------------------

def test_single_choice() -> None:
    result = run(
        chunk(delta(role="assistant", content="")),
        chunk(delta(content="A red ")),
        chunk(delta(content="bicycle.")),
        chunk(delta(finish="stop")),
    )
    assert result == Completion(
        id="chatcmpl-1", model="vision-1", system_fingerprint="fp_1", created=1700000000,
        choices=[Choice(0, "A red bicycle.", None, None, [], "stop", "assistant")],
        usage=None, chunks=4,
    )


def test_two_choices_interleaved() -> None:
    result = run(
        chunk(delta(1, role="assistant")), chunk(delta(0, role="assistant")),
        chunk(delta(1, content="B1 ")), chunk(delta(0, content="A1 ")),
        chunk(delta(0, content="A2"), delta(1, content="B2")),
        chunk(delta(1, finish="length")), chunk(delta(0, finish="stop")),
    )
    assert [(c.index, c.content, c.finish_reason) for c in result.choices] == [
        (0, "A1 A2", "stop"), (1, "B1 B2", "length")]


def test_parallel_tool_calls_across_fragments() -> None:
    def tc(i: int, **kw: Any) -> dict[str, Any]:
        return {"index": i, **kw}
    result = run(
        chunk(delta(role="assistant", content=None)),
        chunk(delta(tool_calls=[tc(0, id="call_a", type="function",
                                   function={"name": "get_weather", "arguments": ""})])),
        chunk(delta(tool_calls=[tc(0, function={"arguments": "{\"city\": "})])),
        chunk(delta(tool_calls=[tc(1, id="call_b", type="function", function={"name": "get_"})])),
        chunk(delta(tool_calls=[tc(1, function={"name": "time", "arguments": "{\"tz\""})])),
        chunk(delta(tool_calls=[tc(0, function={"arguments": "\"Oslo\"}"}),
                                tc(1, function={"arguments": ": \"UTC\"}"})])),
        chunk(delta(finish="tool_calls")),
    )
    (choice,) = result.choices
    assert choice.content is None
    assert choice.finish_reason == "tool_calls"
    assert choice.tool_calls == [
        ToolCall(0, "call_a", "function", "get_weather", "{\"city\": \"Oslo\"}"),
        ToolCall(1, "call_b", "function", "get_time", "{\"tz\": \"UTC\"}"),
    ]


def test_tool_call_name_resent_with_every_fragment() -> None:
    fn = lambda args: {"index": 0, "function": {"name": "lookup", "arguments": args}}  # noqa: E731
    result = run(chunk(delta(tool_calls=[fn("{\"q\":")])), chunk(delta(tool_calls=[fn("1}")])),
                 chunk(delta(finish="tool_calls")))
    assert result.choices[0].tool_calls == [ToolCall(0, None, None, "lookup", "{\"q\":1}")]


def test_tool_calls_without_index() -> None:
    result = run(
        chunk(delta(tool_calls=[{"id": "a", "function": {"name": "f", "arguments": "{"}}])),
        chunk(delta(tool_calls=[{"function": {"arguments": "}"}}])),
        chunk(delta(tool_calls=[{"id": "b", "function": {"name": "g", "arguments": {"x": 1}}}])),
        chunk(delta(finish="tool_calls")),
    )
    assert [(t.index, t.id, t.name, t.arguments) for t in result.choices[0].tool_calls] == [
        (0, "a", "f", "{}"), (1, "b", "g", "{\"x\": 1}")]


@pytest.mark.parametrize("deltas, field, expected", [
    ([{"refusal": "I can't "}, {"refusal": "help."}], "refusal", "I can't help."),
    ([{"reasoning_content": "Look"}, {"reasoning_content": "ing."}, {"content": "Cat."}],
     "reasoning", "Looking."),
    ([{"reasoning": "vLLM "}, {"reasoning": "style"}], "reasoning", "vLLM style"),
    ([{"reasoning_content": "one", "reasoning": "one"}], "reasoning", "one"),  # sent twice: once
    ([{"role": "assistant"}], "content", None),
    ([{"content": None}, {"content": None}], "content", None),
    ([{"content": ""}], "content", ""),
    ([{"content": "é"}, {"content": "日本"}], "content", "é日本"),
    ([{"role": "assistant"}], "refusal", None),
    ([{"role": "assistant"}], "role", "assistant"),
])
def test_text_fields(deltas: list[dict[str, Any]], field: str, expected: str | None) -> None:
    result = run(*[chunk(delta(**d)) for d in deltas], chunk(delta(finish="stop")))
    assert getattr(result.choices[0], field) == expected


def test_usage_only_final_chunk() -> None:
    usage = {"prompt_tokens": 812, "completion_tokens": 40, "total_tokens": 852,
             "prompt_tokens_details": {"cached_tokens": 0}}
    result = run(chunk(delta(content="x")), chunk(delta(finish="stop")), chunk(usage=usage))
    assert result.usage == Usage(812, 40, 852, usage)
    assert result.chunks == 3


def test_usage_on_every_chunk_last_wins() -> None:
    result = run(
        chunk(delta(content="a"), usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
        chunk(delta(content="b"), usage={"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}),
        chunk(delta(finish="stop"), usage=None),
    )
    assert result.usage is not None
    assert (result.usage.completion_tokens, result.usage.total_tokens) == (2, 7)


def test_header_fields_first_seen_fingerprint_last() -> None:
    acc = ChoiceAccumulator()
    acc.add({"choices": [], "prompt_filter_results": [{"prompt_index": 0}]})  # Azure's first chunk
    acc.add({"id": "a", "model": "m1", "created": 1, "system_fingerprint": None, "choices": []})
    acc.add({"id": "b", "model": "m2", "created": 2, "system_fingerprint": "fp_x", "choices": []})
    acc.add({"id": "c", "system_fingerprint": "fp_y",
             "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]})
    result = acc.close()
    assert (result.id, result.model, result.created, result.system_fingerprint) == ("a", "m1", 1, "fp_y")
    assert result.choices[0].content == "hi"
    assert result.chunks == 4


def test_empty_choices_first_chunk_tolerated() -> None:
    result = run({"id": "x", "choices": [], "prompt_filter_results": []},
                 chunk(delta(content="ok", finish="stop")))
    assert result.choices[0].content == "ok"


# --- [DONE], close, truncation -----------------------------------------------------------------

@pytest.mark.parametrize("data, is_done", [
    ("[DONE]", True), (" [DONE] ", True), ("[DONE]\n", True),
    ("", False), ("  ", False), (json.dumps(chunk(delta(content="x"))), False),
])
def test_add_event_done_detection(data: str, is_done: bool) -> None:
    acc = ChoiceAccumulator()
    assert acc.add_event(ServerSentEvent(data)) is is_done
    assert acc.done is is_done


def test_result_before_any_chunk() -> None:
    assert ChoiceAccumulator().result() == Completion(None, None, None, None, [], None, 0)


@pytest.mark.parametrize("chunks, message", [
    ([], "stream ended before [DONE] after 0 chunks; no choices received"),
    ([{"choices": []}], "stream ended before [DONE] after 1 chunk; no choices received"),
    ([chunk(delta(content="a"))] * 7, "stream ended before [DONE] after 7 chunks; choice 0 unfinished"),
    ([chunk(delta(0, content="a"), delta(1, content="b"), delta(2, finish="stop"))],
     "stream ended before [DONE] after 1 chunk; choices 0, 1 unfinished"),
])
def test_close_raises_truncated(chunks: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(TruncatedStream) as info:
        run(*chunks, done=False)
    assert str(info.value) == message
    assert info.value.retryable is True
    assert info.value.error_type == "truncated_stream"
    assert isinstance(info.value, StreamError)


def test_close_without_done_but_all_finished_is_fine() -> None:
    both_finished = chunk(delta(0, content="a", finish="stop"), delta(1, content="b", finish="stop"))
    result = run(both_finished, done=False)
    assert [c.content for c in result.choices] == ["a", "b"]


def test_close_with_done_and_unfinished_choice_is_fine() -> None:
    assert run(chunk(delta(content="a"))).choices[0].finish_reason is None


def test_unfinished() -> None:
    acc = ChoiceAccumulator()
    acc.add(chunk(delta(2, content="a"), delta(0, content="b"), delta(1, finish="stop")))
    assert acc.unfinished() == [0, 2]
    assert acc.result().choices[2].content == "a"  # result() never checks


# --- errors inside the stream --------------------------------------------------------------------

@pytest.mark.parametrize("error, retryable, code, text", [
    ({"message": "The server had an error", "type": "server_error", "code": None}, True,
     "server_error", "The server had an error"),
    ({"message": "bad image", "type": "invalid_request_error", "code": "invalid_image_format"},
     False, "invalid_image_format", "bad image"),
    ({"message": "filtered", "type": None, "code": "content_filter"}, False, "content_filter", "filtered"),
    ({"message": "policy", "code": "content_policy_violation"}, False, "content_policy_violation", "policy"),
    ({"message": "too long", "type": "BadRequestError", "code": 400}, False, "400", "too long"),
    ({"message": "slow down", "type": "RateLimitError", "code": 429}, True, "429", "slow down"),
    ({"message": "timeout", "code": "408"}, True, "408", "timeout"),
    ({"message": "gpu oom", "type": "InternalServerError", "code": 500}, True, "500", "gpu oom"),
    ("engine died", True, None, "engine died"),
])
def test_error_chunk(error: Any, retryable: bool, code: str | None, text: str) -> None:
    acc = ChoiceAccumulator()
    with pytest.raises(StreamErrorEvent) as info:
        acc.add_event(ServerSentEvent(json.dumps({"error": error})))
    assert info.value.retryable is retryable
    assert info.value.code == code
    assert info.value.error_type == "stream_error_event"
    assert text in str(info.value)


def test_vllm_error_object_chunk() -> None:
    acc = ChoiceAccumulator()
    with pytest.raises(StreamErrorEvent) as info:
        acc.add({"object": "error", "message": "context too long", "type": "BadRequestError", "code": 400})
    assert info.value.retryable is False
    assert "context too long" in str(info.value)


def test_error_after_content() -> None:
    acc = ChoiceAccumulator()
    acc.add(chunk(delta(content="partial")))
    with pytest.raises(StreamErrorEvent):
        acc.add({"error": {"message": "overloaded", "type": "server_error"}})


@pytest.mark.parametrize("data, retryable, text", [
    ("", True, "(no details)"),
    ("upstream went away", True, "upstream went away"),
    (json.dumps({"error": {"message": "nope", "type": "invalid_request_error"}}), False, "nope"),
    (json.dumps({"message": "flat object", "code": 503}), True, "flat object"),
])
def test_error_event(data: str, retryable: bool, text: str) -> None:
    with pytest.raises(StreamErrorEvent) as info:
        ChoiceAccumulator().add_event(ServerSentEvent(data, event="error"))
    assert info.value.retryable is retryable
    assert text in str(info.value)


@pytest.mark.parametrize("data, fragment", [
    ("{\"choices\": [", "is not valid JSON"),
    ("not json at all", "is not valid JSON"),
    ("[1, 2]", "is a JSON list, not an object"),
    ("\"text\"", "is a JSON str, not an object"),
    ("{\"choices\": [{\"index\": 0, \"delta\": {\"content\": 5}}]}", "delta.content is a int"),
    ("{\"choices\": \"oops\"}", "unexpected shape"),
    ("{\"choices\": [{\"index\": \"0\"}]}", "unexpected shape"),
])
def test_malformed_chunk_names_chunk_number(data: str, fragment: str) -> None:
    acc = ChoiceAccumulator()
    for good in range(2):
        acc.add_event(ServerSentEvent(json.dumps(chunk(delta(content=str(good))))))
    with pytest.raises(MalformedChunk) as info:
        acc.add_event(ServerSentEvent(data))
    assert "chunk 3" in str(info.value)
    assert fragment in str(info.value)
    assert info.value.retryable is True
    assert info.value.error_type == "malformed_chunk"


def test_malformed_chunk_preview_is_short() -> None:
    bad = "{" + "x" * 10_000
    with pytest.raises(MalformedChunk) as info:
        ChoiceAccumulator().add_event(ServerSentEvent(bad))
    assert len(str(info.value)) < 400
    assert "more chars" in str(info.value)


def test_loads_is_swappable(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.core.accumulate as accumulate
    seen: list[str] = []
    monkeypatch.setattr(accumulate, "_loads", lambda s: seen.append(s) or json.loads(s))
    ChoiceAccumulator().add_event(ServerSentEvent("{\"choices\": []}"))
    assert seen == ["{\"choices\": []}"]


# ---- add_data: the bytes fast path gives what add_event gives --------------------------------------

DATA_CASES = [
    [b'{"id":"a","choices":[{"index":0,"delta":{"content":"caf\xc3\xa9"}}]}', b"[DONE]"],
    [b'{"id":"a","choices":[{"index":0,"delta":{"content":"bad \xff byte"}}]}', b" [DONE] "],
    [b"", b'{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}'],  # empty data: skipped
    [b"[1, 2]"],  # JSON, not an object
    [b"{not json"],
    [b'{"error":{"message":"overloaded","type":"server_error"}}'],
]


def outcome_of(feed: Any) -> tuple[Any, ...]:
    accumulator = ChoiceAccumulator()
    try:
        done = feed(accumulator)
    except Exception as exc:  # the same error class and message either way
        return ("error", type(exc).__name__, str(exc))
    return ("ok", done, accumulator.result())


@pytest.mark.parametrize("values", DATA_CASES)
def test_add_data_matches_add_event(values: list[bytes]) -> None:
    def by_events(accumulator: ChoiceAccumulator) -> bool:
        return any(accumulator.add_event(ServerSentEvent(v.decode("utf-8", "replace"))) for v in values)

    assert outcome_of(lambda a: a.add_data(values)) == outcome_of(by_events)
