"""Rate limits, adaptive concurrency, circuit breaker and budgets.

Unit tests run on a fake clock injected as ``clock``/``sleep``: nothing really sleeps and nothing asserts
on wall time. The last section drives the same components over real HTTP against the local endpoint's
limit knobs, with the endpoint's fault plan on the same fake clock where time matters.
"""

from __future__ import annotations

import asyncio
import base64
import io
from typing import Any

import pytest
from PIL import Image

from pipeline.core.config import EndpointConfig
from pipeline.core.errors import (
    AuthError,
    BudgetExceeded,
    ConfigError,
    ConnectError,
    EndpointTimeout,
    ImageError,
    PermanentEndpointError,
    RateLimited,
    ServerError,
    TruncatedStream,
    error_for_status,
)
from pipeline.core.ratelimit import RateLimitHeaders
from pipeline.core.tokens import TokenEstimate
from pipeline.edges.client import ChatClient
from pipeline.run.limits import (
    AdaptiveConcurrency,
    BreakerState,
    BudgetGuard,
    CircuitBreaker,
    ModelPrice,
    Permit,
    RateLimiter,
    TokenBucket,
    is_endpoint_failure,
    is_overload,
)
from pipeline.server import FaultPlan, LocalEndpoint


class FakeClock:
    """``clock()`` and ``sleep()`` on virtual time. A sleep moves time to (its start + seconds) after
    yielding once, never backwards, so tasks sleeping toward the same instant do not add up; ``lag``
    oversleeps every sleep, as a busy event loop would."""

    def __init__(self, start: float = 1000.0, lag: float = 0.0) -> None:
        self.start = start
        self.now = start
        self.lag = lag
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    @property
    def elapsed(self) -> float:
        return self.now - self.start

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        target = self.now + max(0.0, seconds) + self.lag
        await asyncio.sleep(0)
        self.now = max(self.now, target)

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def rounded(values: list[float], digits: int = 6) -> list[float]:
    return [round(v, digits) for v in values]


# --- token bucket -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rate", "capacity", "amounts", "grant_times"), [
    (60, None, [1, 1, 1, 1], [0, 1, 2, 3]),               # evenly spaced, no burst by default
    (120, None, [1, 1, 1], [0, 0.5, 1.0]),
    (60, 3, [1, 1, 1, 1, 1], [0, 0, 0, 1, 2]),            # a burst of `capacity`, then the rate
    (60, 10, [10, 25, 1], [0, 10, 26]),                   # bigger than capacity: waits for full, then debt
    (60, 10, [0, 0], [0, 0]),
])
async def test_bucket_grant_times(clock: FakeClock, rate: float, capacity: float | None, amounts: list[float],
                                  grant_times: list[float]) -> None:
    bucket = TokenBucket(rate, capacity, clock=clock, sleep=clock.sleep)
    times = []
    for amount in amounts:
        await bucket.acquire(amount)
        times.append(clock.elapsed)
    assert rounded(times) == grant_times


async def test_bucket_is_fifo_under_concurrency(clock: FakeClock) -> None:
    bucket = TokenBucket(60, clock=clock, sleep=clock.sleep)
    order: list[tuple[str, float]] = []

    async def take(name: str, amount: float) -> None:
        await bucket.acquire(amount)
        order.append((name, round(clock.elapsed, 6)))

    async with asyncio.TaskGroup() as group:
        for name, amount in [("a", 1), ("big", 3), ("b", 1), ("c", 1)]:
            group.create_task(take(name, amount))
            await asyncio.sleep(0)
    # the big request is not overtaken by the small ones queued behind it
    assert order == [("a", 0), ("big", 1), ("b", 4), ("c", 5)]


