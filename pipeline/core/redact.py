"""The one redactor: what a secret or an image payload looks like once it is safe to log or store.

Logs (``ops/logs.py``'s filter), run reports, webhook warnings and per-row image errors all mask through
here, so a new kind of secret is taught to the pipeline once. Pure text in, text out: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

__all__ = ["MASK", "redact", "redact_url", "redact_value"]

MASK = "***"

#: ``data:image/png;base64,iVBOR...`` (a data URI's payload is useless in a log and can be huge).
_DATA_URI = re.compile(r"data:(image/[A-Za-z0-9.+-]+);base64,([A-Za-z0-9+/]+={0,2})")
#: OpenAI-style keys (``sk-...``, ``sk-proj-...``), anywhere a word starts.
_SK_KEY = re.compile(r"\bsk-[A-Za-z0-9_-]{8,}")
#: ``Authorization: Bearer <token>``, in headers, reprs and curl lines alike.
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+")
#: Azure's ``api-key`` header, and ``api_key=...`` / ``"api_key": "..."`` in reprs, query strings, JSON.
_API_KEY_FIELD = re.compile(r"""(?i)\b(api[-_]?key["']?\s*[:=]\s*["']?)([^\s"',;&}\])]+)""")
#: A secret of at least ``_CUT_MIN`` characters is recognised by its first ``_CUT_PREFIX`` ones, up to the
#: end of the word it starts (a quote, comma or space ends it).
_CUT_MIN, _CUT_PREFIX, _CUT_REST = 12, 8, r"""[^\s"',;]*"""


def _payload_size(payload: str) -> int:
    """Decoded size of a Base64 payload, without decoding it."""
    return len(payload) * 3 // 4 - payload.count("=", len(payload) - 2)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with API keys, bearer tokens, the given secret values and image payloads masked.

    A data URI keeps its media type and says how big its payload was (``data:image/png;base64,<812 bytes>``),
    which is what a reader debugging a request actually needs. Every non-empty secret is replaced verbatim,
    longest first (so a secret that contains another is masked whole), and so is a secret cut short (an
    endpoint's error message truncated in the middle of the key it echoes): the run of characters that starts
    with its first 8 is masked too (not for URLs, whose first 8 characters are ``https://``). Idempotent:
    masking twice is masking once.
    """
    if not text:
        return text
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, MASK)
        if len(secret) >= _CUT_MIN and "://" not in secret and secret[:_CUT_PREFIX] in text:
            text = re.sub(re.escape(secret[:_CUT_PREFIX]) + _CUT_REST, MASK, text)
    text = _DATA_URI.sub(lambda m: f"data:{m.group(1)};base64,<{_payload_size(m.group(2))} bytes>", text)
    text = _SK_KEY.sub("sk-" + MASK, text)
    text = _BEARER.sub(lambda m: m.group(1) + MASK, text)
    return _API_KEY_FIELD.sub(lambda m: m.group(1) + MASK, text)


def redact_value(value: Any, secrets: Sequence[str] = ()) -> Any:
    """``redact`` applied to every string inside nested dicts, lists and tuples (for structured fields)."""
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, Mapping):
        return {key: redact_value(item, secrets) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(item, secrets) for item in value]
    return value


def redact_url(url: str, *, keep_path: bool = True) -> str:
    """The URL without credentials, query or fragment, so signed URLs never reach logs or outputs.

    ``keep_path=False`` keeps only scheme, host and port, for URLs whose path is itself the secret (a
    Slack webhook's ``/services/T.../B.../...``). A data URI is named, never shown.
    """
    if url[:5].lower() == "data:":
        return "data:... URI"
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable URL>"
    if not keep_path:
        return f"{parts.scheme or '?'}://{host or '?'}{port}"
    query = "?..." if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"
