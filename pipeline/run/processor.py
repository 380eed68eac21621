"""The row processor: one row task in, its outcome out (result rows, or why it failed).

Engine-independent: it loads and pre-flights the image, builds the request body, sends it under the
request gate (every limit) and the retry policy, and rebuilds the answer from the stream. It knows
nothing of queues, ledgers, progress bars or the CLI, and never raises for a row: a failure is an
outcome, so an engine (the local worker pool, a Ray actor) only has to store what comes back.

Two steps, so an engine can overlap them: ``prepare`` (image read + body, the CPU part) and ``send``
(the network part). ``on_answer`` hands over a good answer the moment its stream is complete (inside
the read that completes it), so an engine can stage it for storage before the sending task even wakes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from pipeline.core.config import Config, job_secrets
from pipeline.core.errors import (
    BudgetExceeded,
    EmptyResponse,
    ImageError,
    PipelineError,
)
from pipeline.core.redact import MASK, redact
from pipeline.core.request import RequestBuilder, answer_params_digest, request_key
from pipeline.core.results import ResultRow, rows_from_completion
from pipeline.core.retry import retry_policy
from pipeline.edges.client import ChatClient, StreamOutcome
from pipeline.edges.images import ImageLoader, ImagePayload
from pipeline.edges.storage import INPUT_OPTIONS, AsyncStore
from pipeline.run.gate import RequestGate
from pipeline.run.plan import RowTask

log = logging.getLogger("pipeline")


@dataclass(slots=True)
class PreparedRow:
    """A row ready to go out: its image loaded and its request body built, or why that failed."""

    task: RowTask
    image: ImagePayload | None = None
    payload: bytes = b""
    key: str = ""  # the request key: identical requests share it
    failure: PipelineError | None = None


@dataclass(slots=True)
class RowOutcome:
    """What became of one row: its result rows as JSON-ready dicts (one per choice, or one failure)."""

    key: str
    status: str | None  # "ok" or "failed"; None: not finished (the budget stopped the run first)
    attempts: int = 0
    error_type: str | None = None
    error_message: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    final: bool = False  # a failure of the row itself (retrying the same input cannot help)
    budget_stop: str | None = None  # set: a budget guard says the run must stop taking rows (not a failure)


OnAnswer = Callable[[RowOutcome], None]


class RowPreparer:
    """The CPU half of a row, on its own: load and pre-flight the image, build the request body.

    A ``RowProcessor`` holds one; the Ray engine also runs one alone in its pre-flight tasks (no client,
    no limits), so the prepared rows reach the actors ready to send. Open it with ``async with`` (images).
    """

    def __init__(self, config: Config, *, workers: int | None = None) -> None:
        """``workers``: threads for pixel work (default: the cores)."""
        self.builder = RequestBuilder(config.request, config.images)
        self.images = ImageLoader(config.images, root=config.input.root, egress=config.download_egress,
                                  store_concurrency=config.store_reads, workers=workers,
                                  pool=config.run.preflight_pool,
                                  store=AsyncStore(config.storage_options_for("input"), where=INPUT_OPTIONS))
        self.params = answer_params_digest(config.request, config.images)

    async def __aenter__(self) -> RowPreparer:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.images.aclose()

    async def prepare(self, task: RowTask) -> PreparedRow:
        """Load the row's image and build its request body; a problem with the row comes back as ``failure``."""
        row = task.row
        try:
            if not row.path:
                raise ImageError("the path column is empty for this row", error_type="image_missing")
            image = await self.images.load(row.path, row.base_dir, data=row.data)
            payload = self.builder.build_payload(task.prompt, image.url)
        except PipelineError as exc:
            return PreparedRow(task, failure=exc)
        except Exception as exc:  # a bug must not lose the row: record it and say so loudly
            log.exception("%s: internal error while preparing", row.label)
            return PreparedRow(task, failure=PipelineError(f"internal error: {type(exc).__name__}: {exc}"))
        return PreparedRow(task, image, payload, request_key(self.params, image.sha256, task.prompt))


