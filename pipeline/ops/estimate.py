"""``pipeline estimate``: what the next run would send and cost, without sending anything.

Reads the manifest, the ledger and image *headers* only (Pillow opens lazily; no pixels are decoded).
Input tokens use the same formula the rate limiter uses (text plus OpenAI's image tile rule after the
configured resize policy); output tokens use this job's history when it has some, else ``max_tokens``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from pipeline.core.config import Config
from pipeline.core.request import RequestBuilder
from pipeline.core.tokens import DEFAULT_OUTPUT_TOKENS, estimate_prompt_tokens
from pipeline.edges.ledger import StateStore
from pipeline.edges.preflight import target_size
from pipeline.run.limits import BudgetGuard
from pipeline.run.plan import Plan, RowTask

_EXAMPLES = 5


@dataclass
class Estimate:
    manifest_rows: int = 0
    rows_to_send: int = 0
    rows_new: int = 0
    rows_changed: int = 0
    rows_pending: int = 0  # resumed or retried
    rows_done: int = 0
    rows_invalid: int = 0
    invalid_examples: list[dict[str, str]] = field(default_factory=list)
    input_tokens: int = 0
    output_tokens: int = 0
    output_basis: str = ""
    model: str = ""
    cost: float | None = None
    cost_basis: str = ""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens}


def estimate_job(config: Config) -> Estimate:
    """Classify every manifest row as the next run would, and price the ones it would send."""
    plan = Plan(config)
    info = plan.check()
    builder = RequestBuilder(config.request, config.images)
    report = Estimate(manifest_rows=info.rows, model=config.request.model)
    mean_completion = None
    ledger = config.ledger_path
    store = StateStore(ledger).open() if ledger.exists() else None
    try:
        if store is not None:
            mean_completion = store.mean_usage()[1]
        for batch in plan.batches():
            for task in plan.triage(batch, store):
                _add_row(report, config, builder, task)
    finally:
        if store is not None:
            store.close()
    counts = plan.counts
    report.rows_new, report.rows_changed = counts.new, counts.changed
    report.rows_pending = counts.resumed + counts.retried
    report.rows_done = counts.skipped
    report.rows_to_send = report.rows_new + report.rows_changed + report.rows_pending - report.rows_invalid
    _add_output(report, config, mean_completion)
    _add_cost(report, config)
    return report


def _add_row(report: Estimate, config: Config, builder: RequestBuilder, task: RowTask) -> None:
    size = _sent_size(config, task)
    if isinstance(size, str):
        report.rows_invalid += 1
        if len(report.invalid_examples) < _EXAMPLES:
            report.invalid_examples.append({"id": task.row.id, "problem": size})
        return
    body = builder.build(task.prompt, "data:image/png;base64,")
    report.input_tokens += estimate_prompt_tokens(body, [size] if size else None, config.images.detail)


def _sent_size(config: Config, task: RowTask) -> tuple[int, int] | None | str:
    """The (width, height) that would be sent, None when unknown (a URL), or a problem description."""
    source = task.row.path
    if not source:
        return "empty path"
    base = task.row.base_dir
    if "://" in source or (isinstance(base, str) and not Path(source).is_absolute()):
        return None  # a URL, or a key under a manifest on an object store: not read for an estimate
    path = Path(source)
    path = path if path.is_absolute() else Path(base) / path
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError:
        return f"image file not found: {path}"
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        return f"not a readable image ({type(exc).__name__}): {path}"
    return target_size(width, height, config.images)


def _add_output(report: Estimate, config: Config, mean_completion: float | None) -> None:
    sendable = report.rows_to_send
    n = config.request.n_choices
    if mean_completion is not None:
        report.output_tokens = math.ceil(mean_completion) * sendable
        report.output_basis = f"this job's history: {mean_completion:.0f} completion tokens per request"
        return
    per_choice = config.request.max_completion_tokens or config.request.max_tokens
    if per_choice:
        report.output_tokens = per_choice * n * sendable
        report.output_basis = f"the upper bound: max_tokens={per_choice} x n={n}"
    else:
        report.output_tokens = DEFAULT_OUTPUT_TOKENS * n * sendable
        report.output_basis = f"no history and no max_tokens: assumed {DEFAULT_OUTPUT_TOKENS} per choice"


def _add_cost(report: Estimate, config: Config) -> None:
    prices = {model: (price.input, price.output) for model, price in config.limits.prices.items()}
    price = BudgetGuard(prices=prices, default_model=config.request.model).price_for(config.request.model)
    if price is None:
        report.cost_basis = f"no price for {config.request.model!r} in limits.prices"
        return
    report.cost = price.cost(report.input_tokens, report.output_tokens)
    report.cost_basis = f"limits.prices: {price.input:g} in / {price.output:g} out per 1M tokens"
