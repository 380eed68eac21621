"""Output writers. Results are spooled to a Parquet part file while the run goes on, then the final
Parquet / CSV / JSONL file is written in manifest order under a temporary name and renamed into place,
so no reader ever sees a half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from .results import SEQ_COLUMN, with_seq

_JSONL_BATCH = 10_000


class Sink(Protocol):
    suffix: str

    def write(self, table: pa.Table, path: Path) -> None: ...


class ParquetSink:
    suffix = ".parquet"

    def write(self, table: pa.Table, path: Path) -> None:
        pq.write_table(table, path, compression="zstd")


class CsvSink:
    suffix = ".csv"

    def write(self, table: pa.Table, path: Path) -> None:
        pa_csv.write_csv(table, path)


class JsonlSink:
    suffix = ".jsonl"

    def write(self, table: pa.Table, path: Path) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            for batch in table.to_batches(max_chunksize=_JSONL_BATCH):
                for record in batch.to_pylist():
                    handle.write(json.dumps(record, ensure_ascii=False, default=_json_default))
                    handle.write("\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


SINKS: dict[str, Sink] = {"parquet": ParquetSink(), "csv": CsvSink(), "jsonl": JsonlSink()}


def write_atomic(table: pa.Table, path: Path, fmt: str) -> None:
    """Write beside the target, fsync, then rename: the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        SINKS[fmt].write(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class ResultSpool:
    """Append-only Parquet part file of finished results (with their manifest position)."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory = directory
        self.schema = with_seq(schema)
        self.path = directory / "part-00000.parquet"
        self._writer: pq.ParquetWriter | None = None
        self.rows = 0

    def open(self) -> None:
        if self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True)
        self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        assert self._writer is not None, "spool is not open"
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finalize(self, output: Path, fmt: str) -> int:
        """Write the final output in manifest order and remove the spool; returns rows written."""
        self.close()
        table = pq.read_table(self.path, schema=self.schema)
        table = table.sort_by([(SEQ_COLUMN, "ascending"), ("choice_index", "ascending")]).drop_columns([SEQ_COLUMN])
        write_atomic(table, output, fmt)
        shutil.rmtree(self.directory, ignore_errors=True)
        return table.num_rows
