"""Requests and tokens per minute: token buckets paid *before* a request is sent, settled after.

Requests are spaced evenly by default (bucket capacity 1): providers enforce per-minute limits over
shorter slices, so a minute's worth in one burst is a 429 even under the limit.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from pipeline.run.limits.clock import EPS, Clock, Sleep


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
        if self._queue or self._level < need - EPS:
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
            if self._level >= need - EPS:
                self._level -= amount
                return
            due = self._stamp + (need - self._level) / self.rate
            await self._sleep(max(0.0, due - now))
            woke = self._clock()
            # Granted as of the instant the tokens were there (not when this task got to run again),
            # but never earlier than the moment this waiter started waiting.
            due = self._stamp + (need - self._level) / self.rate
            if due <= woke + EPS:
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
