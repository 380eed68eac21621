"""The command line: parse arguments, load the config, run the job, print, map outcomes to exit codes.

Exit codes: 0 every row ok; 1 some rows failed; 2 bad config or manifest; 3 another run of the job holds
its lock; 4 interrupted (run again to finish); 5 a budget guard stopped the run; 6 a write failed (disk
full, I/O error, read-only file system: fix it and run the same command again).

Each command imports what it needs inside its handler, so ``--help`` and the light commands (validate,
status) start without loading the HTTP client, Pillow or the engines; asyncio too (~35 ms of a ~100 ms
``--help``) is imported only where a command runs a loop.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import __version__
from pipeline.core.errors import (
    ConfigError,
    ExitCode,
    LockHeld,
    PipelineError,
    StorageError,
)
from pipeline.core.redact import redact_url
from pipeline.ops.logs import configure_logging, run_log_path

if TYPE_CHECKING:
    from pipeline.core.config import Config
    from pipeline.ops.jobrun import JobRun
    from pipeline.ops.progress import ProgressReporter
    from pipeline.run.summary import RunSummary

LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

log = logging.getLogger("pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Caption image collections through any OpenAI-compatible streaming vision endpoint.",
        epilog="Exit codes: 0 all rows ok, 1 some rows failed, 2 bad config or manifest, "
        "3 another run of the job is in progress, 4 interrupted (run again to resume), "
        "5 a budget guard (limits.max_requests / max_total_tokens / max_cost) stopped the run, "
        "6 a write failed (disk full, I/O error, read-only: fix it and run the same command again).",
    )
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS,
                        help="log level for messages on stderr (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    logging_options = _logging_options()
    _add_job_commands(commands, logging_options)
    _add_schedule_commands(commands, logging_options)
    _add_serve_command(commands)
    return parser


def _logging_options() -> argparse.ArgumentParser:
    """Options shared by the commands that run jobs."""
    logging_options = argparse.ArgumentParser(add_help=False)
    group = logging_options.add_argument_group("logging")
    group.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                       help="log level for messages on stderr (default: WARNING)")
    group.add_argument("--log-format", choices=["text", "json"], default="text",
                       help="stderr and log file format: text, or one JSON object per line")
    group.add_argument("--log-file", type=Path, metavar="PATH",
                       help="log file for this run (default: <output folder>/logs/<stem>.<start time>.log)")
    group.add_argument("--no-log-file", action="store_true", help="do not write a log file for the run")
    return logging_options


def _add_job_commands(commands: Any, logging_options: argparse.ArgumentParser) -> None:
    """run, retry, status, runs, estimate, export, validate."""
    run = commands.add_parser("run", help="run a job: caption every row not yet done", parents=[logging_options],
                              description="Run a job described by a config file. Rows already done (same "
                              "image, prompt and parameters) are skipped; a stopped run resumes where it "
                              "stopped. The output file is rebuilt from the job's ledger at the end.")
    run.add_argument("config", type=Path, help="YAML or TOML job config")
    _progress_options(run)
    run.add_argument("--exit-line", action="store_true",
                     help="end with one line: time, run id, exit code (what scheduled runs log)")
    run.add_argument("--fresh", action="store_true",
                     help="start over: keep the old ledger as a timestamped backup and send every row")
    _engine_option(run)

    retry = commands.add_parser("retry", help="re-send the rows whose last outcome was failed",
                                parents=[logging_options],
                                description="Put failed rows back in the queue and run the job.")
    retry.add_argument("config", type=Path, help="YAML or TOML job config")
    retry.add_argument("--error-type", metavar="TYPE", help="only rows that failed with this error type")
    _progress_options(retry)
    _engine_option(retry)

    status = commands.add_parser("status", help="counts by status, oldest pending row, error breakdown",
                                 description="Show where the job stands, from its ledger.")
    status.add_argument("config", type=Path, help="YAML or TOML job config")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    runs = commands.add_parser("runs", help="the history of runs with their summaries",
                               description="List the job's runs, from its ledger.")
    runs.add_argument("config", type=Path, help="YAML or TOML job config")
    runs.add_argument("--json", action="store_true", help="print JSON instead of a table")

    estimate = commands.add_parser("estimate", help="what the next run would send and cost (sends nothing)",
                                   description="Read the manifest, the ledger and image headers only, and "
                                   "estimate rows to send, input/output tokens and cost (limits.prices).")
    estimate.add_argument("config", type=Path, help="YAML or TOML job config")
    estimate.add_argument("--json", action="store_true", help="print JSON instead of a table")

    export = commands.add_parser("export", help="rebuild the output file from the ledger",
                                 description="Write output.path from the ledger (safe while a run is going on).")
    export.add_argument("config", type=Path, help="YAML or TOML job config")

    _add_gallery_command(commands)

    validate = commands.add_parser("validate", help="check a config and its manifest without sending anything",
                                   description="Check a config file and the manifest's columns and ids; "
                                   "prints 'ok' or one precise error.")
    validate.add_argument("config", type=Path, help="YAML or TOML job config")


def _add_gallery_command(commands: Any) -> None:
    gallery = commands.add_parser(
        "gallery", help="write an HTML page of thumbnails, captions and failures (opens offline)",
        description="Write one self-contained HTML page from the job's ledger: the run's numbers and charts, "
        "failures by error type, and a card per row (thumbnail, caption, columns, tokens, latency) with "
        "filters. Nothing is downloaded: remote images get a placeholder. Safe while a run is going on.")
    gallery.add_argument("config", type=Path, help="YAML or TOML job config")
    gallery.add_argument("--run", type=int, metavar="N",
                         help="run N's numbers and only the rows it finished (default: the last run's numbers "
                         "over every row of the job)")
    gallery.add_argument("--out", type=Path, metavar="FILE.html",
                         help="where to write it (default: <output stem>.gallery.html beside the output)")
    gallery.add_argument("--limit", type=_card_limit, metavar="N",
                         help="at most N cards (default: report.gallery_limit, 500; at most 5000)")
    gallery.add_argument("--sample", choices=["failed-first", "newest", "random"],
                         help="which rows get cards when there are more than --limit (default: "
                         "report.gallery_sample, failed-first)")
    gallery.add_argument("--seed", type=int, metavar="S",
                         help="seed of --sample random: the same seed picks the same rows (default: 0)")


def _card_limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 5_000:
        raise argparse.ArgumentTypeError(f"expected a whole number of cards from 1 to 5000, got {text!r}")
    return int(text)


def _engine_option(command: argparse.ArgumentParser) -> None:
    command.add_argument("--engine", choices=["local", "ray"],
                         help="where rows run: this process (local) or a Ray cluster (ray; pip install "
                         "'pipeline[ray]'); overrides run.engine")


def _progress_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--no-progress", action="store_true",
                         help="no progress bar and no progress lines in the log")
    command.add_argument("--progress-interval", type=_positive_seconds, default=30.0, metavar="SECONDS",
                         help="when stderr is not a terminal (no bar): seconds between progress lines in the "
                         "log (default: 30)")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds above 0, got {text!r}")
    return value


def _add_schedule_commands(commands: Any, logging_options: argparse.ArgumentParser) -> None:
    schedule = commands.add_parser(
        "schedule", help="print (or install) a crontab line and systemd units that run a job",
        description="Print a crontab line and a systemd service + timer pair that run the job on a cron "
        "schedule, logging to a file; --install writes one of them.")
    schedule.add_argument("config", type=Path, help="YAML or TOML job config")
    schedule.add_argument("--cron", required=True, metavar="EXPR", help="cron expression, e.g. '0 2 * * *'")
    schedule.add_argument("--workdir", type=Path, help="folder the job runs in (default: the current one)")
    schedule.add_argument("--log-file", type=Path, help="where the job's output goes (default: logs/<config>.log)")
    schedule.add_argument("--env-file", type=Path, help="file of KEY=value lines (API keys) for the job")
    schedule.add_argument("--name", help="systemd unit name (default: from the config file name)")
    schedule.add_argument("--install", choices=["cron", "systemd"], help="install it (pick one, not both)")
    schedule.add_argument("--unit-dir", type=Path, help="systemd unit folder (default: the user's)")

    scheduler = commands.add_parser(
        "scheduler", help="run jobs on their cron schedules in the foreground (for containers)",
        parents=[logging_options],
        description="Fire each job on its cron expression, each run in its own process; a tick is skipped "
        "while the job's previous run still holds its lock. Stop with Ctrl-C / SIGTERM.")
    scheduler.add_argument("jobs", nargs="+", metavar="CONFIG[=CRON]", help="job configs, each with its schedule")
    scheduler.add_argument("--cron", metavar="EXPR", help="schedule for jobs given without one")


def _add_serve_command(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the embedded local endpoint on 127.0.0.1",
                                description="Serve the embedded OpenAI-compatible vision endpoint (a "
                                "deterministic Pillow-based describer, not a model) for other tools to use.")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8089, help="port (default: 8089; 0 picks a free one)")
    serve.add_argument("--fault", action="append", default=[], metavar="SPEC",
                       help="fault-injection rule, e.g. 'status:code=429,retry_after=1,p=0.2' (repeatable)")
    serve.add_argument("--chunk-delay", type=float, default=0.0, help="seconds between streamed chunks")
    serve.add_argument("--first-byte-delay", type=float, default=0.0, help="seconds before the first byte")
    serve.add_argument("--api-key-env", metavar="VAR",
                       help="require 'Authorization: Bearer <key>' with the key read from this variable")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, getattr(args, "log_format", "text"))
    handlers = {"run": _run, "retry": _run, "validate": _validate, "serve": _serve, "status": _status,
                "runs": _runs, "export": _export, "gallery": _gallery, "estimate": _estimate,
                "schedule": _schedule, "scheduler": _scheduler}
    code = 1  # what Python exits with after an uncaught exception
    try:
        code = _handle(handlers[args.command], args)
        return code
    finally:
        if getattr(args, "exit_line", False):
            from pipeline.ops.schedule import exit_line

            summary = getattr(args, "summary", None)  # set by _run once the job exists
            run_id = summary.run_id if summary else None
            sys.stdout.flush()  # the summary first: both streams go to one log
            print(exit_line(args.config.absolute(), run_id, code, when=datetime.now(UTC)), file=sys.stderr, flush=True)


def _handle(handler: Any, args: argparse.Namespace) -> int:
    try:
        return handler(args)
    except LockHeld as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.LOCKED
    except StorageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.IO_ERROR
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT


def load_config(path: Path) -> Config:
    """The job's config (pydantic is imported here, once a command needs it)."""
    from pipeline.edges.configfile import load_config as load

    return load(path)


