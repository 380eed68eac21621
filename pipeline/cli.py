"""The command line: parse arguments, load the config, call the runner, print, map outcomes to exit codes.

Exit codes: 0 every row ok; 1 some rows failed; 2 bad config or manifest; 4 interrupted (re-run to finish).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from . import __version__
from .config import Config, load_config
from .errors import ConfigError, ManifestError, PipelineError
from .runner import Progress, Runner, RunSummary

EXIT_OK, EXIT_FAILED_ROWS, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 4

log = logging.getLogger("pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description="Caption image collections through any OpenAI-compatible streaming vision endpoint.",
        epilog="Exit codes: 0 all rows ok, 1 some rows failed, 2 bad config or manifest, 4 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"pipeline {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level for messages on stderr (default: WARNING)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run a job: caption every row of the manifest",
                              description="Run a job described by a config file and write the output file.")
    run.add_argument("config", type=Path, help="YAML or TOML job config")
    run.add_argument("--no-progress", action="store_true", help="do not draw the progress bar")

    validate = commands.add_parser("validate", help="check a config and its manifest without sending anything",
                                   description="Check a config file and the manifest's columns and ids; "
                                   "prints 'ok' or one precise error.")
    validate.add_argument("config", type=Path, help="YAML or TOML job config")

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "validate":
            return _validate(args)
        return _serve(args)
    except (ConfigError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _validate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    info = Runner(config).check()
    print(f"ok: {args.config}: {info.rows} rows in {info.source} (columns: {', '.join(info.columns)}); "
          f"output {config.output.path} ({config.output.output_format})")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    summary = asyncio.run(_run_async(config, progress=not args.no_progress))
    _print_summary(summary)
    return summary.exit_code


async def _run_async(config: Config, *, progress: bool) -> RunSummary:
    bar = _ProgressBar() if progress else None
    runner = Runner(config, on_progress=bar.update if bar else None)
    _install_stop_handlers(runner)
    try:
        return await runner.run()
    finally:
        if bar:
            bar.close()


def _install_stop_handlers(runner: Runner) -> None:
    """First Ctrl-C / SIGTERM: stop cleanly and keep finished work; a second Ctrl-C aborts."""
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()

    def stop() -> None:
        if runner.summary.interrupted and main_task is not None:
            main_task.cancel()
            return
        print("\nstopping: cancelling in-flight requests, writing finished results "
              "(Ctrl-C again to abort)", file=sys.stderr)
        runner.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)


class _ProgressBar:
    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def update(self, progress: Progress) -> None:
        if self.bar is None:
            self.bar = tqdm(total=progress.total, unit="img", dynamic_ncols=True, mininterval=0.25,
                            file=sys.stderr)
        self.bar.n = progress.done
        self.bar.set_postfix(ok=progress.ok, failed=progress.failed, in_flight=progress.in_flight,
                             refresh=False)
        self.bar.update(0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _print_summary(summary: RunSummary) -> None:
    state = "interrupted" if summary.interrupted else "finished"
    print(f"run {state} in {summary.elapsed_s:.1f}s: {summary.rows_total} rows, {summary.rows_ok} ok, "
          f"{summary.rows_failed} failed" + (f", {summary.rows_not_run} not run" if summary.rows_not_run else ""))
    print(f"tokens: {summary.prompt_tokens} prompt, {summary.completion_tokens} completion; "
          f"attempts: {summary.attempts}")
    for error_type, count in summary.errors.most_common():
        print(f"  failed with {error_type}: {count}")
    print(f"output: {summary.output} ({summary.output_rows} rows)")
    if summary.interrupted:
        print("interrupted: run the same command again to finish the remaining rows")


def _serve(args: argparse.Namespace) -> int:
    import os

    from .server import run_server

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
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
