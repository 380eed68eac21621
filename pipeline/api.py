"""The Python API for orchestrators (Airflow, Dagster, Prefect): run a job in three lines.

    from pipeline import run_job
    summary = run_job("configs/nightly.yaml")
    if summary.exit_code: raise RuntimeError(f"{summary.rows_failed} rows failed")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pipeline.core.config import Config, config_from_dict, with_proxy_environment
from pipeline.core.errors import ConfigError
from pipeline.edges.configfile import load_config
from pipeline.run.summary import Command, ProgressCallback, RunSummary

if TYPE_CHECKING:
    from pipeline.edges.manifest import ManifestInfo
    from pipeline.ops.jobrun import JobRun


def _as_config(config: Config | Mapping[str, Any] | str | os.PathLike[str]) -> Config:
    """The job's config, with the environment's proxies where the config leaves ``endpoint.proxy`` unset."""
    if isinstance(config, Config):
        return with_proxy_environment(config, os.environ)
    if isinstance(config, Mapping):
        return with_proxy_environment(config_from_dict(config), os.environ)
    return load_config(config)


async def run_job_async(config: Config | Mapping[str, Any] | str | os.PathLike[str], *, command: Command = "run",
                        fresh: bool = False, error_type: str | None = None,
                        on_progress: ProgressCallback | None = None) -> RunSummary:
    """Run (or resume, or ``command="retry"``) a job inside the caller's event loop."""
    # imported here: aiohttp and pyarrow load when a job runs, not on import
    from pipeline.ops.jobrun import JobRun

    job = JobRun(_as_config(config), on_progress=on_progress, command=command, fresh=fresh,
                 error_type=error_type)
    return await run_with_endpoint(job)


async def run_with_endpoint(job: JobRun) -> RunSummary:
    """Run ``job``, against the embedded endpoint started for it when ``endpoint.base_url`` is ``local``."""
    async with local_endpoint(job.config) as base_url:
        return await job.run(base_url)


def local_fault_rules(config: Config) -> list[Any]:
    """The embedded endpoint's fault rules, parsed (a bad spec is a config error, caught up front)."""
    if not config.endpoint.is_local or not config.endpoint.local.faults:
        return []
    from pipeline.server import parse_fault_spec

    rules = []
    for index, spec in enumerate(config.endpoint.local.faults):
        try:
            rules.append(parse_fault_spec(spec))
        except ValueError as exc:
            raise ConfigError(f"endpoint.local.faults[{index}]: {exc}") from None
    return rules


def check_job(config: Config) -> ManifestInfo:
    """Every check ``run`` makes before its first request, with nothing sent and nothing written: what
    ``pipeline validate`` runs, so a config it passes is one ``run`` accepts. It builds the same parts the
    run builds (fault rules, event loop choice, limits and budget, the client's request head, the plan)."""
    from pipeline.edges.client import ChatClient
    from pipeline.run.gate import RequestGate
    from pipeline.run.plan import Plan

    local_fault_rules(config)
    loop_factory(config.run.event_loop)
    RequestGate.from_config(config)
    ChatClient(config.endpoint, base_url="http://127.0.0.1:9" if config.endpoint.is_local else None)
    return Plan(config).check()


@contextlib.asynccontextmanager
async def local_endpoint(config: Config) -> AsyncIterator[str | None]:
    """Start the embedded endpoint in this event loop when ``base_url: local``; yields its URL (else None)."""
    endpoint = config.endpoint
    if not endpoint.is_local:
        yield None
        return
    from pipeline.server import FaultPlan, LocalEndpoint

    local = endpoint.local
    key = endpoint.api_key.get_secret_value() if endpoint.api_key else None
    server = LocalEndpoint(FaultPlan(local_fault_rules(config)), api_key=key, chunk_delay=local.chunk_delay,
                           first_byte_delay=local.first_byte_delay)
    base_url = await server.start()
    try:
        yield base_url
    finally:
        await server.stop()


def run_job(config: Config | Mapping[str, Any] | str | os.PathLike[str], **options: Any) -> RunSummary:
    """Run a job to the end from synchronous code; ``options`` as for :func:`run_job_async`.

    Raises ``ConfigError`` / ``ManifestError`` for bad input, ``LockHeld`` when another run of the job
    is in progress and ``StorageError`` when a write fails (disk full, I/O error); failed rows are reported
    in the summary (``exit_code`` as the CLI's).

    Called where an event loop is already running (a Jupyter notebook, an async web handler), the job runs
    on its own loop in a worker thread and this call blocks until it ends, as it does anywhere else; the
    caller's loop does nothing meanwhile, so use ``await run_job_async(...)`` to keep it serving.
    """
    config = _as_config(config)
    if not _loop_running():
        return run_coroutine(run_job_async(config, **options), config.run.event_loop)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-run-job") as pool:
        return pool.submit(lambda: run_coroutine(run_job_async(config, **options), config.run.event_loop)).result()


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


T = TypeVar("T")


def run_coroutine(coroutine: Coroutine[Any, Any, T], event_loop: Literal["auto", "uvloop", "asyncio"] = "auto") -> T:
    """``asyncio.run`` on the loop ``run.event_loop`` names: uvloop makes reads, writes and wake-ups cheaper,
    and at hundreds of streams in flight they are most of the client's work (scripts/bench.py, scenario b)."""
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        return runner.run(coroutine)


def loop_factory(event_loop: Literal["auto", "uvloop", "asyncio"]) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if event_loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if event_loop == "uvloop":
            raise ConfigError("run.event_loop is 'uvloop' but uvloop is not installed "
                              "(pip install uvloop, or set run.event_loop: auto)") from None
        return None
    return uvloop.new_event_loop