class RowProcessor:
    """Turns ``RowTask``s into ``RowOutcome``s for one job; open it with ``async with`` (client, images)."""

    def __init__(self, config: Config, *, base_url: str | None = None, pool_size: int | None = None) -> None:
        """``base_url`` overrides ``endpoint.base_url`` (the embedded endpoint's address, say)."""
        self.config = config
        self.preparer = RowPreparer(config)
        self.gate = RequestGate.from_config(config)
        self._secrets = tuple(job_secrets(config))  # masked out of every failure message (an echoed key)
        self._client = ChatClient(config.endpoint, base_url=base_url, pool_size=pool_size or config.run.concurrency,
                                  max_response_bytes=config.request.max_response_bytes)
        self._open = contextlib.AsyncExitStack()

    async def __aenter__(self) -> RowProcessor:
        await self._open.enter_async_context(self.preparer)
        await self._open.enter_async_context(self._client)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._open.aclose()

    async def process(self, task: RowTask, on_answer: OnAnswer | None = None) -> RowOutcome:
        """Both steps for one row, for engines that do not overlap them."""
        return await self.send(await self.prepare(task), on_answer)

    async def prepare(self, task: RowTask) -> PreparedRow:
        """Load the row's image and build its request body; a problem with the row comes back as ``failure``."""
        return await self.preparer.prepare(task)

    async def send(self, prepared: PreparedRow, on_answer: OnAnswer | None = None) -> RowOutcome:
        """Send under the gate and the retry policy. ``on_answer`` gets a good answer as soon as it is
        complete; an answer handed over that way stands even if something fails after it."""
        task, started = prepared.task, _now()
        if prepared.image is None:
            assert prepared.failure is not None
            return self._failure(f"image:{task.digest}", task, prepared.failure, 0, started)
        key, image = prepared.key, prepared.image
        size = (image.report.get("sent_width"), image.report.get("sent_height"))
        estimate = self.gate.estimate(lambda: self.preparer.builder.build(task.prompt, ""),  # text, image parts, max_tokens
                                      size if None not in size else None)  # type: ignore[arg-type]
        sent = 0
        answered: RowOutcome | None = None

        def answer_complete(outcome: StreamOutcome) -> None:
            nonlocal answered
            if outcome.completion.choices and answered is None and on_answer is not None:
                answered = self._answer(key, outcome, sent, started, image)
                on_answer(answered)

        async def send_once(body: bytes) -> StreamOutcome:
            nonlocal sent
            sent += 1
            outcome = await self._client.stream_chat(body, answer_complete if on_answer is not None else None)
            if not outcome.completion.choices:
                raise EmptyResponse("the endpoint finished the stream without any choice")
            return outcome

        try:
            try:  # the common case, one attempt, costs no retry machinery
                outcome = await self.gate.send(send_once, prepared.payload, estimate)
            except PipelineError as exc:
                if not exc.retryable or self.config.run.max_attempts == 1:
                    raise
                outcome = await self._retry(send_once, prepared.payload, estimate, exc)
        except BudgetExceeded as exc:
            stopped = answered or RowOutcome(key, None, sent)  # not finished unless answered before the stop
            stopped.budget_stop = exc.message
            return stopped
        except PipelineError as exc:
            return answered or self._failure(key, task, exc, sent, started, image.report)
        except Exception as exc:  # a bug must not lose the row: record it and say so loudly
            log.exception("%s: internal error", task.row.label)
            failure = PipelineError(f"internal error: {type(exc).__name__}: {exc}")
            return answered or self._failure(key, task, failure, sent, started, image.report)
        return answered if answered is not None else self._answer(key, outcome, sent, started, image)

    async def _retry(self, send_once: Any, payload: bytes, estimate: Any, first: PipelineError) -> StreamOutcome:
        """Attempts 2..max_attempts under the tenacity policy; attempt 1 replays the failure we saw."""
        async for attempt in retry_policy(self.config.run, max_server_wait=self.config.limits.max_retry_wait):
            with attempt:
                if attempt.retry_state.attempt_number == 1:
                    raise first
                outcome: StreamOutcome = await self.gate.send(send_once, payload, estimate)
        return outcome

    def _answer(self, key: str, outcome: StreamOutcome, attempts: int, started: datetime,
                image: ImagePayload) -> RowOutcome:
        results = rows_from_completion(
            outcome.completion, attempts=attempts, ttft_ms=outcome.ttft_ms, latency_ms=outcome.latency_ms,
            started_at=started, finished_at=_now(), image=image.report,
        )
        return RowOutcome(key, "ok", attempts, results=[_masked(r.to_json(), self._secrets) for r in results])

    def _failure(self, key: str, task: RowTask, exc: PipelineError, attempts: int, started: datetime,
                 image: dict[str, Any] | None = None) -> RowOutcome:
        """The failed row; its message masked here, once, so an endpoint that echoes the key (or a header)
        cannot get it into the ledger, the outputs, ``pipeline status`` or the reports."""
        tries = f" after {attempts} attempt(s)" if attempts else ""
        message = redact(exc.message, self._secrets)
        log.warning("%s failed%s: %s: %s", task.row.label, tries, exc.error_type, message)
        result = ResultRow(status="failed", attempts=attempts, error_type=exc.error_type, error_message=message,
                           started_at=started, finished_at=_now(), **(image or {}))
        return RowOutcome(key, "failed", attempts, exc.error_type, message, [result.to_json()],
                          final=exc.row_specific)


def _masked(result: dict[str, Any], secrets: tuple[str, ...]) -> dict[str, Any]:
    """An answer that repeats a configured secret (an endpoint echoing the key into a caption) gets that
    value masked before the ledger and the outputs see it. Only the exact values: a caption is text, and
    the pattern masks of ``redact`` (``Bearer ...``) would change honest words."""
    if not secrets:
        return result
    for name in ("content", "tool_calls", "refusal"):
        text = result[name]
        if text and any(secret in text for secret in secrets):
            for secret in sorted(secrets, key=len, reverse=True):
                text = text.replace(secret, MASK)
            result[name] = text
    return result


def _now() -> datetime:
    return datetime.now(UTC)
