"""Output writers: Parquet, CSV and JSONL under one schema, streamed batch by batch and made atomic.

The output is always derived from the ledger. It is written under a temporary name beside the target,
fsynced, then renamed into place (``edges/files.py``): a reader sees the old file or the new one, never
half of one. A write that fails (disk full, I/O error, read-only) is a ``StorageError`` naming ``path``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Protocol

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.core.targets import Target
from pipeline.edges.files import published, storage_errors

_JSONL_BATCH = 10_000


class SinkWriter(Protocol):
    """What ``write_atomic`` needs of a writer: pyarrow's own streaming Parquet and CSV writers have it."""

    def write_table(self, table: pa.Table) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """One JSON object per line, keys in schema order (pyarrow has no JSON writer)."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._handle: IO[str] = open(path, "w", encoding="utf-8")

    def write_table(self, table: pa.Table) -> None:
        for batch in table.to_batches(max_chunksize=_JSONL_BATCH):
            lines = [json.dumps(record, ensure_ascii=False, default=_iso) for record in batch.to_pylist()]
            if lines:
                self._handle.write("\n".join(lines) + "\n")

    def close(self) -> None:
        self._handle.close()


def _iso(value: Any) -> Any:
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _parquet(path: Path, schema: pa.Schema) -> SinkWriter:
    """Parquet with zstd, one row group per written batch."""
    return pq.ParquetWriter(path, schema, compression="zstd")


#: Output format -> a writer for ``(path, schema)``; CSV gets a header row and ISO 8601 timestamps.
SINKS: dict[str, Callable[[Path, pa.Schema], SinkWriter]] = {
    "parquet": _parquet,
    "csv": pa_csv.CSVWriter,
    "jsonl": JsonlWriter,
}


def write_atomic(tables: Iterable[pa.Table], path: Target, fmt: str, schema: pa.Schema,
                 options: Mapping[str, Any] | None = None) -> int:
    """Stream ``tables`` into ``path`` via a temporary file, fsync and rename (an object-store URL: upload
    the finished file whole, ``files.published``); returns rows written."""
    rows = 0
    with published(path, options) as temporary:
        with storage_errors(path):
            sink = SINKS[fmt](temporary, schema)
        try:
            for table in tables:  # read outside storage_errors: a failed read is not a failed write
                with storage_errors(path):
                    sink.write_table(table)
                rows += table.num_rows
        except BaseException:
            with contextlib.suppress(OSError):  # the first failure is the news
                sink.close()
            raise
        with storage_errors(path):
            sink.close()
    return rows
