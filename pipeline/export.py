"""Rebuild the output file from the ledger: the manifest in order, joined to each row's outcome.

Because the output is derived (never appended to), it has exactly one row per (manifest row, choice)
whatever crashes, resumes and retries came before. Rows with no outcome yet are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from .config import Config
from .ledger import StateStore
from .manifest import ManifestReader
from .results import result_schema, to_table
from .sinks import write_atomic


@dataclass
class ExportReport:
    rows: int = 0  # output rows written (one per choice)
    ok: int = 0  # manifest rows whose outcome is ok
    failed: int = 0  # manifest rows whose outcome is failed
    manifest_rows_done: int = 0


def export_output(config: Config, reader: ManifestReader, store: StateStore,
                  carried: pa.Schema | None = None) -> ExportReport:
    """Write ``output.path`` atomically from the ledger; returns what it wrote."""
    carried = reader.carried_schema if carried is None else carried
    schema = result_schema(carried)
    report = ExportReport()
    fmt = config.output.output_format or "parquet"
    report.rows = write_atomic(_tables(reader, store, schema, report), config.output.path, fmt, schema)
    return report


def _tables(reader: ManifestReader, store: StateStore, schema: pa.Schema, report: ExportReport) -> Iterator[pa.Table]:
    names = reader.carried_columns
    yielded = False
    for batch in reader.batches():
        outcomes = store.outcomes([row.id for row in batch])
        records = []
        for row in batch:
            outcome = outcomes.get(row.id)
            if outcome is None:
                continue
            report.manifest_rows_done += 1
            if outcome.status == "ok":
                report.ok += 1
            else:
                report.failed += 1
            base = {"id": row.id, "path": row.path, **{name: row.columns.get(name) for name in names}}
            records.extend({**base, **result} for result in outcome.results)
        if records:
            yielded = True
            yield to_table(records, schema)
    if not yielded:  # an empty file still carries the schema
        yield schema.empty_table()
