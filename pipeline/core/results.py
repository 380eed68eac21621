"""The one result schema: the row type every worker produces and the Arrow schema every sink writes.

One output row per (manifest row, choice). A failed row has one output row with ``status = failed``,
no choice index, and the error's type and message.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import pyarrow as pa

from pipeline.core.accumulate import Choice, Completion

_TIMESTAMP = pa.timestamp("us", tz="UTC")

#: Result columns in output order; manifest columns are carried between ``path`` and ``status``.
HEAD_FIELDS: list[pa.Field] = [pa.field("id", pa.string(), nullable=False), pa.field("path", pa.string())]
TAIL_FIELDS: list[pa.Field] = [
    pa.field("status", pa.string(), nullable=False),
    pa.field("content", pa.string()),
    pa.field("finish_reason", pa.string()),
    pa.field("choice_index", pa.int32()),
    pa.field("tool_calls", pa.string()),
    pa.field("refusal", pa.string()),
    pa.field("model", pa.string()),
    pa.field("response_id", pa.string()),
    pa.field("system_fingerprint", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("total_tokens", pa.int64()),
    pa.field("attempts", pa.int32()),
    pa.field("ttft_ms", pa.float64()),
    pa.field("latency_ms", pa.float64()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
    pa.field("started_at", _TIMESTAMP),
    pa.field("finished_at", _TIMESTAMP),
    # image pre-flight report: what the file was, what was sent, and how
    pa.field("image_format", pa.string()),
    pa.field("image_width", pa.int32()),
    pa.field("image_height", pa.int32()),
    pa.field("image_bytes", pa.int64()),
    pa.field("sent_format", pa.string()),
    pa.field("sent_width", pa.int32()),
    pa.field("sent_height", pa.int32()),
    pa.field("sent_bytes", pa.int64()),
    pa.field("image_action", pa.string()),
]
RESULT_COLUMNS = frozenset(f.name for f in HEAD_FIELDS + TAIL_FIELDS)
_TIME_FIELDS = ("started_at", "finished_at")


def result_schema(carried: pa.Schema | None = None) -> pa.Schema:
    """The output schema for a manifest whose carried-through columns are ``carried``."""
    middle = list(carried) if carried is not None else []
    return pa.schema(HEAD_FIELDS + middle + TAIL_FIELDS)


@dataclass(slots=True)
class ResultRow:
    """One output row before it is written; field names match ``TAIL_FIELDS`` one to one."""

    status: str
    content: str | None = None
    finish_reason: str | None = None
    choice_index: int | None = None
    tool_calls: str | None = None
    refusal: str | None = None
    model: str | None = None
    response_id: str | None = None
    system_fingerprint: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    attempts: int = 0
    ttft_ms: float | None = None
    latency_ms: float | None = None
    error_type: str | None = None
    error_message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    image_format: str | None = None
    image_width: int | None = None
    image_height: int | None = None
    image_bytes: int | None = None
    sent_format: str | None = None
    sent_width: int | None = None
    sent_height: int | None = None
    sent_bytes: int | None = None
    image_action: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe dict for the ledger; times as epoch microseconds (Arrow reads them as timestamps)."""
        out = {name: getattr(self, name) for name in _ROW_FIELDS}
        for name in _TIME_FIELDS:
            value = out[name]
            if isinstance(value, datetime):
                out[name] = int(value.timestamp() * 1_000_000)
        return out


_ROW_FIELDS = [f.name for f in fields(ResultRow)]
assert _ROW_FIELDS == [f.name for f in TAIL_FIELDS], "ResultRow and TAIL_FIELDS must match"


def rows_from_completion(
    completion: Completion, *, attempts: int, ttft_ms: float | None, latency_ms: float,
    started_at: datetime, finished_at: datetime, image: dict[str, Any] | None = None,
) -> list[ResultRow]:
    """One ``ok`` row per choice; usage (which covers all choices) is repeated on each."""
    usage = completion.usage
    common = dict(
        **(image or {}),
        model=completion.model,
        response_id=completion.id,
        system_fingerprint=completion.system_fingerprint,
        prompt_tokens=usage.prompt_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        total_tokens=usage.total_tokens if usage else None,
        attempts=attempts,
        ttft_ms=ttft_ms,
        latency_ms=latency_ms,
        started_at=started_at,
        finished_at=finished_at,
    )
    return [_choice_row(choice, common) for choice in completion.choices]


def _choice_row(choice: Choice, common: dict[str, Any]) -> ResultRow:
    return ResultRow(
        status="ok",
        content=choice.content,
        finish_reason=choice.finish_reason,
        choice_index=choice.index,
        tool_calls=tool_calls_json(choice),
        refusal=choice.refusal,
        **common,
    )


def tool_calls_json(choice: Choice) -> str | None:
    """Tool calls in the API's own shape, as JSON text (arguments stay the raw string the model sent)."""
    if not choice.tool_calls:
        return None
    calls = [
        {"id": c.id, "type": c.type or "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in choice.tool_calls
    ]
    return json.dumps(calls, ensure_ascii=False)


def to_table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Output records (result fields plus id, path and manifest columns) under the explicit schema."""
    return pa.Table.from_pylist(records, schema=schema)
