"""SSEDecoder against the WHATWG parsing rules, with every way a stream can be cut into reads."""

from __future__ import annotations

import random

import pytest

from pipeline.core.sse import ServerSentEvent as E
from pipeline.core.sse import SSEDecoder

BOM = b"\xef\xbb\xbf"


def decode(*chunks: bytes, flush: bool = True) -> list[E]:
    decoder = SSEDecoder()
    events = [event for chunk in chunks for event in decoder.feed(chunk)]
    return events + decoder.flush() if flush else events


def pieces(stream: bytes, size: int) -> list[bytes]:
    return [stream[i:i + size] for i in range(0, len(stream), size)]


# --- table: whole-stream input -> events (fed whole, then flushed) -------------------------------

CASES = [
    # WHATWG spec examples
    ("spec stock ticker",
     b"data: YHOO\ndata: +2\ndata: 10\n\n",
     [E("YHOO\n+2\n10")]),
    ("spec four blocks",
     b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\ndata:  third event\n\n",
     [E("first event", id="1"), E("second event", id=""), E(" third event", id="")]),
    ("spec two events, trailing unterminated dropped-by-spec kept-by-flush",
     b"data\n\ndata\ndata\n\ndata:",
     [E(""), E("\n"), E("")]),
    ("spec space after colon is optional",
     b"data:test\n\ndata: test\n\n",
     [E("test"), E("test")]),
    ("only one space stripped", b"data:   x\n\n", [E("  x")]),
    ("tab is not stripped", b"data:\tx\n\n", [E("\tx")]),
    ("comment lines ignored", b": hi\n:\ndata: a\n: mid\ndata: b\n\n", [E("a\nb")]),
    ("bare field name means empty value", b"data\n\n", [E("")]),
    ("colon inside value kept", b"data: a: b:c\n\n", [E("a: b:c")]),
    ("event type", b"event: add\ndata: 1\n\n", [E("1", event="add")]),
    ("empty event type is message", b"event:\ndata: 1\n\n", [E("1")]),
    ("event type resets after dispatch", b"event: add\ndata: 1\n\ndata: 2\n\n",
     [E("1", event="add"), E("2")]),
    ("event type resets even without dispatch", b"event: add\n\ndata: 2\n\n", [E("2")]),
    ("no data, no dispatch", b"event: x\nid: 7\nretry: 10\n\n\n\n", []),
    ("id persists across events", b"id: 1\ndata: a\n\ndata: b\n\nid: 2\ndata: c\n\n",
     [E("a", id="1"), E("b", id="1"), E("c", id="2")]),
    ("id set by a data-less block still applies", b"id: 5\n\ndata: a\n\n", [E("a", id="5")]),
    ("id with NUL ignored", b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n",
     [E("a", id="1"), E("b", id="1")]),
    ("empty id resets", b"id: 1\ndata: a\n\nid\ndata: b\n\n", [E("a", id="1"), E("b", id="")]),
    ("retry digits", b"retry: 1500\ndata: a\n\n", [E("a", retry=1500)]),
    ("retry only for its event", b"retry: 1500\ndata: a\n\ndata: b\n\n",
     [E("a", retry=1500), E("b")]),
    ("retry non-digits ignored", b"retry: 15x\ndata: a\n\nretry: -1\ndata: b\n\nretry: 1.5\ndata: c\n\n",
     [E("a"), E("b"), E("c")]),
    ("retry empty ignored", b"retry:\ndata: a\n\n", [E("a")]),
    ("retry unicode digits ignored", "retry: \u00b2\u0661\ndata: a\n\n".encode(), [E("a")]),
    ("unknown fields ignored", b"foo: bar\nDATA: no\ndata : no\ndata: yes\n\n", [E("yes")]),
    # llama.cpp's server sent errors as an error: field, not data: (an error event, not silence)
    ("llama.cpp error field", b'data: a\n\nerror: {"code":400,"message":"bad"}\n\n',
     [E("a"), E('{"code":400,"message":"bad"}', "error")]),
    ("error field unterminated at close", b'error: {"code":500}', [E('{"code":500}', "error")]),
    ("multi-line data", b"data: one\ndata:\ndata: three\n\n", [E("one\n\nthree")]),
    ("empty data line dispatches empty string", b"data:\n\n", [E("")]),
    ("two empty data lines", b"data:\ndata:\n\n", [E("\n")]),
    ("BOM at start dropped", BOM + b"data: a\n\n", [E("a")]),
    ("BOM only once", BOM + BOM + b"data: a\n\n", []),  # 2nd BOM makes the field name unknown
    ("BOM later kept", b"data: a\n\ndata: " + BOM + b"b\n\n", [E("a"), E("\ufeffb")]),
    ("invalid UTF-8 replaced", b"data: \xff\xfe ok\n\n", [E("\ufffd\ufffd ok")]),
    ("truncated UTF-8 before line end", b"data: \xe2\x82\ndata: x\n\n", [E("\ufffd\nx")]),
    ("CR line endings", b"data: a\rdata: b\r\r", [E("a\nb")]),
    ("CRLF line endings", b"data: a\r\ndata: b\r\n\r\n", [E("a\nb")]),
    ("LF CR is two endings", b"data: a\n\rdata: b\n\n", [E("a"), E("b")]),
    ("CR CR LF is two endings", b"data: a\r\r\ndata: b\n\n", [E("a"), E("b")]),
    ("non-ASCII", "data: café 日本 😀\n\n".encode(), [E("café 日本 😀")]),
    ("flush: unterminated final line", b"data: a\n\ndata: b", [E("a"), E("b")]),
    ("flush: event whose blank line never came", b"data: [DONE]\n", [E("[DONE]")]),
    ("flush: trailing comment only", b"data: a\n\n: bye", [E("a")]),
    ("empty stream", b"", []),
    ("only a BOM", BOM, []),
]


