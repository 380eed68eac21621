"""The ``limits:`` config section: defaults, a full YAML example, and precise errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.core.config import LimitsConfig, config_from_dict
from pipeline.core.errors import ConfigError
from pipeline.edges.configfile import load_config
from pipeline.run.limits import BudgetGuard

BASE: dict[str, Any] = {
    "request": {"model": "gpt-4o"},
    "input": {"manifest": "manifest.csv"},
    "output": {"path": "out.parquet"},
}


def with_limits(**limits: Any) -> dict[str, Any]:
    return {**BASE, "limits": limits}


def test_defaults_change_nothing_unless_asked() -> None:
    limits = config_from_dict(BASE).limits
    assert limits == LimitsConfig()
    assert (limits.requests_per_minute, limits.tokens_per_minute) == (None, None)
    assert (limits.max_requests, limits.max_total_tokens, limits.max_cost, limits.prices) == (None, None, None, {})
    assert limits.adaptive and limits.circuit_breaker and limits.min_concurrency == 1
    assert (limits.breaker_window, limits.breaker_min_calls, limits.breaker_failure_ratio) == (20, 10, 0.5)
    assert (limits.breaker_cooldown, limits.breaker_max_cooldown, limits.breaker_give_up_after) == (5, 60, 600)
    assert limits.max_retry_wait == 120


def test_full_yaml_section(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("""
request: {model: gpt-4o}
input: {manifest: manifest.csv}
output: {path: out.parquet}
limits:
  requests_per_minute: 500
  tokens_per_minute: ${TPM:-30000}
  adaptive: false
  min_concurrency: 2
  circuit_breaker: true
  breaker_window: 40
  breaker_min_calls: 20
  breaker_failure_ratio: 0.6
  breaker_cooldown: 2
  breaker_max_cooldown: 30
  breaker_give_up_after: null
  max_retry_wait: null
  max_requests: 10000
  max_total_tokens: 5000000
  max_cost: 12.5
  prices:
    gpt-4o: {input: 2.5, output: 10}
    gpt-4o-mini: {input: 0.15, output: 0.6}
""")
    limits = load_config(path, env={}).limits
    assert (limits.requests_per_minute, limits.tokens_per_minute) == (500, 30000)
    assert not limits.adaptive and limits.min_concurrency == 2
    assert limits.breaker_give_up_after is None and limits.max_retry_wait is None
    assert limits.prices["gpt-4o-mini"].output == 0.6 and limits.max_cost == 12.5
    budget = BudgetGuard(limits.max_requests, limits.max_total_tokens, limits.max_cost,
                         {name: (p.input, p.output) for name, p in limits.prices.items()}, default_model="gpt-4o")
    assert budget.price_for("gpt-4o-2024-08-06") is not None


@pytest.mark.parametrize(("limits", "message"), [
    ({"requests_per_minute": 0}, "limits.requests_per_minute: must be > 0, got 0"),
    ({"tokens_per_minute": -5}, "limits.tokens_per_minute: must be > 0, got -5"),
    ({"requests_per_minut": 60}, "limits.requests_per_minut: unknown key (did you mean 'requests_per_minute'?)"),
    ({"min_concurrency": 0}, "limits.min_concurrency: must be >= 1, got 0"),
    ({"breaker_failure_ratio": 1.5}, "limits.breaker_failure_ratio: must be <= 1, got 1.5"),
    ({"breaker_window": 5, "breaker_min_calls": 6}, "breaker_min_calls (6) must be <= breaker_window (5)"),
    ({"breaker_cooldown": 10, "breaker_max_cooldown": 5}, "breaker_max_cooldown (5) must be >= breaker_cooldown (10)"),
    ({"max_cost": 3}, "max_cost needs prices"),
    ({"max_cost": 3, "prices": {"gpt-4o": {"input": 2.5}}}, "limits.prices.gpt-4o.output: required key is missing"),
    ({"prices": {"gpt-4o": {"input": -1, "output": 1}}}, "limits.prices.gpt-4o.input: must be >= 0, got -1"),
    ({"max_requests": 0}, "limits.max_requests: must be >= 1, got 0"),
    ({"adaptive": "sometimes"}, "limits.adaptive"),
])
def test_errors_name_the_key(limits: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(with_limits(**limits), source="job.yaml")
    assert message in str(caught.value) and str(caught.value).startswith("job.yaml: ")


def test_limits_config_is_frozen() -> None:
    limits = LimitsConfig()
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error type is an implementation detail
        limits.max_requests = 5  # type: ignore[misc]
