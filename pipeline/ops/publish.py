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
from pipeline.edges.ledger import StateStore
from pipeline.edges.manifest import ManifestInfo
from pipeline.ops.export import ExportReport, export_output, export_partition
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
    unchanged = previous.get("signature") == signature and config.output.path.exists()
    if unchanged:
        report = ExportReport(**previous["report"])
    else:
        report = await asyncio.to_thread(export_output, config, plan.reader, store, info.carried)
        store.set_meta("export", json.dumps({"signature": signature, "report": asdict(report)}))
    if config.output.partition_by == "run_date" and not unchanged:
        summary.partition_path = await asyncio.to_thread(
            export_partition, config, plan.reader, store, summary.run_id, info.carried)
    summary.output_rows, summary.output_ok, summary.output_failed = report.rows, report.rows_ok, report.rows_failed
    summary.manifest_ok, summary.manifest_failed = report.ok, report.failed
    summary.rows_not_run = summary.rows_total - report.manifest_rows_done


def run_report(config: Config, store: StateStore, summary: RunSummary, config_digest: str) -> dict[str, Any]:
    """The run's report; build it under the job's lock (a later run that re-sends a request takes over
    its run id)."""
    return build_report(
        store, summary.run_id, summary, config_digest=config_digest, prices=config.limits.prices,
        default_model=config.request.model, exit_code=summary.exit_code, secrets=job_secrets(config),
    )


async def publish_report(config: Config, summary: RunSummary, report: dict[str, Any]) -> None:
    """The run report beside the output, the Prometheus textfile, and the webhook; never fatal. Called
    outside the job's lock: a slow webhook never holds up the next run."""
    try:
        summary.report_path = (await asyncio.to_thread(write_reports, report, config.output.path))[0]
        if config.metrics.prometheus is not None:
            job = config.metrics.job or config.output.path.stem
            text = render_prometheus(report, job)
            await asyncio.to_thread(write_prometheus, text, prometheus_path(config.metrics.prometheus, job))
    except OSError as exc:
        log.warning("could not write the run report: %s", exc)
    if config.notify.webhook_url is not None and notify_wanted(report, config.notify.when):
        await post_webhook(config.notify.webhook_url.get_secret_value(), report, timeout=config.notify.timeout)
