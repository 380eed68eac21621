"""The gallery: one self-contained HTML page per job (``<output stem>.gallery.html``) to look at a run.

Captions are judged by looking at them next to their images, so the page shows a grid of cards, each a
small thumbnail (Pillow, WebP, inlined as a data URI) with the row's caption, id, carried columns, finish
reason, tokens, latency and outcome; the failures grouped by error type; the run's report numbers
(``ops/report.py``) and two small inline SVG charts drawn from the ledger's timestamps. It is built from the
ledger (outcomes, times) and the manifest (paths, carried columns), never from the network: remote images
get a placeholder, and the page loads nothing (no server, no CDN: it opens from ``file://`` offline).

Why a bound and a sample: a job may have 100,000 rows and a page must stay small enough to open and mail.
At most ``limit`` cards (default 500) are chosen (``failed-first``, ``newest`` or a seeded ``random``
sample), thumbnails share ``THUMB_BUDGET`` bytes, long texts are cut, and the whole file is kept under
``GALLERY_MAX_BYTES`` by leaving the last cards out (the page says how many). The browser pages through
the cards and filters them with a little inline script.

Secrets are masked with the job's secrets (``core/redact.py``) in every text that reaches the page, and
every text is HTML-escaped (``gallery_page.py``): a caption that says ``<script>`` is shown, not run.
"""

from __future__ import annotations

import base64
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.core.config import Config, GallerySample, job_secrets
from pipeline.core.errors import ConfigError, ManifestError
from pipeline.core.redact import redact, redact_url
from pipeline.core.results import RESULT_COLUMNS
from pipeline.core.targets import Target
from pipeline.edges.files import atomic_write_text
from pipeline.edges.ledger import Outcome, StateStore
from pipeline.edges.manifest import ManifestReader, Row
from pipeline.edges.thumbnails import local_image_path, thumbnail
from pipeline.ops import gallery_page
from pipeline.ops.report import build_report

log = logging.getLogger("pipeline.ops.gallery")

#: The page never grows past this: cards are left out from the end of the sample until it fits.
GALLERY_MAX_BYTES = 8 * 1024 * 1024
#: All thumbnails of a page together; cards past it show a placeholder instead of their image.
THUMB_BUDGET = 4 * 1024 * 1024
#: Texts are cut to these many characters (a caption is rarely longer; an error page often is).
CAPTION_CHARS, MESSAGE_CHARS, VALUE_CHARS = 2_000, 500, 200
#: Carried columns shown per card, error types listed (most common first), and rows listed under each.
MAX_COLUMNS, MAX_ERROR_TYPES, FAILURE_EXAMPLES = 12, 50, 20


@dataclass(frozen=True)
class GalleryOptions:
    """Which run and which rows: ``run_id`` None means the last run's numbers over every row of the job;
    a run id means that run's numbers over the rows that run finished."""

    run_id: int | None = None
    limit: int = 500
    sample: GallerySample = "failed-first"
    seed: int = 0
    max_bytes: int = GALLERY_MAX_BYTES
    page_size: int = gallery_page.PAGE_SIZE  # cards the browser shows at a time

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> GalleryOptions:
        report = config.report
        base = {"limit": report.gallery_limit, "sample": report.gallery_sample, "seed": report.gallery_seed}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class GalleryResult:
    """What was written: the page, its size, the cards it shows out of the rows it could have shown."""

    path: Target
    bytes: int
    cards: int
    rows: int
    thumbnails: int
    left_out: int = 0


@dataclass
class _Picked:
    """The rows chosen for cards, with what the ledger and the manifest know about each."""

    rows: list[tuple[str, str, str]]
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    manifest: dict[str, Row] = field(default_factory=dict)


def gallery_path(output_path: Target) -> Target:
    """``<output stem>.gallery.html`` beside the output (and its ``.summary.json``)."""
    return output_path.with_name(f"{output_path.stem}.gallery.html")


def write_gallery(config: Config, options: GalleryOptions | None = None, *, out: Target | None = None,
                  report: Mapping[str, Any] | None = None) -> GalleryResult:
    """Build the job's gallery from its ledger and write it atomically to ``out`` (default: beside the
    output). ``report``: the run report when the caller has it (after a run), else it is rebuilt."""
    options = options or GalleryOptions.from_config(config)
    target = out or gallery_path(config.output.path)
    if not config.ledger_path.exists():
        raise ConfigError(f"{config.ledger_path}: no ledger yet, so nothing to show; run the job first")
    with StateStore(config.ledger_path) as store:
        page = _build(config, store, options, report)
    atomic_write_text(target, page.html, config.storage_options_for("output") if out is None else None)
    return GalleryResult(target, len(page.html.encode("utf-8")), page.cards, page.rows, page.thumbnails,
                         page.left_out)


