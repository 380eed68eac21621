"""Manifest readers: CSV, JSONL, Parquet or a directory of images, streamed in chunks.

A manifest (or directory) may be a local path or an object-store URL (``s3://bucket/prefix/manifest.csv``):
local files are opened as they always were; a URL is streamed through fsspec (``edges/storage.py``) with
``input.storage_options``, and relative image paths in its rows resolve against its "folder" (a bucket
prefix). A manifest is never loaded whole. ``ManifestReader.check()`` makes one cheap pass over the id column
(required columns, empty manifest, empty or duplicate ids) so that a bad manifest fails before any
request is sent; ``batches()`` then streams ``Row`` objects in manifest order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipeline.core.config import InputConfig, template_fields
from pipeline.core.errors import ConfigError, ManifestError, PipelineError
from pipeline.core.locations import is_url, url_join, url_parent
from pipeline.edges import storage

#: Suffixes a directory scan picks up when ``input.glob`` is left at its default.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".webp"})
_DEFAULT_GLOB = "**/*"
#: A config that names no rows at all (``pipeline validate`` and ``run`` say this, nothing is sent).
NO_SOURCE = ("input: set input.manifest (a CSV, JSONL or Parquet file) or input.directory (a folder of "
             "images); from Python, run_job(config, manifest=df) takes a pandas DataFrame or Arrow table instead")
_BLOCK_SIZE = 1 << 20
#: Read-ahead of a manifest object: big enough that a long CSV is a few GETs, small enough to stream.
_STORE_BLOCK = 8 << 20
#: Where object-store messages send the user (the section's key; the top-level one applies too).
WHERE = "input.storage_options"


@dataclass(slots=True)
class Row:
    """One manifest row: where it sits, what to send, and what to carry into the output. Not changed once
    read; not ``frozen`` only because a frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__``, which cost ~0.35 s per 200,000 rows of a restart's manifest walk."""

    seq: int  # 0-based position in the manifest; output order
    id: str
    path: str  # as written in the manifest
    prompt: str | None  # per-row prompt override, if the manifest has a prompt column
    columns: dict[str, Any]  # every manifest column by name (template inputs and carried values)
    base_dir: Path | str  # relative image paths resolve against this folder (a URL: a bucket prefix)
    data: bytes | None = None  # the image itself, from an in-memory table's image column (None: read ``path``)
    fingerprint: str | None = None  # the image's identity when the reader knows it (bytes: their sha256)

    @property
    def number(self) -> int:
        """1-based row number, as people count rows in messages."""
        return self.seq + 1

    @property
    def label(self) -> str:
        return f"row {self.number} (id={self.id})"

    def image_path(self) -> Path | str:
        """Where the image is: a local path, or an object URL for a relative key under a URL folder."""
        if is_url(self.path):
            return self.path
        path = Path(self.path).expanduser()
        if path.is_absolute():
            return path
        if isinstance(self.base_dir, str):
            return url_join(self.base_dir, self.path) or self.path
        return self.base_dir / path


@dataclass(frozen=True, slots=True)
class ManifestInfo:
    source: str
    rows: int
    columns: list[str]
    carried: pa.Schema


