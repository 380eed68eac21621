"""Incremental Server-Sent Events decoder following the WHATWG HTML parsing rules.

One extension: an ``error:`` field (llama.cpp's server sent its errors that way, not as ``data:``) makes
the event an ``error`` event carrying that value, instead of being ignored as an unknown field and the
stream then looking merely cut short. It costs nothing on the ``data:`` path.

Pure and synchronous: bytes go in split at any offset, complete events come out. It runs once per
network read, so it works on whole chunks with ``bytes.rfind``/``str.split`` (C loops) and only
loops in Python once per *line*, never per byte. A partial line waits in a ``bytearray`` and only
new bytes are ever scanned, so one huge line fed in tiny pieces stays linear.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ServerSentEvent", "SSEDecoder"]

_BOM = b"\xef\xbb\xbf"
_CR = 0x0D
_LF = 0x0A


class ServerSentEvent(NamedTuple):
    """One dispatched event, as an ``EventSource`` would hand it to a listener.

    A named tuple rather than a frozen dataclass: one is made per streamed token, and a tuple is made
    several times faster."""

    data: str
    event: str = "message"  # dispatch type; "message" when no (or an empty) event: field
    id: str | None = None  # last event id in effect when dispatched
    retry: int | None = None  # reconnection time, if a valid retry: field was in this event


class SSEDecoder:
    """Turn a byte stream into events; keeps only the partial line and the event being built."""

    __slots__ = (
        "_pending", "_at_start", "_skip_lf",
        "_data", "_event_type", "_last_id", "_retry", "_reconnection_time",
    )

    def __init__(self) -> None:
        self._pending = bytearray()  # bytes of the current line; never holds a CR or LF
        self._at_start = True  # until 3 bytes (or a non-BOM byte) decide whether a BOM leads
        self._skip_lf = False  # the last read ended in CR: an LF opening the next read is its pair
        self._data: list[str] = []  # data: values of the event being built, joined by "\n" later
        self._event_type = ""
        self._last_id: str | None = None
        self._retry: int | None = None  # retry: of the event being built
        self._reconnection_time: int | None = None

    @property
    def last_event_id(self) -> str | None:
        """The id a reconnecting client would send as ``Last-Event-ID``."""
        return self._last_id

    @property
    def between_events(self) -> bool:
        """No line and no event is half-read: the bytes so far were whole events (or comments)."""
        return not self._pending and not self._data

    @property
    def reconnection_time(self) -> int | None:
        """The latest valid ``retry:`` value, even one from an event that was never dispatched."""
        return self._reconnection_time

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """Take the next bytes of the stream; return the events they complete."""
        if (value := self.feed_one(chunk)) is not None:
            return [ServerSentEvent(value.decode("utf-8", "replace"), "message", self._last_id)]
        if (values := self.feed_data(chunk)) is not None:
            last_id = self._last_id
            return [ServerSentEvent(value.decode("utf-8", "replace"), "message", last_id) for value in values]
        if self._at_start:
            chunk = self._strip_bom(chunk)
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == _LF:
                chunk = chunk[1:]
        if b"\r" in chunk:
            chunk = self._normalize_cr(chunk)
        end = chunk.rfind(b"\n")
        if end < 0:
            self._pending += chunk
            return []
        complete: bytes | bytearray = chunk[: end + 1] if end + 1 < len(chunk) else chunk
        if self._pending:
            self._pending += complete
            complete = self._pending
            self._pending = bytearray(chunk[end + 1:])
        elif end + 1 < len(chunk):
            self._pending += chunk[end + 1:]
        return self._process(self._split_lines(complete))

    def feed_one(self, chunk: bytes) -> bytes | None:
        """The commonest read of all, in a few C calls: ``chunk`` is exactly one single-line ``data:`` event.
        Its data as undecoded UTF-8 bytes (a ``message`` event with the current ``last_event_id``, as ``feed``
        would return it); else None, having consumed nothing, and the caller tries ``feed_data``.

        With tokens some milliseconds apart, nearly every network read carries one event, so this runs once
        per token of every stream in flight: no list, no split, no loop. The first line feed being the
        second-to-last byte means one line and nothing after its blank line; a CR anywhere (a line ending
        of its own) and any event or line in progress leave the read to the general path.
        """
        if chunk.find(b"\n") != len(chunk) - 2 or not chunk.endswith(b"\n\n") or not chunk.startswith(b"data:") \
                or b"\r" in chunk or self._pending or self._data or self._skip_lf or self._event_type:
            return None
        self._at_start = False  # it opens with "data:", so no BOM leads the stream
        return chunk[6:-2] if chunk.startswith(b" ", 5) else chunk[5:-2]

    def feed_data(self, chunk: bytes) -> list[bytes] | None:
        """The common read in one step: if ``chunk`` is whole single-line ``data:`` events and nothing else,
        their data as undecoded UTF-8 bytes (each is a ``message`` event with the current ``last_event_id``,
        as ``feed`` would return it); else None, having consumed nothing, and the caller uses ``feed``.

        Servers send one event per token, so this is most reads: it skips the line loop, the decode and
        the event objects (a parser can read JSON from the bytes). It takes a read only when no line or
        event is in progress, and a read it takes leaves the decoder exactly as the general path would.
        """
        if self._pending or self._data or self._skip_lf or self._event_type \
                or not chunk.endswith(b"\n\n") or b"\r" in chunk:
            return None
        if self._at_start:
            if chunk.startswith(_BOM[:1]):  # a BOM may open the stream: the general path strips it
                return None
            self._at_start = False
        if chunk.startswith(b"data: "):  # the usual spelling: two C passes over the read
            values = chunk[6:-2].split(b"\n\ndata: ")
            if chunk.count(b"\n") == 2 * len(values):  # no line feed but the events' own
                return values
        blocks = chunk.split(b"\n\n")
        blocks.pop()  # the empty tail after the final blank line
        values = []
        for block in blocks:
            if not block.startswith(b"data:") or b"\n" in block:
                return None  # another field, a comment, a multi-line event, an extra blank line
            values.append(block[6:] if block.startswith(b" ", 5) else block[5:])
        return values

    def flush(self) -> list[ServerSentEvent]:
        """End of stream: process a last unterminated line and dispatch an unterminated event.

        The spec discards an event whose blank line never came; we return it, because servers
        often close right after ``data: [DONE]\\n`` and the last real chunk must not be lost.
        """
        tail = bytes(self._pending)
        self._pending.clear()
        self._at_start = False
        self._skip_lf = False
        lines = [tail.decode("utf-8", "replace")] if tail else []
        lines.append("")
        return self._process(lines)

    def _strip_bom(self, chunk: bytes) -> bytes:
        """Drop a UTF-8 BOM that opens the stream, even one split across reads."""
        head = bytes(self._pending) + chunk if self._pending else chunk
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._pending = bytearray(head)  # maybe a BOM: wait for more bytes
            return b""
        self._pending.clear()
        self._at_start = False
        return head[len(_BOM):] if head.startswith(_BOM) else head

    def _normalize_cr(self, chunk: bytes) -> bytes:
        """Make every line ending LF, so the rest only looks for LF (CR is rare on the wire).

        A CR that ends the read may be the first half of a CRLF: it becomes LF now, and an LF that
        opens the next read is then dropped as its second half.
        """
        self._skip_lf = chunk[-1] == _CR
        return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")

    @staticmethod
    def _split_lines(complete: bytes | bytearray) -> list[str]:
        """Decode bytes that end in LF and split them into lines."""
        text = complete.decode("utf-8", "replace")  # LF is ASCII: whole lines decode as the stream would
        lines = text.split("\n")
        lines.pop()  # the empty string after the final line ending
        return lines

    def _process(self, lines: list[str]) -> list[ServerSentEvent]:
        """Apply each line to the event being built; collect what blank lines dispatch."""
        events: list[ServerSentEvent] = []
        for line in lines:
            if not line:
                event = self._dispatch()
                if event is not None:
                    events.append(event)
            elif line.startswith("data:"):  # the hot path, spelled out
                self._data.append(line[6:] if line.startswith(" ", 5) else line[5:])
            elif line[0] != ":":  # ":" opens a comment
                self._field(line)
        return events

    def _field(self, line: str) -> None:
        """Handle one ``name:value`` (or bare ``name``) line; unknown names are ignored."""
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id" and "\x00" not in value:
            self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = self._reconnection_time = int(value)
        elif name == "error":  # llama.cpp's legacy error line: the event becomes an ``error`` event
            self._event_type = "error"
            self._data = [value]

    def _dispatch(self) -> ServerSentEvent | None:
        """Blank line: emit the event if it has data; the type and retry reset either way."""
        event_type = self._event_type or "message"
        retry = self._retry
        self._event_type = ""
        self._retry = None
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return ServerSentEvent(data, event_type, self._last_id, retry)