async def test_late_wakeups_do_not_slow_the_rate() -> None:
    clock = FakeClock(lag=0.3)  # every sleep overshoots by 0.3 s
    bucket = TokenBucket(60, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(5):
        await bucket.acquire()
        times.append(clock.elapsed)
    # charged from when each token was due (1, 2, 3...), not from when the task got to run
    assert rounded(times) == [0, 1.3, 2.3, 3.3, 4.3]


@pytest.mark.parametrize(("correction", "next_grant"), [
    (("refund", 0.5), 0.5), (("debit", 1.0), 2.0), (("refund", 5.0), 0.0)])
async def test_refund_and_debit_move_the_next_grant(clock: FakeClock, correction: tuple[str, float],
                                                     next_grant: float) -> None:
    bucket = TokenBucket(60, capacity=1, clock=clock, sleep=clock.sleep)
    await bucket.acquire()
    getattr(bucket, correction[0])(correction[1])
    await bucket.acquire()
    assert round(clock.elapsed, 6) == next_grant


async def test_cancelled_waiter_leaves_the_queue(clock: FakeClock) -> None:
    bucket = TokenBucket(60, clock=clock, sleep=clock.sleep)
    await bucket.acquire()
    stuck = asyncio.ensure_future(bucket.acquire(1))
    behind = asyncio.ensure_future(bucket.acquire(1))
    await asyncio.sleep(0)
    stuck.cancel()
    await behind
    assert stuck.cancelled() and bucket.waiting == 0 and round(clock.elapsed, 6) == 1


@pytest.mark.parametrize("kwargs", [{"rate_per_minute": 0}, {"rate_per_minute": 60, "capacity": 0}])
def test_bucket_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TokenBucket(**kwargs)


# --- rate limiter -----------------------------------------------------------------------------------


async def test_requests_per_minute_paces_requests(clock: FakeClock) -> None:
    limiter = RateLimiter(requests_per_minute=120, clock=clock, sleep=clock.sleep)
    times = []
    for _ in range(4):
        async with limiter.reserve():
            times.append(clock.elapsed)
    assert rounded(times) == [0, 0.5, 1.0, 1.5]


async def test_tokens_per_minute_settles_to_real_usage(clock: FakeClock) -> None:
    limiter = RateLimiter(tokens_per_minute=600, clock=clock, sleep=clock.sleep)  # 10 tokens/s, capacity 10
    async with limiter.reserve(10) as first:
        first.settle(4)  # 6 unused tokens come back
    async with limiter.reserve(10) as second:
        assert round(clock.elapsed, 6) == 0.4
        second.settle(None)  # no usage reported: the estimate stands
    assert second.settled_tokens == 10
    with pytest.raises(RuntimeError, match="already settled"):
        second.settle(3)
    async with limiter.reserve(10) as third:
        third.settle(30)  # used more than estimated: the bucket goes into debt
    async with limiter.reserve(1):
        assert round(clock.elapsed, 6) == 0.4 + 1.0 + 2.0 + 0.1


async def test_disabled_limiter_never_waits(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    assert not limiter.enabled
    for _ in range(100):
        async with limiter.reserve(10_000) as reservation:
            reservation.settle(5)
    assert clock.elapsed == 0


async def test_achieved_rate_matches_the_limit_under_concurrency(clock: FakeClock) -> None:
    limiter = RateLimiter(requests_per_minute=600, tokens_per_minute=10**9, clock=clock, sleep=clock.sleep)
    sent: list[float] = []

    async def worker() -> None:
        for _ in range(10):
            async with limiter.reserve(100) as reservation:
                sent.append(clock.now)
                await asyncio.sleep(0)
                reservation.settle(80)

    async with asyncio.TaskGroup() as group:
        for _ in range(32):
            group.create_task(worker())
    rate = (len(sent) - 1) / (max(sent) - min(sent)) * 60
    assert len(sent) == 320 and abs(rate - 600) / 600 < 0.01


# --- adaptive concurrency ---------------------------------------------------------------------------


async def test_admits_up_to_the_limit_then_queues_fifo(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(2, clock=clock)
    first, second = await limiter.acquire(), await limiter.acquire()
    order: list[str] = []

    async def wait(name: str) -> None:
        async with limiter:
            order.append(name)

    tasks = [asyncio.ensure_future(wait(name)) for name in "abc"]
    await asyncio.sleep(0)
    assert (limiter.in_flight, limiter.waiting, order) == (2, 3, [])
    limiter.release()
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"] and limiter.in_flight == 1
    assert first.epoch == second.epoch == 0


@pytest.mark.parametrize(("signals", "limit", "cuts"), [
    # each signal: permit epoch at admission (None: no permit) and seconds passed before it
    ([(0, 0)], 8, 1),
    ([(0, 0), (0, 0), (0, 0), (0, 0)], 8, 1),             # one wave of 429s counts once
    ([(0, 0), (1, 0)], 4, 2),                            # a request sent after the cut cuts again
    ([(0, 0), (1, 0), (2, 0), (3, 0), (4, 0)], 1, 5),    # never below the minimum
    ([(None, 0), (None, 0.5)], 8, 1),                    # no permit: same wave within `window`
    ([(None, 0), (None, 1.5)], 4, 2),
])
async def test_overload_cuts_once_per_wave(clock: FakeClock, signals: list[tuple[int | None, float]],
                                          limit: float, cuts: int) -> None:
    limiter = AdaptiveConcurrency(16, minimum=1, clock=clock)
    for epoch, wait in signals:
        clock.advance(wait)
        permit = None if epoch is None else Permit(epoch, clock.now)
        limiter.on_overload(permit)
    assert (limiter.limit, limiter.cuts, limiter.overloads) == (limit, cuts, len(signals))


async def test_successes_grow_the_limit_by_one_per_round(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(4, minimum=1, maximum=6, clock=clock)
    limiter.on_overload()  # 4 -> 2
    history = []
    for _ in range(12):
        limiter.on_success()
        history.append(limiter.limit)
    # 2 successes -> 3, then 3 more -> 4, then 4 more -> 5, then capped by rounds still to come
    assert history == [2, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5]
    for _ in range(20):
        limiter.on_success()
    assert limiter.limit == 6  # the maximum
    assert [round(limit) for _, limit in limiter.trace] == [4, 2, 3, 4, 5, 6]


async def test_a_lower_limit_waits_for_in_flight_to_drain(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(4, clock=clock)
    permits = [await limiter.acquire() for _ in range(4)]
    limiter.on_overload(permits[0])  # 4 -> 2 with 4 in flight
    late = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    limiter.release()
    limiter.release()
    await asyncio.sleep(0)
    assert not late.done()  # 2 in flight == limit 2
    limiter.release()
    assert (await late).epoch == 1 and limiter.in_flight == 2


@pytest.mark.parametrize(("remaining_requests", "remaining_tokens", "per_request", "limit"), [
    (3, None, None, 3),          # the endpoint has room for 3 more: no point in 8 in flight
    (20, None, None, 8),         # plenty left: unchanged
    (0, None, None, 2),          # nothing left: the minimum
    (None, 1500, 500, 3),        # 1500 tokens left at ~500 per request
    (6, 1000, 500, 2),           # the tighter of the two
    (None, 1000, None, 8),       # tokens without a per-request estimate say nothing
])
def test_rate_limit_headers_lower_the_limit(clock: FakeClock, remaining_requests: int | None,
                                            remaining_tokens: int | None, per_request: float | None,
                                            limit: float) -> None:
    limiter = AdaptiveConcurrency(8, minimum=2, clock=clock)
    limiter.observe(RateLimitHeaders(remaining_requests=remaining_requests, remaining_tokens=remaining_tokens),
                    tokens_per_request=per_request)
    assert limiter.limit == limit


async def test_cancelled_waiter_does_not_leak_a_slot(clock: FakeClock) -> None:
    limiter = AdaptiveConcurrency(1, clock=clock)
    await limiter.acquire()
    waiter = asyncio.ensure_future(limiter.acquire())
    await asyncio.sleep(0)
    limiter.release()  # hands the slot to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert limiter.in_flight == 0 and limiter.waiting == 0


@pytest.mark.parametrize(("exc", "overload", "failure"), [
    (error_for_status(429, "slow down"), True, False),
    (error_for_status(503, "overloaded"), True, True),
    (error_for_status(529, "overloaded"), True, True),
    (error_for_status(500, "boom"), False, True),
    (error_for_status(502, "bad gateway"), False, True),
    (error_for_status(408, "timeout"), False, False),
    (error_for_status(400, "bad"), False, False),
    (error_for_status(401, "key"), False, False),
    (ConnectError("refused"), False, True),
    (EndpointTimeout("stalled", phase="idle"), False, True),
    (TruncatedStream("cut"), False, False),
    (ValueError("bug"), False, False),
])
def test_signal_classification(exc: BaseException, overload: bool, failure: bool) -> None:
    assert (is_overload(exc), is_endpoint_failure(exc)) == (overload, failure)


# --- circuit breaker --------------------------------------------------------------------------------

DOWN = ConnectError("cannot connect")


async def attempt(breaker: CircuitBreaker, exc: BaseException | None = None) -> Any:
    """One pass through the guard that ends with ``exc`` (or succeeds); returns the ticket."""
    try:
        async with breaker.guard() as ticket:
            if exc is not None:
                raise exc
    except BaseException as caught:
        if caught is not exc:
            raise
    return ticket


@pytest.mark.parametrize(("outcomes", "state"), [
    ([DOWN] * 9, BreakerState.CLOSED),                                  # below min_calls
    ([DOWN] * 10, BreakerState.OPEN),
    ([None] * 10 + [DOWN] * 9, BreakerState.CLOSED),                    # 9 of 19: under half
    ([None] * 10 + [DOWN] * 10, BreakerState.OPEN),                     # 10 of 20
    ([None] * 30 + [DOWN] * 10, BreakerState.OPEN),                     # only the last 20 count
    ([error_for_status(500, "x")] * 10, BreakerState.OPEN),
    ([EndpointTimeout("t", phase="first_byte")] * 10, BreakerState.OPEN),
    ([error_for_status(400, "bad")] * 20, BreakerState.CLOSED),          # the endpoint is up
    ([error_for_status(429, "slow")] * 20, BreakerState.CLOSED),
    ([ImageError("missing")] * 20, BreakerState.CLOSED),
    ([None] * 5 + [BudgetExceeded("stop", limit="max_requests")] * 20 + [DOWN] * 5, BreakerState.OPEN),  # neutral
])
async def test_breaker_trips_on_most_recent_endpoint_failures(clock: FakeClock, outcomes: list[Any],
                                                              state: BreakerState) -> None:
    breaker = CircuitBreaker(window=20, failure_ratio=0.5, min_calls=10, clock=clock, sleep=clock.sleep)
    for exc in outcomes:
        await attempt(breaker, exc)
    assert breaker.state is state


async def test_outage_flags_only_failures_the_breaker_recognised(clock: FakeClock) -> None:
    breaker = CircuitBreaker(window=4, min_calls=4, failure_ratio=1.0, clock=clock, sleep=clock.sleep)
    held = breaker.guard()  # an attempt that went out before the trip and fails during the outage
    late_ticket = await held.__aenter__()
    flags = [(await attempt(breaker, DOWN)).outage for _ in range(4)]
    assert flags == [False, False, False, True]  # the first three are charged to their rows
    assert await held.__aexit__(ConnectError, DOWN, None) is False  # not swallowed: the caller re-raises
    assert late_ticket.outage and breaker.state is BreakerState.OPEN


async def test_open_breaker_makes_callers_wait_then_one_probe_closes_it(clock: FakeClock) -> None:
    breaker = CircuitBreaker(window=2, min_calls=2, cooldown=5, clock=clock, sleep=clock.sleep)
    await attempt(breaker, DOWN)
    await attempt(breaker, DOWN)
    assert breaker.state is BreakerState.OPEN
    probe_may_finish = asyncio.Event()
    events: list[tuple[str, float, bool]] = []

    async def caller(name: str) -> None:
        async with breaker.guard() as ticket:
            events.append((name, clock.elapsed, ticket.probe))
            if ticket.probe:
                await probe_may_finish.wait()

    tasks = [asyncio.ensure_future(caller(name)) for name in "abcd"]
    for _ in range(5):
        await asyncio.sleep(0)
    assert events == [("a", 5.0, True)] and breaker.state is BreakerState.HALF_OPEN  # one probe only
    probe_may_finish.set()
    await asyncio.gather(*tasks)
    assert [name for name, *_ in events] == ["a", "b", "c", "d"]
    assert not any(probe for *_, probe in events[1:]) and breaker.state is BreakerState.CLOSED


async def test_failed_probes_back_off_and_are_absorbed(clock: FakeClock) -> None:
    breaker = CircuitBreaker(window=1, min_calls=1, cooldown=5, max_cooldown=12, backoff=2,
                             clock=clock, sleep=clock.sleep)
    await attempt(breaker, DOWN)
    probes = []
    for _ in range(4):
        ticket = await attempt(breaker, DOWN)
        probes.append((round(clock.elapsed, 6), ticket.probe, ticket.outage, breaker.cooldown))
    assert probes == [(5, True, True, 10), (15, True, True, 12), (27, True, True, 12), (39, True, True, 12)]
    ticket = await attempt(breaker)
    assert ticket.probe and breaker.state is BreakerState.CLOSED and breaker.cooldown == 5


async def test_cancelled_probe_hands_over_to_the_next_caller(clock: FakeClock) -> None:
    breaker = CircuitBreaker(window=1, min_calls=1, cooldown=5, clock=clock, sleep=clock.sleep)
    await attempt(breaker, DOWN)
    with pytest.raises(asyncio.CancelledError):
        async with breaker.guard() as ticket:
            assert ticket.probe
            raise asyncio.CancelledError
    assert breaker.state is BreakerState.OPEN
    assert (await attempt(breaker)).probe and breaker.state is BreakerState.CLOSED
    assert clock.elapsed == 5  # no second cooldown for a probe that never got a verdict


async def test_call_rides_out_an_outage_without_raising(clock: FakeClock) -> None:
    breaker = CircuitBreaker(window=1, min_calls=1, cooldown=5, max_cooldown=60, clock=clock, sleep=clock.sleep)
    sent: list[float] = []

    async def request() -> str:
        sent.append(clock.elapsed)
        if clock.elapsed < 30:  # the endpoint is down for 30 s
            raise ConnectError("connection refused")
        return "ok"

    assert await breaker.call(request) == "ok"
    assert rounded(sent) == [0, 5, 15, 35]  # cooldowns 5, 10, 20


async def test_call_reraises_failures_that_are_not_an_outage(clock: FakeClock) -> None:
    breaker = CircuitBreaker(clock=clock, sleep=clock.sleep)

    async def refused() -> None:
        raise ConnectError("once")

    async def bad() -> None:
        raise PermanentEndpointError("HTTP 400: no", status=400)

    with pytest.raises(ConnectError):
        await breaker.call(refused)  # one failure in a closed breaker: the row's own problem
    with pytest.raises(PermanentEndpointError):
        await breaker.call(bad)


async def test_breaker_gives_up_after_a_long_outage(clock: FakeClock) -> None:
    breaker = CircuitBreaker(window=1, min_calls=1, cooldown=5, backoff=1, give_up_after=20,
                             clock=clock, sleep=clock.sleep)

    async def down() -> None:
        raise ConnectError("connection refused")

    with pytest.raises(ConnectError):
        await breaker.call(down)
    assert breaker.gave_up and clock.elapsed == 20
    clock_before = clock.elapsed
    with pytest.raises(ConnectError):
        await breaker.call(down)  # no more waiting once given up
    assert clock.elapsed == clock_before
    await attempt(breaker)  # the endpoint answers again: back to normal
    assert breaker.state is BreakerState.CLOSED and not breaker.gave_up


async def test_custom_failure_predicate(clock: FakeClock) -> None:
    breaker = CircuitBreaker(window=2, min_calls=2, is_failure=lambda exc: isinstance(exc, TruncatedStream),
                             clock=clock, sleep=clock.sleep)
    await attempt(breaker, DOWN)
    await attempt(breaker, DOWN)
    assert breaker.state is BreakerState.CLOSED  # connection errors no longer count...
    await attempt(breaker, TruncatedStream("cut"))
    await attempt(breaker, TruncatedStream("cut"))
    assert breaker.state is BreakerState.OPEN  # ...truncations do


@pytest.mark.parametrize("kwargs", [{"window": 5, "min_calls": 6}, {"failure_ratio": 0},
                                    {"cooldown": 10, "max_cooldown": 5}, {"backoff": 0.5}])
def test_breaker_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(**kwargs)


# --- budgets ----------------------------------------------------------------------------------------

PRICES = {"gpt-4o": {"input": 2.5, "output": 10.0}, "gpt-4o-mini": (0.15, 0.6)}


@pytest.mark.parametrize(("guard_kwargs", "requests", "admitted", "limit"), [
    # requests: (estimated prompt, estimated completion, actual prompt, actual completion)
    ({"max_requests": 2}, [(0, 0, 0, 0)] * 3, 2, "max_requests"),
    ({"max_total_tokens": 1000}, [(400, 100, 400, 100)] * 3, 2, "max_total_tokens"),
    ({"max_total_tokens": 1000}, [(400, 100, 100, 50)] * 6, 4, "max_total_tokens"),  # usage frees room
    ({"max_cost": 0.01, "prices": PRICES}, [(1000, 100, 1000, 100)] * 3, 2, "max_cost"),  # 0.0035 each
    ({"max_requests": 5, "max_total_tokens": 10**6}, [(10, 10, 10, 10)] * 5, 5, None),
])
def test_budget_stops_before_a_request_that_would_pass_it(guard_kwargs: dict[str, Any],
                                                          requests: list[tuple[int, int, int, int]],
                                                          admitted: int, limit: str | None) -> None:
    budget = BudgetGuard(**guard_kwargs, default_model="gpt-4o")
    sent = 0
    with pytest.raises(BudgetExceeded) if limit else _no_raise() as caught:
        for est_prompt, est_completion, prompt, completion in requests:
            ticket = budget.check_before_request(est_prompt, est_completion)
            sent += 1
            budget.record(prompt, completion, ticket=ticket)
    assert sent == admitted and budget.spent.requests == admitted
    if limit:
        assert caught.value.limit == limit and caught.value.error_type == "budget_exceeded"
        assert budget.exceeded is caught.value and not caught.value.retryable


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_in_flight_estimates_count_toward_the_budget() -> None:
    budget = BudgetGuard(max_total_tokens=1000)
    tickets = [budget.check_before_request(300, 100) for _ in range(2)]  # 800 pending, nothing recorded
    with pytest.raises(BudgetExceeded, match="800 in flight"):
        budget.check_before_request(300, 100)
    budget.release(tickets[0])
    budget.release(tickets[0])  # idempotent
    budget.check_before_request(300, 100)
    assert budget.pending_tokens == 800


def test_budget_context_manager_releases_on_failure() -> None:
    budget = BudgetGuard(max_total_tokens=500)
    with pytest.raises(ConnectError), budget.request(TokenEstimate(300, 300, 100)):
        raise ConnectError("down")
    assert budget.pending_tokens == 0 and budget.spent.requests == 1
    with budget.request(TokenEstimate(300, 300, 100), model="gpt-4o") as spend:
        spend.record(250, 40)
    assert budget.spent.total_tokens == 290 and budget.pending_tokens == 0


@pytest.mark.parametrize(("model", "price"), [
    ("gpt-4o", ModelPrice(2.5, 10.0)),
    ("gpt-4o-2024-08-06", ModelPrice(2.5, 10.0)),        # longest configured prefix
    ("gpt-4o-mini-2024-07-18", ModelPrice(0.15, 0.6)),   # ...which is the mini one here
    ("llava:7b", ModelPrice(2.5, 10.0)),                 # unknown: the configured model's price
    (None, ModelPrice(2.5, 10.0)),
])
def test_price_lookup(model: str | None, price: ModelPrice) -> None:
    budget = BudgetGuard(max_cost=1.0, prices=PRICES, default_model="gpt-4o")
    assert budget.price_for(model) == price


def test_cost_accounting_and_missing_price() -> None:
    budget = BudgetGuard(max_cost=1.0, prices=PRICES, default_model="gpt-4o")
    budget.record(1_000_000, 100_000, "gpt-4o-mini")
    assert budget.spent.cost == pytest.approx(0.15 + 0.06)
    with pytest.raises(ConfigError, match="no price for model 'llava'"):
        BudgetGuard(max_cost=1.0, prices=PRICES, default_model="llava")


# --- over real HTTP ---------------------------------------------------------------------------------


def image_body(text: str = "Describe the image.", size: tuple[int, int] = (64, 48)) -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 160, 60)).save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"model": "test-model", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "text", "text": text},
                                                      {"type": "image_url", "image_url": {"url": uri}}]}]}


