"""The circuit breaker: during an endpoint outage callers wait instead of burning their retries.

Failures that belong to the outage are flagged so the row processor does not charge them to the row.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from pipeline.core.errors import (
    ConnectError,
    EndpointError,
    EndpointTimeout,
    PipelineError,
    ServerError,
    StreamError,
)
from pipeline.run.limits.clock import Clock, Sleep

T = TypeVar("T")


def is_endpoint_failure(exc: BaseException) -> bool:
    """What the circuit breaker counts: cannot connect, timed out, or an HTTP 5xx."""
    if isinstance(exc, (ConnectError, EndpointTimeout)):
        return True
    status = getattr(exc, "status", None)
    return isinstance(exc, ServerError) and status is not None and status >= 500


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
