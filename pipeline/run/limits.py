"""Limits that keep the endpoint as busy as it allows and no busier: rates, concurrency, outages, budgets.

Four independent pieces, each an ``async with`` (or a plain call) the runner puts around one attempt.
Every one takes an injectable ``clock`` (and ``sleep`` where it waits), so its tests run on a fake clock.

* :class:`RateLimiter` (two :class:`TokenBucket` s): ``requests_per_minute`` / ``tokens_per_minute`` are
  paid *before* a request is sent, with the estimate from ``tokens.py``; the real ``usage`` settles the
  difference afterwards. Requests are spaced evenly by default (bucket capacity 1): providers enforce
  per-minute limits over shorter slices, so a minute's worth in one burst is a 429 even under the limit.
* :class:`AdaptiveConcurrency`: AIMD on the in-flight limit. A 429/503 halves it (once per wave: answers
  to requests sent before the last cut do not cut again); ``limit`` successes in a row add one. Headers
  ``x-ratelimit-remaining-*`` can lower it further. Endpoints without such headers (vLLM, Ollama) are
  steered by the 429 signal alone.
* :class:`CircuitBreaker`: when most recent attempts fail with connection errors, timeouts or 5xx, it
  opens; callers then *wait* (they are not failed) until a cooldown passes, one probe goes through, and its
  success lets everybody go again. Failures that belong to the outage are flagged so the runner does not
  charge them to the row's retry budget.
* :class:`BudgetGuard`: ``max_requests`` / ``max_total_tokens`` / ``max_cost`` raise
  :class:`~pipeline.core.errors.BudgetExceeded` *before* a request that would pass them.

Intended runner wiring, per row (``estimator``, ``limiter``, ``concurrency``, ``breaker``, ``budget`` are
shared by all workers; ``image_sizes`` = the payload's ``(sent_width, sent_height)``)::

    estimate = estimator.estimate(body, image_sizes)                 # tokens.TokenEstimator
    async for attempt in retry_policy(run, max_server_wait=limits.max_retry_wait):
        with attempt:
            while True:                                              # outage failures use no attempt
                try:
                    async with breaker.guard() as ticket:            # waits while open; never raises
                        async with concurrency as permit:            # AdaptiveConcurrency slot
                            with budget.request(estimate) as spend:  # BudgetExceeded: stop the run
                                async with limiter.reserve(estimate.total) as reservation:
                                    requests_sent += 1
                                    try:
                                        outcome = await client.stream_chat(body)
                                    except PipelineError as exc:
                                        if is_overload(exc):         # 429 / 503 / 529
                                            concurrency.on_overload(permit)
                                        raise
                                    usage = outcome.completion.usage  # None without include_usage
                                    reservation.settle(usage.total_tokens if usage else None)
                                    if usage:
                                        spend.record(usage.prompt_tokens, usage.completion_tokens,
                                                     outcome.completion.model)
                                        estimator.observe(estimate, usage.prompt_tokens,
                                                          usage.completion_tokens, n_choices)
                                    concurrency.on_success()
                                    concurrency.observe(outcome.rate_limits)  # needs client support
                    break
                except PipelineError:
                    if ticket.outage:
                        continue        # the breaker absorbed it; guard() waits out the outage
                    raise               # tenacity decides: retry (charged) or fail the row

The breaker is outermost so a worker waiting out an outage holds no concurrency slot and no tokens; the
rate limiter is innermost so its tokens are taken right before the request leaves. tenacity's
``attempt_number`` then counts charged attempts only; ``requests_sent`` counts every request.
``BudgetExceeded`` is not retryable: the runner stops taking new rows and leaves the rest to do.
``CircuitBreaker.call`` packages the ``while True`` loop for a single callable.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import TypeVar

from pipeline.core.errors import (
    BudgetExceeded,
    ConfigError,
    ConnectError,
    EndpointError,
    EndpointTimeout,
    PipelineError,
    RateLimited,
    ServerError,
    StreamError,
)
from pipeline.core.ratelimit import RateLimitHeaders
from pipeline.core.tokens import TokenEstimate

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
T = TypeVar("T")

#: Statuses that mean "too much load": they shrink the concurrency limit (529: Anthropic's "overloaded").
OVERLOAD_STATUSES = frozenset({429, 503, 529})
_EPS = 1e-9


def is_overload(exc: BaseException) -> bool:
    """A 429, 503 or 529 answer: the endpoint is asking for less load."""
    return isinstance(exc, RateLimited) or (
        isinstance(exc, ServerError) and getattr(exc, "status", None) in OVERLOAD_STATUSES)


def is_endpoint_failure(exc: BaseException) -> bool:
    """What the circuit breaker counts: cannot connect, timed out, or an HTTP 5xx."""
    if isinstance(exc, (ConnectError, EndpointTimeout)):
        return True
    status = getattr(exc, "status", None)
    return isinstance(exc, ServerError) and status is not None and status >= 500


# --- token bucket -----------------------------------------------------------------------------------


class TokenBucket:
    """A token bucket refilled at ``rate_per_minute``; ``acquire`` waits, first come first served.

    ``capacity`` (default 1) bounds the burst after idle time. An ``acquire`` larger than the capacity is
    granted once the bucket is full and leaves it in debt, so big requests still pass at the right
    average rate instead of waiting forever. A waiter that wakes late is charged as of the moment its
    tokens became available, so scheduler lag does not slow the achieved rate below the limit.
    ``refund``/``debit`` correct a charge once the real cost is known.
    """

    def __init__(self, rate_per_minute: float, capacity: float | None = None, *,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        if not rate_per_minute > 0:
            raise ValueError(f"rate_per_minute must be > 0, got {rate_per_minute}")
        self.rate_per_minute = float(rate_per_minute)
        self.rate = self.rate_per_minute / 60.0  # per second
        self.capacity = float(capacity) if capacity is not None else 1.0
        if not self.capacity > 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self._clock = clock
        self._sleep = sleep
        self._level = self.capacity
        self._stamp = clock()
        self._queue: deque[asyncio.Future[None]] = deque()

    def _advance(self, now: float) -> None:
        if now > self._stamp:
            self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
            self._stamp = now

    @property
    def available(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._advance(self._clock())
        return self._level

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def try_acquire(self, amount: float = 1.0) -> bool:
        """Take ``amount`` now if nobody is queued and it is available; never waits."""
        need = min(amount, self.capacity)
        self._advance(self._clock())
        if self._queue or self._level < need - _EPS:
            return False
        self._level -= amount
        return True

    async def acquire(self, amount: float = 1.0) -> None:
        """Wait until ``amount`` tokens (at most ``capacity`` of them) are there, then take them."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        if self.try_acquire(amount):
            return
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(ticket)
        try:
            if self._queue[0] is not ticket:
                await ticket  # resolved when the ticket ahead leaves the queue
            await self._wait_as_head(amount)
        finally:
            self._queue.remove(ticket)
            if self._queue and not self._queue[0].done():
                self._queue[0].set_result(None)

    async def _wait_as_head(self, amount: float) -> None:
        need = min(amount, self.capacity)
        since = self._clock()
        while True:
            now = self._clock()
            self._advance(now)
            if self._level >= need - _EPS:
                self._level -= amount
                return
            due = self._stamp + (need - self._level) / self.rate
            await self._sleep(max(0.0, due - now))
            woke = self._clock()
            # Granted as of the instant the tokens were there (not when this task got to run again),
            # but never earlier than the moment this waiter started waiting.
            due = self._stamp + (need - self._level) / self.rate
            if due <= woke + _EPS:
                grant = max(due, since, self._stamp)
                self._advance(grant)
                self._level -= amount
                return

    def refund(self, amount: float) -> None:
        """Give back tokens charged but not used (up to the capacity)."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        self._advance(self._clock())
        self._level = min(self.capacity, self._level + amount)

    def debit(self, amount: float) -> None:
        """Charge tokens used beyond what was acquired; the bucket may go into debt."""
        if amount < 0:
            raise ValueError(f"amount must be >= 0, got {amount}")
        self._advance(self._clock())
        self._level -= amount


@dataclass
class Reservation:
    """What one request paid the token bucket; ``settle`` corrects it to the real usage."""

    estimated_tokens: int
    _tokens: TokenBucket | None = field(repr=False, default=None)
    settled_tokens: int | None = None

    def settle(self, actual_tokens: int | None) -> None:
        """Refund or debit the difference to the real usage (``None``: keep the estimate). Once only."""
        if self.settled_tokens is not None:
            raise RuntimeError("reservation already settled")
        actual = self.estimated_tokens if actual_tokens is None else max(0, int(actual_tokens))
        self.settled_tokens = actual
        if self._tokens is None:
            return
        difference = actual - self.estimated_tokens
        if difference < 0:
            self._tokens.refund(-difference)
        elif difference > 0:
            self._tokens.debit(difference)


class RateLimiter:
    """``requests_per_minute`` and ``tokens_per_minute`` buckets; either may be ``None`` (no limit).

    Tokens are taken first and the request slot last, so the request is timed by the request bucket as
    closely as possible to when it really leaves. A reservation that is never settled (the attempt
    failed) keeps its estimate: providers count failed requests against the limits too.
    """

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None, *,
                 request_capacity: float | None = None, token_capacity: float | None = None,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        self.requests = (TokenBucket(requests_per_minute, request_capacity, clock=clock, sleep=sleep)
                         if requests_per_minute else None)
        # Token budgets are spent in big lumps (one request = hundreds of tokens): allow one second's
        # worth, so a typical request is not forced into debt; smaller than that would not smooth more.
        if tokens_per_minute and token_capacity is None:
            token_capacity = max(1.0, tokens_per_minute / 60.0)
        self.tokens = (TokenBucket(tokens_per_minute, token_capacity, clock=clock, sleep=sleep)
                       if tokens_per_minute else None)

    @property
    def enabled(self) -> bool:
        return self.requests is not None or self.tokens is not None

    @asynccontextmanager
    async def reserve(self, estimated_tokens: int = 0) -> AsyncIterator[Reservation]:
        """Wait for room for one request of ``estimated_tokens``; yield the reservation to settle."""
        if self.tokens is not None:
            await self.tokens.acquire(estimated_tokens)
        if self.requests is not None:
            await self.requests.acquire(1)
        yield Reservation(estimated_tokens, self.tokens)


# --- adaptive concurrency ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Permit:
    """One admitted attempt: when, and under which cut of the limit (``epoch``)."""

    epoch: int
    admitted_at: float


class AdaptiveConcurrency:
    """An in-flight limit that shrinks on overload and grows back while requests succeed (AIMD).

    * ``on_overload(permit)``: ``limit *= decrease`` (not below ``minimum``), once per wave: a permit
      admitted before the last cut belongs to the wave that was already answered, so it is ignored.
      Without a permit, signals within ``window`` seconds of the last cut count as the same wave.
    * ``on_success()``: after ``floor(limit)`` successes in a row (one round of the window), ``limit +=
      increase`` (not above ``maximum``). Growth per round, not per request, is what keeps it additive.
    * ``observe_headers(...)``: when ``x-ratelimit-remaining-*`` says fewer requests are left than the
      limit allows in flight, the limit drops to what is left.

    Admission is first come first served; a lowered limit lets in-flight attempts finish and admits no
    new one until fewer than ``floor(limit)`` are in flight. ``trace`` holds (time, limit) at each change
    of the effective limit (bounded by ``trace_size``).
    """

    def __init__(self, initial: int, minimum: int = 1, maximum: int | None = None, *,
                 increase: float = 1.0, decrease: float = 0.5, window: float = 1.0,
                 clock: Clock = time.monotonic, trace_size: int = 10_000) -> None:
        maximum = initial if maximum is None else maximum
        if not 1 <= minimum <= maximum:
            raise ValueError(f"need 1 <= minimum <= maximum, got {minimum}, {maximum}")
        if not 0 < decrease < 1 or increase <= 0:
            raise ValueError("need 0 < decrease < 1 and increase > 0")
        self.minimum = minimum
        self.maximum = maximum
        self.increase = increase
        self.decrease = decrease
        self.window = window
        self._clock = clock
        self._limit = float(min(max(initial, minimum), maximum))
        self._in_flight = 0
        self._epoch = 0
        self._last_cut: float | None = None
        self._successes = 0
        self._waiters: deque[asyncio.Future[Permit]] = deque()
        self.overloads = 0  # signals received
        self.cuts = 0  # signals that cut the limit
        self.trace: deque[tuple[float, float]] = deque(maxlen=trace_size)
        self.trace.append((clock(), self._limit))

    @property
    def limit(self) -> float:
        """The current limit (fractional; ``floor`` of it is admitted)."""
        return self._limit

    @property
    def effective_limit(self) -> int:
        return max(self.minimum, math.floor(self._limit + _EPS))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _set_limit(self, value: float) -> None:
        before = self.effective_limit
        self._limit = min(float(self.maximum), max(float(self.minimum), value))
        if self.effective_limit != before:
            self.trace.append((self._clock(), self._limit))
        self._wake()

    def _permit(self) -> Permit:
        return Permit(self._epoch, self._clock())

    async def acquire(self) -> Permit:
        if not self._waiters and self._in_flight < self.effective_limit:
            self._in_flight += 1
            return self._permit()
        waiter: asyncio.Future[Permit] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # admitted, then cancelled before running
                self.release()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def release(self) -> None:
        self._in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._in_flight < self.effective_limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._in_flight += 1
                waiter.set_result(self._permit())

    async def __aenter__(self) -> Permit:
        return await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()

    def on_success(self) -> None:
        """One attempt got a full answer: count toward the next additive step."""
        self._successes += 1
        if self._successes >= self.effective_limit:
            self._successes = 0
            if self._limit < self.maximum:
                self._set_limit(self._limit + self.increase)

    def on_overload(self, permit: Permit | None = None) -> bool:
        """A 429/503: cut the limit unless this wave was already answered. True if it cut."""
        self.overloads += 1
        now = self._clock()
        if permit is not None:
            if permit.epoch < self._epoch:
                return False
        elif self._last_cut is not None and now - self._last_cut < self.window:
            return False
        self._epoch += 1
        self._last_cut = now
        self._successes = 0
        self.cuts += 1
        self._set_limit(self._limit * self.decrease)
        return True

    def observe_headers(self, remaining_requests: int | None = None, remaining_tokens: int | None = None,
                        *, tokens_per_request: float | None = None) -> bool:
        """Lower the limit to what the endpoint says is left (requests, or tokens / tokens_per_request)."""
        ceilings: list[float] = []
        if remaining_requests is not None:
            ceilings.append(float(remaining_requests))
        if remaining_tokens is not None and tokens_per_request:
            ceilings.append(remaining_tokens / tokens_per_request)
        if not ceilings or min(ceilings) >= self._limit:
            return False
        self._successes = 0
        self._set_limit(min(ceilings))
        return True

    def observe(self, headers: RateLimitHeaders, *, tokens_per_request: float | None = None) -> bool:
        """:meth:`observe_headers` from a parsed :class:`~pipeline.run.retry.RateLimitHeaders`."""
        return self.observe_headers(headers.remaining_requests, headers.remaining_tokens,
                                    tokens_per_request=tokens_per_request)


# --- circuit breaker --------------------------------------------------------------------------------


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass
class BreakerTicket:
    """One pass through :meth:`CircuitBreaker.guard`.

    ``probe``: this attempt is the single half-open probe. ``waited``: seconds spent waiting for the
    breaker before the attempt went out. ``outage`` (set when the guard exits with a failure): the
    failure belongs to an outage the breaker has recognised (it tripped the breaker, arrived while it was
    open, or was a failed probe), so the runner should retry without charging the row's budget.
    """

    probe: bool = False
    waited: float = 0.0
    outage: bool = False


class CircuitBreaker:
    """Closed -> open when most recent attempts fail at the endpoint; open -> one probe -> closed.

    Counts the last ``window`` outcomes while closed; at least ``min_calls`` of them with a failure share
    of ``failure_ratio`` or more opens it. Open: callers wait ``cooldown`` seconds, then one of them
    probes (half-open) while the others keep waiting. The probe's success closes the breaker; its failure
    reopens it with the cooldown multiplied by ``backoff`` (capped at ``max_cooldown``).

    Only :func:`is_endpoint_failure` errors count as failures (pass ``is_failure`` to change that); any
    other answer from the endpoint, a 400 or a 429 included, shows it is up. Errors that are not the
    endpoint's answer (cancellation, ``BudgetExceeded``, an ``ImageError``, a bug) count as nothing.

    ``give_up_after`` (seconds, ``None`` = never): an outage longer than this stops being absorbed; the
    guard lets everything through and failures count against rows again, so a dead endpoint ends the
    run with failed (resumable) rows instead of hanging it.
    """

    def __init__(self, window: int = 20, failure_ratio: float = 0.5, min_calls: int = 10,
                 cooldown: float = 5.0, max_cooldown: float = 60.0, backoff: float = 2.0,
                 give_up_after: float | None = None, *,
                 is_failure: Callable[[BaseException], bool] = is_endpoint_failure,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep) -> None:
        if not 1 <= min_calls <= window:
            raise ValueError(f"need 1 <= min_calls <= window, got {min_calls}, {window}")
        if not 0 < failure_ratio <= 1:
            raise ValueError(f"failure_ratio must be in (0, 1], got {failure_ratio}")
        if not 0 < cooldown <= max_cooldown or backoff < 1:
            raise ValueError("need 0 < cooldown <= max_cooldown and backoff >= 1")
        self.window = window
        self.failure_ratio = failure_ratio
        self.min_calls = min_calls
        self.base_cooldown = cooldown
        self.max_cooldown = max_cooldown
        self.backoff = backoff
        self.give_up_after = give_up_after
        self._is_failure = is_failure
        self._clock = clock
        self._sleep = sleep
        self._state = BreakerState.CLOSED
        self._outcomes: deque[bool] = deque(maxlen=window)  # True = failure
        self._cooldown = cooldown
        self._opened_at = 0.0
        self._unhealthy_since: float | None = None
        self._probing = False
        self._changed = asyncio.Event()
        self.trips = 0
        self.transitions: deque[tuple[float, BreakerState]] = deque(maxlen=1000)

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def cooldown(self) -> float:
        """The cooldown the current (or next) open period uses."""
        return self._cooldown

    @property
    def gave_up(self) -> bool:
        """The outage has lasted longer than ``give_up_after``: failures count against rows again."""
        return (self.give_up_after is not None and self._unhealthy_since is not None
                and self._clock() - self._unhealthy_since >= self.give_up_after)

    def _move(self, state: BreakerState) -> None:
        self._state = state
        self.transitions.append((self._clock(), state))
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _trip(self, *, again: bool) -> None:
        now = self._clock()
        if again:
            self._cooldown = min(self.max_cooldown, self._cooldown * self.backoff)
        if self._unhealthy_since is None:
            self._unhealthy_since = now
        self._opened_at = now
        self.trips += 1
        self._move(BreakerState.OPEN)

    def _close(self) -> None:
        self._outcomes.clear()
        self._cooldown = self.base_cooldown
        self._unhealthy_since = None
        self._move(BreakerState.CLOSED)

    async def enter(self) -> BreakerTicket:
        """Wait while the breaker is open (never raises for that); the ticket goes back to :meth:`exit`."""
        start = self._clock()
        while True:
            if self._state is BreakerState.CLOSED or self.gave_up:
                return BreakerTicket(waited=self._clock() - start)
            if self._state is BreakerState.OPEN:
                remaining = self._opened_at + self._cooldown - self._clock()
                if remaining > 0:
                    await self._sleep(remaining)
                    continue
                if not self._probing:
                    self._probing = True
                    self._move(BreakerState.HALF_OPEN)
                    return BreakerTicket(probe=True, waited=self._clock() - start)
            await self._changed.wait()  # half-open: wait for the probe's verdict

    def exit(self, ticket: BreakerTicket, exc: BaseException | None) -> None:
        """Record how the attempt of ``ticket`` ended (``exc`` None: an answer)."""
        failure = exc is not None and self._is_failure(exc)
        # Cancelled, interrupted, or not the endpoint's answer (budget stop, bad image, a bug): no verdict.
        neutral = exc is not None and not failure and not isinstance(exc, (EndpointError, StreamError))
        if ticket.probe:
            self._probing = False
            if neutral:  # let the next waiter probe at once
                self._move(BreakerState.OPEN)
            elif failure:
                ticket.outage = not self.gave_up
                self._trip(again=True)
            else:
                self._close()
            return
        if neutral:
            return
        if self._state is not BreakerState.CLOSED:
            if failure:
                ticket.outage = not self.gave_up
            elif self.gave_up:
                self._close()  # a pass-through attempt got an answer: the endpoint is back
            return
        self._outcomes.append(failure)
        failures = sum(self._outcomes)
        if failure and len(self._outcomes) >= self.min_calls and failures >= self.failure_ratio * len(self._outcomes):
            ticket.outage = True
            self._trip(again=False)

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[BreakerTicket]:
        """Wait while the breaker is open (never raises for that), then run the attempt and record it."""
        ticket = await self.enter()
        try:
            yield ticket
        except BaseException as exc:
            self.exit(ticket, exc)
            raise
        self.exit(ticket, None)

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt()`` under :meth:`guard`, repeating it while its failures belong to an outage."""
        while True:
            try:
                async with self.guard() as ticket:
                    return await attempt()
            except PipelineError:
                if not ticket.outage:
                    raise
            # absorbed by the breaker: go round, and guard() waits out the open period


