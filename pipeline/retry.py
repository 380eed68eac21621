"""Retry policy: which failures get another attempt, and how long to wait before it.

tenacity drives the loop; this module supplies the predicate (``error.retryable``) and a wait that is
exponential with full jitter but defers to the server's own ``Retry-After`` when it sent one.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from .config import RunConfig
from .errors import PipelineError

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


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, PipelineError) and exc.retryable


class wait_retry_after(wait_base):
    """Full-jitter exponential backoff, unless the last error carried a server-given delay."""

    def __init__(self, base: float, maximum: float) -> None:
        self.backoff = wait_random_exponential(multiplier=base, max=maximum)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hinted = getattr(exc, "retry_after", None)
        if hinted is not None:
            return float(hinted)
        return self.backoff(retry_state)


def retry_policy(run: RunConfig) -> AsyncRetrying:
    """A fresh tenacity controller for one row's attempts."""
    return AsyncRetrying(
        stop=stop_after_attempt(run.max_attempts),
        wait=wait_retry_after(run.backoff_base, run.backoff_max),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )
