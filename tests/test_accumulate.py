"""ChoiceAccumulator: chunks in, one rebuilt completion (or the right error) out."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from pipeline.core.accumulate import (
    Choice,
    ChoiceAccumulator,
    Completion,
    ToolCall,
    Usage,
    error_in_answer,
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


BENCH_LIKE = [  # what the bench endpoint and OpenAI send, one value per read
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp_1",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    b'"usage":null}',
    b'{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":"fp_2",'
    b'"choices":[{"index":0,"delta":{"content":"tok"},"logprobs":null,"finish_reason":null}],"usage":null}',
    b'{"id":"","model":"","choices":[{"index":1,"delta":{"content":" two"},"finish_reason":"length"}]}',
    b'{"id":"chatcmpl-1","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":2,"total_tokens":10}}',
    b'{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"x_groq":{"usage":{"total_tokens":3}}}',
    b"[DONE]",
]


@pytest.mark.parametrize("values", [*DATA_CASES, BENCH_LIKE, BENCH_LIKE[1:4] + [b'{"choices":"bad"}']])
def test_add_value_per_read_matches_add_event(values: list[bytes]) -> None:
    """The one-event read path (``add_value``) against the event path, value by value."""
    def by_values(accumulator: ChoiceAccumulator) -> bool:
        return any(accumulator.add_value(v) for v in values)

    def by_events(accumulator: ChoiceAccumulator) -> bool:
        return any(accumulator.add_event(ServerSentEvent(v.decode("utf-8", "replace"))) for v in values)

    assert outcome_of(by_values) == outcome_of(by_events)


# ---- add_value's token shape: chunks read without parsing, checked against parsing every chunk ---------

def _token_chunk(token: bytes, fingerprint: bytes = b'"fp_1"', index: int = 0, sep: bytes = b":",
                 tail: bytes = b',"logprobs":null,"finish_reason":null') -> bytes:
    return (b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","system_fingerprint":' + fingerprint
            + b',"choices":[{"index":%d,"delta":{"content"' % index + sep + token + b"}" + tail + b"}]}")


SHAPE_TOKENS = [b'"hi"', b'" a"', b'""', b'"caf\xc3\xa9"', b'"\xf0\x9f\x98\x80"', b'"bad \xff"', b'"q\\"uote"',
                b'"back\\\\slash"', b'"\\u00e9"', b'"ctl\x01"', b'"tab\t"', b'"\x7f"', b'"\xed\xa0\x80"', b"123",
                b"null", b'"a","x":1', b'"a"}, "finish_reason": "stop", "z": {"content":"b"', b'"unterminated']
SHAPE_OTHERS = [
    _token_chunk(b'"x"', fingerprint=b'"fp_2"'), _token_chunk(b'"x"', fingerprint=b"null"), _token_chunk(b'"x"', index=1),
    _token_chunk(b'"x"', sep=b" : "), _token_chunk(b'"x"', tail=b',"logprobs":{"content":[{"token":"x"}]},"finish_reason":null'),
    _token_chunk(b'"x","content":"y"'), _token_chunk(b'"x"', tail=b',"finish_reason":"stop"'),
    b'{"id":"c1","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}',
    b'{"id":"c1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}',
    b'{"id":"c1","choices":[{"index":0,"delta":{"content":"u"}}],"usage":{"total_tokens":9}}',
    b'{"error":{"message":"overloaded","type":"server_error"}}', b"[DONE]", b"not json", b"",
]


def _shape_sequences(count: int) -> list[list[bytes]]:
    rng = random.Random(16)
    sequences = [[_token_chunk(b'"t%d"' % i) for i in range(6)]]  # the common answer: one shape throughout
    for _ in range(count):
        opening = [_token_chunk(rng.choice([b'"a"', b'"b c"', b'"\xc3\xa9"']), sep=rng.choice([b":", b": "]))]
        rest = [_token_chunk(rng.choice(SHAPE_TOKENS), sep=rng.choice([b":", b":", b": "])) if rng.random() < 0.7
                else rng.choice(SHAPE_OTHERS) for _ in range(rng.randint(1, 12))]
        sequences.append(opening + rest)
    return sequences


@pytest.mark.parametrize("values", _shape_sequences(400))
def test_token_shape_reads_give_what_parsing_every_chunk_gives(values: list[bytes]) -> None:
    """Every chunk read through ``add_value`` (which reads repeated token chunks by their shape, without
    JSON) ends in the same completion, ``[DONE]`` answer or error message as ``add_event`` (which parses
    every chunk): tokens with quotes, escapes, control characters and bad UTF-8, other fingerprints, indices,
    spacing, duplicate keys, usage, errors and finishes in between."""
    def by_values(accumulator: ChoiceAccumulator) -> bool:
        return any(accumulator.add_value(v) for v in values)

    def by_events(accumulator: ChoiceAccumulator) -> bool:
        return any(accumulator.add_event(ServerSentEvent(v.decode("utf-8", "replace"))) for v in values)

    assert outcome_of(by_values) == outcome_of(by_events)



def _long_sequences(count: int) -> list[list[bytes]]:
    """Answers of up to 60 chunks, mostly plain tokens of one shape, with odd chunks among them."""
    rng = random.Random(61)
    sequences = [[_token_chunk(b'"t%d"' % i) for i in range(40)] + [b"[DONE]"]]
    for _ in range(count):
        plain = [b'"a"', b'" b c"', b'"\xc3\xa9"', b'""', b'" 12"']
        sequences.append([_token_chunk(rng.choice(plain)) if rng.random() < 0.85
                          else _token_chunk(rng.choice(SHAPE_TOKENS)) if rng.random() < 0.6
                          else rng.choice(SHAPE_OTHERS) for _ in range(rng.randint(2, 60))])
    return sequences


@pytest.mark.parametrize("values", _shape_sequences(150) + _long_sequences(150))
def test_token_shape_batches_give_what_parsing_every_chunk_gives(values: list[bytes]) -> None:
    """Reads of many events (``add_data``, which takes a run of chunks of the learnt shape with one check of
    the run) end as ``add_event`` parsing every chunk does, however the chunks are cut into reads; a token
    that is not plain in the middle of a run is read on its own, the plain ones around it still by shape."""
    rng = random.Random(len(values))
    cuts = sorted(rng.sample(range(1, len(values)), k=min(3, len(values) - 1)))

    def by_reads(accumulator: ChoiceAccumulator) -> bool:
        reads = [values[a:b] for a, b in zip([0, *cuts], [*cuts, len(values)])]
        return any(accumulator.add_data(read) for read in reads)

    def by_events(accumulator: ChoiceAccumulator) -> bool:
        return any(accumulator.add_event(ServerSentEvent(v.decode("utf-8", "replace"))) for v in values)

    expected = outcome_of(by_events)
    assert outcome_of(lambda a: a.add_data(values)) == expected
    assert outcome_of(by_reads) == expected


def test_a_run_of_token_chunks_is_taken_at_once_and_odd_tokens_on_their_own() -> None:
    accumulator = ChoiceAccumulator()
    run = [_token_chunk(b'"%d "' % i) for i in range(10)]
    odd = [_token_chunk(b'"q\\"uote"'), _token_chunk(b'"bad \xff"')]
    assert not accumulator.add_data(run[:5] + odd[:1] + run[5:8] + odd[1:] + run[8:])
    parts = accumulator._choices[0].content
    assert parts is not None and len(parts) < 8  # runs were joined, not appended token by token
    assert accumulator.add_data([b"[DONE]"])
    assert accumulator.result().choices[0].content == "0 1 2 3 4 q\"uote5 6 7 bad \ufffd8 9 "

def test_plain_token_chunks_are_read_by_their_shape() -> None:
    accumulator = ChoiceAccumulator()
    assert not accumulator.add_value(_token_chunk(b'"one"'))
    assert not accumulator.add_value(_token_chunk(b'" two"'))
    assert accumulator._shape is not None  # learnt from the first token chunk: the second was not parsed
    assert not accumulator.add_value(_token_chunk(b'" caf\xc3\xa9"', fingerprint=b'"fp_2"'))  # parsed: other bytes
    assert not accumulator.add_value(_token_chunk(b'" three"'))  # the shape again: its fingerprint is back
    assert accumulator.add_value(b"[DONE]")
    done = accumulator.result()
    assert done.choices[0].content == "one two caf\u00e9 three" and done.chunks == 4
    assert done.system_fingerprint == "fp_1" and done.id == "c1" and done.model == "m" and done.created == 1


# --- endpoints that bend the protocol (from the providers' public docs) -------------------------

AZURE_FILTER = {"hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"},
                "sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}


def test_azure_empty_opening_chunk_and_annotation_only_chunks_are_skipped() -> None:
    """Azure OpenAI: the first chunk has empty id/model/created and only prompt_filter_results; content-filter
    annotations (no delta) arrive mid-stream and after the stop chunk."""
    opening = {"choices": [], "created": 0, "id": "", "model": "", "object": "",
               "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_FILTER}]}
    azure = {"id": "chatcmpl-az", "object": "chat.completion.chunk", "created": 1718000000,
             "model": "gpt-4o-2024-05-13", "system_fingerprint": "fp_az"}
    annotation = {**azure, "choices": [{"index": 0, "finish_reason": None, "content_filter_results": AZURE_FILTER,
                                        "content_filter_offsets": {"check_offset": 0, "start_offset": 0,
                                                                   "end_offset": 12}}]}
    result = run(
        opening,
        {**azure, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                               "content_filter_results": {}}]},
        {**azure, "choices": [{"index": 0, "delta": {"content": "A red "}, "finish_reason": None}]},
        annotation,
        {**azure, "choices": [{"index": 0, "delta": {"content": "bicycle."}, "finish_reason": None}]},
        {**azure, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        annotation,
        {**azure, "choices": [{"index": 1, "finish_reason": None, "content_filter_results": AZURE_FILTER}]},
    )
    assert (result.id, result.model, result.created) == ("chatcmpl-az", "gpt-4o-2024-05-13", 1718000000)
    assert [(c.index, c.content, c.finish_reason) for c in result.choices] == [(0, "A red bicycle.", "stop")]


def test_an_annotation_for_a_choice_not_yet_begun_leaves_no_unfinished_choice() -> None:
    acc = ChoiceAccumulator()
    acc.add(chunk(delta(content="done", finish="stop")))
    acc.add(chunk({"index": 1, "finish_reason": None, "content_filter_results": AZURE_FILTER}))
    assert acc.unfinished() == [] and acc.finished()
    assert [c.index for c in acc.close().choices] == [0]


GROQ_USAGE = {"queue_time": 0.01, "prompt_tokens": 24, "prompt_time": 0.002, "completion_tokens": 7,
              "completion_time": 0.01, "total_tokens": 31, "total_time": 0.012}


@pytest.mark.parametrize("final, expected", [
    # Groq: usage rides in x_groq on the chunk with finish_reason
    (chunk(delta(finish="stop"), x_groq={"id": "req_01", "usage": GROQ_USAGE}), (24, 7, 31)),
    # ... or on a chunk without choices
    (chunk(x_groq={"id": "req_01", "usage": GROQ_USAGE}), (24, 7, 31)),
    # usage inside the finishing choice
    (chunk({**delta(finish="stop"), "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}),
     (5, 2, 7)),
    # the standard place wins when both are sent
    (chunk(delta(finish="stop"), x_groq={"usage": GROQ_USAGE},
           usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}), (1, 1, 2)),
])
def test_usage_outside_the_standard_final_chunk_is_picked_up(final: dict[str, Any], expected: tuple) -> None:
    result = run(chunk(delta(content="x")), final, chunk(delta(finish="stop")))
    assert result.usage is not None
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == expected


def test_groq_first_chunk_x_groq_without_usage_is_no_usage() -> None:
    result = run(chunk(delta(content="x"), x_groq={"id": "req_01"}), chunk(delta(finish="stop")))
    assert result.usage is None


def call(index: int | None, ident: str | None = None, name: str | None = None, arguments: str | None = None,
         ) -> dict[str, Any]:
    fragment: dict[str, Any] = {"function": {}}
    if index is not None:
        fragment["index"] = index
    if ident:
        fragment.update(id=ident, type="function")
    if name is not None:
        fragment["function"]["name"] = name
    if arguments is not None:
        fragment["function"]["arguments"] = arguments
    return fragment


def tools_of(*fragments: dict[str, Any]) -> tuple[list[ToolCall], list[str]]:
    result = run(*(chunk(delta(tool_calls=[f])) for f in fragments), chunk(delta(finish="tool_calls")))
    return result.choices[0].tool_calls, result.warnings


def test_two_calls_sharing_an_index_with_different_ids_are_two_calls() -> None:
    calls, warnings = tools_of(
        call(0, "call_a", "describe", ""), call(0, None, None, '{"x":'), call(0, None, None, "1}"),
        call(0, "call_b", "tag", '{"y":'), call(0, None, None, "2}"),
    )
    assert [(c.index, c.id, c.name, c.arguments) for c in calls] == [
        (0, "call_a", "describe", '{"x":1}'), (1, "call_b", "tag", '{"y":2}')]
    assert warnings == []


def test_an_id_repeated_at_its_own_index_is_the_same_call() -> None:
    calls, _ = tools_of(call(0, "call_a", "f", '{"a":'), call(0, "call_a", None, "1}"))
    assert [(c.id, c.arguments) for c in calls] == [("call_a", '{"a":1}')]


@pytest.mark.parametrize("pieces, expected", [
    (['{"colour":', ' "red"}'], '{"colour": "red"}'),                                # plain deltas
    (['{"colour":', '{"colour": "re', '{"colour": "red"}'], '{"colour": "red"}'),    # cumulative
    (['{"colour":', ' "red"}', '{"colour": "red"}'], '{"colour": "red"}'),          # whole repeated at the end
    (['{"a": 1}'], '{"a": 1}'),
])
def test_tool_call_arguments_resent_or_repeated_stay_valid_json(pieces: list[str], expected: str) -> None:
    calls, warnings = tools_of(call(0, "call_1", "f", pieces[0]), *(call(0, None, None, p) for p in pieces[1:]))
    assert calls[0].arguments == expected and json.loads(calls[0].arguments)
    assert warnings == []


def test_unrecognisable_arguments_stay_as_sent_and_are_reported() -> None:
    calls, warnings = tools_of(call(0, "call_1", "f", '{"a":'), call(0, None, None, '"b"'))
    assert calls[0].arguments == '{"a":"b"'
    assert warnings == ["choice 0, tool call 0 (f): arguments are not valid JSON"]


def test_empty_arguments_stay_empty_and_are_reported() -> None:
    calls, warnings = tools_of(call(0, "call_1", "get_time", ""))
    assert calls[0].arguments == "" and calls[0].name == "get_time"
    assert warnings == ["choice 0, tool call 0 (get_time): empty arguments"]


@pytest.mark.parametrize("body, retryable, text", [
    ({"error": {"message": "Invalid image", "type": "invalid_request_error", "code": None}}, False, "Invalid image"),
    ({"error": {"message": "model overloaded", "type": "server_error", "code": 503}}, True, "model overloaded"),
    ({"error": {"message": "bad", "code": 400}}, False, "bad"),
    ({"object": "error", "message": "context too long", "type": "BadRequestError", "code": 400}, False,
     "context too long"),
    ({"error": "upstream timed out"}, True, "upstream timed out"),
])
def test_error_in_answer(body: dict[str, Any], retryable: bool, text: str) -> None:
    error = error_in_answer(body)
    assert error is not None and error.retryable is retryable and error.row_specific is not retryable
    assert f"endpoint answered 200 with an error: {text}" in str(error)


def test_error_in_answer_is_none_for_a_completion() -> None:
    assert error_in_answer({"id": "x", "choices": [], "error": None}) is None


@pytest.mark.parametrize("line, retryable", [
    (b'error: {"code": 400, "message": "image too large", "type": "invalid_request_error"}\n\n', False),
    (b'error: {"error": {"code": 500, "message": "image too large", "type": "server_error"}}\n\n', True),
])
def test_llama_cpp_error_field_fails_with_its_message(line: bytes, retryable: bool) -> None:
    decoder, acc = SSEDecoder(), ChoiceAccumulator()
    events = decoder.feed(b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n' + line)
    with pytest.raises(StreamErrorEvent, match="image too large") as info:
        for event in events:
            acc.add_event(event)
    assert info.value.retryable is retryable