# --- budgets ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """US dollars (or any currency) per one million tokens."""

    input: float
    output: float

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


@dataclass(frozen=True, slots=True)
class Spent:
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class BudgetTicket:
    """One admitted request's estimate, held as pending until recorded or released."""

    prompt_tokens: int
    completion_tokens: int
    model: str | None
    open: bool = True


class _Spend:
    """Handed out by :meth:`BudgetGuard.request`: ``record`` the usage of the request it admitted."""

    def __init__(self, guard: BudgetGuard, ticket: BudgetTicket) -> None:
        self._guard = guard
        self.ticket = ticket

    def record(self, prompt_tokens: int | None, completion_tokens: int | None, model: str | None = None) -> None:
        self._guard.record(prompt_tokens or 0, completion_tokens or 0, model or self.ticket.model,
                           ticket=self.ticket)


PriceLike = ModelPrice | tuple[float, float] | Mapping[str, float]


def _as_price(value: PriceLike) -> ModelPrice:
    if isinstance(value, ModelPrice):
        return value
    if isinstance(value, Mapping):
        return ModelPrice(float(value["input"]), float(value["output"]))
    return ModelPrice(float(value[0]), float(value[1]))


class BudgetGuard:
    """Stops the run before a request would pass ``max_requests``, ``max_total_tokens`` or ``max_cost``.

    The check counts what was spent *plus* the estimates of requests still in flight, so N concurrent
    workers cannot all slip under the limit at once. Prices are per 1M tokens, looked up by the model the
    endpoint reports: exact name, else the longest configured prefix (``gpt-4o`` prices
    ``gpt-4o-2024-08-06``), else ``default_model``'s price. With ``max_cost`` set and no price for
    ``default_model``, construction fails with a ConfigError: a cost limit that cannot be computed is a
    config mistake, not something to find out after the bill.
    """

    def __init__(self, max_requests: int | None = None, max_total_tokens: int | None = None,
                 max_cost: float | None = None, prices: Mapping[str, PriceLike] | None = None, *,
                 default_model: str | None = None) -> None:
        self.max_requests = max_requests
        self.max_total_tokens = max_total_tokens
        self.max_cost = max_cost
        self.prices = {name: _as_price(price) for name, price in (prices or {}).items()}
        self.default_model = default_model
        if max_cost is not None and self.price_for(default_model) is None:
            raise ConfigError(f"limits.max_cost is set but limits.prices has no price for model "
                              f"{default_model!r}; add {{input: ..., output: ...}} per 1M tokens")
        self._requests = 0
        self._prompt = 0
        self._completion = 0
        self._cost = 0.0
        self._pending: list[BudgetTicket] = []
        self.exceeded: BudgetExceeded | None = None

    @property
    def enabled(self) -> bool:
        return self.max_requests is not None or self.max_total_tokens is not None or self.max_cost is not None

    def price_for(self, model: str | None) -> ModelPrice | None:
        if model is not None:
            if model in self.prices:
                return self.prices[model]
            prefixes = [name for name in self.prices if model.startswith(name)]
            if prefixes:
                return self.prices[max(prefixes, key=len)]
        if self.default_model is not None and model != self.default_model:
            return self.price_for(self.default_model)
        return None

    def _cost_of(self, prompt_tokens: int, completion_tokens: int, model: str | None) -> float:
        price = self.price_for(model)
        return price.cost(prompt_tokens, completion_tokens) if price else 0.0

    @property
    def spent(self) -> Spent:
        return Spent(self._requests, self._prompt, self._completion, self._cost)

    @property
    def pending_tokens(self) -> int:
        return sum(t.prompt_tokens + t.completion_tokens for t in self._pending)

    def _refuse(self, limit: str, message: str) -> BudgetExceeded:
        self.exceeded = BudgetExceeded(f"budget reached: {message}; stopping (rows not sent stay to do)",
                                       limit=limit)
        return self.exceeded

    def check_before_request(self, prompt_tokens: int = 0, completion_tokens: int = 0,
                             model: str | None = None) -> BudgetTicket:
        """Admit one request with these estimates, or raise :class:`BudgetExceeded`.

        Call once per request about to be sent; it counts the request and holds the estimate as
        pending until :meth:`record` or :meth:`release` gets the returned ticket.
        """
        model = model or self.default_model
        if self.max_requests is not None and self._requests + 1 > self.max_requests:
            raise self._refuse("max_requests", f"max_requests={self.max_requests} requests sent")
        if self.max_total_tokens is not None:
            committed = self._prompt + self._completion + self.pending_tokens
            if committed + prompt_tokens + completion_tokens > self.max_total_tokens:
                raise self._refuse("max_total_tokens", (
                    f"max_total_tokens={self.max_total_tokens}: {self._prompt + self._completion} used, "
                    f"{self.pending_tokens} in flight, next request estimated at "
                    f"{prompt_tokens + completion_tokens}"))
        if self.max_cost is not None:
            pending = sum(self._cost_of(t.prompt_tokens, t.completion_tokens, t.model) for t in self._pending)
            next_cost = self._cost_of(prompt_tokens, completion_tokens, model)
            if self._cost + pending + next_cost > self.max_cost:
                raise self._refuse("max_cost", (
                    f"max_cost={self.max_cost:g}: {self._cost:.4f} spent, {pending:.4f} in flight, "
                    f"next request estimated at {next_cost:.4f}"))
        self._requests += 1
        ticket = BudgetTicket(prompt_tokens, completion_tokens, model)
        self._pending.append(ticket)
        return ticket

    def release(self, ticket: BudgetTicket) -> None:
        """Drop a ticket's pending estimate (its request failed without reporting usage)."""
        if ticket.open:
            ticket.open = False
            self._pending.remove(ticket)

    def record(self, prompt_tokens: int, completion_tokens: int, model: str | None = None, *,
               ticket: BudgetTicket | None = None) -> None:
        """Add a request's real usage (and release its ticket's estimate)."""
        if ticket is not None:
            self.release(ticket)
            model = model or ticket.model
        model = model or self.default_model
        self._prompt += max(0, prompt_tokens)
        self._completion += max(0, completion_tokens)
        self._cost += self._cost_of(max(0, prompt_tokens), max(0, completion_tokens), model)

    @contextmanager
    def request(self, estimate: TokenEstimate | None = None, model: str | None = None) -> Iterator[_Spend]:
        """``check_before_request`` on entry (may raise), ``release`` on exit unless usage was recorded."""
        ticket = self.check_before_request(estimate.prompt if estimate else 0,
                                           estimate.completion if estimate else 0, model)
        try:
            yield _Spend(self, ticket)
        finally:
            self.release(ticket)