def _validate(args: argparse.Namespace) -> int:
    from pipeline.api import check_job

    config = load_config(args.config)
    info = check_job(config)  # every check run makes, so validate and run refuse the same configs
    print(f"ok: {args.config}: {info.rows} rows in {info.source} (columns: {', '.join(info.columns)}); "
          f"output {config.output.path} ({config.output.output_format})")
    if not config.endpoint.is_local and (proxy := config.endpoint.proxy_for(config.endpoint.base_url)):
        print(f"    requests go to {redact_url(config.endpoint.base_url)} through the proxy {proxy}")
    return ExitCode.OK


def _run_log_path(config: Any) -> Path:
    """The run's log file: beside the output, or beside the ledger when the output is on an object store."""
    output = config.output.path
    if isinstance(output, Path):
        return run_log_path(output, datetime.now(UTC))
    return run_log_path(config.ledger_path.with_name(output.name), datetime.now(UTC))


def _run(args: argparse.Namespace) -> int:
    from pipeline.api import run_coroutine
    from pipeline.ops.jobrun import JobRun
    from pipeline.ops.publish import job_secrets

    config = load_config(args.config)
    if args.engine is not None:  # --engine overrides run.engine
        config = config.model_copy(update={"run": config.run.model_copy(update={"engine": args.engine})})
    log_file = None if args.no_log_file else args.log_file or _run_log_path(config)
    configure_logging(args.log_level, args.log_format, log_file, secrets=job_secrets(config), file_level="INFO")
    bar = None if args.no_progress else _progress(args.progress_interval)
    job = JobRun(config, on_progress=bar.update if bar else None, command=args.command,
                 fresh=getattr(args, "fresh", False), error_type=getattr(args, "error_type", None))
    args.summary = job.summary  # its run id, for --exit-line
    try:
        summary = run_coroutine(_run_async(job, bar), config.run.event_loop)
    except StorageError:
        if job.summary.run_id:  # the run started: say what it did before the write failed
            _print_summary(job.summary, job.report)
        raise
    _print_summary(summary, job.report)
    return summary.exit_code


