"""Budgets: ``max_requests`` / ``max_total_tokens`` / ``max_cost`` stop a run *before* a request passes them.

Also the one price rule (exact model, longest prefix, else the configured model) that the run report
reuses, so the report's cost and the ``max_cost`` guard never disagree.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline.core.errors import BudgetExceeded, ConfigError
from pipeline.core.tokens import TokenEstimate


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
