"""Retry policy pieces: server-given delays and the retryable predicate."""

import email.utils

import pytest
from tenacity import RetryCallState

from pipeline.config import RunConfig
from pipeline.errors import (
    AuthError,
    ConnectError,
    MalformedChunk,
    PermanentEndpointError,
    RateLimited,
    ServerError,
    TruncatedStream,
    error_for_status,
)
from pipeline.retry import is_retryable, parse_duration, parse_retry_after, retry_policy, wait_retry_after


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
