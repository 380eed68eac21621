"""The object-store foundation: URL detection, storage_options in the config, the fsspec filesystem for a
URL, and SDK failures translated into one ObjectStoreError, against a real S3 API (moto's server)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from pipeline.core.config import job_secrets
from pipeline.core.errors import ConfigError, ObjectStoreError
from pipeline.core.locations import is_url, url_join, url_parent
from pipeline.edges import storage

from .helpers import job_config
from .s3server import S3Server, s3  # noqa: F401 - the fixture

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(("text", "url"), [
    ("s3://bucket/key.csv", True), ("gs://b/k", True), ("az://c/k", True), ("abfs://c/k", True),
    ("memory://x/y", True), ("file:///tmp/x.csv", False), ("/tmp/x.csv", False), ("data/x.csv", False),
    ("C:\\data\\x.csv", False), (Path("s3:/folded/by/pathlib"), False),
])
def test_is_url_tells_object_stores_from_local_paths(text: str | Path, url: bool) -> None:
    assert is_url(text) is url


def test_config_path_keys_keep_urls_as_text_and_read_file_urls_as_paths(tmp_path: Path) -> None:
    config = job_config(tmp_path / "m.csv", tmp_path / "out.parquet",
                        input={"manifest": f"file://{tmp_path}/my%20m.csv"})
    assert config.input.manifest == tmp_path / "my m.csv"
    listing = job_config(tmp_path / "m.csv", tmp_path / "out.parquet",
                         input={"manifest": None, "directory": "s3://bucket/prefix/"})
    assert listing.input.directory == "s3://bucket/prefix/"


def test_url_helpers_resolve_keys_under_a_bucket_prefix() -> None:
    assert url_parent("s3://bucket/a/b/manifest.csv") == "s3://bucket/a/b"
    assert url_parent("s3://bucket/manifest.csv") == "s3://bucket"
    assert url_join("s3://bucket/a/b", "img/x.png") == "s3://bucket/a/b/img/x.png"
    assert url_join("s3://bucket", "x.png") == "s3://bucket/x.png"
    assert url_join("s3://bucket/a/b", "../c/x.png") == "s3://bucket/a/c/x.png"
    assert url_join("s3://bucket/a", "../../x.png") is None  # out of the bucket: refused


def test_storage_options_merge_key_by_key_and_never_show_secrets(tmp_path: Path) -> None:
    config = job_config("s3://photos/manifest.csv", tmp_path / "out.parquet",  # type: ignore[arg-type]
                        input={"storage_options": {"secret": SECRET, "client_kwargs": {"region_name": "eu-west-1"}}},
                        storage_options={"endpoint_url": "http://minio:9000", "key": "AKIAEXAMPLEKEY01",
                                         "client_kwargs": {"region_name": "us-east-1"}})
    assert config.input.manifest == "s3://photos/manifest.csv"  # a URL stays text (a Path folds the //)
    assert config.input.manifest_format == "csv"
    merged = config.storage_options_for("input")
    assert merged == {"endpoint_url": "http://minio:9000", "key": "AKIAEXAMPLEKEY01", "secret": SECRET,
                      "client_kwargs": {"region_name": "eu-west-1"}}
    assert config.storage_options_for("output") == config.storage_options
    shown = repr(config) + str(config.input)
    assert SECRET not in shown and "AKIAEXAMPLEKEY01" not in shown and "minio:9000" in shown
    assert {SECRET, "AKIAEXAMPLEKEY01"} <= set(job_secrets(config))


def test_a_bad_storage_options_value_is_never_echoed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        job_config(tmp_path / "m.csv", tmp_path / "out.parquet", input={"storage_options": SECRET})
    assert "input.storage_options" in str(caught.value) and SECRET not in str(caught.value)


def test_a_missing_backend_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if not installed: the import fails
    with pytest.raises(ObjectStoreError) as caught:
        storage.filesystem("gs://bucket/manifest.csv", {}, where="input.storage_options")
    assert caught.value.problem == "backend"
    assert "pip install 'pipeline[gcs]'" in str(caught.value) and "gs://bucket/manifest.csv" in str(caught.value)


def test_an_unknown_scheme_is_one_clear_error() -> None:
    with pytest.raises(ObjectStoreError, match=r"ftp:// is not an object store"):
        storage.filesystem("ftp://host/manifest.csv", {}, where="input.storage_options")


def test_reads_an_object_from_the_real_s3_server(s3: S3Server) -> None:  # noqa: F811
    s3.create_bucket("smoke")
    s3.put("s3://smoke/a/b.txt", b"hello object store")
    fs = storage.filesystem("s3://smoke/a/b.txt", s3.storage_options, where="input.storage_options")
    assert fs is storage.filesystem("s3://smoke/other", dict(s3.storage_options), where="x")  # cached
    with storage.open_input("s3://smoke/a/b.txt", s3.storage_options, where="input.storage_options") as handle:
        assert handle.read() == b"hello object store"
    assert s3.get("s3://smoke/a/b.txt") == b"hello object store"


def test_async_store_reads_on_the_running_loop(s3: S3Server) -> None:  # noqa: F811
    s3.create_bucket("smoke-async")
    s3.put("s3://smoke-async/x.bin", b"0123456789")

    async def read() -> tuple[dict, bytes, bytes]:
        store = storage.AsyncStore(s3.storage_options, where="input.storage_options")
        try:
            return (await store.info("s3://smoke-async/x.bin"), await store.read("s3://smoke-async/x.bin", 4),
                    await store.read("s3://smoke-async/x.bin", 100))
        finally:
            await store.aclose()

    info, head, whole = asyncio.run(read())
    assert info["size"] == 10 and info["ETag"]
    assert (head, whole) == (b"0123", b"0123456789")


@pytest.mark.parametrize(("change", "problem", "hint"), [
    ({"key": "AKIAWRONGWRONGWRONG1"}, "credentials", "InvalidAccessKeyId"),
    ({"secret": "not-the-right-secret-at-all"}, "credentials", "SignatureDoesNotMatch"),
])
def test_wrong_credentials_are_one_clear_error(s3: S3Server, change: dict, problem: str,  # noqa: F811
                                               hint: str) -> None:
    s3.create_bucket("creds")
    s3.put("s3://creds/m.csv", b"id,path\n")
    options = {**s3.storage_options, **change}
    with pytest.raises(ObjectStoreError) as caught:
        with storage.open_input("s3://creds/m.csv", options, where="input.storage_options") as handle:
            handle.read()
    message = str(caught.value)
    assert caught.value.problem == problem, message
    assert "s3://creds/m.csv" in message and "input.storage_options" in message and hint in message
    assert options["secret"] not in message and s3.secret not in message


def test_a_directory_listing_with_wrong_credentials_is_one_clear_error(s3: S3Server) -> None:  # noqa: F811
    s3.create_bucket("listing-creds")
    s3.put("s3://listing-creds/in/a.png", b"x")
    from pipeline.core.config import InputConfig
    from pipeline.edges.manifest import ManifestReader

    reader = ManifestReader(InputConfig(directory="s3://listing-creds/in/"),
                            storage_options={**s3.storage_options, "secret": "not-the-right-secret-at-all"})
    with pytest.raises(ObjectStoreError) as caught:
        reader.check()
    assert caught.value.problem == "credentials" and "SignatureDoesNotMatch" in str(caught.value)
    assert "s3://listing-creds/in" in str(caught.value)


def test_no_such_bucket_and_no_such_object(s3: S3Server) -> None:  # noqa: F811
    s3.create_bucket("there")
    for url, problem in (("s3://not-there/m.csv", "no_bucket"), ("s3://there/missing.csv", "not_found")):
        with pytest.raises(ObjectStoreError) as caught:
            with storage.open_input(url, s3.storage_options, where="input.storage_options") as handle:
                handle.read()
        assert caught.value.problem == problem and url in str(caught.value)


def test_an_unreachable_endpoint_names_endpoint_url(s3: S3Server) -> None:  # noqa: F811
    with socket_closed_port() as port:
        options = {**s3.storage_options, "endpoint_url": f"http://127.0.0.1:{port}",
                   "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}
        with pytest.raises(ObjectStoreError) as caught:
            with storage.open_input("s3://any/m.csv", options, where="input.storage_options") as handle:
                handle.read()
    assert caught.value.problem == "unreachable"
    assert "input.storage_options.endpoint_url" in str(caught.value)


def socket_closed_port():  # type: ignore[no-untyped-def]
    """A port on 127.0.0.1 with nothing listening (bound, never listened on, so nobody takes it meanwhile)."""
    import contextlib
    import socket

    @contextlib.contextmanager
    def held():  # type: ignore[no-untyped-def]
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            yield sock.getsockname()[1]

    return held()