def client_for(endpoint: LocalEndpoint) -> ChatClient:
    config = EndpointConfig(base_url=endpoint.base_url,
                            timeout={"connect": 5, "first_byte": 5, "idle": 5, "total": 20})
    return ChatClient(config)


async def test_rate_limiter_keeps_an_rpm_limited_endpoint_free_of_429s() -> None:
    """Client and endpoint share a fake clock, and fake time stands still while a request is on its way
    (zero network latency in fake time), so the endpoint sees exactly the limiter's pacing."""
    clock = FakeClock()
    plan = FaultPlan(["rpm_limit:rpm=600,burst=3"], clock=clock)
    body = image_body()
    async with LocalEndpoint(plan) as endpoint, client_for(endpoint) as client:
        sent: list[float] = []

        async def sleep_after_arrivals(seconds: float) -> None:
            await endpoint.stats.wait_until(lambda s: sum(s.responses_by_status.values()) >= len(sent), 5)
            await clock.sleep(seconds)

        limiter = RateLimiter(requests_per_minute=600, clock=clock, sleep=sleep_after_arrivals)

        async def worker() -> None:
            for _ in range(5):
                async with limiter.reserve():
                    sent.append(clock.now)
                    await client.stream_chat(body)

        async with asyncio.TaskGroup() as group:
            for _ in range(8):
                group.create_task(worker())
        stats = endpoint.stats.snapshot()
        assert stats["responses_by_status"] == {"200": 40}
        assert (len(sent) - 1) / (max(sent) - min(sent)) * 60 == pytest.approx(600, rel=0.05)

        # baseline, same endpoint and clock: without the limiter the bucket runs dry at once
        clock.advance(60)
        results = await asyncio.gather(*(client.stream_chat(body) for _ in range(8)), return_exceptions=True)
        assert sum(isinstance(r, RateLimited) for r in results) == 5


