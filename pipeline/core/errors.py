"""One exception tree for the whole pipeline.

Every exception the package raises on purpose is one of these (the embedded test endpoint,
``pipeline.server``, keeps its own). The runner decides "retry or record" by asking ``error.retryable``,
and the output records ``error.error_type`` (a stable snake_case name) and the message. Nothing here
imports I/O libraries: aiohttp/asyncio errors are translated in ``edges/client.py`` and ``edges/downloads.py``.

::

    PipelineError
    ├── ConfigError                  bad config file / key / value            (never retried)
    │   ├── ScheduleError            a cron expression the scheduler cannot take
    │   └── ObjectStoreError         an object-store URL unusable as configured: backend not installed,
    │                                credentials refused, access denied, no such bucket / object, endpoint
    │                                unreachable (``problem`` says which; edges/storage.py translates)
    ├── ManifestError                missing column, duplicate id, empty      (never retried)
    ├── ImageError                   per-row: missing / empty / unsupported   (never retried)
    │   ├── TransientDownloadError   one download attempt failed (connect, timeout, 408/429/5xx):
    │   │                            retried by the download, then reported as an ImageError
    │   └── DownloadBlocked          a download (or a redirect hop) would reach a loopback / private /
    │                                link-local ... address not in images.allow_hosts (SSRF guard)
    ├── BudgetExceeded               max_requests / max_total_tokens / max_cost reached: stop cleanly
    ├── LockHeld                     another run of the same job holds the ledger lock
    ├── LedgerError                  the ledger file is corrupt or from a newer pipeline
    ├── StorageError                 a write failed: disk full, I/O error, read-only (the run stops)
    ├── OutputMissing                read_results found no output file (the job has not run yet)
    ├── ClusterError                 run.engine ray: the Ray cluster cannot be reached, or its job failed
    ├── EndpointError                HTTP-level answer or transport failure
    │   ├── TransientEndpointError   connect, timeouts, 408/409/429/5xx       (retryable)
    │   │   ├── ConnectError
    │   │   │   ├── ProtocolError    the server's bytes are not valid HTTP/1.1
    │   │   │   └── ProxyError       the proxy is down, closed the tunnel, or could not reach the endpoint
    │   │   ├── EndpointTimeout      connect / first_byte / idle / total
    │   │   ├── RateLimited          429
    │   │   └── ServerError          5xx, 408, 409
    │   ├── PermanentEndpointError   400/401/403/404/413/422 ...              (not retried)
    │   │   ├── AuthError            401/403: the key, not the row
    │   │   │   └── ProxyAuthError   407: the proxy wants (other) credentials
    │   │   ├── ProxyRefused         the proxy refused the CONNECT (403 ...): its policy, not the row
    │   │   └── NotFound             404: usually the model name or base_url
    │   ├── ServerWaitTooLong        the server asked to wait past max_retry_wait (not retried)
    │   └── ResponseTooLarge         one answer over request.max_response_bytes (not retried)
    └── StreamError                  problems inside a 200 SSE stream
        ├── TruncatedStream          closed before [DONE] with unfinished choices (retryable)
        ├── MalformedChunk           a data line that is not valid JSON        (retryable)
        ├── EmptyResponse            [DONE] without any choice                 (retryable)
        └── StreamErrorEvent         an error object / ``event: error``        (retryable unless 4xx-like)

``ExitCode`` (the process exit codes) lives here too, so the CLI, the run summary and the scheduler share
one definition.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class ExitCode(IntEnum):
    """The process exit codes of ``pipeline run`` / ``retry`` (and ``RunSummary.exit_code``), defined once:
    schedulers, cron wrappers and CI read them, so their values never change."""

    OK = 0  # every output row ok (or failed rows within run.max_failed_fraction)
    FAILED_ROWS = 1  # some rows failed; the output still has every row
    BAD_INPUT = 2  # bad config or manifest: nothing was sent
    LOCKED = 3  # another run of the same job holds its lock
    INTERRUPTED = 4  # Ctrl-C / SIGTERM: run the same command again to resume
    BUDGET = 5  # a budget guard stopped the run: raise it and run again
    IO_ERROR = 6  # a write failed (disk full, I/O error, read-only): fix the disk and run again


#: HTTP statuses that are worth another attempt.
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


class PipelineError(Exception):
    """Base of every error the pipeline raises on purpose."""

    error_type: ClassVar[str] = "error"
    retryable: bool = False
    #: The row itself is at fault (its image, its request): sending it again as-is would fail the same way,
    #: so a later ``pipeline run`` leaves it failed until its inputs change or ``pipeline retry`` is used.
    row_specific: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(PipelineError):
    """The config file or one of its values is wrong; the message names file and key path."""

    error_type = "config_error"


class ManifestError(PipelineError):
    """The manifest as a whole cannot be used (missing column, duplicate id, no rows)."""

    error_type = "manifest_error"


class ScheduleError(ConfigError):
    """A cron expression that is invalid or that the chosen scheduler cannot express, or a schedule whose job
    could not start there (its env file, config variables, Python or log folder)."""

    error_type = "schedule_error"


class ObjectStoreError(ConfigError):
    """An object-store URL (``s3://``, ``gs://``, ``az://`` ...) cannot be used as configured.

    Raised before any request goes to the endpoint when the manifest, a listing or the first image is on
    the store, so the run exits with code 2. ``problem`` is one of ``backend`` (its package is not
    installed), ``options`` (the backend refused a storage_options key), ``credentials``, ``denied``,
    ``no_bucket``, ``not_found``, ``unreachable`` or ``other``; ``url`` is the URL as it may be shown
    (no credentials, no query). The message names the storage_options key to check, never its value.
    """

    error_type = "object_store_error"

    def __init__(self, message: str, *, url: str, problem: str) -> None:
        super().__init__(message)
        self.url = url
        self.problem = problem


class ImageError(PipelineError):
    """One row's image cannot be sent; only that row fails."""

    error_type = "image_error"
    row_specific = True

    def __init__(self, message: str, *, error_type: str | None = None) -> None:
        super().__init__(message)
        if error_type:
            self.error_type = error_type  # type: ignore[misc]


class TransientDownloadError(ImageError):
    """One download attempt failed in a way another attempt may not (connection, timeout, 408/429/5xx).

    The download retries it; after the last attempt the row fails with a plain ``ImageError`` naming it.
    """

    error_type = "image_remote_error"
    retryable = True


class DownloadBlocked(ImageError):
    """A download would connect to an address the SSRF guard refuses (``core/addresses.py``); permanent
    until ``images.allow_hosts`` opens it, and nothing was sent to that address."""

    error_type = "image_blocked"


class BudgetExceeded(PipelineError):
    """The next request would pass a configured budget (``limit`` names which one).

    Not a row failure: the runner stops starting rows and finishes cleanly; rows not sent stay to do.
    """

    error_type = "budget_exceeded"

    def __init__(self, message: str, *, limit: str) -> None:
        super().__init__(message)
        self.limit = limit


class LockHeld(PipelineError):
    """Another run of the same job holds the ledger lock."""

    error_type = "lock_held"


class LedgerError(PipelineError):
    """The ledger file is unusable (corrupt, or written by a newer pipeline)."""

    error_type = "ledger_error"


class StorageError(PipelineError):
    """Writing the output, a partition, a report, the log or the ledger failed at the OS level (disk full,
    I/O error, read-only file system).

    A job-level stop, not a row failure: the message names the path, the cause and what to do. The ledger
    stays intact (SQLite rolls back the failed commit), so the same command finishes the job once the disk
    is fixed, without sending finished rows again; ``--fresh`` would re-pay every row, so it is never advised.
    """

    error_type = "storage_error"

    def __init__(self, message: str, *, path: str, cause: str) -> None:
        super().__init__(message)
        self.path = path
        self.cause = cause


class ClusterError(PipelineError):
    """``run.engine: ray``: the cluster at ``ray.address`` could not be joined, or Ray Data gave up on the
    job (its actors could not start). A job-level stop: what was recorded stays, the same command resumes."""

    error_type = "cluster_error"


class OutputMissing(PipelineError):
    """``read_results`` was pointed at an output that does not exist (yet): the message names the path and
    the command that writes it."""

    error_type = "output_missing"

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class EndpointError(PipelineError):
    """The endpoint answered with an error status, or could not be reached."""

    error_type = "endpoint_error"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        self.code = code


class TransientEndpointError(EndpointError):
    error_type = "transient_error"
    retryable = True


class ConnectError(TransientEndpointError):
    error_type = "connect_error"


class EndpointTimeout(TransientEndpointError):
    """A streaming-aware timeout: ``phase`` is connect, first_byte, idle or total."""

    error_type = "timeout"

    def __init__(self, message: str, *, phase: str) -> None:
        super().__init__(message)
        self.phase = phase


class ProtocolError(ConnectError):
    """The server's bytes are not valid HTTP/1.1 (the connection is dropped; the request may be tried again)."""

    error_type = "protocol_error"


class ProxyError(ConnectError):
    """The proxy could not be reached, closed the tunnel, or could not reach the endpoint (502/503/504)."""

    error_type = "proxy_error"


class RateLimited(TransientEndpointError):
    error_type = "rate_limited"


class ServerError(TransientEndpointError):
    error_type = "server_error"


class PermanentEndpointError(EndpointError):
    error_type = "bad_request"
    row_specific = True


class AuthError(PermanentEndpointError):
    """A job-level problem (the key), not the row's: the next run tries the row again."""

    error_type = "auth_error"
    row_specific = False


class ProxyAuthError(AuthError):
    """The proxy answered 407: no credentials, wrong ones, or a scheme the pipeline does not speak."""

    error_type = "proxy_auth_error"


class ProxyRefused(PermanentEndpointError):
    """The proxy refused to open a tunnel to the endpoint (its policy): job-level, not the row's."""

    error_type = "proxy_refused"
    row_specific = False


class NotFound(PermanentEndpointError):
    """Usually a wrong model name or base_url: job-level, so the next run tries the row again."""

    error_type = "not_found"
    row_specific = False


class ServerWaitTooLong(EndpointError):
    """The endpoint asked to wait longer than ``max_server_wait``: the row fails now, not in an hour.

    Keeps the original error's ``error_type`` (e.g. ``rate_limited``) and message, and says why it was
    not retried; the original is the ``__cause__``. Not retryable by construction.
    """

    retryable = False

    def __init__(self, original: PipelineError, wait: float, limit: float) -> None:
        super().__init__(
            f"{original.message} (the endpoint asked to wait {wait:g}s, more than "
            f"max_retry_wait={limit:g}s; not retried)",
            status=getattr(original, "status", None), retry_after=wait, code=getattr(original, "code", None),
        )
        self.error_type = original.error_type  # type: ignore[misc]
        self.original = original


class ResponseTooLarge(EndpointError):
    """One answer grew past ``request.max_response_bytes``: reading stopped and the connection was dropped,
    so memory stays bounded. Another attempt would most likely stream the same flood and pay for it again,
    so it is not retried; ``pipeline retry`` sends it again once the limit is raised."""

    error_type = "response_too_large"
    row_specific = True


class StreamError(PipelineError):
    """Something went wrong inside an HTTP 200 event stream."""

    error_type = "stream_error"
    retryable = True


class TruncatedStream(StreamError):
    error_type = "truncated_stream"


class MalformedChunk(StreamError):
    error_type = "malformed_chunk"


class EmptyResponse(StreamError):
    """The stream finished cleanly but carried no choice at all."""

    error_type = "empty_response"


class StreamErrorEvent(StreamError):
    """The server sent an error object inside the stream; retryable unless it looks client-side."""

    error_type = "stream_error_event"

    def __init__(self, message: str, *, retryable: bool = True, code: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.row_specific = not retryable
        self.code = code


def error_for_status(status: int, message: str, *, retry_after: float | None = None,
                     code: str | None = None) -> EndpointError:
    """Map an HTTP error status to the matching exception class."""
    cls: type[EndpointError]
    if status == 429:
        cls = RateLimited
    elif status in RETRYABLE_STATUSES or status >= 500:
        cls = ServerError
    elif status in (401, 403):
        cls = AuthError
    elif status == 404:
        cls = NotFound
    else:
        cls = PermanentEndpointError
    return cls(f"HTTP {status}: {message}", status=status, retry_after=retry_after, code=code)