async def _run_async(job: JobRun, bar: ProgressReporter | None) -> RunSummary:
    from pipeline.api import run_with_endpoint

    _install_stop_handlers(job)
    try:
        return await run_with_endpoint(job)
    finally:
        if bar:
            bar.close()


def _progress(interval: float) -> ProgressReporter:
    """A bar on a terminal, else a progress line in the log every ``interval`` seconds."""
    from pipeline.ops.progress import progress_reporter

    return progress_reporter(sys.stderr, interval)


def _install_stop_handlers(job: JobRun) -> None:
    """First Ctrl-C / SIGTERM: stop cleanly and keep finished work; a second Ctrl-C aborts."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def stop() -> None:
        if job.summary.interrupted and main_task is not None:
            main_task.cancel()
            return
        print("\nstopping: cancelling in-flight requests, writing finished results "
              "(Ctrl-C again to abort)", file=sys.stderr)
        job.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


def _print_summary(summary: RunSummary, report: dict[str, Any]) -> None:
    state = "interrupted" if summary.interrupted else "finished"
    print(f"{summary.command} #{summary.run_id} {state} in {summary.elapsed_s:.1f}s")
    requeued = f" · re-queued failed {summary.requeued}" if summary.command == "retry" else ""
    print(f"  manifest   {summary.rows_total} rows: new {summary.rows_new} · changed {summary.rows_changed} · "
          f"resumed {summary.rows_resumed} · retried {summary.rows_retried} · "
          f"skipped (already done) {summary.rows_skipped}{requeued}")
    print(f"  this run   ok {summary.rows_ok} · failed {summary.rows_failed} · "
          f"answered from identical requests {summary.rows_deduplicated} · requests sent {summary.attempts}"
          + (f" · not run {summary.rows_not_run}" if summary.rows_not_run else ""))
    for error_type, count in summary.errors.most_common():
        print(f"    failed with {error_type}: {count}")
    print(f"  tokens     {summary.prompt_tokens} prompt · {summary.completion_tokens} completion"
          + (f" · cost {cost:.4f}" if (cost := report.get("cost", {}).get("total")) is not None else ""))
    latency, ttft = report.get("latency_ms") or {}, report.get("ttft_ms") or {}
    if latency.get("p50") is not None:
        print(f"  latency    p50 {latency['p50']:.0f} ms · p95 {latency['p95']:.0f} ms · p99 {latency['p99']:.0f} ms"
              + (f" · first chunk p50 {ttft['p50']:.0f} ms" if ttft.get("p50") is not None else ""))
    if summary.bytes_saved:
        print(f"  pre-flight {summary.bytes_saved / 1e6:.1f} MB not sent (images resized or re-encoded)")
    print(f"  output     {summary.output}: {summary.output_rows} rows "
          f"({summary.output_ok} ok, {summary.output_failed} failed)")
    print(f"             for {summary.manifest_ok + summary.manifest_failed} of {summary.rows_total} manifest "
          f"rows ({summary.manifest_ok} ok, {summary.manifest_failed} failed, {summary.rows_not_run} not run yet)")
    if summary.stop_reason == "budget":
        print(f"stopped: {summary.budget_message}\nraise the limit in limits: and run again to continue")
    elif summary.interrupted:
        print("interrupted: run the same command again to resume")
    elif summary.manifest_failed and summary.rows_failed < summary.manifest_failed:
        print("earlier failures are kept; 'pipeline retry CONFIG' re-sends them")
    if summary.partition_path is not None:
        print(f"  partition  {summary.partition_path}")
    if summary.report_path is not None:
        print(f"  report     {summary.report_path} (and .md)")
    if summary.gallery_path is not None:
        print(f"  gallery    {summary.gallery_path}")


def _status(args: argparse.Namespace) -> int:
    from pipeline.ops.jobs import job_status

    config = load_config(args.config)
    report = job_status(config)
    if args.json:
        print(json.dumps(report, indent=2))
        return ExitCode.OK
    counts = report["rows"]
    print(f"job {args.config} · ledger {report['ledger']}")
    print(f"manifest rows: {report['manifest_rows']}")
    for status in ("ok", "failed", "pending", "in_flight", "not_run_yet"):
        print(f"  {status:<12}{counts.get(status, 0):>8}")
    if report["oldest_pending"]:
        pending = report["oldest_pending"]
        print(f"oldest pending row: {pending['id']} (since {pending['since']})")
    if report["errors"]:
        print("failures by error type:")
        for entry in report["errors"]:
            example = entry["examples"][0] if entry["examples"] else None
            hint = f"   e.g. {example['id']}: {example['message']}" if example else ""
            print(f"  {entry['error_type']:<20}{entry['count']:>6}{hint}")
    _print_last_run(report["last_run"], report["running_pid"])
    return ExitCode.OK


def _print_last_run(run: dict[str, Any] | None, running_pid: int | None) -> None:
    """The last run, and whether a run is going on now: the job's lock says so, not the ledger."""
    if run:
        print(f"last run: #{run['run_id']} {run['command']} {run['status']} at {run['started_at']}")
        if run["status"] == "crashed":
            print("  it stopped without finishing (killed or crashed; no run holds the lock): "
                  "run the job again to resume")
    if running_pid is not None:
        print(f"running now: pid {running_pid} holds the job's lock")


