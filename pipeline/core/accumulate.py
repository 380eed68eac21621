"""Rebuild a streamed chat completion from its chunks.

Pure and synchronous. Deltas are gathered in lists and joined once in :meth:`ChoiceAccumulator.result`,
so a long answer costs one append per chunk rather than a growing string copy. Errors a server sends
*inside* a 200 stream become the ``errors`` classes, so the runner decides retry-or-record as usual.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import orjson

from pipeline.core.errors import MalformedChunk, StreamErrorEvent, TruncatedStream
from pipeline.core.sse import ServerSentEvent

__all__ = ["ToolCall", "Choice", "Usage", "Completion", "ChoiceAccumulator"]

#: The one JSON parser of this module (orjson: several times faster than json on small chunks).
_loads = orjson.loads

_DONE = "[DONE]"
_PREVIEW_CHARS = 200
_MESSAGE_CHARS = 500
#: Error types / codes that say the request itself is at fault, so another attempt cannot help.
_CLIENT_SIDE_LABELS = frozenset({
    "invalid_request_error", "invalid_request", "badrequesterror", "bad_request",
    "content_filter", "content_policy_violation", "context_length_exceeded",
})
_RETRYABLE_4XX = frozenset({408, 409, 429})


@dataclass(slots=True)
class ToolCall:
    """One function call the model asked for, rebuilt from fragments sharing an index."""

    index: int
    id: str | None
    type: str | None
    name: str
    arguments: str


@dataclass(slots=True)
class Choice:
    """One of the ``n`` answers; streams interleave choices, so each is rebuilt by index."""

    index: int
    content: str | None  # None when no non-null content was ever sent, else the joined text
    refusal: str | None
    reasoning: str | None  # from delta.reasoning_content, or delta.reasoning
    tool_calls: list[ToolCall]
    finish_reason: str | None
    role: str | None


@dataclass(slots=True)
class Usage:
    """Token counts, typed where the runner needs them; the rest stays in ``raw``."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    raw: dict[str, Any]  # the server's object as sent (details, cached tokens, ...)


@dataclass(slots=True)
class Completion:
    """The whole streamed answer, shaped like a non-streamed ``chat.completion``."""

    id: str | None
    model: str | None
    system_fingerprint: str | None
    created: int | None
    choices: list[Choice]  # sorted by index
    usage: Usage | None
    chunks: int  # number of chunks seen


class _ToolCallParts:
    """A tool call being rebuilt from fragments that share its ``index``."""

    __slots__ = ("index", "id", "type", "name", "arguments")

    def __init__(self, index: int) -> None:
        self.index = index
        self.id: str | None = None
        self.type: str | None = None
        self.name = ""
        self.arguments: list[str] = []

    def add(self, fragment: dict[str, Any]) -> None:
        if ident := fragment.get("id"):
            self.id = ident
        if kind := fragment.get("type"):
            self.type = kind
        function = fragment.get("function")
        if not function:
            return
        name = function.get("name")
        if name and name != self.name:  # some servers resend the whole name with every fragment
            self.name += name
        arguments = function.get("arguments")
        if arguments:
            self.arguments.append(arguments if isinstance(arguments, str) else json.dumps(arguments))

    def build(self) -> ToolCall:
        return ToolCall(self.index, self.id, self.type, self.name, "".join(self.arguments))


