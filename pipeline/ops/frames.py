"""A job's output read back for analysis: a pyarrow Table in the output's own schema, or a typed DataFrame.

The output file is the contract (docs/output.md), so this reads the file, never the ledger: Parquet
keeps every type; CSV and JSONL are read with the result schema's types for the result columns (carried
manifest columns come back as text from CSV, as JSON types from JSONL). A partitions folder
(``output.partition_by: run_date``) is read file by file, each with its ``run_date`` from the folder name.

The DataFrame gets the types an analyst wants without a cleaning step: ``started_at`` / ``finished_at`` as
``datetime64[ns, UTC]``, integer columns (tokens, attempts, sizes) as nullable ``Int64`` (a failed row has
no tokens: ``<NA>``, not a float NaN), ``status`` / ``error_type`` / ``finish_reason`` / ``image_action``
as categoricals, and text as pandas' ``string`` dtype.
"""

from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.core.errors import ConfigError, OutputMissing
from pipeline.core.results import result_schema

if TYPE_CHECKING:
    import pandas as pd

_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: The result columns as the output declares them (carried manifest columns are not in it).
_RESULT_TYPES = {field.name: field.type for field in result_schema()}
#: Low-cardinality result columns: categoricals group, count and filter cheaply. ``status`` has fixed categories.
_CATEGORICAL = ("error_type", "finish_reason", "image_action")
_STATUSES = ["ok", "failed"]


def read_output(path: Path, fmt: str | None = None, *, hint: str = "") -> pa.Table:
    """The output at ``path`` (a file, or a folder of partitions) as one Arrow table.

    ``fmt`` defaults to the suffix; ``hint`` says what writes this output (for the error when it is missing).
    """
    if path.is_dir():
        return _read_partitions(path, hint)
    fmt = fmt or _format(path)
    if not path.exists():
        raise OutputMissing(f"{path}: no output there yet{hint or '; check the path'}", path=str(path))
    return _read_file(path, fmt)


def to_frame(table: pa.Table) -> pd.DataFrame:
    """``table`` as a DataFrame with the dtypes the module docstring lists."""
    import pandas as pd

    def dtype(kind: pa.DataType) -> Any:
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return pd.StringDtype()
        if pa.types.is_integer(kind):
            return pd.Int64Dtype()
        if pa.types.is_boolean(kind):
            return pd.BooleanDtype()
        return None

    frame = table.to_pandas(types_mapper=dtype)
    for field in table.schema:
        if pa.types.is_timestamp(field.type):  # pandas 3 keeps Arrow's microseconds; 2.x gives nanoseconds
            with contextlib.suppress(OverflowError, pd.errors.OutOfBoundsDatetime):  # a carried year 9999
                frame[field.name] = frame[field.name].dt.as_unit("ns")
    if "status" in frame:
        frame["status"] = frame["status"].astype(pd.CategoricalDtype(_STATUSES))
    for name in _CATEGORICAL:
        if name in frame:
            frame[name] = frame[name].astype("category")
    return frame


def _format(path: Path) -> str:
    fmt = _SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ConfigError(f"{path}: cannot tell the output format from the suffix {path.suffix!r}; "
                          "read_results takes .parquet, .csv or .jsonl files, a partitions folder or a job config")
    return fmt


def _read_file(path: Path, fmt: str) -> pa.Table:
    try:
        if fmt == "parquet":
            table = pq.read_table(path)
        elif fmt == "csv":
            table = _read_csv(path)
        else:
            table = _read_jsonl(path)
        return _conform(table)
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"{path}: cannot read it as a {fmt} output: {str(exc).strip().splitlines()[0]}") from None


def _read_csv(path: Path) -> pa.Table:
    """Result columns in their types, every other column as text (as it was in a CSV manifest)."""
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle), [])
    types = {name: _RESULT_TYPES.get(name, pa.string()) for name in header}
    options = pa_csv.ConvertOptions(column_types=types, strings_can_be_null=True)
    return pa_csv.read_csv(path, convert_options=options)


def _read_jsonl(path: Path) -> pa.Table:
    """Timestamps are ISO 8601 text in JSONL: read as text here, converted by ``_conform``."""
    if path.stat().st_size == 0:
        return result_schema().empty_table()
    return pa_json.read_json(path)


def _conform(table: pa.Table) -> pa.Table:
    """Each result column cast to the type the output declares (ISO 8601 text timestamps parsed as UTC)."""
    for index, name in enumerate(table.column_names):
        wanted = _RESULT_TYPES.get(name)
        column = table.column(index)
        if wanted is None or column.type == wanted:
            continue
        table = table.set_column(index, name, column.cast(wanted))  # ISO 8601 text parses to timestamps
    return table


def _read_partitions(folder: Path, hint: str) -> pa.Table:
    """Every output file under ``folder``, each with its Hive folder keys (``run_date=...``) as columns."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
    if not files:
        raise OutputMissing(f"{folder}: no output files (.parquet, .csv, .jsonl) in this folder yet{hint}",
                            path=str(folder))
    tables = []
    for file in files:
        table = _read_file(file, _format(file))
        for part in file.relative_to(folder).parent.parts:
            key, equals, value = part.partition("=")
            if equals:
                table = table.append_column(key, pa.array([value] * table.num_rows, pa.string()))
        tables.append(table)
    return pa.concat_tables(tables, promote_options="permissive")
