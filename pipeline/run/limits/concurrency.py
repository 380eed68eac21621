"""Adaptive concurrency (AIMD): the in-flight limit halves on overload and grows back on success.

Endpoints without ``x-ratelimit-remaining-*`` headers (vLLM, Ollama) are steered by the 429 signal alone.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass
from types import TracebackType

from pipeline.core.errors import RateLimited, ServerError
from pipeline.core.ratelimit import RateLimitHeaders
from pipeline.run.limits.clock import EPS, Clock

#: Statuses that mean "too much load": they shrink the concurrency limit (529: Anthropic's "overloaded").
OVERLOAD_STATUSES = frozenset({429, 503, 529})


def is_overload(exc: BaseException) -> bool:
    """A 429, 503 or 529 answer: the endpoint is asking for less load."""
    return isinstance(exc, RateLimited) or (
        isinstance(exc, ServerError) and getattr(exc, "status", None) in OVERLOAD_STATUSES)


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
        return max(self.minimum, math.floor(self._limit + EPS))

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
        """:meth:`observe_headers` from a parsed :class:`~pipeline.core.ratelimit.RateLimitHeaders`."""
        return self.observe_headers(headers.remaining_requests, headers.remaining_tokens,
                                    tokens_per_request=tokens_per_request)
