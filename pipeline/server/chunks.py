"""OpenAI-exact response objects: ``chat.completion`` bodies and ``chat.completion.chunk`` streams.

Choices are streamed round-robin (role, pieces, finish for each) so a client that accumulates by
``choices[].index`` is really exercised when n > 1.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from pipeline.server.answer import Answer, ChoicePlan

SYSTEM_FINGERPRINT = "fp_local"
DONE_FRAME = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class CompletionHeader:
    """Fields every chunk of one completion repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str, created: int) -> CompletionHeader:
        return cls(id=f"chatcmpl-{secrets.token_hex(12)}", created=created, model=model)


def sse_frame(payload: dict[str, Any], event: str | None = None) -> bytes:
    """One server-sent event: optional ``event:`` line, one compact ``data:`` line, blank line."""
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def stream_chunks(answer: Answer, header: CompletionHeader, *, include_usage: bool) -> list[dict[str, Any]]:
    """Every chunk object of the stream, in sending order (without the final ``[DONE]``)."""
    per_choice = [_choice_deltas(choice) for choice in answer.choices]
    chunks = []
    for round_ in zip_longest(*per_choice):
        for choice_part in round_:
            if choice_part is not None:
                chunks.append(_chunk(header, [choice_part]))
    if include_usage:
        for chunk in chunks:
            chunk["usage"] = None
        chunks.append({**_chunk(header, []), "usage": answer.usage.as_dict()})
    return chunks


def first_finish_position(chunks: list[dict[str, Any]]) -> int:
    """Index of the first chunk that finishes a choice (where a truncation must stop at the latest)."""
    for position, chunk in enumerate(chunks):
        if any(choice.get("finish_reason") for choice in chunk["choices"]):
            return position
    return len(chunks)


def _chunk(header: CompletionHeader, choices: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": header.id, "object": "chat.completion.chunk", "created": header.created,
            "model": header.model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices}


def _choice_deltas(choice: ChoicePlan) -> list[dict[str, Any]]:
    """The choice's own sequence: role delta, one delta per piece, empty delta with finish_reason."""
    deltas: list[dict[str, Any]]
    if choice.tool_call is None:
        deltas = [{"role": "assistant", "content": ""}]
        deltas += [{"content": piece} for piece in choice.pieces]
    else:
        head = {"index": 0, "id": choice.tool_call.id, "type": "function",
                "function": {"name": choice.tool_call.name, "arguments": ""}}
        deltas = [{"role": "assistant", "content": None, "tool_calls": [head]}]
        deltas += [{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]} for piece in choice.pieces]
    parts = [_choice_part(choice.index, delta, None) for delta in deltas]
    parts.append(_choice_part(choice.index, {}, choice.finish_reason))
    return parts


def _choice_part(index: int, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def completion_body(answer: Answer, header: CompletionHeader) -> dict[str, Any]:
    """The non-streaming ``chat.completion`` object."""
    return {
        "id": header.id, "object": "chat.completion", "created": header.created, "model": header.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [_message_choice(choice) for choice in answer.choices],
        "usage": answer.usage.as_dict(),
    }


def _message_choice(choice: ChoicePlan) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
    if choice.tool_call is not None:
        message["content"] = None
        message["tool_calls"] = [{"id": choice.tool_call.id, "type": "function",
                                  "function": {"name": choice.tool_call.name, "arguments": choice.text}}]
    return {"index": choice.index, "message": message, "logprobs": None, "finish_reason": choice.finish_reason}