@pytest.mark.parametrize("stream, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table(stream: bytes, expected: list[E]) -> None:
    assert decode(stream) == expected


@pytest.mark.parametrize("stream, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_table_one_byte_at_a_time(stream: bytes, expected: list[E]) -> None:
    assert decode(*pieces(stream, 1)) == expected


def test_feed_returns_events_as_soon_as_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\n") == [E("a")]
    assert decoder.feed(b"data: b\n\ndata: c") == [E("b")]
    assert decoder.flush() == [E("c")]


def test_without_flush_unterminated_event_is_not_dispatched() -> None:
    assert decode(b"data: a\n\ndata: b\n", flush=False) == [E("a")]


def test_cr_at_end_of_read_then_lf_is_one_line_ending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\n") == []  # the LF completes "\r\n": no blank line yet
    assert decoder.feed(b"\r") == [E("a")]
    assert decoder.feed(b"\n") == []  # the LF completes "\r\n" of the blank line
    assert decoder.feed(b"data: b\n\n") == [E("b")]


def test_cr_at_end_then_empty_read_then_lf() -> None:
    assert decode(b"data: a\r", b"", b"\n", b"\r\n") == [E("a")]


def test_cr_alone_at_end_of_read_then_data() -> None:
    assert decode(b"data: a\r", b"\rdata: b\r", b"\r") == [E("a"), E("b")]


@pytest.mark.parametrize("split", [1, 2])
def test_bom_split_across_reads(split: int) -> None:
    stream = BOM + b"data: a\n\n"
    assert decode(stream[:split], stream[split:]) == [E("a")]
    assert decode(*pieces(stream, 1)) == [E("a")]


def test_bom_prefix_that_is_not_a_bom() -> None:
    assert decode(b"\xef", b"\xbb", b"Adata: a\n\n") == []  # field "\ufffd\ufffdAdata" unknown
    assert decode(b"\xef\xbb") == []


def test_state_properties() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"id: 9\nretry: 300\n\n")
    assert decoder.last_event_id == "9"
    assert decoder.reconnection_time == 300


# --- UTF-8 across reads --------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["é", "日本語", "😀🚀", "aéb€c😀"])
def test_multibyte_split_everywhere(text: str) -> None:
    stream = f"data: {text}\n\n".encode()
    for cut in range(len(stream) + 1):
        assert decode(stream[:cut], stream[cut:]) == [E(text)], cut


# --- long lines ----------------------------------------------------------------------------------

LONG_VALUE = "".join(random.Random(7).choices("abcdefghij{}\":, \u00e9\u65e5", k=200_000))
LONG_STREAM = f"data: {LONG_VALUE}\n\ndata: after\n\n".encode()


@pytest.mark.parametrize("size", [len(LONG_STREAM), 1, 997, 65536])
def test_200kb_line(size: int) -> None:
    assert decode(*pieces(LONG_STREAM, size)) == [E(LONG_VALUE), E("after")]


# --- byte-level split: every offset, every line-ending style -------------------------------------

def build_stream(ending: str | list[str]) -> bytes:
    """Several events exercising every feature; ``ending`` is one style or a cycle of styles."""
    lines = [
        ": keep-alive comment",
        "",
        "event: progress",
        "id: 41",
        "data: {\"a\": 1}",
        "",
        "data: multi",
        "data:line \u00e9\u65e5\U0001f600",
        "data",
        ": a comment inside an event",
        "retry: 2500",
        "",
        "",
        "data:  two spaces",
        "id: 42",
        "",
        "data: [DONE]",
        "",
    ]
    endings = [ending] if isinstance(ending, str) else ending
    return "".join(line + endings[i % len(endings)] for i, line in enumerate(lines)).encode()


EXPECTED = [
    E("{\"a\": 1}", event="progress", id="41"),
    E("multi\nline \u00e9\u65e5\U0001f600\n", id="41", retry=2500),
    E(" two spaces", id="42"),
    E("[DONE]", id="42"),
]
STYLES = {"LF": "\n", "CR": "\r", "CRLF": "\r\n", "mixed": ["\r\n", "\n", "\r", "\r\n", "\r"]}


@pytest.mark.parametrize("style", STYLES)
def test_every_two_way_split(style: str) -> None:
    stream = build_stream(STYLES[style])
    assert decode(stream) == EXPECTED
    assert decode(stream, flush=False) == EXPECTED
    for cut in range(len(stream) + 1):
        assert decode(stream[:cut], stream[cut:]) == EXPECTED, f"cut at {cut}"


@pytest.mark.parametrize("style", STYLES)
def test_one_byte_at_a_time(style: str) -> None:
    assert decode(*pieces(build_stream(STYLES[style]), 1)) == EXPECTED


@pytest.mark.parametrize("style", STYLES)
def test_three_way_splits(style: str) -> None:
    stream = build_stream(STYLES[style])
    rng = random.Random(style)
    pairs = [sorted(rng.sample(range(len(stream) + 1), 2)) for _ in range(1500)]
    pairs += [[a, a + 1] for a in range(len(stream))]  # every pair of neighbours
    for a, b in pairs:
        assert decode(stream[:a], stream[a:b], stream[b:]) == EXPECTED, (a, b)


@pytest.mark.parametrize("style", STYLES)
def test_split_with_bom(style: str) -> None:
    stream = BOM + build_stream(STYLES[style])
    for cut in range(len(stream) + 1):
        assert decode(stream[:cut], stream[cut:]) == EXPECTED, f"cut at {cut}"


# ---- the whole-events fast path -------------------------------------------------------------------

FAST_PATH_READS = [
    [b"data: a\n\n", b"data: b\n\ndata: c\n\n"],  # one and two whole events per read
    [b"data:no-space\n\n", b"data:  two spaces\n\n", b"data:\n\n"],  # space rules, empty data
    [b"data: caf\xc3\xa9 \xf0\x9f\x98\x80\n\n", b"data: bad \xff byte\n\n"],  # UTF-8, and a replaced byte
    [b"id: 7\n\n", b"data: after id\n\n"],  # the id in effect travels with fast-path events
    [b"event: ping\ndata: x\n\n", b"data: y\n\n"],  # an event type: general path, then fast path
    [b"data: a\n\n\n\n", b"data: b\n\n"],  # an extra blank line dispatches nothing
    [b"data: a\ndata: b\n\n", b": comment\n\n", b"data: c\r\n\r\n"],  # multi-line, comment, CRLF
    [b"data: [DONE]\n\n"],
]


@pytest.mark.parametrize("reads", FAST_PATH_READS)
def test_whole_event_reads_decode_as_the_byte_at_a_time_general_path(reads: list[bytes]) -> None:
    whole = SSEDecoder()
    fast = [event for read in (b":warm-up\n\n", *reads) for event in whole.feed(read)]
    slow = decode(*pieces(b":warm-up\n\n" + b"".join(reads), 1))
    assert fast == slow and fast


def test_fast_path_is_taken_for_whole_data_events() -> None:
    decoder = SSEDecoder()
    decoder.feed(b": open\n\n")  # past the BOM check
    assert decoder.feed_data(b"data: x\n\ndata:y\n\n") == [b"x", b"y"]
    assert decoder.feed_data(b"data: x\nid: 1\n\n") is None  # another field: general path
    assert decoder.feed(b"data: x\nid: 1\n\n") == [E("x", id="1")]  # ... which the caller then takes
    assert decoder.feed_data(b"data: partial") is None and decoder.feed(b"data: partial") == []
    assert decoder.feed_data(b"\n\n") is None  # a line is in progress: never the fast path
    assert SSEDecoder().feed_data(b"data: first\n\n") == [b"first"]  # the opening read too...
    assert SSEDecoder().feed_data(BOM + b"data: first\n\n") is None  # ...unless a BOM may lead it


# ---- the one-event fast path (feed_one): tested against the byte-at-a-time general path ---------------

ONE_EVENT_READS = [
    b"data: {\"a\":1}\n\n", b"data:{}\n\n", b"data:  two spaces\n\n", b"data:\n\n", b"data: \n\n",
    b"data: caf\xc3\xa9\n\n", b"data: bad \xff byte\n\n", b"data: [DONE]\n\n",
    # near misses: each must leave the read to the general path and still decode the same
    b"data: a\r\n\r\n", b"data: a\rb\n\n", b"data: a\n\n\n", b"data: a\ndata: b\n\n", b"data: a\n",
    b"data: a\n\ndata: b\n\n", b"data: a\nx\n", b"data", b"data\n\n", b"dat: a\n\n", b"id: 9\n\n", b": c\n\n",
    b"event: e\n", b"\n\n", b"\n", b"", b"x", b"data: tail-less",
]


@pytest.mark.parametrize("opening", [b"", b": open\n\n", b"id: 3\n\n", b"data: half", b"event: e\n", b"data: a\r",
                                     BOM[:2]])
@pytest.mark.parametrize("read", ONE_EVENT_READS)
def test_one_event_reads_decode_as_the_byte_at_a_time_general_path(opening: bytes, read: bytes) -> None:
    """Whatever state the decoder is in (a line or event under way, a CR pending, a BOM half-read, an id in
    effect), a read through ``feed`` (which tries ``feed_one`` first) gives the same events, in the same
    order, as the same bytes fed one at a time (which never take a fast path), and so does what follows."""
    later = b"data: next\n\n"
    fast, probe = SSEDecoder(), SSEDecoder()
    opened, _ = fast.feed(opening), probe.feed(opening)
    middle = fast.feed(read)
    got = opened + middle + fast.feed(later) + fast.flush()
    byte_at_a_time = SSEDecoder()
    slow = [event for byte in pieces(opening + read + later, 1) for event in byte_at_a_time.feed(byte)]
    assert got == slow + byte_at_a_time.flush()
    assert fast.last_event_id == byte_at_a_time.last_event_id
    if (value := probe.feed_one(read)) is not None:  # taken: exactly the one event the general path gives
        assert middle == [E(value.decode("utf-8", "replace"), id=probe.last_event_id)]


def test_feed_one_takes_exactly_one_whole_data_event_and_nothing_else() -> None:
    decoder = SSEDecoder()
    assert decoder.feed_one(b"data: {\"x\":1}\n\n") == b'{"x":1}'  # the opening read too
    assert decoder.feed_one(b"data:no-space\n\n") == b"no-space"
    assert decoder.feed_one(b"data: a\n\ndata: b\n\n") is None  # two events: feed_data's
    assert decoder.feed_one(b"data: a\r\n\r\n") is None  # CR line endings: the general path
    assert decoder.feed_one(b"data: partial") is None and decoder.feed(b"data: partial") == []
    assert decoder.feed_one(b"\n\n") is None  # a line is in progress: never the fast path
    assert decoder.feed(b"\n\n") == [E("partial")]
    assert decoder.feed(b"event: ping\n") == [] and decoder.feed_one(b"data: x\n\n") is None  # typed event
    assert SSEDecoder().feed_one(BOM + b"data: first\n\n") is None  # a BOM may lead the stream


def test_between_events_tells_a_half_read_line_from_whole_events() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b": keep-alive\n\n") == [] and decoder.between_events
    assert decoder.feed(b"data: {\"a\"") == [] and not decoder.between_events
    assert decoder.feed(b":1}\n") == [] and not decoder.between_events  # line whole, event not dispatched
    assert decoder.feed(b"\n") == [E('{"a":1}')] and decoder.between_events