async def test_adaptive_concurrency_backs_off_an_undisclosed_concurrency_limit() -> None:
    plan = FaultPlan(["concurrency_limit:max=3"], chunk_delay=0.002)
    body = image_body()
    async with LocalEndpoint(plan) as endpoint, client_for(endpoint) as client:
        limiter = AdaptiveConcurrency(12, minimum=1)
        done = 0

        async def worker() -> None:
            nonlocal done
            for _ in range(4):
                while True:
                    async with limiter as permit:
                        try:
                            await client.stream_chat(body)
                        except RateLimited:
                            limiter.on_overload(permit)
                            continue
                        limiter.on_success()
                        done += 1
                        break
                    await asyncio.sleep(0.01)

        async with asyncio.TaskGroup() as group:
            for _ in range(12):
                group.create_task(worker())
        assert done == 48 and limiter.cuts >= 1 and min(limit for _, limit in limiter.trace) <= 3
        assert endpoint.stats.snapshot()["faults_injected"]["concurrency_limit"] == limiter.overloads


async def test_breaker_rides_out_a_down_endpoint_without_failing_rows() -> None:
    """Rows with 2 attempts each survive a 30 s (fake) outage: the breaker absorbs the outage failures."""
    clock = FakeClock()
    plan = FaultPlan(clock=clock)
    body = image_body()
    async with LocalEndpoint(plan) as endpoint, client_for(endpoint) as client:
        breaker = CircuitBreaker(window=4, min_calls=2, cooldown=5, clock=clock, sleep=clock.sleep)
        plan.add("down:seconds=30")
        attempts_charged: list[int] = []

        async def row() -> None:
            charged = 0
            while True:
                try:
                    async with breaker.guard() as ticket:
                        await client.stream_chat(body)
                    break
                except ServerError:
                    if not ticket.outage:
                        charged += 1
                        assert charged < 2, "row would have failed"
            attempts_charged.append(charged)

        async with asyncio.TaskGroup() as group:
            for _ in range(6):
                group.create_task(row())
        stats = endpoint.stats.snapshot()
        assert len(attempts_charged) == 6 and stats["streams_completed"] == 6
        assert breaker.trips >= 1 and breaker.state is BreakerState.CLOSED and clock.elapsed >= 30
        assert stats["faults_injected"]["down"] < 6 * 2  # probes, not every row, met the outage


def test_auth_errors_are_not_outages() -> None:
    assert not is_endpoint_failure(AuthError("HTTP 401: no", status=401))
