"""Where a file lives: a local path or an object-store URL (``s3://bucket/key``), told apart without I/O.

Pure (no fsspec, no I/O): the config types its path keys with ``Location`` (a ``Path`` for a local file, the
URL text for an object store, since ``Path("s3://b/k")`` would fold the ``//``), and the edges use the
helpers here to take a URL apart. Opening anything is ``pipeline/edges/storage.py``'s job.

Plain paths and ``file://`` URLs are local: they never reach fsspec, so a job with local files pays nothing
for object-store support.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import unquote, urlsplit

from pydantic import BeforeValidator

__all__ = ["Location", "as_location", "is_url", "location_suffix", "option_secrets", "mask_options", "url_join",
           "url_parent", "url_protocol"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+)://")
#: ``storage_options`` keys (at any depth) whose values are credentials: s3fs's ``key`` / ``secret`` /
#: ``token``, botocore's ``aws_secret_access_key``, adlfs's ``account_key`` / ``sas_token`` /
#: ``connection_string`` / ``client_secret``, gcsfs's ``token`` / ``credentials``, any ``password``.
_SECRET_OPTION = re.compile(r"(?i)key|secret|token|passw|credential|connection_string|sas|signature|auth")
#: A secret value shorter than this is masked in reprs but not searched for in every message (``anon``,
#: ``cloud`` are gcsfs token *modes*, not credentials, and masking short words everywhere garbles logs).
_MIN_SECRET = 8
_MASK = "***"
_URL_PASSWORD = re.compile(r"(?i)(^[a-z][a-z0-9+.-]*://[^/@\s:]*:)[^/@\s]+@")


def url_protocol(text: str | Path) -> str | None:
    """``s3`` for ``s3://bucket/key``; None for a plain path (and for a ``Path``, which is always local)."""
    if isinstance(text, Path):
        return None
    match = _SCHEME.match(text)
    return match.group(1).lower() if match else None


def is_url(path: str | Path) -> bool:
    """True for ``scheme://...`` other than ``file://``: what goes through fsspec rather than ``open``."""
    protocol = url_protocol(path)
    return protocol is not None and protocol != "file"


def as_location(value: Any) -> Any:
    """The config's reading of a path key: URL text stays text, ``file:///a/b`` is the path ``/a/b``, and
    anything else becomes a ``Path``."""
    if not isinstance(value, str):
        return value
    if url_protocol(value.strip()) == "file":
        return Path(unquote(urlsplit(value.strip()).path))
    return value.strip() if is_url(value.strip()) else Path(value)


#: A config path key that may also name an object (``s3://bucket/key``, ``gs://...``, ``az://...``).
Location = Annotated[Path | str, BeforeValidator(as_location)]


def location_suffix(location: Path | str) -> str:
    """``.parquet`` for ``s3://b/x/m.parquet`` and ``x/m.parquet`` alike (a URL's query is not a suffix)."""
    if isinstance(location, Path):
        return location.suffix
    return PurePosixPath(urlsplit(location).path).suffix


def url_parent(url: str) -> str:
    """The "folder" of an object: ``s3://b/x/m.csv`` -> ``s3://b/x``; a bucket is its own parent."""
    head, _, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    folder = posixpath.dirname(key.rstrip("/"))
    return f"{head}://{bucket}/{folder}".rstrip("/")


def url_join(base: str, relative: str) -> str | None:
    """``relative`` (a key written in a manifest) under ``base`` (a URL folder); None when ``..`` climbs
    out of the bucket, which no manifest row may do."""
    head, _, rest = base.rstrip("/").partition("://")
    bucket, _, prefix = rest.partition("/")
    key = posixpath.normpath(posixpath.join(prefix, relative))
    if key == ".." or key.startswith("../") or key.startswith("/"):
        return None
    return f"{head}://{bucket}/{key.removeprefix('./')}" if key != "." else f"{head}://{bucket}"


def option_secrets(options: Mapping[str, Any]) -> list[str]:
    """Every credential in a ``storage_options`` mapping: string values under a secret-looking key (at any
    depth, ``client_kwargs.aws_secret_access_key`` too) and the password of a URL value (``user:pw@``)."""
    found: list[str] = []

    def walk(value: Any, secret: bool) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                walk(item, secret or bool(_SECRET_OPTION.search(str(key))))
        elif isinstance(value, list | tuple):
            for item in value:
                walk(item, secret)
        elif isinstance(value, str):
            if secret and len(value) >= _MIN_SECRET:
                found.append(value)
            elif (match := _URL_PASSWORD.match(value)):
                found.append(value[match.end(1):match.end() - 1])

    walk(options, False)
    return found


def mask_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """``storage_options`` as a repr may show them: every value under a secret-looking key is ``***``."""
    def mask(value: Any, secret: bool) -> Any:
        if isinstance(value, Mapping):
            return {k: mask(v, secret or bool(_SECRET_OPTION.search(str(k)))) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [mask(v, secret) for v in value]
        if secret and value is not None and not isinstance(value, bool):
            return _MASK
        return _URL_PASSWORD.sub(r"\1" + _MASK + "@", value) if isinstance(value, str) else value

    return mask(options, False)  # type: ignore[no-any-return]