def _runs(args: argparse.Namespace) -> int:
    from pipeline.ops.jobs import run_history

    config = load_config(args.config)
    history = run_history(config)
    if args.json:
        print(json.dumps(history, indent=2))
        return ExitCode.OK
    header = f"{'run':>4}  {'command':<7}  {'status':<11}  {'started (UTC)':<19}  {'took':>7}  " \
             f"{'new':>6}  {'skipped':>7}  {'ok':>6}  {'failed':>6}  {'sent':>6}"
    print(header)
    for run in history:
        s = run["summary"]
        took = f"{s.get('elapsed_s', 0):.1f}s" if s.get("elapsed_s") else "-"
        started = run["started_at"][:19].replace("T", " ")
        print(f"{run['run_id']:>4}  {run['command']:<7}  {run['status']:<11}  {started:<19}  {took:>7}  "
              f"{s.get('rows_new', 0):>6}  {s.get('rows_skipped', 0):>7}  {s.get('rows_ok', 0):>6}  "
              f"{s.get('rows_failed', 0):>6}  {s.get('attempts', 0):>6}")
    if not history:
        print("(no runs yet)")
    return ExitCode.OK


def _estimate(args: argparse.Namespace) -> int:
    from pipeline.api import local_fault_rules
    from pipeline.ops.estimate import estimate_job

    config = load_config(args.config)
    local_fault_rules(config)  # a bad spec fails here as it would in the run
    report = estimate_job(config)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return ExitCode.OK
    detail = config.images.detail or "auto"
    print(f"estimate for {args.config} (model {report.model}; nothing was sent)")
    print(f"  manifest rows   {report.manifest_rows:>12,}")
    print(f"  to send         {report.rows_to_send:>12,}  (new {report.rows_new} · changed {report.rows_changed} · "
          f"pending from earlier runs {report.rows_pending})")
    print(f"  already done    {report.rows_done:>12,}")
    print(f"  invalid         {report.rows_invalid:>12,}" + ("  (would fail without a request)" if report.rows_invalid else ""))
    for example in report.invalid_examples:
        print(f"    {example['id']}: {example['problem']}")
    print(f"  input tokens    {report.input_tokens:>12,}  (prompt text + images after the resize policy, detail={detail})")
    print(f"  output tokens   {report.output_tokens:>12,}  ({report.output_basis})")
    cost = f"{report.cost:>12.4f}" if report.cost is not None else f"{'unknown':>12}"
    print(f"  cost            {cost}  ({report.cost_basis})")
    return ExitCode.OK