class _ChoiceParts:
    """One choice being rebuilt; text fields stay None until a non-null piece arrives."""

    __slots__ = ("index", "role", "content", "refusal", "reasoning", "tool_calls", "finish_reason")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        self.content: list[str] | None = None
        self.refusal: list[str] | None = None
        self.reasoning: list[str] | None = None
        self.tool_calls: dict[int, _ToolCallParts] = {}
        self.finish_reason: str | None = None

    def add_delta(self, delta: dict[str, Any]) -> None:
        if len(delta) == 1 and (content := delta.get("content")).__class__ is str:  # most chunks: one token
            if self.content is None:
                self.content = [content]
            else:
                self.content.append(content)
            return
        if (role := delta.get("role")) is not None:
            self.role = role
        if (content := delta.get("content")) is not None:
            self.content = _append(self.content, content, "content")
        if (refusal := delta.get("refusal")) is not None:
            self.refusal = _append(self.refusal, refusal, "refusal")
        reasoning = delta.get("reasoning_content")
        if reasoning is None:
            reasoning = delta.get("reasoning")  # vLLM >= 0.10, OpenRouter, ...
        if reasoning is not None:
            self.reasoning = _append(self.reasoning, reasoning, "reasoning")
        if tool_calls := delta.get("tool_calls"):
            for fragment in tool_calls:
                self._tool_call(self._tool_call_index(fragment)).add(fragment)

    def _tool_call(self, index: int) -> _ToolCallParts:
        call = self.tool_calls.get(index)
        if call is None:
            call = self.tool_calls[index] = _ToolCallParts(index)
        return call

    def _tool_call_index(self, fragment: dict[str, Any]) -> int:
        """The fragment's ``index``; servers that omit it get one from the id, or the last call."""
        index = fragment.get("index")
        if isinstance(index, int):
            return index
        ident = fragment.get("id")
        if ident:
            for call in self.tool_calls.values():
                if call.id == ident:
                    return call.index
            return max(self.tool_calls, default=-1) + 1
        return max(self.tool_calls, default=0)

    def build(self) -> Choice:
        return Choice(
            index=self.index,
            content=_join(self.content),
            refusal=_join(self.refusal),
            reasoning=_join(self.reasoning),
            tool_calls=[self.tool_calls[i].build() for i in sorted(self.tool_calls)],
            finish_reason=self.finish_reason,
            role=self.role,
        )


class ChoiceAccumulator:
    """Feed it the stream's events (or parsed chunks); ask for the rebuilt completion at the end."""

    __slots__ = ("_choices", "_chunks", "_done", "_id", "_model", "_fingerprint", "_created", "_usage")

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceParts] = {}
        self._chunks = 0
        self._done = False
        self._id: str | None = None
        self._model: str | None = None
        self._fingerprint: str | None = None
        self._created: int | None = None
        self._usage: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        """True once ``data: [DONE]`` was seen."""
        return self._done

    def add_event(self, event: ServerSentEvent) -> bool:
        """Take one SSE event; return True for ``[DONE]`` so the caller stops reading there."""
        if event.event == "error":
            raise _error_from_event_data(event.data)
        data = event.data
        if not data:
            return False
        if data[0] != "{":  # rare: [DONE], padding, or garbage
            stripped = data.strip()
            if stripped == _DONE:
                self._done = True
                return True
            if not stripped:
                return False
        try:
            chunk = _loads(data)
        except ValueError as exc:  # json and orjson decode errors are both ValueErrors
            raise MalformedChunk(
                f"chunk {self._chunks + 1} is not valid JSON ({exc}): {_preview(data)}"
            ) from exc
        if not isinstance(chunk, dict):
            raise MalformedChunk(
                f"chunk {self._chunks + 1} is a JSON {type(chunk).__name__}, not an object: "
                f"{_preview(data)}"
            )
        self.add(chunk)
        return False

    def add_data(self, values: list[bytes]) -> bool:
        """Take the data of ``message`` events as UTF-8 bytes (``SSEDecoder.feed_data``); True at ``[DONE]``.

        Same outcome as ``add_event`` per value; JSON is parsed straight from the bytes, and anything
        unusual (not an object, not valid UTF-8, not JSON) goes the ``add_event`` way for its message.
        """
        for value in values:
            if value[:1] == b"{":
                try:
                    chunk = _loads(value)
                except ValueError:
                    chunk = None
                if chunk.__class__ is dict:
                    self.add(chunk)
                    continue
            if self.add_event(ServerSentEvent(value.decode("utf-8", "replace"))):
                return True
        return False

    def add(self, chunk: dict[str, Any]) -> None:
        """Merge one parsed chunk object."""
        error = chunk.get("error")
        if error is not None:
            raise _stream_error(error)
        if chunk.get("object") == "error":  # older vLLM: the chunk itself is the error object
            raise _stream_error(chunk)
        self._chunks += 1
        try:
            self._add_header(chunk)
            for choice in chunk.get("choices") or ():
                self._add_choice(choice)
        except (AttributeError, TypeError, ValueError) as exc:
            raise MalformedChunk(f"chunk {self._chunks} has an unexpected shape: {exc}") from exc

    def unfinished(self) -> list[int]:
        """Indices of choices that have no finish_reason yet."""
        return sorted(i for i, parts in self._choices.items() if parts.finish_reason is None)

    def close(self) -> Completion:
        """End of stream: the completion, or TruncatedStream if it visibly stopped early."""
        if not self._done:
            if not self._choices:
                raise TruncatedStream(f"{self._ended_early()}; no choices received")
            if missing := self.unfinished():
                label = "choice" if len(missing) == 1 else "choices"
                numbers = ", ".join(map(str, missing))
                raise TruncatedStream(f"{self._ended_early()}; {label} {numbers} unfinished")
        return self.result()

    def result(self) -> Completion:
        """The completion so far, without any completeness checks."""
        return Completion(
            id=self._id,
            model=self._model,
            system_fingerprint=self._fingerprint,
            created=self._created,
            choices=[self._choices[i].build() for i in sorted(self._choices)],
            usage=_usage(self._usage),
            chunks=self._chunks,
        )

    def _add_header(self, chunk: dict[str, Any]) -> None:
        """Top-level fields: first seen wins, except fingerprint and usage where the last wins."""
        if self._id is None or self._model is None or self._created is None:
            if self._id is None:
                self._id = chunk.get("id")
            if self._model is None:
                self._model = chunk.get("model")
            if self._created is None:
                self._created = chunk.get("created")
        if (fingerprint := chunk.get("system_fingerprint")) is not None:
            self._fingerprint = fingerprint
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._usage = usage

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index") or 0
        if not isinstance(index, int):
            raise TypeError(f"choice index is a {type(index).__name__}, not an int")
        parts = self._choices.get(index)
        if parts is None:
            parts = self._choices[index] = _ChoiceParts(index)
        if delta := choice.get("delta"):
            parts.add_delta(delta)
        if (finish_reason := choice.get("finish_reason")) is not None:
            parts.finish_reason = finish_reason

    def _ended_early(self) -> str:
        noun = "chunk" if self._chunks == 1 else "chunks"
        return f"stream ended before [DONE] after {self._chunks} {noun}"


