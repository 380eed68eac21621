"""The fast path of ``AsyncStore.read`` on s3:// (``edges/s3direct.py``), against the real S3 server with
signatures checked: the same bytes as s3fs, the same errors as s3fs, and s3fs for what it does not cover."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.errors import ObjectStoreError
from pipeline.edges import storage

from .s3server import S3Server, s3  # noqa: F401 - the fixture

WHERE = "input.storage_options"
#: Keys that need percent-encoding in a URL path and in the signature's canonical request.
ODD_KEYS = ["plain.bin", "with space/and more.bin", "unicode/ünï çødé 画像.bin",
            "signs/a+b=c&d;e,f@g$h!i'(j)*~k.bin", "dots/./x/../y.bin", "double//slash.bin", "q?x=1#frag.bin"]


async def _read(options: dict[str, Any], url: str, end: int, tried: list[int] | None = None) -> tuple[bytes, int]:
    """The bytes and how many reads the fast path answered; ``tried`` gets how many it was asked."""
    store = storage.AsyncStore(options, where=WHERE)
    try:
        return await store.read(url, end), store.direct_reads
    finally:
        if tried is not None:
            tried.append(store.direct_tried)
        await store.aclose()


async def test_ranged_reads_give_s3fs_bytes_for_keys_that_need_encoding(s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("direct-keys")
    body = bytes(range(256)) * 40
    for key in ODD_KEYS:
        s3.put(f"{bucket}/{key}", body)
    store = storage.AsyncStore(s3.storage_options, where=WHERE)  # one store and one s3fs session for all reads
    fs = storage.AsyncStore(s3.storage_options, where=WHERE).filesystem(f"{bucket}/{ODD_KEYS[0]}")
    try:
        for key in ODD_KEYS:
            url = f"{bucket}/{key}"
            for end in (1, 1000, len(body), len(body) + 1, 20 * 1024 * 1024 + 1):
                direct = store.direct_reads
                data = await store.read(url, end)
                assert data == body[:end] == await fs._cat_file(url, start=0, end=end), (key, end)
                assert store.direct_reads == direct + 1, key  # the fast path answered; the server checked it
    finally:
        await store.aclose()
        await (await fs.set_session()).close()


async def test_the_signature_travels_in_headers_never_in_the_url(s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("direct-nourl")
    s3.put(f"{bucket}/secret-check.bin", b"abc")
    assert await _read(s3.storage_options, f"{bucket}/secret-check.bin", 10) == (b"abc", 1)
    log = Path(s3._log.name).read_text(errors="replace")
    lines = [line for line in log.splitlines() if "/direct-nourl/secret-check.bin" in line]
    assert lines and not any(re.search(r"secret-check\.bin\?", line) for line in lines)


async def test_a_missing_object_is_s3fs_error_for_the_row(s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("direct-missing")
    tried: list[int] = []
    with pytest.raises(ObjectStoreError) as caught:
        await _read(s3.storage_options, f"{bucket}/not here ü.jpg", 100, tried)
    assert tried == [1] and caught.value.problem == "not_found"
    assert str(caught.value) == f"{bucket}/not here ü.jpg: no such object at {s3.url}"


@pytest.mark.parametrize(("change", "code"), [
    ({"key": "AKIAWRONGWRONGWRONG1"}, "InvalidAccessKeyId"),
    ({"secret": "not-the-right-secret-at-all"}, "SignatureDoesNotMatch"),
])
async def test_wrong_credentials_are_the_same_clear_error(s3: S3Server, change: dict, code: str) -> None:  # noqa: F811
    bucket = s3.create_bucket("direct-creds")
    s3.put(f"{bucket}/a.bin", b"abc")
    options = {**s3.storage_options, **change}
    tried: list[int] = []
    with pytest.raises(ObjectStoreError) as caught:
        await _read(options, f"{bucket}/a.bin", 100, tried)
    message = str(caught.value)
    assert tried == [1] and caught.value.problem == "credentials" and code in message and WHERE in message
    assert options["secret"] not in message and s3.secret not in message


async def test_an_empty_object_is_refused_a_range_as_before(s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("direct-empty")
    s3.put(f"{bucket}/empty.bin", b"")
    tried: list[int] = []
    with pytest.raises(ObjectStoreError) as caught:  # images.py asks the size then, and reads b""
        await _read(s3.storage_options, f"{bucket}/empty.bin", 100, tried)
    assert tried == [1] and caught.value.problem == "other" and "range" in str(caught.value).lower()


def _role_credentials(s3: S3Server) -> dict[str, str]:  # noqa: F811
    """Temporary credentials (key, secret, session token) of an assumed role on the server."""
    iam = s3.client("iam")
    trust = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
    allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
    arn = iam.create_role(RoleName="direct-reader", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
    iam.put_role_policy(RoleName="direct-reader", PolicyName="all", PolicyDocument=json.dumps(allow))
    found = s3.client("sts").assume_role(RoleArn=arn, RoleSessionName="tests")["Credentials"]
    return {"key": found["AccessKeyId"], "secret": found["SecretAccessKey"], "token": found["SessionToken"]}


async def test_session_tokens_from_options_and_from_the_sdk_chain(s3: S3Server, tmp_path: Path,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3.create_bucket("direct-token")
    s3.put(f"{bucket}/t.bin", b"token ok")
    role = _role_credentials(s3)
    endpoint = {"endpoint_url": s3.url, "client_kwargs": {"region_name": "us-east-1"}}
    assert await _read({**endpoint, **role}, f"{bucket}/t.bin", 100) == (b"token ok", 1)
    # the SDK's own chain: a profile in a shared credentials file (the file is the SDK's to read)
    (tmp_path / "credentials").write_text(
        f"[reader]\naws_access_key_id = {role['key']}\naws_secret_access_key = {role['secret']}\n"
        f"aws_session_token = {role['token']}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    assert await _read({**endpoint, "profile": "reader"}, f"{bucket}/t.bin", 100) == (b"token ok", 1)
    tried: list[int] = []
    with pytest.raises(ObjectStoreError) as caught:  # the token is checked: a wrong one is refused
        await _read({**endpoint, **role, "token": "x" + role["token"][1:]}, f"{bucket}/t.bin", 100, tried)
    assert tried == [1] and caught.value.problem == "credentials" and role["token"] not in str(caught.value)


async def test_options_the_fast_path_does_not_cover_go_through_s3fs(s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("direct-fallback")
    s3.put(f"{bucket}/r.bin", b"requester pays")
    assert await _read({**s3.storage_options, "requester_pays": True}, f"{bucket}/r.bin", 100) == (
        b"requester pays", 0)
    assert await _read({**s3.storage_options, "version_aware": True}, f"{bucket}/r.bin", 100) == (
        b"requester pays", 0)


async def test_an_unreachable_endpoint_is_still_named(s3: S3Server) -> None:  # noqa: F811
    from .test_objectstore import socket_closed_port

    with socket_closed_port() as port:
        options = {**s3.storage_options, "endpoint_url": f"http://127.0.0.1:{port}",
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
        tried: list[int] = []
        with pytest.raises(ObjectStoreError) as caught:
            await _read(options, "s3://any/a.bin", 100, tried)
    assert tried == [1] and caught.value.problem == "unreachable" and f"{WHERE}.endpoint_url" in str(caught.value)


def test_object_entries_for_resume_checks_match_s3fs_without_a_head_request(s3: S3Server) -> None:  # noqa: F811
    from pipeline.edges.images import _object_fingerprint, fingerprints

    bucket = s3.create_bucket("direct-info")
    urls = [f"{bucket}/{key}" for key in ODD_KEYS]
    for i, url in enumerate(urls):
        s3.put(url, b"x" * (100 + i))
    found = storage.infos([*urls, f"{bucket}/gone.bin"], s3.storage_options, where=WHERE, limit=4)
    plain = storage.filesystem(urls[0], s3.storage_options, where=WHERE)
    for url in urls:
        assert found[url] == plain.info(url, refresh=True), url  # the very entry s3fs's HEAD gives
    assert isinstance(found[f"{bucket}/gone.bin"], ObjectStoreError)
    assert found[f"{bucket}/gone.bin"].problem == "not_found"
    assert fingerprints([(url, "") for url in urls], s3.storage_options, limit=4) == [
        _object_fingerprint(url, plain.info(url, refresh=True)) for url in urls]  # resume sees no change
    assert s3.requests("HEAD", "direct-info/plain.bin") == 2  # the two plain.info() calls above, nothing else


async def test_https_uses_the_ca_bundle_botocore_is_given(tmp_path: Path) -> None:
    server = S3Server(tmp_path, tls=True)  # a private CA, passed as client_kwargs.verify
    try:
        bucket = server.create_bucket("direct-tls")
        server.put(f"{bucket}/t.bin", b"over tls")
        assert server.url.startswith("https://")
        assert await _read(server.storage_options, f"{bucket}/t.bin", 100) == (b"over tls", 1)
        untrusted = {**server.storage_options, "client_kwargs": {"region_name": "us-east-1"},
                     "config_kwargs": {"retries": {"max_attempts": 1}}}
        tried: list[int] = []
        with pytest.raises(ObjectStoreError) as caught:  # the system CAs do not know this one: refused
            await _read(untrusted, f"{bucket}/t.bin", 100, tried)
        assert tried == [1] and "certificate verify failed" in str(caught.value).lower()
    finally:
        server.stop()


async def test_a_bucket_url_is_never_read_as_its_listing(s3: S3Server) -> None:  # noqa: F811
    bucket = s3.create_bucket("direct-bucket-only")
    s3.put(f"{bucket}/a.bin", b"abc")
    tried: list[int] = []
    with pytest.raises(ObjectStoreError):  # s3fs refuses an empty key, as before; a GET of "/" would list it
        await _read(s3.storage_options, bucket, 10_000, tried)
    assert tried == [1]


async def test_a_store_that_refuses_the_fast_path_is_left_to_s3fs(s3: S3Server) -> None:  # noqa: F811
    from pipeline.edges.s3direct import MISS_LIMIT

    bucket = s3.create_bucket("direct-refused")
    for i in range(MISS_LIMIT + 3):
        s3.put(f"{bucket}/{i}.bin", b"data %d" % i)
    store = storage.AsyncStore(s3.storage_options, where=WHERE)
    try:
        assert await store.read(f"{bucket}/0.bin", 100) == b"data 0" and store.direct_reads == 1
        # a fault in the fast path only: its requests are signed with another secret, s3fs's are not
        wrong = storage.AsyncStore({**s3.storage_options, "secret": "not-the-right-secret-at-all"}, where=WHERE)
        wrong_fs = wrong.filesystem(f"{bucket}/0.bin")
        store._direct["s3"]._signer = (await wrong_fs.set_session())._request_signer
        before = s3.requests("GET", "direct-refused/")
        for i in range(1, MISS_LIMIT + 3):
            assert await store.read(f"{bucket}/{i}.bin", 100) == b"data %d" % i
        # the first MISS_LIMIT reads cost two requests (refused, then s3fs), the rest one (s3fs alone)
        assert s3.requests("GET", "direct-refused/") - before == 2 * MISS_LIMIT + 2
        assert store.direct_reads == 1 and store.direct_tried == MISS_LIMIT + 3
        await wrong.aclose()
    finally:
        await store.aclose()