def _export(args: argparse.Namespace) -> int:
    from pipeline.ops.jobs import export_job

    config = load_config(args.config)
    report = export_job(config)
    print(f"wrote {config.output.path}: {report.rows} rows ({report.rows_ok} ok, {report.rows_failed} failed) "
          f"for {report.manifest_rows_done} manifest rows ({report.ok} ok, {report.failed} failed)")
    return ExitCode.OK


def _gallery(args: argparse.Namespace) -> int:
    from pipeline.ops.gallery import GalleryOptions, summary_of, write_gallery

    config = load_config(args.config)
    options = GalleryOptions.from_config(config, run_id=args.run, limit=args.limit, sample=args.sample,
                                         seed=args.seed)
    print(summary_of(write_gallery(config, options, out=args.out)))
    return ExitCode.OK


def _schedule(args: argparse.Namespace) -> int:
    import os

    from pipeline.ops.schedule import (
        ENVIRONMENT_NOTE,
        crontab_line,
        crontab_marker,
        default_log_file,
        install_crontab,
        install_systemd_units,
        prepare_schedule,
        render_schedule,
        systemd_enable_hint,
        systemd_units,
    )

    where = prepare_schedule(args.config, workdir=args.workdir or Path.cwd(), python=sys.executable,
                             log_file=args.log_file or default_log_file(args.config), env_file=args.env_file,
                             shell_env=os.environ)  # a job that could not start under cron is not scheduled
    config_path = args.config.absolute()
    if args.install == "systemd":
        units = systemd_units(config_path, args.cron, name=args.name, **where)
        for path in install_systemd_units(units, args.unit_dir):
            print(f"wrote {path}")
        print(systemd_enable_hint(units))
    elif args.install == "cron":
        install_crontab(crontab_line(config_path, args.cron, **where), marker=crontab_marker(config_path))
        print("installed in the crontab:")
        print(crontab_line(config_path, args.cron, **where))
    else:
        print(render_schedule(config_path, args.cron, name=args.name, **where))
    if args.env_file is None:
        print(ENVIRONMENT_NOTE)
    return ExitCode.OK