def _append(pieces: list[str] | None, piece: Any, field: str) -> list[str]:
    """Add a text delta, starting the list on the first one; non-strings mean a broken chunk."""
    if not isinstance(piece, str):
        raise TypeError(f"delta.{field} is a {type(piece).__name__}, not a string")
    if pieces is None:
        return [piece]
    pieces.append(piece)
    return pieces


def _join(pieces: list[str] | None) -> str | None:
    return None if pieces is None else "".join(pieces)


def _usage(raw: dict[str, Any] | None) -> Usage | None:
    if raw is None:
        return None
    return Usage(_int(raw.get("prompt_tokens")), _int(raw.get("completion_tokens")),
                 _int(raw.get("total_tokens")), raw)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _preview(data: str) -> str:
    """At most ~200 characters of bad data, quoted, so a log line stays readable."""
    if len(data) <= _PREVIEW_CHARS:
        return repr(data)
    return f"{data[:_PREVIEW_CHARS]!r}... ({len(data) - _PREVIEW_CHARS} more chars)"


def _error_from_event_data(data: str) -> StreamErrorEvent:
    """``event: error``: use the JSON error object when there is one, else the raw text."""
    try:
        payload = _loads(data) if data.strip() else None
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        return _stream_error(payload.get("error") or payload)
    text = data.strip()
    return StreamErrorEvent(f"server sent an error event: {_clip(text) if text else '(no details)'}")


def _stream_error(error: Any) -> StreamErrorEvent:
    """An error object (OpenAI/vLLM ``{"message","type","code"}``) or a bare string."""
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or json.dumps(error)
        error_type, code = error.get("type"), error.get("code")
    else:
        message, error_type, code = error, None, None
    details = ", ".join(f"{key}={value}" for key, value in (("type", error_type), ("code", code))
                        if value is not None)
    label = code if code is not None else error_type
    text = _clip(str(message)) or "(no message)"
    return StreamErrorEvent(
        f"server error in stream: {text}" + (f" ({details})" if details else ""),
        retryable=not _is_client_side(error_type, code),
        code=None if label is None else str(label),
    )


def _is_client_side(error_type: Any, code: Any) -> bool:
    """True when type/code say the request itself is wrong (4xx-like, filtered, invalid)."""
    for label in (error_type, code):
        if isinstance(label, str) and label.lower() in _CLIENT_SIDE_LABELS:
            return True
    status = _status(code)
    return status is not None and 400 <= status <= 499 and status not in _RETRYABLE_4XX


def _status(code: Any) -> int | None:
    """A numeric error code (400 or "400") as an int."""
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    if isinstance(code, str) and code.isascii() and code.isdigit():
        return int(code)
    return None


def _clip(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."
