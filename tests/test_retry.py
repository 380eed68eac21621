"""Retry policy pieces: server-given delays and the retryable predicate."""

import email.utils

import pytest
from tenacity import RetryCallState

from pipeline.core.config import ImagesConfig, RunConfig
from pipeline.core.errors import (
    AuthError,
    ConnectError,
    ImageError,
    MalformedChunk,
    PermanentEndpointError,
    RateLimited,
    ServerError,
    ServerWaitTooLong,
    TransientDownloadError,
    TruncatedStream,
    error_for_status,
)
from pipeline.core.ratelimit import (
    RateLimitHeaders,
    parse_duration,
    parse_rate_limit_headers,
    parse_retry_after,
    server_wait,
)
from pipeline.core.retry import (
    download_retry_policy,
    is_retryable,
    retry_policy,
    stop_if_server_wait_exceeds,
    wait_retry_after,
)


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"Retry-After": "1"}, 1.0),
        ({"retry-after": "2.5"}, 2.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers, expected):
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_http_date():
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"Retry-After": date}, now=now) == pytest.approx(30, abs=1)


@pytest.mark.parametrize("text, seconds", [("1s", 1), ("6m0s", 360), ("250ms", 0.25), ("1h2m3.5s", 3723.5),
                                           ("3", 3), ("later", None), ("1s junk", None)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "status, cls, retryable",
    [(429, RateLimited, True), (500, ServerError, True), (503, ServerError, True), (529, ServerError, True),
     (408, ServerError, True), (409, ServerError, True), (400, PermanentEndpointError, False),
     (401, AuthError, False), (403, AuthError, False), (422, PermanentEndpointError, False)],
)
def test_status_taxonomy(status, cls, retryable):
    error = error_for_status(status, "msg")
    assert type(error) is cls
    assert is_retryable(error) is retryable
    assert str(error) == f"HTTP {status}: msg"


def test_stream_and_transport_errors_are_retryable():
    assert all(is_retryable(e) for e in [TruncatedStream("x"), MalformedChunk("x"), ConnectError("x")])
    assert not is_retryable(ValueError("bug"))


def test_wait_prefers_retry_after():
    wait = wait_retry_after(base=0.5, maximum=4)
    state = RetryCallState(retry_object=retry_policy(RunConfig()), fn=None, args=(), kwargs={})
    state.set_exception((RateLimited, RateLimited("x", status=429, retry_after=1.5), None))
    assert wait(state) == 1.5
    state.set_exception((ServerError, ServerError("x", status=500), None))
    for attempt in range(1, 8):
        state.attempt_number = attempt
        assert 0 <= wait(state) <= 4


# --- server waits from rate-limit headers, and the cap on them ----------------------------------------

@pytest.mark.parametrize(
    "headers, status, expected",
    [
        ({"Retry-After": "2"}, 503, 2.0),                                         # explicit: any status
        ({"retry-after-ms": "250", "x-ratelimit-reset-requests": "9s"}, 429, 0.25),  # explicit wins
        ({"x-ratelimit-reset-requests": "1s"}, 429, 1.0),
        ({"x-ratelimit-reset-tokens": "250ms"}, 429, 0.25),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 429, 360.0),  # longest
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "0",
          "x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-remaining-tokens": "5000"}, 429, 2.0),  # spent one
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "3",
          "x-ratelimit-reset-tokens": "20ms", "x-ratelimit-remaining-tokens": "0"}, 429, 0.02),
        ({"x-ratelimit-reset-requests": "2s", "x-ratelimit-remaining-requests": "3",
          "x-ratelimit-reset-tokens": "5s", "x-ratelimit-remaining-tokens": "9"}, 429, 5.0),  # neither: longest
        ({"x-ratelimit-reset-requests": "1s"}, 503, None),                         # not a 429: no wait
        ({"x-ratelimit-reset-requests": "1s"}, None, None),
        ({"x-ratelimit-reset-requests": "soon"}, 429, None),
        ({}, 429, None),
    ],
)
def test_server_wait(headers, status, expected):
    assert server_wait(headers, status) == expected


BOTH_RESETS = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-remaining-requests": "0",
               "x-ratelimit-reset-tokens": "6m0s", "x-ratelimit-remaining-tokens": "0"}


@pytest.mark.parametrize("limit_type, expected", [
    ("requests", 1.0),            # OpenAI's 429 body: {"error": {"type": "requests", ...}}: that budget's reset
    ("tokens", 360.0),
    ("tokens_usage_based", 360.0),
    ("insufficient_quota", 360.0),  # names no budget: the longest spent one, as before
    (None, 360.0),
])
def test_server_wait_follows_the_budget_the_429_names(limit_type, expected):
    assert server_wait(BOTH_RESETS, 429, limit_type=limit_type) == expected