class ManifestReader:
    """Streams rows from the configured manifest or directory."""

    def __init__(self, config: InputConfig, reserved: Sequence[str] = (),
                 storage_options: Mapping[str, Any] | None = None) -> None:
        """``storage_options``: the fsspec options for a URL manifest or directory (``Config.storage_options_for
        ("input")``: the top-level ones with ``input.storage_options`` over them); default the section's."""
        self.config = config
        self.reserved = frozenset(reserved)
        self.options = dict(config.storage_options if storage_options is None else storage_options)
        self.source: Path | str
        self.base_dir: Path | str
        if config.directory is not None:
            self.source = config.directory
            self.base_dir = config.directory.rstrip("/") if isinstance(config.directory, str) else config.directory
        elif config.manifest is not None:
            self.source = config.manifest
            manifest = config.manifest
            self.base_dir = url_parent(manifest) if isinstance(manifest, str) else manifest.parent
        else:
            raise ConfigError(NO_SOURCE)
        if config.image_column is not None:
            raise ConfigError(f"input.image_column ({config.image_column!r}) is for in-memory tables "
                              "(run_job(config, manifest=df)); a manifest file names its images in input.path_column")
        self._schema: pa.Schema | None = None
        self._listing: list[str] | None = None

    def _open(self, path: Path | str, mode: str = "rb", **kwargs: Any) -> AbstractContextManager[Any]:
        """A manifest file, local or on an object store (streamed, read-ahead ``_STORE_BLOCK``)."""
        if is_url(path):
            kwargs["block_size"] = _STORE_BLOCK
        return storage.open_input(path, self.options, where=WHERE, mode=mode, **kwargs)

    # -- schema -------------------------------------------------------------------------------

    @property
    def schema(self) -> pa.Schema:
        """Column names and types of the manifest (a directory scan has just id and path)."""
        if self._schema is None:
            self._schema = self._read_schema()
        return self._schema

    def _read_schema(self) -> pa.Schema:
        if self.config.directory is not None:
            return pa.schema([("id", pa.string()), ("path", pa.string())])
        fmt = self.config.manifest_format
        path = self._manifest_path()
        try:
            if fmt == "csv":
                with self._open(path, "r", newline="", encoding="utf-8-sig") as handle:
                    return pa.schema([(name, pa.string()) for name in _csv_header(handle, path)])
            if not is_url(path):
                return _arrow_schema(path, fmt)
            with self._open(path) as handle:
                return _arrow_schema(handle, fmt)
        except PipelineError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise self._read_error(path, fmt, exc) from None

    @property
    def carried_columns(self) -> list[str]:
        """Manifest columns copied into every output row (all but the id and path columns)."""
        names = [n for n in self.schema.names if n not in (self.config.id_column, self.config.path_column)]
        if self.config.carry_columns is not None:
            names = [n for n in names if n in self.config.carry_columns]
        return names

    @property
    def carried_schema(self) -> pa.Schema:
        fields = [self.schema.field(name) for name in self.carried_columns]
        return pa.schema([pa.field(f.name, _plain(f.type)) for f in fields])

    # -- validation ---------------------------------------------------------------------------

    def check(self, templates: Sequence[str] = ()) -> ManifestInfo:
        """Everything that must hold before the first request: columns, row count, unique ids."""
        directory = self.config.directory
        if isinstance(directory, Path) and not directory.is_dir():
            raise ManifestError(f"{directory}: input.directory is not a folder")
        self._check_columns(templates)
        rows = self._check_ids()
        if rows == 0:
            raise ManifestError(f"{self.source}: the manifest has no rows; nothing to do")
        return ManifestInfo(str(self.source), rows, list(self.schema.names), self.carried_schema)

    def _check_columns(self, templates: Sequence[str]) -> None:
        names = self.schema.names
        shown = ", ".join(names) or "(none)"
        wanted = self._required_columns()
        for key, column in wanted.items():
            if column not in names:
                raise ManifestError(
                    f"{self.source}: missing required column {column!r} (columns are: {shown}); "
                    f"add it or set {key}"
                )
        for name in self.config.carry_columns or ():
            if name not in names:
                raise ManifestError(f"{self.source}: input.carry_columns names {name!r}, not a column ({shown})")
        for template in templates:
            for field in template_fields(template):
                if field not in names:
                    raise ManifestError(
                        f"{self.source}: request.prompt uses {{{field}}}, not a manifest column (columns are: {shown})"
                    )
        clash = sorted(set(self.carried_columns) & self.reserved)
        if clash:
            raise ManifestError(
                f"{self.source}: column(s) {', '.join(clash)} clash with result columns of the same name; "
                "rename them or list the columns to keep in input.carry_columns"
            )

    def _required_columns(self) -> dict[str, str]:
        """Config key -> the column it names, for every column the manifest must have."""
        wanted = {"input.id_column": self.config.id_column, "input.path_column": self.config.path_column}
        if self.config.prompt_column:
            wanted["input.prompt_column"] = self.config.prompt_column
        return wanted

    def _id_values(self) -> Iterator[list[Any]]:
        """The id column, batch by batch, as Python values (CSV through the csv module: no Arrow buffers)."""
        if self.config.directory is not None:
            yield self._scan_directory()
            return
        if self.config.manifest_format == "csv":
            path = self._manifest_path()
            try:
                with self._open(path, "r", newline="", encoding="utf-8-sig") as handle:
                    yield from _csv_column(handle, self.schema.names.index(self.config.id_column))
            except OSError as exc:
                raise self._read_error(path, "csv", exc) from None
            return
        for batch in self._record_batches([self.config.id_column]):
            yield batch.column(0).to_pylist()

    def _check_ids(self) -> int:
        """Count rows; refuse empty and duplicate ids. Streams: memory is one 64-bit hash per id."""
        seen: set[int] = set()
        suspects: set[str] = set()
        empty: list[int] = []
        count = 0
        for values in self._id_values():
            for value in values:
                count += 1
                text = "" if value is None else str(value)
                if not text.strip():
                    if len(empty) < 5:
                        empty.append(count)
                    continue
                digest = hash(text)
                if digest in seen:
                    suspects.add(text)  # a repeat, or (rarely) a hash collision: checked below
                else:
                    seen.add(digest)
        if empty:
            raise ManifestError(
                f"{self.source}: empty id in column {self.config.id_column!r} at row(s) "
                f"{', '.join(map(str, empty))}; every row needs an id"
            )
        if suspects:
            self._report_duplicates(suspects)
        return count

    def _report_duplicates(self, suspects: set[str]) -> None:
        """Second pass, only on the error path: where the first duplicated id stands, exactly."""
        rows: dict[str, list[int]] = {value: [] for value in suspects}
        number = 0
        for values in self._id_values():
            for value in values:
                number += 1
                text = "" if value is None else str(value)
                if text in rows:
                    rows[text].append(number)
        duplicated = [(where, value) for value, where in rows.items() if len(where) > 1]
        if not duplicated:
            return  # only hash collisions
        duplicated.sort()
        where, first = duplicated[0]
        more = f"; {len(duplicated) - 1} more duplicated id(s)" if len(duplicated) > 1 else ""
        raise ManifestError(
            f"{self.source}: duplicate id {first!r} at rows {where[0]} and {where[1]}{more}; ids must be unique "
            f"(column {self.config.id_column!r})"
        )

    # -- streaming ----------------------------------------------------------------------------

    def batches(self, size: int | None = None) -> Iterator[list[Row]]:
        """Rows in manifest order, ``size`` (default ``input.chunk_size``) at a time."""
        size = size or self.config.chunk_size
        if self.config.directory is not None:
            yield from self._directory_batches(size)
            return
        seq = 0
        id_col, path_col, prompt_col = self.config.id_column, self.config.path_column, self.config.prompt_column
        base = self.base_dir
        for records in self._records(size):
            rows = []
            for record in records:
                prompt = record.get(prompt_col) if prompt_col else None
                rows.append(
                    Row(seq, _text(record[id_col]), _text(record[path_col]), _text(prompt) or None, record, base)
                )
                seq += 1
            if rows:
                yield rows

    def _records(self, size: int) -> Iterator[list[dict[str, Any]]]:
        """Manifest rows as dicts, a chunk at a time. CSV goes through the csv module: every value is text
        anyway, and Arrow's CSV reader keeps ~0.5 KB of buffers per row read in a long job's memory."""
        if self.config.manifest_format != "csv":
            for batch in self._record_batches(None, size):
                yield batch.to_pylist()
            return
        path = self._manifest_path()
        try:
            with self._open(path, "r", newline="", encoding="utf-8-sig") as handle:
                yield from _csv_records(handle, self.schema.names, size)
        except OSError as exc:
            raise self._read_error(path, "csv", exc) from None

    def _directory_batches(self, size: int) -> Iterator[list[Row]]:
        paths = self._scan_directory()
        for start in range(0, len(paths), size):
            yield [
                Row(start + i, rel, rel, None, {"id": rel, "path": rel}, self.base_dir)
                for i, rel in enumerate(paths[start : start + size])
            ]

    def _scan_directory(self) -> list[str]:
        root = self.config.directory
        assert root is not None
        if isinstance(root, str):
            return self._list_prefix(root)
        literal = self.config.glob != _DEFAULT_GLOB
        found = []
        for path in root.glob(self.config.glob):
            if path.is_file() and (literal or path.suffix.lower() in IMAGE_SUFFIXES):
                found.append(path.relative_to(root).as_posix())
        found.sort()
        return found

    def _list_prefix(self, root: str) -> list[str]:
        """The keys under a bucket prefix matching ``input.glob``, relative to the prefix, listed once per
        reader. fsspec keeps the listing (ETag, size, mtime per object) in the filesystem's listing cache,
        so the resume check of each row costs no request (``images.store_fingerprints``)."""
        if self._listing is not None:
            return self._listing
        prefix = root.rstrip("/")
        fs = storage.filesystem(prefix, self.options, where=WHERE)
        literal = self.config.glob != _DEFAULT_GLOB
        with storage.translated(prefix, self.options, where=WHERE, action="list"):
            fs.invalidate_cache(prefix)  # a listing kept from an earlier run in this process may be stale
            listed = fs.glob(f"{prefix}/{self.config.glob}", detail=True)
        base = fs._strip_protocol(prefix).rstrip("/") + "/"
        found = []
        for name, info in listed.items():
            rel = name[len(base):] if name.startswith(base) else None
            if rel and info.get("type") == "file" and (literal or Path(rel).suffix.lower() in IMAGE_SUFFIXES):
                found.append(rel)
        self._listing = sorted(found)
        return self._listing

    def _record_batches(self, columns: list[str] | None, size: int | None = None) -> Iterator[pa.RecordBatch]:
        """Parquet and JSONL through Arrow (CSV goes through the csv module: see ``_records``)."""
        path = self._manifest_path()
        fmt = self.config.manifest_format
        assert fmt is not None
        size = size or self.config.chunk_size
        try:
            if not is_url(path):
                yield from _arrow_batches(path, fmt, columns, size)
                return
            with self._open(path) as handle:
                yield from _arrow_batches(handle, fmt, columns, size)
        except PipelineError:
            raise
        except (pa.ArrowException, OSError) as exc:
            raise self._read_error(path, fmt, exc) from None

    def _manifest_path(self) -> Path | str:
        path = self.config.manifest
        assert path is not None
        if isinstance(path, Path) and not path.is_file():
            raise ManifestError(f"{path}: manifest file not found (input.manifest)")
        return path

    def _read_error(self, path: Path | str, fmt: str, exc: BaseException) -> PipelineError:
        """A manifest that cannot be read; for JSONL, the first bad line by its number in the file (from 1).

        Arrow's JSON reader counts rows from 0 within each 1 MiB block it parses, which names no line anyone
        can find; so on this (error) path the file is read again line by line to say which one is broken.
        An object store's failure (credentials, network) is the store's error, not the manifest's.
        """
        if is_url(path) and isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
            return storage.store_error(exc, str(path), self.options, where=WHERE)
        if fmt == "jsonl" and not isinstance(exc, OSError):
            with self._open(path, "r", encoding="utf-8", errors="replace") as handle:
                problem = _first_bad_json_line(handle)
            if problem is not None:
                return ManifestError(f"{path}: {problem}; fix or remove that line (JSONL: one JSON object per line)")
        return ManifestError(f"{path}: cannot read {fmt} manifest: {_short(exc)}")


