"""After a run: the output rebuilt from the ledger, the run report beside it, the Prometheus textfile
and the webhook. Kept out of the engines so that every engine publishes the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import asdict
from typing import Any

from pipeline.core.config import Config, job_secrets
from pipeline.core.errors import StorageError
from pipeline.core.targets import Target
from pipeline.edges.files import location_exists
from pipeline.edges.ledger import StateStore
from pipeline.edges.manifest import ManifestInfo
from pipeline.edges.threads import in_thread
from pipeline.ops.export import ExportReport, export_output, export_partition
from pipeline.ops.gallery import summary_of, write_gallery
from pipeline.ops.report import (
    build_report,
    notify_wanted,
    post_webhook,
    prometheus_path,
    render_prometheus,
    write_prometheus,
    write_reports,
)
from pipeline.run.plan import Plan
from pipeline.run.summary import RunSummary

log = logging.getLogger("pipeline")


async def export_run(config: Config, plan: Plan, store: StateStore, info: ManifestInfo, summary: RunSummary) -> None:
    """Rebuild the output from the ledger, unless nothing it depends on changed since the last time;
    the output counts go into ``summary``."""
    signature = json.dumps({
        "counts": 2,  # the stored report counts output rows and manifest rows apart (since counts 2)
        "writes": store.writes, "manifest": plan.manifest_digest, "rows": info.rows,
        "output": str(config.output.path), "format": config.output.output_format,
        "carried": info.carried.names,
    })
    previous = json.loads(store.get_meta("export") or "{}")
    unchanged = previous.get("signature") == signature and await asyncio.to_thread(
        location_exists, config.output.path, config.storage_options_for("output"))
    if unchanged:
        report = ExportReport(**previous["report"])
    else:
        report = await in_thread(export_output, config, plan.reader, store, info.carried)
        store.set_meta("export", json.dumps({"signature": signature, "report": asdict(report)}))
    if config.output.partition_by == "run_date":
        summary.partition_path = await _export_owed_partitions(config, plan, store, info, summary.run_id,
                                                               changed=not unchanged)
    summary.output_rows, summary.output_ok, summary.output_failed = report.rows, report.rows_ok, report.rows_failed
    summary.manifest_ok, summary.manifest_failed = report.ok, report.failed
    summary.rows_not_run = summary.rows_total - report.manifest_rows_done


#: Ledger meta key: the runs whose partition is not written yet (see ``owe_partition``).
PARTITIONS_OWED = "partitions_owed"


def owe_partition(config: Config, store: StateStore, run_id: int) -> None:
    """Note, when a run starts, that its partition is owed: a run stopped by a full disk (or anything
    else) before writing it has it written by the next run, so no finished row misses its partition."""
    if config.output.partition_by == "run_date":
        owed = json.loads(store.get_meta(PARTITIONS_OWED) or "[]")
        store.set_meta(PARTITIONS_OWED, json.dumps(sorted({*owed, run_id})))


async def _export_owed_partitions(config: Config, plan: Plan, store: StateStore, info: ManifestInfo,
                                  run_id: int, *, changed: bool) -> Target | None:
    """This run's partition and any an earlier run still owes; returns this run's (None: no rows, as when
    nothing ``changed`` in the ledger since the last export)."""
    owed = sorted({*json.loads(store.get_meta(PARTITIONS_OWED) or "[]"), run_id})
    mine = None
    for owed_run in list(owed):
        if owed_run != run_id or changed:
            path = await in_thread(export_partition, config, plan.reader, store, owed_run, info.carried)
            mine = path if owed_run == run_id else mine
        owed.remove(owed_run)
        store.set_meta(PARTITIONS_OWED, json.dumps(owed))
    return mine


def run_report(config: Config, store: StateStore, summary: RunSummary, config_digest: str) -> dict[str, Any]:
    """The run's report; build it under the job's lock (a later run that re-sends a request takes over
    its run id)."""
    return build_report(
        store, summary.run_id, summary, config_digest=config_digest, prices=config.limits.prices,
        default_model=config.request.model, exit_code=summary.exit_code, secrets=job_secrets(config),
    )


async def publish_report(config: Config, summary: RunSummary, report: dict[str, Any]) -> StorageError | None:
    """The run report beside the output, the Prometheus textfile, and the webhook. Called outside the job's
    lock: a slow webhook never holds up the next run. A report that cannot be written (disk full, read-only)
    is returned, for the caller to stop with; the webhook is still posted (a broken webhook is only logged).
    Without a report (the run stopped before one was built) nothing is published."""
    if not report:
        return None
    failure = None
    options = config.storage_options_for("output")
    try:
        summary.report_path = (await asyncio.to_thread(write_reports, report, config.output.path, options))[0]
    except StorageError as exc:
        failure = exc
    if config.report.gallery:
        summary.gallery_path = await asyncio.to_thread(_write_gallery, config, report)
    if config.metrics.prometheus is not None:
        job = config.metrics.job or config.output.path.stem
        try:
            await asyncio.to_thread(write_prometheus, render_prometheus(report, job),
                                    prometheus_path(config.metrics.prometheus, job), options)
        except StorageError as exc:
            failure = failure or exc
    if failure is not None:
        log.info("%s", failure)  # the log file keeps it; the caller says it once on stderr
    if config.notify.webhook_url is not None and notify_wanted(report, config.notify.when):
        await post_webhook(config.notify.webhook_url.get_secret_value(), report, timeout=config.notify.timeout,
                           egress=config.webhook_egress)
    return failure


def _write_gallery(config: Config, report: dict[str, Any]) -> Target | None:
    """``report.gallery``: the page beside the summary. A page is a view, never the run's outcome: any error
    building it is logged as a warning and the run ends as it would have without it."""
    try:
        result = write_gallery(config, report=report)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("gallery not written (the run's outcome is unchanged): %s: %s", type(exc).__name__, exc)
        return None
    log.info("%s", summary_of(result))
    return result.path