def _build(config: Config, store: StateStore, options: GalleryOptions,
           report: Mapping[str, Any] | None) -> gallery_page.Page:
    run_id = _run_id(store, options.run_id)
    secrets = job_secrets(config)
    if report is None or report.get("run_id") != run_id:
        report = _report(config, store, run_id, secrets)
    finished = store.finished_rows(options.run_id)
    picked = _Picked(pick_rows(finished, options.limit, options.sample, options.seed))
    ids = [row_id for row_id, _, _ in picked.rows]
    picked.outcomes = store.outcomes(ids)
    picked.manifest, columns = _manifest_rows(config, set(ids))
    cards = _cards(config, picked, columns, secrets)
    times = list(store.finished_requests(run_id, ("latency_ms", "finished_at")))
    failures = _failures(store.failure_groups(FAILURE_EXAMPLES, run_id=options.run_id)[:MAX_ERROR_TYPES], secrets)
    header = gallery_page.Header(
        title=config.output.path.name, report=dict(report), run_id=run_id, scope_run=options.run_id,
        rows=len(finished), rows_failed=sum(status == "failed" for _, status, _ in finished),
        sample=options.sample, limit=options.limit, seed=options.seed, columns=columns,
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"))
    return gallery_page.render(header, cards, failures, _latencies(times), _finish_times(times),
                               max_bytes=options.max_bytes, page_size=options.page_size)


def _run_id(store: StateStore, wanted: int | None) -> int:
    runs = store.runs()
    if not runs:
        raise ConfigError(f"{store.path}: the ledger has no runs yet; run the job first")
    if wanted is None:
        return int(runs[-1]["run_id"])
    if store.run_record(wanted) is None:
        known = ", ".join(str(r["run_id"]) for r in runs[-10:])
        raise ConfigError(f"--run {wanted}: no such run in {store.path} (the last runs are {known}; "
                          "see 'pipeline runs CONFIG')")
    return wanted


def _report(config: Config, store: StateStore, run_id: int, secrets: Sequence[str]) -> dict[str, Any]:
    """The run report, as the run wrote it (from its summary in the ledger's run history)."""
    record = next(run for run in store.runs() if run["run_id"] == run_id)
    digest = (store.run_record(run_id) or {}).get("config_digest", "")
    return build_report(store, run_id, record["summary"], config_digest=digest, prices=config.limits.prices,
                        default_model=config.request.model, secrets=secrets)


def pick_rows(rows: Sequence[tuple[str, str, str]], limit: int, sample: GallerySample,
              seed: int = 0) -> list[tuple[str, str, str]]:
    """``limit`` of the (row id, status, finished at) rows: the newest first, the failed ones (newest first)
    before the rest, or a random sample drawn with ``seed`` (shown in row id order)."""
    if sample == "random":
        chosen = random.Random(seed).sample(list(rows), min(limit, len(rows)))
        return sorted(chosen)
    ordered = sorted(rows, key=lambda row: row[2], reverse=True)
    if sample == "failed-first":
        ordered.sort(key=lambda row: row[1] != "failed")  # stable: newest first within each group
    return ordered[:limit]


def _manifest_rows(config: Config, wanted: set[str]) -> tuple[dict[str, Row], list[str]]:
    """The manifest rows of the chosen ids (paths and carried columns; reading stops once all are found),
    and the carried column names. A manifest that is gone or unreadable still gives a page, from the
    ledger alone (no images, no columns): the captions are what people came for."""
    found: dict[str, Row] = {}
    try:  # a job fed from Python (run_job(config, manifest=df)) has no manifest here: ConfigError
        reader = ManifestReader(config.input, reserved=RESULT_COLUMNS,
                                storage_options=config.storage_options_for("input"))
        columns = reader.carried_columns[:MAX_COLUMNS]
        for batch in reader.batches() if wanted else ():
            found.update((row.id, row) for row in batch if row.id in wanted)
            if len(found) == len(wanted):
                break
    except (ManifestError, ConfigError) as exc:
        log.warning("gallery: %s; the cards show no images or manifest columns", exc)
        return {}, []
    return found, columns


def _cards(config: Config, picked: _Picked, columns: Sequence[str], secrets: Sequence[str]) -> list[gallery_page.Card]:
    budget = THUMB_BUDGET
    cards = []
    for row_id, status, finished in picked.rows:
        row = picked.manifest.get(row_id)
        thumb, note = _thumb(config, row, budget)
        budget = 0 if note == _OVER_BUDGET else budget - len(thumb or "")  # once one is over, so are the rest
        outcome = picked.outcomes.get(row_id)
        cards.append(_card(row_id, status, finished, row, outcome, columns, secrets, thumb, note))
    return cards


_OVER_BUDGET = "left out (size bound)"


def _thumb(config: Config, row: Row | None, budget: int) -> tuple[str | None, str]:
    """The row's thumbnail as a data URI within what is left of the budget, or why there is none."""
    if row is None:
        return None, "not in the manifest"
    path = local_image_path(row.path, row.base_dir)
    if path is None:
        return None, "remote image"
    if budget <= 0:
        return None, _OVER_BUDGET
    data = thumbnail(path, root=config.input.root, max_source_bytes=config.images.max_source_bytes)
    if data is None:
        return None, "no image to show"
    uri = "data:image/webp;base64," + base64.b64encode(data).decode("ascii")
    return (uri, "") if len(uri) <= budget else (None, _OVER_BUDGET)


def _card(row_id: str, status: str, finished: str, row: Row | None, outcome: Outcome | None,
          columns: Sequence[str], secrets: Sequence[str], thumb: str | None, note: str) -> gallery_page.Card:
    results = outcome.results if outcome else []
    first: dict[str, Any] = results[0] if results else {}
    texts = [r.get("content") or "" for r in results if r.get("content")]
    caption = "\n\n".join(texts) if len(texts) > 1 else (texts[0] if texts else "")
    values = row.columns if row else {}
    return gallery_page.Card(
        id=_clean(row_id, secrets, VALUE_CHARS), status=status, finished_at=finished,
        path=_clean(redact_url(row.path) if row else "", secrets, VALUE_CHARS),
        caption=_clean(caption, secrets, CAPTION_CHARS), choices=len(results),
        columns=tuple(_clean(_text(values.get(name)), secrets, VALUE_CHARS) for name in columns),
        finish_reason=first.get("finish_reason"), prompt_tokens=first.get("prompt_tokens"),
        completion_tokens=first.get("completion_tokens"), latency_ms=first.get("latency_ms"),
        attempts=outcome.attempts if outcome else None,
        error_type=_clean(first.get("error_type") or "", secrets, VALUE_CHARS) or None,
        error_message=_clean(first.get("error_message") or "", secrets, MESSAGE_CHARS) or None,
        thumb=thumb, thumb_note=note)


def _failures(groups: Iterable[tuple[str | None, int, list[tuple[str, str | None]]]],
              secrets: Sequence[str]) -> list[gallery_page.FailureGroup]:
    return [gallery_page.FailureGroup(
        error_type=_clean(error_type or "error", secrets, VALUE_CHARS), count=int(count),
        rows=[(_clean(row_id, secrets, VALUE_CHARS), _clean(message or "", secrets, MESSAGE_CHARS))
              for row_id, message in sample])
        for error_type, count, sample in groups]


def _latencies(times: Iterable[tuple[Any, ...]]) -> list[float]:
    """Latency (ms) of the run's ok requests, as the report's percentiles count them."""
    return [float(latency) for status, _, _, latency, _ in times if status == "ok" and latency is not None]


def _finish_times(times: Iterable[tuple[Any, ...]]) -> list[float]:
    """When each of the run's requests finished (Unix seconds; the ledger keeps microseconds)."""
    return [int(finished) / 1e6 for _, _, _, _, finished in times if finished is not None]


def _clean(text: str, secrets: Sequence[str], limit: int) -> str:
    """Masked (``core/redact.py``) and cut to ``limit`` characters; escaping is the page's job."""
    text = redact(text, secrets)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def summary_of(result: GalleryResult) -> str:
    """One line for the CLI and the log."""
    left = f", {result.left_out} left out for the size bound" if result.left_out else ""
    return (f"wrote {result.path}: {result.cards} of {result.rows} rows as cards ({result.thumbnails} "
            f"thumbnails{left}), {result.bytes / 1e6:.1f} MB")