def test_a_named_budget_without_its_reset_falls_back_to_the_others():
    assert server_wait({"x-ratelimit-reset-tokens": "2s"}, 429, limit_type="requests") == 2.0
    assert server_wait({"Retry-After": "3", **BOTH_RESETS}, 429, limit_type="requests") == 3.0  # explicit wins


def test_parse_rate_limit_headers():
    info = parse_rate_limit_headers({
        "X-RateLimit-Limit-Requests": "500", "x-ratelimit-limit-tokens": "30000",
        "x-ratelimit-remaining-requests": "499", "x-ratelimit-remaining-tokens": "29000",
        "x-ratelimit-reset-requests": "120ms", "x-ratelimit-reset-tokens": "2s", "x-other": "1",
    })
    assert info == RateLimitHeaders(500, 30000, 499, 29000, 0.12, 2.0) and info.present
    assert not parse_rate_limit_headers({"content-type": "text/event-stream"}).present
    assert parse_rate_limit_headers({"x-ratelimit-remaining-requests": "lots"}).remaining_requests is None


def _state_with(exc):
    state = RetryCallState(retry_object=retry_policy(RunConfig()), fn=None, args=(), kwargs={})
    state.set_exception((type(exc), exc, None))
    return state


def test_wait_never_sleeps_past_max_server_wait():
    wait = wait_retry_after(base=0.5, maximum=4, max_server_wait=10)
    assert wait(_state_with(RateLimited("x", status=429, retry_after=9))) == 9
    assert 0 <= wait(_state_with(RateLimited("x", status=429, retry_after=3600))) <= 4  # falls back
    stop = stop_if_server_wait_exceeds(10)
    assert stop(_state_with(RateLimited("x", status=429, retry_after=3600)))
    assert not stop(_state_with(RateLimited("x", status=429, retry_after=10)))
    assert not stop(_state_with(ServerError("x", status=500)))


async def _run(policy, failures):
    """Drive a policy over a list of exceptions (then success); returns (attempts, result or error)."""
    attempts = 0
    try:
        async for attempt in policy:
            with attempt:
                attempts += 1
                if attempts <= len(failures):
                    raise failures[attempts - 1]
        return attempts, "ok"
    except Exception as exc:  # noqa: BLE001 - the test looks at what came out
        return attempts, exc


FAST = RunConfig(max_attempts=3, backoff_base=0, backoff_max=0)


@pytest.mark.parametrize(
    "failures, max_wait, attempts, outcome",
    [
        ([RateLimited("HTTP 429: slow down", status=429, retry_after=0)], 10, 2, "ok"),
        ([RateLimited("HTTP 429: quota", status=429, retry_after=3600)], 10, 1, ServerWaitTooLong),
        ([RateLimited("HTTP 429: quota", status=429, retry_after=3600)], None, 1, "sleeps"),  # not run
        ([ServerError("HTTP 500: a", status=500)] * 3, 10, 3, ServerError),   # attempts used up: original
        ([PermanentEndpointError("HTTP 400: bad", status=400)], 10, 1, PermanentEndpointError),
    ],
)
async def test_policy_stops_instead_of_sleeping_too_long(failures, max_wait, attempts, outcome):
    if outcome == "sleeps":
        policy = retry_policy(FAST, max_server_wait=max_wait)
        assert policy.wait(_state_with(failures[0])) == 3600  # no cap: the server's hour is honoured
        return
    got_attempts, result = await _run(retry_policy(FAST, max_server_wait=max_wait), failures)
    assert got_attempts == attempts
    if outcome == "ok":
        assert result == "ok"
        return
    assert type(result) is outcome
    if outcome is ServerWaitTooLong:
        assert result.error_type == "rate_limited" and not result.retryable and result.status == 429
        assert str(result).startswith("HTTP 429: quota (the endpoint asked to wait 3600s")
        assert "max_retry_wait=10s" in str(result) and result.original is failures[0]
        assert result.__cause__ is failures[0]
    else:
        assert result is failures[-1]


async def test_download_policy_retries_transient_failures_only():
    """Downloads share the request mechanism: retryable errors get ``download_attempts`` tries with a capped
    backoff (0.25 s doubling to 2 s), and the last error comes out as it was raised."""
    policy = download_retry_policy(ImagesConfig(download_attempts=2))
    state = _state_with(TransientDownloadError("HTTP 503"))
    waits = []
    for attempt_number in range(1, 6):
        state.attempt_number = attempt_number
        waits.append(policy.wait(state))
    assert waits == [0.25, 0.5, 1.0, 2.0, 2.0]
    failures = [TransientDownloadError("HTTP 503"), TransientDownloadError("timed out after 1 s")]
    assert await _run(policy, failures) == (2, failures[-1])
    refused = ImageError("x.jpg: download answered HTTP 404", error_type="image_remote_error")
    assert await _run(download_retry_policy(ImagesConfig(download_attempts=3)), [refused]) == (1, refused)
    assert await _run(policy, [TransientDownloadError("HTTP 429")]) == (2, "ok")
