"""PLACEHOLDER until wt-s3a's storage module is merged: fsspec filesystems for URLs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def filesystem(url: str, options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url, **dict(options or {}))
    return fs, path


def storage_error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
