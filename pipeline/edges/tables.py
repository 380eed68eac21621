"""In-memory manifests: a pandas DataFrame or a pyarrow Table in place of a manifest file.

``run_job(config, manifest=df)`` hands the table down to the plan, which reads it through ``TableReader``:
the same ``ManifestReader`` checks (columns, empty and duplicate ids, templates, carried columns) and the
same ``Row`` objects, so triage, the ledger, the row processor and the export treat it like a file.

Images come from ``input.path_column`` (paths or URLs, as in a file manifest; relative paths resolve
against the working directory) or from ``input.image_column``: the encoded image file's bytes in each
cell. A bytes row is identified by the sha256 of its bytes (``Row.fingerprint``), never by the object
holding them, so running the same table twice sends nothing the second time and changing one cell's bytes
re-sends that row alone. Its ``path`` in the output is the table's ``input.path_column`` value when the
table has that column (a label, never read), else ``<bytes:sha256:`` + 16 hex digits + ``>``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.core.config import InputConfig
from pipeline.core.errors import ConfigError, ManifestError
from pipeline.edges.manifest import ManifestInfo, ManifestReader, Row

#: Fingerprint of a bytes row whose cell is empty: stable, so the failed row is not re-sent unchanged.
_NO_BYTES = "bytes:none"


def manifest_reader(config: InputConfig, reserved: Sequence[str] = (), table: Any = None,
                    storage_options: Mapping[str, Any] | None = None) -> ManifestReader:
    """The reader for a job: ``table`` (a DataFrame or Arrow table) when given, else the configured file
    (``storage_options`` for a manifest or folder on an object store)."""
    if table is None:
        return ManifestReader(config, reserved, storage_options)
    return TableReader(table, config, reserved)


class TableReader(ManifestReader):
    """Rows from a pandas DataFrame or pyarrow Table (or RecordBatch); ``input.manifest`` is not read.

    The table is converted to Arrow once, on the first check, column by column so that a column Arrow
    cannot hold (mixed Python objects) is named; the image column stays as the Python cells it holds.
    """

    def __init__(self, table: Any, config: InputConfig, reserved: Sequence[str] = ()) -> None:
        # not ManifestReader.__init__: that one wants a file or a folder
        self.config = config.model_copy(update={"manifest": None, "directory": None, "format": None})
        self.reserved = frozenset(reserved)
        self.source = _kind(table)
        self.base_dir = Path.cwd()  # relative paths in a table: the caller's working directory
        self.options: dict[str, Any] = {}  # paths in a table are local or URLs read with the job's own options
        self._listing: list[str] | None = None
        self._input = table
        self._schema: pa.Schema | None = None
        self._table: pa.Table | None = None
        self._cells: Any = None  # the image column: a Python list (pandas) or an Arrow ChunkedArray

    # -- what ManifestReader asks of a source ---------------------------------------------------

    def _read_schema(self) -> pa.Schema:
        table = self._arrow()
        image = self.config.image_column
        if image is not None and self._cells is not None:
            return table.schema.append(pa.field(image, pa.binary()))
        return table.schema

    def _record_batches(self, columns: list[str] | None, size: int | None = None) -> Iterator[pa.RecordBatch]:
        table = self._arrow()
        if columns is not None:
            table = table.select(columns)
        yield from table.to_batches(max_chunksize=size or self.config.chunk_size)

    def _required_columns(self) -> dict[str, str]:
        wanted = super()._required_columns()
        if self.config.image_column is not None:
            del wanted["input.path_column"]  # optional then: a label for the output's path column
            wanted["input.image_column"] = self.config.image_column
        return wanted

    @property
    def carried_columns(self) -> list[str]:
        """As for a file, less the image column: bytes are sent, not copied into the output."""
        return [name for name in super().carried_columns if name != self.config.image_column]

    def check(self, templates: Sequence[str] = ()) -> ManifestInfo:
        info = super().check(templates)
        if self.config.image_column is not None:
            self._check_cells()
        return info

    def batches(self, size: int | None = None) -> Iterator[list[Row]]:
        if self.config.image_column is None:
            yield from super().batches(size)
            return
        size = size or self.config.chunk_size
        table = self._arrow()
        for start in range(0, table.num_rows, size):
            records = table.slice(start, size).to_pylist()
            cells = self._cell_slice(start, len(records))
            yield [self._bytes_row(start + i, record, cell) for i, (record, cell) in enumerate(zip(records, cells))]

    # -- the table itself ------------------------------------------------------------------------

    def _arrow(self) -> pa.Table:
        """The table without its image column, as Arrow (converted once)."""
        if self._table is None:
            self._table, self._cells = _split(self._input, self.config.image_column, self.source)
        return self._table

    def _cell_slice(self, start: int, length: int) -> list[Any]:
        if isinstance(self._cells, list):
            return self._cells[start : start + length]
        return self._cells.slice(start, length).to_pylist()  # type: ignore[no-any-return]

    def _check_cells(self) -> None:
        """Every image cell is bytes or empty: another type is a mistake in the caller's code, refused
        before anything is sent (an empty cell is that row's failure, as an empty path is)."""
        total, size = self._arrow().num_rows, self.config.chunk_size
        for start in range(0, total, size):
            for offset, cell in enumerate(self._cell_slice(start, size)):
                if _missing(cell) or isinstance(_unwrap(cell), (bytes, bytearray, memoryview)):
                    continue
                number = start + offset + 1
                ids = self._arrow().column(self.config.id_column)
                raise ManifestError(
                    f"{self.source}: row {number} (id={ids[number - 1].as_py()!r}): input.image_column "
                    f"{self.config.image_column!r} holds a {type(cell).__module__}.{type(cell).__qualname__}, "
                    "not bytes; put the encoded image file's bytes there (e.g. Path(p).read_bytes()), or name "
                    "paths or URLs in input.path_column instead"
                )

    def _bytes_row(self, seq: int, record: dict[str, Any], cell: Any) -> Row:
        data = b"" if _missing(cell) else bytes(_unwrap(cell))
        digest = hashlib.sha256(data).hexdigest() if data else None
        label = _text(record.get(self.config.path_column)) or (
            f"<bytes:sha256:{digest[:16]}>" if digest else "<bytes:none>")
        prompt_col = self.config.prompt_column
        prompt = _text(record.get(prompt_col)) if prompt_col else ""
        return Row(seq, _text(record[self.config.id_column]), label, prompt or None, record, self.base_dir,
                   data=data, fingerprint=f"sha256:{digest}" if digest else _NO_BYTES)


def _kind(table: Any) -> str:
    """How messages name the table; refuses anything that is not a table."""
    if isinstance(table, pa.Table | pa.RecordBatch):
        return "Arrow table manifest"
    import pandas as pd  # the caller built a DataFrame, so pandas is loaded already

    if isinstance(table, pd.DataFrame):
        return "DataFrame manifest"
    raise ConfigError(f"manifest= takes a pandas DataFrame or a pyarrow Table, got {type(table).__name__}; "
                      "for a manifest file set input.manifest in the config instead")


def _split(table: Any, image: str | None, source: str) -> tuple[pa.Table, Any]:
    """(the table as Arrow without the image column, the image column's cells or None if absent)."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    if isinstance(table, pa.Table):
        if image is None or image not in table.column_names:
            return table, None
        return table.drop_columns([image]), table.column(image)
    names = [str(name) for name in table.columns]
    if len(set(names)) != len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise ManifestError(f"{source}: column name(s) {', '.join(map(repr, twice))} appear more than once; "
                            "rename them")
    cells = table.iloc[:, names.index(image)].tolist() if image in names else None
    arrays = {}
    for index, name in enumerate(names):
        if name == image:
            continue
        try:
            arrays[name] = pa.array(table.iloc[:, index], from_pandas=True)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise ManifestError(f"{source}: column {name!r} cannot be written to the output ({exc}); give it one "
                                "type (say df[col].astype(str)) or leave it out with input.carry_columns") from None
    return pa.table(arrays), cells


def _unwrap(cell: Any) -> Any:
    """A Hugging Face ``datasets`` Image cell is ``{"bytes": ..., "path": ...}``: its bytes."""
    return cell.get("bytes") if isinstance(cell, Mapping) else cell


def _missing(cell: Any) -> bool:
    """None, NaN or pandas' NA (what a missing cell of an object column holds), or a dict with no bytes."""
    cell = _unwrap(cell)
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return True
    return type(cell).__name__ == "NAType"


def _text(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)
