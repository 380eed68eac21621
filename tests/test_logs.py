"""Structured logs and redaction: keys, bearer tokens, configured secrets and image payloads never reach
stderr or the log file, in either format."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.core.redact import redact
from pipeline.ops.logs import (
    JsonFormatter,
    RedactingFilter,
    configure_logging,
    run_log_path,
)

PAYLOAD = bytes(range(256)) * 4 + b"tail"  # 1028 bytes: base64 needs padding
DATA_URI = "data:image/png;base64," + base64.b64encode(PAYLOAD).decode()
SECRET = "my-configured-secret-value"
FAKE_KEY = "sk-" "abcdefghijklmnop1234"  # split so no scanner mistakes the test data for a leaked key


@pytest.mark.parametrize(("text", "expected"), [
    (f"key {FAKE_KEY} end", "key sk-*** end"),
    ("key sk-proj-AbC_dEf-123456789 end", "key sk-*** end"),
    ("Authorization: Bearer abc.DEF-123_xyz==", "Authorization: Bearer ***"),
    ("headers={'authorization': 'bearer tok/en+1='}", "headers={'authorization': 'bearer ***'}"),
    ("api-key: 0123456789abcdef", "api-key: ***"),
    ('{"api_key": "abc123", "model": "m"}', '{"api_key": "***", "model": "m"}'),
    ("https://x.openai.azure.com/?api-key=abc123&v=1", "https://x.openai.azure.com/?api-key=***&v=1"),
    (f"token {SECRET}!", "token ***!"),
    (f"image {DATA_URI} sent", f"image data:image/png;base64,<{len(PAYLOAD)} bytes> sent"),
    ("data:image/jpeg;base64,QUJD", "data:image/jpeg;base64,<3 bytes>"),
    ("task-abcdefghijk and risk-assessment stay", "task-abcdefghijk and risk-assessment stay"),
    ("plain text, no secrets", "plain text, no secrets"),
])
def test_redact(text, expected):
    assert redact(text, [SECRET, ""]) == expected
    assert redact(expected, [SECRET]) == expected  # idempotent: a second handler changes nothing


def test_longest_secret_is_masked_whole():
    assert redact("abc-long-secret", ["abc", "abc-long-secret"]) == "***"


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    """A private logger tree (not the root), so pytest's own log capture is left alone."""
    log = logging.getLogger("test_logs_tree")
    log.propagate = False
    yield log
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()


def emit_everything(log: logging.Logger) -> None:
    child = log.getChild("client")
    child.info("sending %s with key %s", DATA_URI, FAKE_KEY,
               extra={"row_id": "row-7", "headers": {"Authorization": f"Bearer {SECRET}"}, "attempt": 2})
    try:
        raise RuntimeError(f"endpoint said: invalid key {SECRET}")
    except RuntimeError:
        log.exception("request failed")
    log.debug("hidden below the level")


def test_json_logs_to_stderr_and_file_are_redacted(logger, tmp_path):
    stream = io.StringIO()
    log_file = tmp_path / "logs" / "run.log"
    handlers = configure_logging("INFO", "json", log_file, secrets=[SECRET], stream=stream, logger=logger)
    assert len(handlers) == 2
    emit_everything(logger)
    for handler in handlers:
        handler.flush()
    for text in (stream.getvalue(), log_file.read_text()):
        assert SECRET not in text and FAKE_KEY not in text
        assert base64.b64encode(PAYLOAD).decode()[:40] not in text
        lines = [json.loads(line) for line in text.splitlines()]
        assert [line["level"] for line in lines] == ["INFO", "ERROR"]
        first, second = lines
        assert set(first) >= {"ts", "level", "logger", "message"}
        assert datetime.fromisoformat(first["ts"]).tzinfo is not None
        assert first["logger"] == "test_logs_tree.client"
        assert first["message"] == f"sending data:image/png;base64,<{len(PAYLOAD)} bytes> with key sk-***"
        assert first["row_id"] == "row-7" and first["attempt"] == 2
        assert first["headers"] == {"Authorization": "Bearer ***"}
        assert second["message"] == "request failed"
        assert "RuntimeError: endpoint said: invalid key ***" in second["exc"]


def test_text_format_file_defaults_and_reconfiguring(logger, tmp_path):
    stream = io.StringIO()
    log_file = tmp_path / "run.log"
    configure_logging("WARNING", "text", log_file, secrets=[SECRET], stream=stream, logger=logger,
                      file_format="json", file_level="INFO")
    emit_everything(logger)
    console = stream.getvalue().splitlines()
    assert console[0] == "ERROR test_logs_tree: request failed"  # INFO is below the console's level
    assert "RuntimeError: endpoint said: invalid key ***" in stream.getvalue() and SECRET not in stream.getvalue()
    in_file = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [line["level"] for line in in_file] == ["INFO", "ERROR"]  # the file keeps more

    again = io.StringIO()
    installed = configure_logging("INFO", "text", None, stream=again, logger=logger)
    logger.info("once")
    assert [h for h in logger.handlers if getattr(h, "_pipeline_owned", False)] == installed  # replaced, not added
    assert again.getvalue() == "INFO test_logs_tree: once\n"
    assert stream.getvalue().count("once") == 0


def test_filter_and_formatter_on_their_own():
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "token %s", ("sk-abcdefghijklmnop",), None)
    record.payload = [DATA_URI, {"nested": "Bearer abcdef"}]
    assert RedactingFilter().filter(record) is True
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "token sk-***" and line["level"] == "WARNING"
    assert line["payload"] == [f"data:image/png;base64,<{len(PAYLOAD)} bytes>", {"nested": "Bearer ***"}]


def test_bad_format_is_refused(logger):
    with pytest.raises(ValueError, match="log format"):
        configure_logging("INFO", "xml", None, logger=logger)  # type: ignore[arg-type]


def test_run_log_path():
    started = datetime(2026, 3, 1, 2, 0, 5, tzinfo=UTC)
    assert run_log_path(Path("out/demo/captions.parquet"), started) == \
        Path("out/demo/logs/captions.20260301T020005Z.log")
    assert run_log_path(Path("a.csv"), started, Path("/var/log/pipeline")) == \
        Path("/var/log/pipeline/a.20260301T020005Z.log")
