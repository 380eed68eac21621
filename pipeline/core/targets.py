"""Where a published file goes (the output, its partitions, reports, the Prometheus file, the synced
ledger): a local ``Path``, or an object-store URL (``s3://bucket/key``) as a ``RemotePath``.

Pure: no I/O here. ``RemotePath`` is a ``str`` (what fsspec takes) with the few path operations the output
side does on its target (``name``, ``stem``, ``suffix``, ``parent``, ``with_name``, ``with_suffix``, ``/``), so
``report_paths``, partitions and the Prometheus file name are computed the same way for both kinds. Whether a
file is written in place or staged and uploaded is decided where it is written (``edges/files.py``), on the
type: a ``Path`` never goes near fsspec.
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Any

__all__ = ["RemotePath", "Target"]


class RemotePath(str):
    """An object-store URL with pure path arithmetic on its key (always ``/``-separated)."""

    __slots__ = ()

    def __new__(cls, value: str) -> RemotePath:
        # imported here: core.locations imports pydantic, and `pipeline --help` stays light
        from pipeline.core.locations import is_url

        if not is_url(value):
            raise ValueError(f"not an object-store URL: {value!r}")
        return super().__new__(cls, value)

    @property
    def scheme(self) -> str:
        return self.split("://", 1)[0].lower()

    @property
    def _rest(self) -> str:
        return self.split("://", 1)[1]

    @property
    def name(self) -> str:
        return posixpath.basename(self._rest.rstrip("/"))

    @property
    def suffix(self) -> str:
        return posixpath.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return posixpath.splitext(self.name)[0]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(f"{self.scheme}://{posixpath.dirname(self._rest.rstrip('/'))}")

    def with_name(self, name: str) -> RemotePath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> RemotePath:
        return self.with_name(self.stem + suffix)

    def __truediv__(self, other: str) -> RemotePath:
        return RemotePath(f"{self.rstrip('/')}/{other}")

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """Validated from URL text, dumped as it (pydantic imported here: ``pipeline --help`` stays light)."""
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            _remote_only, serialization=core_schema.plain_serializer_function_ser_schema(str))


def _remote_only(value: Any) -> RemotePath:
    if isinstance(value, RemotePath):
        return value
    from pipeline.core.locations import is_url

    if isinstance(value, str) and is_url(value.strip()):
        return RemotePath(value.strip())
    raise ValueError("not an object-store URL")


#: Where a file is published: a ``RemotePath`` for a URL, else a local ``Path`` (the config's field type
#: is ``config.TargetField``: this union, URL first).
Target = RemotePath | Path
