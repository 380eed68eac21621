"""Logging for unattended runs: plain text or one JSON object per line, to stderr and optionally a file,
with secrets and image payloads masked before any handler writes a byte.

Why a filter on every handler: a key can reach a log line in many ways (an endpoint echoing the request,
an exception message with a header in it, a debug dump of a body holding a multi-megabyte Base64 data URI).
Masking at the handler means no code path has to remember to do it, and the log file and stderr see the
same redacted text. The masking is idempotent, so a record passing two handlers is not mangled twice.

The masking itself is ``pipeline.core.redact`` (shared with reports and image errors); this module applies
it to every record. Nothing here reads the environment: the caller passes the level, the format, the file
and the secret values (the configured API key, a webhook URL) to mask.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from pipeline.core.redact import redact, redact_value
from pipeline.edges.files import storage_error, storage_errors

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged as a field.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    """Masks secrets in a record's message, its ``extra`` fields, its traceback and its stack.

    The message is rendered (``msg % args``) and stored back with ``args`` cleared, so a secret passed as
    an argument is caught too. The traceback is rendered into ``exc_text`` here, because formatters only
    render it later, after every filter has run.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)
        self._formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage(), self.secrets)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self._formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.secrets)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.secrets)
        for name, value in list(vars(record).items()):
            if name not in _STANDARD_ATTRS:
                setattr(record, name, redact_value(value, self.secrets))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, then every
    ``extra=`` field, then ``exc`` / ``stack`` when present. Log shippers (Loki, CloudWatch, journald's
    JSON mode, Datadog) index the fields without any parsing rule."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name not in _STANDARD_ATTRS and name not in data:
                data[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class LogFileHandler(logging.FileHandler):
    """A log file that fills its disk says so once, in one line on stderr, and stops writing; the default
    handler would print a traceback for every record. The run itself stops at its next output or ledger
    write with a ``StorageError``."""

    failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        self.failed = True
        error = sys.exc_info()[1]
        cause = storage_error(Path(self.baseFilename), error).cause if isinstance(error, OSError) else error
        sys.stderr.write(f"warning: cannot write the log file {self.baseFilename}: {cause}; "
                         "logging to stderr only\n")


def _formatter(fmt: LogFormat, text_format: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return logging.Formatter(text_format)
    raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")


#: Set on the handlers ``configure_logging`` installs, so a second call replaces exactly those.
_OWNED = "_pipeline_owned"
#: Set on its console (stderr) handler, which a progress bar routes through itself while it is shown.
_CONSOLE = "_pipeline_console"


def configure_logging(level: int | str = "WARNING", fmt: LogFormat = "text", log_file: Path | None = None, *,
                      secrets: Iterable[str] = (), file_format: LogFormat | None = None,
                      file_level: int | str | None = None, stream: TextIO | None = None,
                      logger: logging.Logger | None = None) -> list[logging.Handler]:
    """Install a stderr handler (and a file handler when ``log_file`` is set) on ``logger`` (the root).

    Every handler gets the same ``RedactingFilter``. The file, opened in append mode (one file can hold
    several runs, or the caller passes one path per run), defaults to the stderr format and to the level
    given; set ``file_level="INFO"`` to keep a fuller record in the file than on the console. Calling
    again replaces the handlers of the previous call (tests and long-lived processes reconfigure).
    Returns the handlers installed.
    """
    target = logger if logger is not None else logging.getLogger()
    for handler in list(target.handlers):
        if getattr(handler, _OWNED, False):
            target.removeHandler(handler)
            handler.close()
    redactor = RedactingFilter(secrets)
    console = logging.StreamHandler(stream if stream is not None else sys.stderr)
    console.setLevel(level)
    console.setFormatter(_formatter(fmt, TEXT_FORMAT))
    setattr(console, _CONSOLE, True)
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        with storage_errors(log_file):
            log_file.parent.mkdir(parents=True, exist_ok=True)
            to_file = LogFileHandler(log_file, mode="a", encoding="utf-8")
        to_file.setLevel(file_level if file_level is not None else level)
        to_file.setFormatter(_formatter(file_format or fmt, FILE_TEXT_FORMAT))
        handlers.append(to_file)
    levels = [h.level for h in handlers]
    for handler in handlers:
        handler.addFilter(redactor)
        setattr(handler, _OWNED, True)
        target.addHandler(handler)
    target.setLevel(min(levels))
    return handlers


def console_handlers(logger: logging.Logger | None = None) -> list[logging.StreamHandler[Any]]:
    """The console handlers ``configure_logging`` installed on ``logger`` (the root)."""
    target = logger if logger is not None else logging.getLogger()
    return [h for h in target.handlers if getattr(h, _CONSOLE, False) and isinstance(h, logging.StreamHandler)]


def run_log_path(output_path: Path, started: datetime, folder: Path | None = None) -> Path:
    """A log file per run: ``<output folder>/logs/<output stem>.<UTC start, compact>.log``.

    Named by the start time rather than the run id because logging starts before the ledger hands out
    the id; sorting the folder lists the runs in order.
    """
    stamp = started.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    base = folder if folder is not None else output_path.parent / "logs"
    return base / f"{output_path.stem}.{stamp}.log"
