"""Rebuild the output file from the ledger: the manifest in order, joined to each row's outcome.

Because the output is derived (never appended to), it has exactly one row per (manifest row, choice)
whatever crashes, resumes and retries came before. Rows with no outcome yet are left out.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from pipeline.core.config import Config
from pipeline.core.results import result_schema, to_table
from pipeline.core.targets import Target
from pipeline.edges.ledger import StateStore
from pipeline.edges.manifest import ManifestReader
from pipeline.edges.sinks import write_atomic

#: Manifest rows turned into records at a time: bounds the Python objects alive during an export.
_EXPORT_ROWS = 1_000


@dataclass
class ExportReport:
    """What an export wrote, counted twice over: output rows (one per choice: ``request.n: 2`` gives two per
    manifest row) and manifest rows. ``rows == rows_ok + rows_failed`` and ``manifest_rows_done == ok +
    failed``; the rest of the manifest has no outcome yet."""

    rows: int = 0  # output rows written (one per choice)
    ok: int = 0  # manifest rows whose outcome is ok
    failed: int = 0  # manifest rows whose outcome is failed
    manifest_rows_done: int = 0
    rows_ok: int = 0  # output rows of ok manifest rows
    rows_failed: int = 0  # output rows of failed manifest rows


def export_output(config: Config, reader: ManifestReader, store: StateStore,
                  carried: pa.Schema | None = None) -> ExportReport:
    """Write ``output.path`` atomically from the ledger; returns what it wrote."""
    carried = reader.carried_schema if carried is None else carried
    schema = result_schema(carried)
    report = ExportReport()
    fmt = config.output.output_format or "parquet"
    report.rows = write_atomic(_tables(reader, store, schema, report), config.output.path, fmt, schema,
                               config.storage_options_for("output"))
    return report


def export_partition(config: Config, reader: ManifestReader, store: StateStore, run_id: int,
                     carried: pa.Schema | None = None) -> Target | None:
    """The rows run ``run_id`` finished, as ``<partitions>/run_date=YYYY-MM-DD/part-runNNNNN.<fmt>``.

    Hive-style folders, so pandas, pyarrow, DuckDB and Polars read the whole tree as one table with a
    ``run_date`` column; the consolidated ``output.path`` keeps every image's latest caption.
    """
    carried = reader.carried_schema if carried is None else carried
    schema = result_schema(carried)
    report = ExportReport()
    tables = [t for t in _tables(reader, store, schema, report, run_id=run_id) if t.num_rows]
    if not tables:
        return None
    run = store.run_record(run_id)
    if run is None:
        raise ValueError(f"{store.path}: no run #{run_id} in the ledger")
    started = run["started_at"]
    fmt = config.output.output_format or "parquet"
    path = config.output.partitions / f"run_date={started[:10]}" / f"part-run{run_id:05d}.{fmt}"
    write_atomic(tables, path, fmt, schema, config.storage_options_for("output"))
    return path


def _tables(reader: ManifestReader, store: StateStore, schema: pa.Schema, report: ExportReport,
            run_id: int | None = None) -> Iterator[pa.Table]:
    names = reader.carried_columns
    yielded = False
    for batch in reader.batches(_EXPORT_ROWS):
        outcomes = store.outcomes([row.id for row in batch], run_id)
        records = []
        for row in batch:
            outcome = outcomes.get(row.id)
            if outcome is None:
                continue
            base = {"id": row.id, "path": row.path, **{name: row.columns.get(name) for name in names}}
            added = [{**base, **result} for result in outcome.results]
            records.extend(added)
            _count(report, outcome.status == "ok", len(added))
        if records:
            yielded = True
            yield to_table(records, schema)
    if not yielded:  # an empty file still carries the schema
        yield schema.empty_table()


def _count(report: ExportReport, ok: bool, output_rows: int) -> None:
    report.manifest_rows_done += 1
    if ok:
        report.ok += 1
        report.rows_ok += output_rows
    else:
        report.failed += 1
        report.rows_failed += output_rows