def _scheduler(args: argparse.Namespace) -> int:
    from pipeline.ops.schedule import (
        Scheduler,
        SchedulerEvent,
        run_job_subprocess,
        scheduler_jobs,
    )

    jobs = scheduler_jobs(args.jobs, args.cron)
    for path, _ in jobs:
        load_config(path)
    child_args = ["--log-format", args.log_format, "--log-level", args.log_level]
    if args.no_log_file:
        child_args.append("--no-log-file")

    def report(event: SchedulerEvent) -> None:
        detail = f"exit {event.exit_code}" if event.kind == "run" else event.reason
        print(f"{event.scheduled_for:%Y-%m-%d %H:%M:%S} {event.config}: {event.kind} ({detail})", flush=True)

    import asyncio
    import signal

    async def loop() -> None:
        stop = asyncio.Event()
        running = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            running.add_signal_handler(sig, stop.set)
        runner = functools.partial(run_job_subprocess, extra_args=child_args)
        print(f"scheduler: {len(jobs)} job(s); Ctrl-C to stop", flush=True)
        await Scheduler(jobs, runner=runner, stop=stop, on_event=report).run()

    asyncio.run(loop())
    return ExitCode.OK


def _serve(args: argparse.Namespace) -> int:
    import os

    from pipeline.server import run_server

    key = None
    if args.api_key_env:
        key = os.environ.get(args.api_key_env)
        if not key:
            raise ConfigError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    try:
        run_server(args.host, args.port, fault_specs=args.fault, api_key=key,
                   chunk_delay=args.chunk_delay, first_byte_delay=args.first_byte_delay)
    except ValueError as exc:
        raise ConfigError(f"--fault: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return ExitCode.OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
