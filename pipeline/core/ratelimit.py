"""Rate-limit and retry-after headers, read the way OpenAI-compatible servers send them (pure).

``server_wait`` says how long the server asked a client to wait before the next attempt:

* ``retry-after-ms`` (milliseconds), else ``Retry-After`` (seconds or an HTTP date), on any status;
* else, on a 429 only, OpenAI's ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens`` (durations
  such as ``1s``, ``6m0s``, ``250ms``): when the 429's error type names the budget that ran out
  (OpenAI's ``"type": "requests"`` or ``"tokens"``), that budget's reset; else the longest of those whose
  ``x-ratelimit-remaining-*`` says that budget is spent (or is not given). On other statuses these headers
  describe the account, not the failure, so they are not a reason to wait.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: ``1s``, ``6m0s``, ``250ms``, ``1h2m3.5s``; plain numbers are seconds."""
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the server asked us to wait, from ``retry-after-ms`` or ``Retry-After`` (seconds or date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lowered:
        try:
            return max(0.0, float(lowered["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _int_header(lowered: Mapping[str, str], name: str) -> int | None:
    try:
        return int(float(lowered[name]))
    except (KeyError, ValueError):
        return None


def _duration_header(lowered: Mapping[str, str], name: str) -> float | None:
    value = lowered.get(name)
    return parse_duration(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class RateLimitHeaders:
    """OpenAI-style ``x-ratelimit-*`` headers of one response (``None`` where absent or unreadable)."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None  # seconds
    reset_tokens: float | None = None  # seconds

    @property
    def present(self) -> bool:
        return any(value is not None for value in (self.limit_requests, self.limit_tokens,
                                                   self.remaining_requests, self.remaining_tokens,
                                                   self.reset_requests, self.reset_tokens))


def parse_rate_limit_headers(headers: Mapping[str, str]) -> RateLimitHeaders:
    """Read ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``; vLLM/Ollama send none of them."""
    lowered = _lowered(headers)
    return RateLimitHeaders(
        limit_requests=_int_header(lowered, "x-ratelimit-limit-requests"),
        limit_tokens=_int_header(lowered, "x-ratelimit-limit-tokens"),
        remaining_requests=_int_header(lowered, "x-ratelimit-remaining-requests"),
        remaining_tokens=_int_header(lowered, "x-ratelimit-remaining-tokens"),
        reset_requests=_duration_header(lowered, "x-ratelimit-reset-requests"),
        reset_tokens=_duration_header(lowered, "x-ratelimit-reset-tokens"),
    )


def server_wait(headers: Mapping[str, str], status: int | None = None, now: float | None = None,
                limit_type: str | None = None) -> float | None:
    """Seconds the server asked us to wait before the next attempt, or None (use computed backoff).

    Explicit ``retry-after-ms`` / ``Retry-After`` win on any status. On a 429 without them, the error's
    ``limit_type`` (its ``type``: ``requests`` or ``tokens``) picks that budget's reset when it is given:
    a requests limit that resets in 1 s must not wait out a token window of a minute, nor the reverse.
    Otherwise the reset duration of each spent budget counts (a budget whose ``remaining`` header is
    absent counts as possibly spent); the longest wins, since the request needs both budgets.
    """
    explicit = parse_retry_after(headers, now)
    if explicit is not None or status != 429:
        return explicit
    info = parse_rate_limit_headers(headers)
    named = _reset_of(info, limit_type)
    if named is not None:
        return named
    candidates = [
        reset for reset, remaining in ((info.reset_requests, info.remaining_requests),
                                       (info.reset_tokens, info.remaining_tokens))
        if reset is not None and (remaining is None or remaining <= 0)
    ]
    if not candidates:  # both budgets claim room left: some other limit; take the longest reset given
        candidates = [r for r in (info.reset_requests, info.reset_tokens) if r is not None]
    return max(candidates) if candidates else None


def _reset_of(info: RateLimitHeaders, limit_type: str | None) -> float | None:
    """The reset of the budget a 429's error type names (``requests`` / ``tokens``, also ``tokens_usage_based``)."""
    kind = (limit_type or "").lower()
    if kind.startswith("request"):
        return info.reset_requests
    if kind.startswith("token"):
        return info.reset_tokens
    return None