def _arrow_schema(source: Any, fmt: str | None) -> pa.Schema:
    """The schema of a Parquet or JSONL manifest (a local path, or an open object-store file)."""
    if fmt == "parquet":
        return pq.ParquetFile(source).schema_arrow
    return pa_json.open_json(source, read_options=pa_json.ReadOptions(block_size=_BLOCK_SIZE)).schema


def _arrow_batches(source: Any, fmt: str, columns: list[str] | None, size: int) -> Iterator[pa.RecordBatch]:
    if fmt == "parquet":
        yield from pq.ParquetFile(source).iter_batches(batch_size=size, columns=columns)
        return
    reader = pa_json.open_json(source, read_options=pa_json.ReadOptions(block_size=_BLOCK_SIZE))
    for batch in _rebatch(reader, size):
        yield batch.select(columns) if columns else batch


def _csv_records(handle: Any, names: list[str], size: int) -> Iterator[list[dict[str, Any]]]:
    """CSV rows (after the header) as dicts, ``size`` at a time; short rows padded with empty values."""
    width = len(names)
    reader = csv.reader(handle)
    next(reader, None)
    chunk: list[dict[str, Any]] = []
    for values in reader:
        if not values:
            continue
        if len(values) < width:
            values += [""] * (width - len(values))
        chunk.append(dict(zip(names, values)))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _first_bad_json_line(handle: Any) -> str | None:
    """"invalid JSON at line N (...)" or "line N is not a JSON object" for the first such line, else None."""
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            column = f", column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
            return f"invalid JSON at line {number} ({detail}{column})"
        if not isinstance(value, dict):
            return f"line {number} is not a JSON object (found {type(value).__name__})"
    return None


def _csv_header(handle: Any, path: Path | str) -> list[str]:
    header = next(csv.reader(handle), None)
    if not header:
        raise ManifestError(f"{path}: the CSV manifest is empty; it needs a header row (id,path,...)")
    return header


def _csv_column(handle: Any, index: int, size: int = 10_000) -> Iterator[list[str]]:
    """One CSV column, ``size`` values at a time, skipping the header."""
    reader = csv.reader(handle)
    next(reader, None)
    batch: list[str] = []
    for record in reader:
        if not record:
            continue  # a blank line is no row (Arrow's reader skips them too)
        batch.append(record[index] if index < len(record) else "")
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _rebatch(batches: Any, size: int) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        for start in range(0, batch.num_rows, size):
            yield batch.slice(start, size)


def _plain(kind: pa.DataType) -> pa.DataType:
    """Dictionary-encoded manifest columns are written out as their plain value type."""
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
