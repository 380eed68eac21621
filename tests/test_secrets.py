"""Secrets stay secret everywhere: an endpoint that echoes credentials, config errors and reprs, and
``validate`` refusing what ``run`` refuses. Real endpoint on 127.0.0.1, real files, the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.api import run_job_async
from pipeline.core.config import ImagesConfig, config_from_dict, job_secrets
from pipeline.core.errors import ConfigError, ImageError
from pipeline.core.redact import redact
from pipeline.edges.client import ChatClient
from pipeline.edges.preflight import prepare
from pipeline.server import FaultPlan, LocalEndpoint, parse_fault_spec

from .helpers import make_image, make_manifest

# None of these looks like a key to the redactor's patterns: only the config can say they are secret.
KEY = "k3y-0123456789abcdefghij"
TENANT = "tenant-token-5f6e7d8c9b"  # X-Tenant-Token: secret by its name
CUSTOM = "custom-value-a1b2c3d4e5"  # X-Custom: secret because secret_names says so
SIG = "sig-9z8y7x6w5v4u3t2s"  # ?sig=: secret by its name
PLAIN = "acme-org-not-secret"  # X-Org: an ordinary header, echoed and kept
SECRETS = (KEY, TENANT, CUSTOM, SIG)


def document(manifest: Path, output: Path, base_url: str, **endpoint: Any) -> dict[str, Any]:
    return {
        "endpoint": {"base_url": base_url, "api_key": KEY,
                     "headers": {"X-Tenant-Token": TENANT, "X-Custom": CUSTOM, "X-Org": PLAIN},
                     "query": {"sig": SIG, "api-version": "2024-10-21"}, "secret_names": ["x-custom"],
                     **endpoint},
        "request": {"model": "test-model", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 2, "max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.02},
        "output": {"path": str(output), "partition_by": "run_date"},
    }


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def every_file_text(folder: Path) -> str:
    """Every byte written under ``folder`` (ledger, WAL, outputs, partitions, reports, logs), as text."""
    return "\n".join(p.read_bytes().decode("latin-1") for p in sorted(folder.rglob("*")) if p.is_file())


async def test_an_endpoint_that_echoes_credentials_gets_none_of_them_stored(tmp_path, caplog):
    manifest = make_manifest(tmp_path / "in", 3)
    out = tmp_path / "out" / "captions.jsonl"
    async with LocalEndpoint(FaultPlan([parse_fault_spec("echo_auth")]), api_key=KEY) as ep:
        config = document(manifest, out, ep.base_url)
        summary = await run_job_async(config)
    assert summary.rows_failed == 3
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    message = rows[0]["error_message"]
    assert rows[0]["error_type"] == "auth_error"
    assert "Incorrect API key provided: ***" in message and PLAIN in message  # echoed, and masked
    written = every_file_text(tmp_path / "out")
    assert "Incorrect API key provided" in written  # the ledger and the reports hold the message...
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("pipeline"))
    assert "Incorrect API key provided" in logged
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(config))
    status = cli("status", str(config_path), cwd=tmp_path)
    assert status.returncode == 0 and "Incorrect API key provided" in status.stdout
    for secret in SECRETS:  # ...and none of the secrets, anywhere
        assert secret not in written and secret not in logged and secret not in status.stdout


async def test_an_answer_that_repeats_a_secret_is_stored_masked(tmp_path):
    """An ok answer, not an error: the caption itself quotes the key and a header value."""
    manifest = make_manifest(tmp_path / "in", 2)
    out = tmp_path / "out" / "captions.jsonl"
    say = parse_fault_spec(f"say:text=Bearer bonds; the key is {KEY} and the tenant {TENANT}")
    async with LocalEndpoint(FaultPlan([say]), api_key=KEY) as ep:
        summary = await run_job_async(document(manifest, out, ep.base_url))
    assert summary.rows_ok == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert {row["content"] for row in rows} == {"Bearer bonds; the key is *** and the tenant ***"}  # words kept
    written = every_file_text(tmp_path / "out")
    assert "the key is ***" in written
    for secret in SECRETS:
        assert secret not in written


def test_a_secret_cut_short_by_a_truncated_message_is_still_masked():
    message = f"HTTP 401: Incorrect API key provided: {KEY[:14]}..."
    assert redact(message, [KEY]) == "HTTP 401: Incorrect API key provided: ***"
    webhook = "https://hooks.example.com/services/T000/B000/XYZ"  # a URL's first 8 characters are not enough
    assert redact("see https://docs.example.com/errors", [webhook]) == "see https://docs.example.com/errors"


def test_job_secrets_are_collected_from_the_whole_config(tmp_path):
    doc = document(tmp_path / "m.csv", tmp_path / "o.parquet", "https://user:pa55word-proxy@api.example.com/v1")
    doc["endpoint"]["headers"]["X-Auth-Mode"] = "on"  # looks secret by name, but too short to be one
    doc["notify"] = {"webhook_url": "https://hooks.example.com/services/T0/B0/abc"}
    secrets = job_secrets(config_from_dict(doc))
    assert set(secrets) == {*SECRETS, "pa55word-proxy", "https://hooks.example.com/services/T0/B0/abc"}


def config_error(doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(doc, "job.yaml")
    return str(caught.value)


@pytest.mark.parametrize("section, value", [
    ("headers", {"X-Api-Key": ["hidden-secret-value-1"]}),
    ("headers", {"Authorization": "Bearer hidden-secret-value-1"}),
    ("headers", {"api-key": "hidden-secret-value-1"}),
    ("query", {"sig": ["hidden-secret-value-1"]}),
])
def test_config_errors_never_show_header_or_query_values(tmp_path, section, value):
    doc = document(tmp_path / "m.csv", tmp_path / "o.parquet", "local")
    doc["endpoint"][section] = value
    text = config_error(doc)
    assert f"endpoint.{section}" in text and "<hidden>" in text
    assert "hidden-secret-value-1" not in text


def test_base_url_credentials_are_not_shown_in_its_error(tmp_path):
    doc = document(tmp_path / "m.csv", tmp_path / "o.parquet", "ftp://user:hidden-secret-value-1@host/v1")
    text = config_error(doc)
    assert "endpoint.base_url" in text and "hidden-secret-value-1" not in text


def test_the_config_repr_names_headers_and_query_keys_but_hides_their_values(tmp_path):
    config = config_from_dict(document(tmp_path / "m.csv", tmp_path / "o.parquet", "local"))
    client = ChatClient(config.endpoint, base_url="http://127.0.0.1:9")
    shown = repr(config) + str(config) + repr(config.endpoint) + repr(client)
    assert "X-Tenant-Token" in shown and "sig" in shown
    for secret in (*SECRETS, PLAIN):
        assert secret not in shown


@pytest.mark.parametrize("change, names", [
    ({"headers": {"X-Tenant": "abc\r\nX-Injected: 1"}}, "headers.X-Tenant"),
    ({"headers": {"X-Bad\nName": "v"}}, "header name"),
    ({"headers": {"X-Tenant": "caf\u00e9\u2603"}}, "headers.X-Tenant"),
    ({"api_key": "k3y-copied-with-a-newline\n"}, "endpoint.api_key"),
])
def test_validate_and_run_both_refuse_a_header_that_cannot_go_on_the_wire(tmp_path, change, names):
    manifest = make_manifest(tmp_path / "in", 1)
    doc = document(manifest, tmp_path / "out.parquet", "local")
    doc["endpoint"].update(change)
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    for command in ("validate", "run"):
        result = cli(command, str(config_path), cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        assert names in result.stderr and ("line break" in result.stderr or "Latin-1" in result.stderr)
        assert "X-Injected" not in result.stderr and "copied-with" not in result.stderr
    assert not (tmp_path / "out.parquet").exists()


def test_validate_refuses_a_cost_budget_it_cannot_price_like_run_does(tmp_path):
    manifest = make_manifest(tmp_path / "in", 1)
    doc = document(manifest, tmp_path / "out.parquet", "local")
    doc["limits"] = {"max_cost": 5, "prices": {"other-model": {"input": 1, "output": 2}}}
    config_path = tmp_path / "job.yaml"
    config_path.write_text(yaml.safe_dump(doc))
    for command in ("validate", "run"):
        result = cli(command, str(config_path), cwd=tmp_path)
        assert result.returncode == 2 and "limits.prices has no price for model 'test-model'" in result.stderr


NON_IMAGES = {
    "a PDF document": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj private-content",
    "an HTML page": b"<!DOCTYPE html><html><body>private-content</body></html>",
    "an SVG drawing": b"<?xml version='1.0'?>\n<svg xmlns='http://www.w3.org/2000/svg'>private-content</svg>",
    "a ZIP archive": b"PK\x03\x04\x14\x00private-content",
    "plain text": b"private-content, a caption file saved as .jpg\n",
    "binary data of an unknown type": b"\xde\xad\xbe\xef\x00private-content\xff\xfe\x00",
}


@pytest.mark.parametrize("kind", list(NON_IMAGES))
def test_a_non_image_file_is_named_by_type_never_quoted(kind):
    with pytest.raises(ImageError) as caught:
        prepare(NON_IMAGES[kind], "row-1 (scan.jpg)", ImagesConfig())
    message = caught.value.message
    assert caught.value.error_type == "image_unsupported"
    assert f"the file is {kind}" in message
    assert "private" not in message and "%PDF" not in message and "\\x" not in message


def test_a_real_image_still_passes_the_sniffer(tmp_path):
    data = make_image(tmp_path / "ok.png", (10, 20, 30))
    assert prepare(data, "ok.png", ImagesConfig()).mime == "image/png"
