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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pipeline.core.config import Config, config_from_dict, with_proxy_environment
from pipeline.core.errors import ConfigError
from pipeline.edges.configfile import load_config
from pipeline.run.summary import Command, ProgressCallback, RunSummary

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

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
                        on_progress: ProgressCallback | None = None, manifest: Any = None) -> RunSummary:
    """Run (or resume, or ``command="retry"``) a job inside the caller's event loop.

    ``manifest``: a pandas DataFrame or pyarrow Table to read in place of ``input.manifest`` (which the
    config may then leave out): ids from ``input.id_column``, images from ``input.path_column`` (paths,
    URLs) or ``input.image_column`` (encoded image bytes). Resumable like a file: the ledger knows each row
    by its id and its image's content, so running the same table again sends only what changed.
    """
    # imported here: aiohttp and pyarrow load when a job runs, not on import
    from pipeline.ops.jobrun import JobRun

    job = JobRun(_as_config(config), on_progress=on_progress, command=command, fresh=fresh,
                 error_type=error_type, manifest=manifest)
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


def check_job(config: Config, manifest: Any = None) -> ManifestInfo:
    """Every check ``run`` makes before its first request, with nothing sent and nothing written: what
    ``pipeline validate`` runs, so a config it passes is one ``run`` accepts. It builds the same parts the
    run builds (fault rules, event loop choice, limits and budget, the client's request head, the plan)."""
    from pipeline.edges.client import ChatClient
    from pipeline.run.gate import RequestGate
    from pipeline.run.plan import Plan

    local_fault_rules(config)
    loop_factory(config.run.event_loop)
    if config.run.engine == "ray":
        import pipeline.run.rayengine  # noqa: F401 - without Ray: the ConfigError naming the extra
    RequestGate.from_config(config)
    ChatClient(config.endpoint, base_url="http://127.0.0.1:9" if config.endpoint.is_local else None)
    return Plan(config, table=manifest).check()


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


def read_results(config_or_path: Config | Mapping[str, Any] | str | os.PathLike[str], *,
                 as_arrow: bool = False) -> pd.DataFrame | pa.Table:
    """A job's output as a pandas DataFrame (``as_arrow=True``: a pyarrow Table), for a notebook or a report.

    ``config_or_path`` is the job (a ``Config``, a config dict, or a ``.yaml`` / ``.yml`` / ``.toml`` file:
    its ``output.path`` is read) or an output itself: a ``.parquet``, ``.csv`` or ``.jsonl`` file, or a
    partitions folder (``output.partition_by: run_date``; each row gets its ``run_date``). The DataFrame has
    typed columns: UTC timestamps, nullable ``Int64`` token counts, categorical ``status`` and
    ``error_type``, ``string`` text, and the carried manifest columns (docs/python.md). Raises
    ``OutputMissing`` when there is no output yet, naming the path and what writes it.
    """
    from pipeline.ops.frames import read_output, to_frame

    path, fmt, hint = _output_of(config_or_path)
    table = read_output(path, fmt, hint=hint)
    return table if as_arrow else to_frame(table)


def _output_of(source: Config | Mapping[str, Any] | str | os.PathLike[str]) -> tuple[Path, str | None, str]:
    """(output path, its format if a config says it, what to run to write it)."""
    if isinstance(source, Config | Mapping):
        output = _as_config(source).output
        return output.path, output.output_format, "; run the job first: run_job(config) writes it"
    path = Path(source)
    if path.suffix.lower() in (".yaml", ".yml", ".toml"):
        output = load_config(path).output
        return output.path, output.output_format, f"; run the job first: pipeline run {path} (or run_job)"
    return path, None, ""


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
