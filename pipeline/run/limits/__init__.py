"""Limits that keep the endpoint as busy as it allows and no busier: rates, concurrency, outages, budgets.

Four independent pieces, one module each (``rate``, ``concurrency``, ``breaker``, ``budget``), each an
``async with`` (or a plain call) the runner puts around one attempt. This package re-exports them all.
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

from pipeline.run.limits.breaker import (
    BreakerState,
    BreakerTicket,
    CircuitBreaker,
    is_endpoint_failure,
)
from pipeline.run.limits.budget import (
    BudgetGuard,
    BudgetTicket,
    ModelPrice,
    PriceLike,
    Spent,
)
from pipeline.run.limits.clock import Clock, Sleep
from pipeline.run.limits.concurrency import (
    OVERLOAD_STATUSES,
    AdaptiveConcurrency,
    Permit,
    is_overload,
)
from pipeline.run.limits.rate import RateLimiter, Reservation, TokenBucket

__all__ = [
    "OVERLOAD_STATUSES",
    "AdaptiveConcurrency",
    "BreakerState",
    "BreakerTicket",
    "BudgetGuard",
    "BudgetTicket",
    "CircuitBreaker",
    "Clock",
    "ModelPrice",
    "Permit",
    "PriceLike",
    "RateLimiter",
    "Reservation",
    "Sleep",
    "Spent",
    "TokenBucket",
    "is_endpoint_failure",
    "is_overload",
]
