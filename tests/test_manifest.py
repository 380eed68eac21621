"""Manifest readers over real files: formats, chunking, column checks, duplicate and empty ids."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.config import InputConfig
from pipeline.core.errors import ManifestError
from pipeline.core.results import RESULT_COLUMNS
from pipeline.edges.manifest import ManifestReader


def csv_manifest(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "m.csv"
    path.write_text(text)
    return path


def rows_of(reader: ManifestReader):
    return [row for batch in reader.batches() for row in batch]


def test_csv_rows_keep_text_and_order(tmp_path):
    path = csv_manifest(tmp_path, "id,path,label\n007,a.jpg,cat\n010,sub/b.png,\n")
    reader = ManifestReader(InputConfig(manifest=path), reserved=RESULT_COLUMNS)
    info = reader.check()
    assert info.rows == 2 and info.columns == ["id", "path", "label"]
    rows = rows_of(reader)
    assert [(r.seq, r.id, r.path) for r in rows] == [(0, "007", "a.jpg"), (1, "010", "sub/b.png")]
    assert rows[0].columns["label"] == "cat"
    assert rows[1].image_path() == tmp_path / "sub/b.png"
    assert reader.carried_columns == ["label"]


def test_chunked_reading_yields_bounded_batches(tmp_path):
    lines = "\n".join(f"{i},img{i}.jpg" for i in range(2500))
    path = csv_manifest(tmp_path, "id,path\n" + lines + "\n")
    reader = ManifestReader(InputConfig(manifest=path, chunk_size=1000))
    sizes = [len(b) for b in reader.batches()]
    assert sum(sizes) == 2500 and max(sizes) <= 1000
    assert [r.seq for b in reader.batches() for r in b] == list(range(2500))


def test_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "path": f"{i}.jpg", "score": i / 2}) for i in range(3)))
    reader = ManifestReader(InputConfig(manifest=jsonl))
    assert reader.check().rows == 3
    rows = rows_of(reader)
    assert rows[2].id == "2" and rows[2].columns["score"] == 1.0
    assert pa.types.is_floating(reader.carried_schema.field("score").type)

    parquet = tmp_path / "m.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "file": ["a.jpg", "/abs/b.jpg"], "w": [1, 2]}), parquet)
    reader = ManifestReader(InputConfig(manifest=parquet, id_column="key", path_column="file"))
    assert reader.check().rows == 2
    rows = rows_of(reader)
    assert rows[1].image_path() == Path("/abs/b.jpg")
    assert reader.carried_columns == ["w"]


def test_directory_scan(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.PNG", "sub/c.webp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    reader = ManifestReader(InputConfig(directory=tmp_path))
    assert reader.check().rows == 3
    assert [r.id for r in rows_of(reader)] == ["a.PNG", "b.jpg", "sub/c.webp"]
    literal = ManifestReader(InputConfig(directory=tmp_path, glob="*.txt"))
    assert [r.path for r in rows_of(literal)] == ["notes.txt"]


@pytest.mark.parametrize(
    "text, config, message",
    [
        ("id,file\n1,a.jpg\n", {}, "missing required column 'path' (columns are: id, file); add it or set input.path_column"),
        ("id,path\n", {}, "the manifest has no rows"),
        ("", {}, "the CSV manifest is empty"),
        ("id,path\n1,a.jpg\n2,b.jpg\n1,c.jpg\n", {}, "duplicate id '1' at rows 1 and 3"),
        ("id,path\n1,a.jpg\n,b.jpg\n", {}, "empty id in column 'id' at row(s) 2"),
        ("id,path,status\n1,a.jpg,x\n", {}, "status clash with result columns"),
        ("id,path\n1,a.jpg\n", {"prompt_column": "question"}, "missing required column 'question'"),
    ],
)
def test_manifest_errors_are_precise(tmp_path, text, config, message):
    path = csv_manifest(tmp_path, text)
    reader = ManifestReader(InputConfig(manifest=path, **config), reserved=RESULT_COLUMNS)
    with pytest.raises(ManifestError) as info:
        reader.check()
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_template_column_must_exist(tmp_path):
    path = csv_manifest(tmp_path, "id,path\n1,a.jpg\n")
    with pytest.raises(ManifestError, match=r"request.prompt uses \{label\}"):
        ManifestReader(InputConfig(manifest=path)).check(["Describe the {label}"])


def test_missing_manifest_file(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        ManifestReader(InputConfig(manifest=tmp_path / "none.csv")).check()


def test_carry_columns_restricts_output(tmp_path):
    path = csv_manifest(tmp_path, "id,path,status,keep\n1,a.jpg,x,y\n")
    reader = ManifestReader(InputConfig(manifest=path, carry_columns=["keep"]), reserved=RESULT_COLUMNS)
    reader.check()
    assert reader.carried_columns == ["keep"]
