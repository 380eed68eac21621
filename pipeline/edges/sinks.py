"""Output writers: Parquet, CSV and JSONL under one schema, streamed batch by batch and made atomic.

The output is always derived from the ledger. It is written under a temporary name beside the target,
fsynced, then renamed into place (``edges/files.py``): a reader sees the old file or the new one, never
half of one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any, Protocol

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.edges.files import atomic_path

_JSONL_BATCH = 10_000


class SinkWriter(Protocol):
    def write(self, table: pa.Table) -> None: ...

    def close(self) -> None: ...


class ParquetSink:
    """Parquet with zstd, one row group per written batch."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._writer = pq.ParquetWriter(path, schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


class CsvSink:
    """CSV with a header row; timestamps in ISO 8601."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._writer = pa_csv.CSVWriter(path, schema)

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)

    def close(self) -> None:
        self._writer.close()


class JsonlSink:
    """One JSON object per line, keys in schema order."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self._handle: IO[str] = open(path, "w", encoding="utf-8")

    def write(self, table: pa.Table) -> None:
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


SINKS: dict[str, type[ParquetSink] | type[CsvSink] | type[JsonlSink]] = {
    "parquet": ParquetSink,
    "csv": CsvSink,
    "jsonl": JsonlSink,
}


def write_atomic(tables: Iterable[pa.Table], path: Path, fmt: str, schema: pa.Schema) -> int:
    """Stream ``tables`` into ``path`` via a temporary file, fsync and rename; returns rows written."""
    rows = 0
    with atomic_path(path) as temporary:
        sink = SINKS[fmt](temporary, schema)
        try:
            for table in tables:
                sink.write(table)
                rows += table.num_rows
        finally:
            sink.close()
    return rows
