"""The request gate: every limit of ``pipeline.run.limits`` around one attempt, in the order that wastes nothing.

Breaker outermost (a worker waiting out an outage holds no slot and no tokens), then the adaptive
concurrency slot, the budget check, and the rate buckets last, right before the request leaves. Failures
that belong to an outage the breaker recognised are repeated here and never reach the retry policy, so
rows keep their retry budget while the endpoint is down.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pipeline.core.config import Config
from pipeline.core.errors import PipelineError
from pipeline.core.tokens import TokenEstimate, TokenEstimator
from pipeline.edges.client import StreamOutcome
from pipeline.run.limits import (
    AdaptiveConcurrency,
    BudgetGuard,
    CircuitBreaker,
    Permit,
    RateLimiter,
    is_overload,
)

Send = Callable[[dict[str, Any]], Awaitable[StreamOutcome]]
_NOTHING = TokenEstimate(raw_prompt=0, prompt=0, completion=0)  # when nothing counts tokens


@dataclass
class RequestGate:
    concurrency: AdaptiveConcurrency
    limiter: RateLimiter
    budget: BudgetGuard
    breaker: CircuitBreaker | None
    estimator: TokenEstimator
    adaptive: bool
    n_choices: int = 1
    answered: bool = False  # the endpoint has answered successfully in this run

    @classmethod
    def from_config(cls, config: Config) -> RequestGate:
        limits, run = config.limits, config.run
        breaker = None
        if limits.circuit_breaker:
            breaker = CircuitBreaker(
                window=limits.breaker_window, failure_ratio=limits.breaker_failure_ratio,
                min_calls=limits.breaker_min_calls, cooldown=limits.breaker_cooldown,
                max_cooldown=limits.breaker_max_cooldown, give_up_after=limits.breaker_give_up_after,
            )
        prices = {model: (price.input, price.output) for model, price in limits.prices.items()}
        return cls(
            concurrency=AdaptiveConcurrency(run.concurrency, min(limits.min_concurrency, run.concurrency),
                                            run.concurrency),
            limiter=RateLimiter(limits.requests_per_minute, limits.tokens_per_minute),
            budget=BudgetGuard(limits.max_requests, limits.max_total_tokens, limits.max_cost, prices,
                               default_model=config.request.model),
            breaker=breaker,
            estimator=TokenEstimator(config.images.detail),
            adaptive=limits.adaptive,
            n_choices=config.request.n_choices,
        )

    @property
    def counts_tokens(self) -> bool:
        """Only a tokens-per-minute bucket or a token/cost budget needs an estimate before sending."""
        budget = self.budget
        return self.limiter.tokens is not None or budget.max_total_tokens is not None or budget.max_cost is not None

    def estimate(self, shape: Callable[[], dict[str, Any]], size: tuple[int, int] | None) -> TokenEstimate:
        """The request's token estimate; ``shape`` builds the body it reads, and is not called (nor is
        anything estimated) when no limit counts tokens, which keeps the common run's hot path free of it."""
        if not self.counts_tokens:
            return _NOTHING
        return self.estimator.estimate(shape(), [size] if size else None)

    async def send(self, send: Send, body: dict[str, Any], estimate: TokenEstimate) -> StreamOutcome:
        """One charged attempt (outage failures are waited out and repeated, uncharged).

        The breaker arms after the first good answer: an endpoint that never answered (a wrong URL, a
        closed port) fails rows at their normal pace instead of being waited on as an outage."""
        while True:
            breaker = self.breaker if self.answered else None
            if breaker is None:
                return await self._attempt(send, body, estimate)
            ticket = await breaker.enter()
            try:
                outcome = await self._attempt(send, body, estimate)
            except BaseException as exc:
                breaker.exit(ticket, exc)
                if isinstance(exc, PipelineError) and ticket.outage:
                    continue  # the breaker absorbed this failure: go round; enter() waits out the open period
                raise
            breaker.exit(ticket, None)
            return outcome

    async def _attempt(self, send: Send, body: dict[str, Any], estimate: TokenEstimate) -> StreamOutcome:
        async with self.concurrency as permit:
            if not (self.budget.enabled or self.limiter.enabled):  # nothing to reserve or to account for
                outcome = await self._send(send, body, permit)
                self.answered = True
                return outcome
            with self.budget.request(estimate) as spend:
                async with self.limiter.reserve(estimate.total) as reservation:
                    outcome = await self._send(send, body, permit)
                    usage = outcome.completion.usage
                    reservation.settle(usage.total_tokens if usage else None)
                    if usage and usage.prompt_tokens is not None:
                        spend.record(usage.prompt_tokens, usage.completion_tokens or 0, outcome.completion.model)
                        self.estimator.observe(estimate, usage.prompt_tokens, usage.completion_tokens,
                                               self.n_choices)
                    self.answered = True
                    return outcome

    async def _send(self, send: Send, body: dict[str, Any], permit: Permit) -> StreamOutcome:
        try:
            outcome = await send(body)
        except PipelineError as exc:
            if self.adaptive and is_overload(exc):
                self.concurrency.on_overload(permit)
            raise
        if self.adaptive:
            self.concurrency.on_success()
            self.concurrency.observe(outcome.rate_limits)
        return outcome
