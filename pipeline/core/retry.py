"""Retry policies: which failures get another attempt, and how long to wait before it.

One mechanism (tenacity, asking ``error.retryable``) for the two things that retry: a row's requests to
the endpoint (:func:`retry_policy`) and an image download (:func:`download_retry_policy`).

For requests, the wait is exponential with full jitter but defers to the server's own delay when it sent
one:

* ``retry-after-ms`` (milliseconds), else ``Retry-After`` (seconds or an HTTP date), on any status;
* else, on a 429 only, OpenAI's ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens`` (durations
  such as ``1s``, ``6m0s``, ``250ms``): the one the 429's error type names (``requests`` / ``tokens``),
  else the longest of those whose ``x-ratelimit-remaining-*`` says that budget is spent (or is not given).
  On other statuses these headers describe the account, not the failure, so they are not a reason to wait.
* an error response with ``x-should-retry: false`` is not retried at all (``edges/client.py`` marks it).

A server may ask for an hour. ``max_server_wait`` caps that: a longer request stops the row's retries at
once with :class:`ServerWaitTooLong` (the endpoint's message plus why), instead of parking a worker.
"""

from __future__ import annotations

from typing import NoReturn

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_exponential, wait_random_exponential

from pipeline.core.config import ImagesConfig, RunConfig
from pipeline.core.errors import PipelineError, ServerWaitTooLong


def _hinted_wait(retry_state: RetryCallState) -> float | None:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    hinted = getattr(exc, "retry_after", None)
    return float(hinted) if hinted is not None else None


def is_retryable(exc: BaseException) -> bool:
    return isinstance(exc, PipelineError) and exc.retryable


class wait_retry_after(wait_base):
    """Full-jitter exponential backoff, unless the last error carried a server-given delay.

    A server delay above ``max_server_wait`` is never slept: :func:`retry_policy` stops before that
    (:class:`stop_if_server_wait_exceeds`); used on its own, this wait falls back to the backoff.
    """

    def __init__(self, base: float, maximum: float, max_server_wait: float | None = None) -> None:
        self.backoff = wait_random_exponential(multiplier=base, max=maximum)
        self.max_server_wait = max_server_wait

    def __call__(self, retry_state: RetryCallState) -> float:
        hinted = _hinted_wait(retry_state)
        if hinted is not None and (self.max_server_wait is None or hinted <= self.max_server_wait):
            return hinted
        return self.backoff(retry_state)


class stop_if_server_wait_exceeds(stop_base):
    """Stop retrying when the last error carries a server delay longer than ``limit`` seconds."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, retry_state: RetryCallState) -> bool:
        hinted = _hinted_wait(retry_state)
        return hinted is not None and hinted > self.limit


def _give_up(max_attempts: int, max_server_wait: float | None):  # noqa: ANN202 - tenacity callback
    """tenacity's final step: re-raise the last error, or wrap it when the server's wait was too long."""

    def raise_last(retry_state: RetryCallState) -> NoReturn:
        assert retry_state.outcome is not None
        exc = retry_state.outcome.exception()
        assert exc is not None
        hinted = _hinted_wait(retry_state)
        if (max_server_wait is not None and hinted is not None and hinted > max_server_wait
                and retry_state.attempt_number < max_attempts and isinstance(exc, PipelineError)):
            raise ServerWaitTooLong(exc, hinted, max_server_wait) from exc
        raise exc

    return raise_last


def retry_policy(run: RunConfig, *, max_server_wait: float | None = None) -> AsyncRetrying:
    """A fresh tenacity controller for one row's attempts.

    ``max_server_wait`` (``limits.max_retry_wait``): a server delay longer than this ends the row's
    retries with :class:`ServerWaitTooLong`; ``None`` honours any delay.
    """
    stop = stop_after_attempt(run.max_attempts)
    if max_server_wait is not None:
        stop = stop | stop_if_server_wait_exceeds(max_server_wait)
    return AsyncRetrying(
        stop=stop,
        wait=wait_retry_after(run.backoff_base, run.backoff_max, max_server_wait),
        retry=retry_if_exception(is_retryable),
        retry_error_callback=_give_up(run.max_attempts, max_server_wait),
    )


#: A download's backoff: 0.25 s, 0.5 s, 1 s, then 2 s between attempts (an image server that stays down
#: longer fails the row with ``image_remote_error``; ``pipeline retry`` sends it again).
DOWNLOAD_BACKOFF_BASE_S, DOWNLOAD_BACKOFF_MAX_S = 0.25, 2.0


def download_retry_policy(images: ImagesConfig) -> AsyncRetrying:
    """A fresh tenacity controller for one image download: ``images.download_attempts`` tries of a
    retryable error (``TransientDownloadError``), then the last one is re-raised for the caller to report."""
    return AsyncRetrying(
        stop=stop_after_attempt(images.download_attempts),
        wait=wait_exponential(multiplier=DOWNLOAD_BACKOFF_BASE_S, max=DOWNLOAD_BACKOFF_MAX_S),
        retry=retry_if_exception(is_retryable),
        reraise=True,
    )
