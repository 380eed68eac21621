"""pipeline: caption large image collections through any OpenAI-compatible streaming vision endpoint.

The public surface: ``run_job(config_or_path)`` / ``run_job_async(...)`` run a job from Python and return a
``RunSummary`` (``manifest=df`` runs a pandas DataFrame or Arrow table); ``read_results(config_or_path)``
reads its output back as a typed DataFrame (``as_arrow=True``: a pyarrow Table); ``load_config`` reads a
config file into a ``Config``; every error the pipeline raises on purpose is a ``PipelineError`` (the tree
is drawn in ``pipeline.core.errors``), and ``ExitCode`` names the process exit codes.

``import pipeline`` stays cheap (the CLI's ``--help``, tools that only catch errors): the errors are plain
classes, and the API (pydantic, pyarrow, pandas, aiohttp, Pillow behind it) is imported on first use of
its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.core.errors import (
    AuthError,
    BudgetExceeded,
    ClusterError,
    ConfigError,
    ConnectError,
    DownloadBlocked,
    EmptyResponse,
    EndpointError,
    EndpointTimeout,
    ExitCode,
    ImageError,
    LedgerError,
    LockHeld,
    MalformedChunk,
    ManifestError,
    NotFound,
    ObjectStoreError,
    OutputMissing,
    PermanentEndpointError,
    PipelineError,
    ProtocolError,
    ProxyAuthError,
    ProxyError,
    ProxyRefused,
    RateLimited,
    ResponseTooLarge,
    ScheduleError,
    ServerError,
    ServerWaitTooLong,
    StorageError,
    StreamError,
    StreamErrorEvent,
    TransientDownloadError,
    TransientEndpointError,
    TruncatedStream,
)

if TYPE_CHECKING:
    from pipeline.api import (
        Config,
        RunSummary,
        load_config,
        read_results,
        run_job,
        run_job_async,
    )

from pipeline.core.version import __version__

#: Resolved from ``pipeline.api`` on first use.
_API_NAMES = ("run_job", "run_job_async", "read_results", "RunSummary", "Config", "load_config")

__all__ = [
    "run_job",
    "run_job_async",
    "read_results",
    "RunSummary",
    "Config",
    "load_config",
    "ExitCode",
    "PipelineError",
    "AuthError",
    "BudgetExceeded",
    "ClusterError",
    "ConfigError",
    "ConnectError",
    "DownloadBlocked",
    "EmptyResponse",
    "EndpointError",
    "EndpointTimeout",
    "ImageError",
    "LedgerError",
    "LockHeld",
    "MalformedChunk",
    "ManifestError",
    "NotFound",
    "ObjectStoreError",
    "OutputMissing",
    "PermanentEndpointError",
    "ProtocolError",
    "ProxyAuthError",
    "ProxyError",
    "ProxyRefused",
    "RateLimited",
    "ResponseTooLarge",
    "ScheduleError",
    "ServerError",
    "ServerWaitTooLong",
    "StorageError",
    "StreamError",
    "StreamErrorEvent",
    "TransientDownloadError",
    "TransientEndpointError",
    "TruncatedStream",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """Import the API lazily, once: later lookups find the name in the module itself."""
    if name in _API_NAMES:
        from pipeline import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names too, before their first use (for ``dir()``, completion and ``help()``)."""
    return sorted(set(globals()) | set(__all__))
