"""A real S3 API for tests: moto's server mode in a subprocess on 127.0.0.1, with credentials enforced.

Why a subprocess: moto's in-process mode patches botocore (a mock of the network layer, which the house
rules forbid); its server mode is a separate HTTP server that speaks the S3 wire protocol, so s3fs, boto3
and the pipeline talk to it exactly as they would to MinIO or AWS. The server is started on a free port,
waited for (bounded), and stopped by its own pid.

Credentials are real: at start, an IAM user and its access key are created while moto still accepts
anything, then moto's authentication is switched on (``/moto-api/reset-auth``), so a request signed with
another key is refused with ``InvalidAccessKeyId`` and a wrong secret with ``SignatureDoesNotMatch``,
as AWS would. Everything a client needs travels in ``storage_options``: nothing is read from the
environment or ``~/.aws``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port

REGION = "us-east-1"
#: How long the server may take to answer its first request (importing moto takes ~2 s on a busy core).
START_TIMEOUT = 60.0


class S3Server:
    """One moto server process; ``storage_options`` holds what a config needs to reach it."""

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        """``tls``: serve https with a certificate from a private CA, whose PEM is ``ca_file``."""
        self.port = free_port()
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._log = open(workdir / f"moto-{self.port}.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | {"PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]
        self.ca_file: Path | None = None
        self._context: ssl.SSLContext | None = None
        if tls:
            import trustme

            ca = trustme.CA()
            self.ca_file = workdir / "ca.pem"
            ca.cert_pem.write_to_path(str(self.ca_file))
            served = ca.issue_cert("127.0.0.1")
            served.cert_chain_pems[0].write_to_path(str(workdir / "server.pem"))
            served.private_key_pem.write_to_path(str(workdir / "server.key"))
            command += ["-c", str(workdir / "server.pem"), "-k", str(workdir / "server.key")]
            self._context = ssl.create_default_context(cafile=str(self.ca_file))
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.key = "bootstrap-key-id"
        self.secret = "bootstrap-secret-value"
        try:
            self._wait_ready()
            self._enforce_credentials()
        except BaseException:
            self.stop()
            raise

    # -- lifecycle ----------------------------------------------------------------------------

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}; see {self._log.name}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2, context=self._context):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not ready after {START_TIMEOUT:g}s") from None
                with contextlib.suppress(subprocess.TimeoutExpired):  # the pause between polls watches the process
                    self.process.wait(timeout=0.1)

    def _enforce_credentials(self) -> None:
        """Create a user with full S3 rights and its key, then make moto check every request's signature."""
        iam = self.client("iam")
        iam.create_user(UserName="pipeline-tests")
        iam.put_user_policy(UserName="pipeline-tests", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        created = iam.create_access_key(UserName="pipeline-tests")["AccessKey"]
        self.key, self.secret = created["AccessKeyId"], created["SecretAccessKey"]
        request = urllib.request.Request(f"{self.url}/moto-api/reset-auth", data=b"0", method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10, context=self._context) as answer:
            assert answer.status == 200

    def stop(self) -> None:
        """Stop exactly the process this object started."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()

    def requests(self, method: str, key_part: str) -> int:
        """How many ``method`` requests whose path contains ``key_part`` the server has answered so far
        (from its access log, one line per request, written before the answer goes out)."""
        self._log.flush()
        pattern = re.compile(rf'"(?:\x1b\[[0-9;]*m)*{method} /[^ "]*{re.escape(key_part)}[^ "]* HTTP/')
        text = Path(self._log.name).read_text(errors="replace")
        return sum(1 for line in text.splitlines() if pattern.search(line))

    # -- clients ------------------------------------------------------------------------------

    @property
    def storage_options(self) -> dict[str, Any]:
        """What ``storage_options`` in a config needs for this server (s3fs's keyword arguments)."""
        verify = {"verify": str(self.ca_file)} if self.ca_file is not None else {}
        return {"endpoint_url": self.url, "key": self.key, "secret": self.secret,
                "client_kwargs": {"region_name": REGION, **verify}}

    def client(self, service: str = "s3") -> Any:
        """A boto3 client for this server, for setting up and inspecting test data."""
        import boto3

        return boto3.client(service, endpoint_url=self.url, region_name=REGION, aws_access_key_id=self.key,
                            verify=str(self.ca_file) if self.ca_file is not None else None,
                            aws_secret_access_key=self.secret)

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def put(self, url: str, data: bytes) -> None:
        bucket, key = split(url)
        self.client().put_object(Bucket=bucket, Key=key, Body=data)

    def get(self, url: str) -> bytes:
        bucket, key = split(url)
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]

    def delete(self, url: str) -> None:
        bucket, key = split(url)
        self.client().delete_object(Bucket=bucket, Key=key)

    def upload_folder(self, folder: Path, prefix: str) -> list[str]:
        """Every file under ``folder`` to ``prefix`` (``s3://bucket/some/prefix``), keys relative to it."""
        urls = []
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            url = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
            self.put(url, path.read_bytes())
            urls.append(url)
        return urls


def split(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One S3 server per test module (buckets are named per test, so tests do not share data)."""
    server = S3Server(tmp_path_factory.mktemp("s3server"))
    try:
        yield server
    finally:
        server.stop()
