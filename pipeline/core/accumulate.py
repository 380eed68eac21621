"""Rebuild a streamed chat completion from its chunks.

Pure and synchronous. Deltas are gathered in lists and joined once in :meth:`ChoiceAccumulator.result`,
so a long answer costs one append per chunk rather than a growing string copy. Errors a server sends
*inside* a 200 stream become the ``errors`` classes, so the runner decides retry-or-record as usual.

Servers bend the protocol; what is tolerated, and what it costs per chunk:

* Azure OpenAI opens with a chunk whose ``id`` and ``model`` are empty, and sends annotation-only
  chunks (content-filter results, no ``delta``): empty header fields count as missing (the first
  non-empty one wins), and a choice entry with neither delta nor finish_reason creates no choice.
* Usage outside the standard ``usage`` (Groq's ``x_groq.usage``, usage inside a choice) is looked for
  only in a chunk that finishes a choice or carries no choices, never on a token chunk.
* Tool-call fragments: a new ``id`` at a used ``index`` is a second call; arguments resent cumulatively
  or repeated whole in a last chunk are recognised at the end (once per call, not per fragment), and
  what could not be made valid JSON, or is empty, is reported in ``Completion.warnings``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from pipeline.core.errors import MalformedChunk, StreamErrorEvent, TruncatedStream
from pipeline.core.sse import ServerSentEvent

__all__ = ["ToolCall", "Choice", "Usage", "Completion", "ChoiceAccumulator", "error_in_answer"]

#: The one JSON parser of this module (orjson: several times faster than json on small chunks).
_loads = orjson.loads

_DONE = "[DONE]"
#: What may not appear in the token bytes of a chunk read by its shape: a quote or a backslash (the JSON string
#: would end or hold an escape there) and control characters (JSON forbids them raw: the parser must reject).
_NOT_PLAIN = re.compile(rb'["\\\x00-\x1f]')
_PROBE = "probe-\u00b7-token"
_SHAPE_TRIES = 4  # token chunks per answer tried as a shape before giving up on that answer
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
    warnings: list[str] = field(default_factory=list)  # what was odd but not fatal (empty tool arguments, ...)


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

    def build(self, notes: list[str], choice: int) -> ToolCall:
        arguments, problem = _arguments(self.arguments)
        if problem:
            notes.append(f"choice {choice}, tool call {self.index} ({self.name or 'no name'}): {problem}")
        return ToolCall(self.index, self.id, self.type, self.name, arguments)


def _arguments(pieces: list[str]) -> tuple[str, str | None]:
    """The call's arguments from its fragments, and what was wrong with them (None when nothing).

    Deltas are meant to be joined; some servers resend everything so far with each fragment, or repeat
    the whole arguments in a last chunk. When plain joining is not JSON but one of those readings is,
    that reading is taken; otherwise the joined text stays as sent (the output shows what came)."""
    if not pieces:
        return "", "empty arguments"
    joined = "".join(pieces)
    if _is_json(joined):
        return joined, None
    last = pieces[-1]
    if len(pieces) > 1 and _is_json(last):
        if all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:])):
            return last, None  # cumulative: each fragment is everything so far
        if "".join(pieces[:-1]) == last:
            return last, None  # the whole arguments repeated in a final chunk
    return joined, "arguments are not valid JSON"


def _is_json(text: str) -> bool:
    try:
        _loads(text)
    except ValueError:
        return False
    return True


class _ChoiceParts:
    """One choice being rebuilt; text fields stay None until a non-null piece arrives."""

    __slots__ = ("index", "role", "content", "refusal", "reasoning", "tool_calls", "finish_reason", "_slot_of")

    def __init__(self, index: int) -> None:
        self.index = index
        self.role: str | None = None
        self.content: list[str] | None = None
        self.refusal: list[str] | None = None
        self.reasoning: list[str] | None = None
        self.tool_calls: dict[int, _ToolCallParts] = {}  # by slot: the call's place in the answer
        self.finish_reason: str | None = None
        self._slot_of: dict[int, int] = {}  # the server's tool-call index -> slot of the call it now means

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
                self._tool_call(self._tool_call_slot(fragment)).add(fragment)

    def _tool_call(self, slot: int) -> _ToolCallParts:
        call = self.tool_calls.get(slot)
        if call is None:
            call = self.tool_calls[slot] = _ToolCallParts(slot)
        return call

    def _tool_call_slot(self, fragment: dict[str, Any]) -> int:
        """Which call a fragment continues: by ``index``, except that a new ``id`` at a used index is a new
        call (some servers number every call 0); servers that omit the index get one from the id, or the
        last call."""
        index, ident = fragment.get("index"), fragment.get("id")
        if not isinstance(index, int):
            if ident:
                return self._slot_of_id(ident)
            return max(self.tool_calls, default=0)
        slot = self._slot_of.get(index)
        if slot is None:
            slot = index if index not in self.tool_calls else max(self.tool_calls) + 1
        elif ident and self.tool_calls[slot].id not in (None, ident):
            slot = self._slot_of_id(ident)
        self._slot_of[index] = slot
        return slot

    def _slot_of_id(self, ident: str) -> int:
        for call in self.tool_calls.values():
            if call.id == ident:
                return call.index
        return max(self.tool_calls, default=-1) + 1

    def build(self, notes: list[str]) -> Choice:
        return Choice(
            index=self.index,
            content=_join(self.content),
            refusal=_join(self.refusal),
            reasoning=_join(self.reasoning),
            tool_calls=[self.tool_calls[i].build(notes, self.index) for i in sorted(self.tool_calls)],
            finish_reason=self.finish_reason,
            role=self.role,
        )


class _Shape:
    """The bytes of a token chunk before and after its text, and what reading that chunk again does."""

    __slots__ = ("prefix", "suffix", "size", "fingerprint", "content")

    def __init__(self, prefix: bytes, suffix: bytes, fingerprint: Any, content: list[str]) -> None:
        self.prefix, self.suffix, self.size = prefix, suffix, len(prefix) + len(suffix)
        self.fingerprint = fingerprint
        self.content = content  # the choice's list of content pieces

    def take(self, values: list[bytes], start: int, answer: ChoiceAccumulator) -> int:
        """Append the tokens of the run of chunks of this shape at ``values[start:]`` to the choice, with one
        check of the whole run (``add_value``'s, batched: no quote, backslash or control character, valid
        UTF-8 token by token); how many values it took (0: the first is not a plain chunk of this shape)."""
        prefix, suffix, size = self.prefix, self.suffix, self.size
        front, back = len(prefix), len(suffix)
        texts = []
        for value in values[start:] if start else values:
            if len(value) < size or not value.startswith(prefix) or not value.endswith(suffix):
                break
            texts.append(value[front:len(value) - back])
        joined = b"".join(texts)
        if (odd := _NOT_PLAIN.search(joined)) is not None:  # take the plain ones before it, add_value the rest
            texts = texts[:_index_at(texts, odd.start())]
            joined = b"".join(texts)
        if not joined.isascii():
            for index, text in enumerate(texts):
                try:
                    text.decode()
                except UnicodeDecodeError:
                    texts = texts[:index]
                    joined = b"".join(texts)
                    break
        if not texts:
            return 0
        answer._chunks += len(texts)
        if self.fingerprint is not None:  # the last one wins, as parsing the chunks would set it
            answer._fingerprint = self.fingerprint
        self.content.append(joined.decode())
        return len(texts)

    @classmethod
    def find(cls, value: bytes, chunk: dict[str, Any], token: str, content: list[str] | None) -> _Shape | None:
        """Where in ``value`` the token sits as a plain JSON string (tried from the last ``"content"`` key back,
        as a duplicate key's last value wins), proven by parsing a probe token in its place."""
        raw = token.encode()
        if content is None or _NOT_PLAIN.search(raw) is not None:
            return None
        expected = _loads(value)
        expected["choices"][0]["delta"]["content"] = _PROBE
        at = len(value)
        while (at := value.rfind(b'"content"', 0, at)) >= 0:
            start = value.find(b'"', at + 9)
            if start > 0 and value[at + 9:start].strip(b" \t\r\n") == b":" and value.startswith(raw + b'"', start + 1):
                prefix, suffix = value[:start + 1], value[start + 1 + len(raw):]
                try:
                    if _loads(prefix + _PROBE.encode() + suffix) == expected:
                        return cls(prefix, suffix, chunk.get("system_fingerprint"), content)
                except ValueError:
                    pass
        return None



def _index_at(texts: list[bytes], offset: int) -> int:
    """Which of ``texts`` holds byte ``offset`` of their concatenation."""
    for index, text in enumerate(texts):
        offset -= len(text)
        if offset < 0:
            return index
    return len(texts)


class ChoiceAccumulator:
    """Feed it the stream's events (or parsed chunks); ask for the rebuilt completion at the end."""

    __slots__ = ("_choices", "_chunks", "_done", "_id", "_model", "_fingerprint", "_created", "_usage", "_shape",
                 "_shape_tries")

    def __init__(self) -> None:
        self._choices: dict[int, _ChoiceParts] = {}
        self._chunks = 0
        self._done = False
        self._id: str | None = None
        self._model: str | None = None
        self._fingerprint: str | None = None
        self._created: int | None = None
        self._usage: dict[str, Any] | None = None
        self._shape: _Shape | None = None  # a token chunk's bytes around its text (see ``add_value``)
        self._shape_tries = _SHAPE_TRIES

    @property
    def chunks(self) -> int:
        """Chunks merged so far."""
        return self._chunks

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
        start, count = 0, len(values)
        while start < count:
            if self._shape is not None:
                start += self._shape.take(values, start, self)
                if start >= count:
                    break
            if self.add_value(values[start]):
                return True
            start += 1
        return False

    def add_value(self, value: bytes) -> bool:
        """``add_data`` for one value (``SSEDecoder.feed_one``: the read of one token); True at ``[DONE]``.

        Servers send every token chunk of an answer with the same bytes around the token (id, model,
        fingerprint, index, ``finish_reason: null``, ...). Once a parsed token chunk has shown that shape
        (``_learn_shape``), a chunk with the same bytes before and after a token that holds no quote,
        backslash or control character, in valid UTF-8, is that token chunk again: the token is appended
        without parsing the JSON, with exactly the effects parsing it would have had (tests compare both).
        """
        shape = self._shape
        if shape is not None and value.startswith(shape.prefix) and value.endswith(shape.suffix) \
                and len(value) >= shape.size:
            text = value[len(shape.prefix):len(value) - len(shape.suffix)]
            if _NOT_PLAIN.search(text) is None:
                try:
                    token = text.decode()
                except UnicodeDecodeError:  # the parser rejects it too: the slow way gives the same message
                    pass
                else:
                    self._chunks += 1
                    if shape.fingerprint is not None:  # the last one wins, as parsing the chunk would set it
                        self._fingerprint = shape.fingerprint
                    shape.content.append(token)
                    return False
        if value[:1] == b"{":
            try:
                chunk = _loads(value)
            except ValueError:
                chunk = None
            if chunk.__class__ is dict:
                self.add(chunk)
                if shape is None and self._shape_tries:
                    self._learn_shape(value, chunk)
                return False
        return self.add_event(ServerSentEvent(value.decode("utf-8", "replace")))

    def _learn_shape(self, value: bytes, chunk: dict[str, Any]) -> None:
        """Take this chunk's bytes around its token as the answer's token shape, if it is a plain token chunk
        (one choice, a delta of only ``content``, no finish, no usage) and a probe token put in its place
        parses to the same chunk with the probe as its content."""
        choices = chunk.get("choices")
        if choices.__class__ is not list or len(choices) != 1 or isinstance(chunk.get("usage"), dict):
            return
        choice = choices[0]
        if choice.__class__ is not dict or choice.get("finish_reason") is not None:
            return
        delta, index = choice.get("delta"), choice.get("index") or 0
        if delta.__class__ is not dict or len(delta) != 1 or (token := delta.get("content")).__class__ is not str:
            return
        self._shape_tries -= 1
        self._shape = _Shape.find(value, chunk, token, self._choices[index].content)

    def add(self, chunk: dict[str, Any]) -> None:
        """Merge one parsed chunk object."""
        error = chunk.get("error")
        if error is not None:
            raise _stream_error(error)
        if chunk.get("object") == "error":  # older vLLM: the chunk itself is the error object
            raise _stream_error(chunk)
        self._chunks += 1
        try:
            if self._id is None or self._model is None or self._created is None:
                self._add_ids(chunk)
            if (fingerprint := chunk.get("system_fingerprint")) is not None:  # the last one wins
                self._fingerprint = fingerprint
            if isinstance(usage := chunk.get("usage"), dict):  # the last one wins
                self._usage = usage
            choices = chunk.get("choices")
            if choices:
                for choice in choices:
                    if self._add_choice(choice):  # it finished a choice: usage may ride along elsewhere
                        self._other_usage(chunk, choice)
            else:
                self._other_usage(chunk, None)
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

    def finished(self) -> bool:
        """True once at least one choice arrived and every choice has its finish_reason."""
        return bool(self._choices) and all(parts.finish_reason is not None for parts in self._choices.values())

    def result(self) -> Completion:
        """The completion so far, without any completeness checks."""
        notes: list[str] = []
        return Completion(
            id=self._id,
            model=self._model,
            system_fingerprint=self._fingerprint,
            created=self._created,
            choices=[self._choices[i].build(notes) for i in sorted(self._choices)],
            usage=_usage(self._usage),
            chunks=self._chunks,
            warnings=notes,
        )

    def _add_ids(self, chunk: dict[str, Any]) -> None:
        """Top-level id, model and created: the first non-empty one wins (Azure opens with empty ones). Only
        called until all three are known (``add`` reads the fingerprint and usage, where the last wins)."""
        if self._id is None:
            self._id = chunk.get("id") or None
        if self._model is None:
            self._model = chunk.get("model") or None
        if self._created is None:
            self._created = chunk.get("created") or None

    def _add_choice(self, choice: dict[str, Any]) -> bool:
        """Merge one choice entry; True when it carries a finish_reason."""
        index = choice.get("index") or 0
        if not isinstance(index, int):
            raise TypeError(f"choice index is a {type(index).__name__}, not an int")
        delta = choice.get("delta")
        finish_reason = choice.get("finish_reason")
        parts = self._choices.get(index)
        if parts is None:
            if delta is None and finish_reason is None:
                return False  # annotation only (Azure's content-filter results): not an answer of its own
            parts = self._choices[index] = _ChoiceParts(index)
        if delta:
            if len(delta) == 1 and parts.content is not None and (content := delta.get("content")).__class__ is str:
                parts.content.append(content)  # add_delta's one-token case, without the call: most chunks
            else:
                parts.add_delta(delta)
        if finish_reason is not None:
            parts.finish_reason = finish_reason
            return True
        return False

    def _other_usage(self, chunk: dict[str, Any], choice: dict[str, Any] | None) -> None:
        """Usage sent outside the standard place: Groq's ``x_groq.usage``, or inside the choice. Only read
        when the standard ``usage`` of this chunk is absent, so that one wins."""
        if isinstance(chunk.get("usage"), dict):
            return
        extra = chunk.get("x_groq")
        usage = extra.get("usage") if isinstance(extra, dict) else None
        if not isinstance(usage, dict) and choice is not None:
            usage = choice.get("usage")
        if isinstance(usage, dict):
            self._usage = usage

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


def error_in_answer(body: dict[str, Any]) -> StreamErrorEvent | None:
    """The error a whole 200 JSON answer carries instead of choices (``{"error": ...}``, or vLLM's
    ``{"object": "error", ...}``), or None; retryable unless its type or code is 4xx-like."""
    if (error := body.get("error")) is not None:
        return _stream_error(error, "endpoint answered 200 with an error")
    if body.get("object") == "error":
        return _stream_error(body, "endpoint answered 200 with an error")
    return None


def _stream_error(error: Any, context: str = "server error in stream") -> StreamErrorEvent:
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
        f"{context}: {text}" + (f" ({details})" if details else ""),
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
