"""pandas in and out: a DataFrame (or Arrow table) as the manifest, and ``read_results`` back, end to end
against the real embedded endpoint."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml

import pipeline
from pipeline import (
    ConfigError,
    ManifestError,
    OutputMissing,
    read_results,
    run_job,
    run_job_async,
)
from pipeline.core.config import config_from_dict
from pipeline.server import LocalEndpoint

from .helpers import COLOURS, make_image

SIZES = [(40, 30), (52, 31), (64, 33), (70, 40)]


def table_config(out: Path, base_url: str = "local", **input_keys: object) -> dict:
    """A job with no input.manifest: the rows come from the table handed to run_job."""
    return {
        "endpoint": {"base_url": base_url, "timeout": {"connect": 5, "first_byte": 10, "idle": 5, "total": 30}},
        "request": {"model": "test-model", "prompt": "Describe {id}."},
        "input": dict(input_keys),
        "run": {"concurrency": 4, "max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.05},
        "output": {"path": str(out)},
    }


def images(folder: Path, count: int = 4) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i}.png"
        make_image(path, COLOURS[i % len(COLOURS)], size=SIZES[i % len(SIZES)])
        paths.append(path)
    return paths


def requests_seen(endpoint: LocalEndpoint) -> int:
    return endpoint.stats.snapshot()["requests"]


# -- DataFrame in, DataFrame out ------------------------------------------------------------------


def test_dataframe_round_trip_has_typed_columns_and_the_carried_ones(tmp_path):
    paths = images(tmp_path / "in", 3)
    taken = [datetime(2026, 5, day, 12, tzinfo=UTC) for day in (1, 2, 3, 4)]
    df = pd.DataFrame({
        "id": ["a", "b", "c", "gone"],
        "path": [str(p) for p in paths] + [str(tmp_path / "in" / "missing.png")],
        "label": ["cat", "dog", None, "owl"],
        "score": [0.5, 1.5, 2.5, 3.5],
        "n": [1, 2, 3, 4],
        "taken": taken,
    })
    summary = run_job(table_config(tmp_path / "out" / "captions.parquet"), manifest=df)
    assert (summary.rows_ok, summary.rows_failed) == (3, 1)

    results = read_results(table_config(tmp_path / "out" / "captions.parquet"))
    assert list(results["id"]) == ["a", "b", "c", "gone"]
    assert list(results.columns[:6]) == ["id", "path", "label", "score", "n", "taken"]
    dtypes = results.dtypes
    assert str(dtypes["started_at"]) == "datetime64[ns, UTC]" and str(dtypes["finished_at"]) == "datetime64[ns, UTC]"
    for column in ("prompt_tokens", "completion_tokens", "total_tokens", "attempts", "image_width", "n"):
        assert dtypes[column] == pd.Int64Dtype(), column
    assert isinstance(dtypes["status"], pd.CategoricalDtype) and list(dtypes["status"].categories) == ["ok", "failed"]
    assert isinstance(dtypes["error_type"], pd.CategoricalDtype)
    for column in ("id", "path", "content", "label", "error_message"):
        assert dtypes[column] == pd.StringDtype(), column
    assert dtypes["score"] == "float64" and str(dtypes["taken"]) == "datetime64[ns, UTC]"

    ok, failed = results[results["status"] == "ok"], results[results["status"] == "failed"]
    assert ok["prompt_tokens"].gt(0).all() and ok["content"].str.len().gt(0).all()
    assert list(ok["image_width"]) == [w for w, _ in SIZES[:3]]
    assert list(failed["error_type"]) == ["image_missing"] and failed["prompt_tokens"].isna().all()
    assert list(results["n"]) == [1, 2, 3, 4] and list(results["taken"]) == taken
    assert results["label"].isna().tolist() == [False, False, True, False]
    assert results.groupby("status", observed=True).size().to_dict() == {"ok": 3, "failed": 1}


def test_relative_paths_in_a_dataframe_resolve_against_the_working_directory(tmp_path, monkeypatch):
    images(tmp_path / "in", 2)
    monkeypatch.chdir(tmp_path)
    df = pd.DataFrame({"id": [1, 2], "path": ["in/img_0.png", "in/img_1.png"]})
    summary = run_job(table_config(tmp_path / "out.parquet"), manifest=df)
    assert summary.rows_ok == 2
    assert list(read_results(tmp_path / "out.parquet")["id"]) == ["1", "2"]  # ids are text, as in a file


def test_bytes_manifest_sends_the_bytes_and_names_them_by_content(tmp_path):
    paths = images(tmp_path / "in", 3)
    data = [p.read_bytes() for p in paths]
    df = pd.DataFrame({"id": ["x", "y", "z"], "image": data, "note": ["n1", "n2", "n3"]})
    out = tmp_path / "out.parquet"
    summary = run_job(table_config(out, image_column="image"), manifest=df)
    assert summary.rows_ok == 3

    results = read_results(out)
    assert list(results["path"]) == [f"<bytes:sha256:{hashlib.sha256(d).hexdigest()[:16]}>" for d in data]
    assert list(results["image_width"]) == [w for w, _ in SIZES[:3]]
    assert list(results["note"]) == ["n1", "n2", "n3"] and "image" not in results.columns  # bytes not copied out
    assert set(results["image_action"]) == {"pass_through"}


def test_a_path_column_beside_the_bytes_labels_the_rows(tmp_path):
    data = [p.read_bytes() for p in images(tmp_path / "in", 2)]
    table = pa.table({"id": ["x", "y"], "image": pa.array(data, pa.binary()), "path": ["cat.png", ""]})
    out = tmp_path / "out.jsonl"
    assert run_job(table_config(out, image_column="image"), manifest=table).rows_ok == 2
    results = read_results(out)
    assert list(results["path"]) == ["cat.png", f"<bytes:sha256:{hashlib.sha256(data[1]).hexdigest()[:16]}>"]
    assert list(results["image_height"]) == [h for _, h in SIZES[:2]]


def test_hugging_face_style_image_cells_are_read_for_their_bytes(tmp_path):
    data = images(tmp_path / "in", 1)[0].read_bytes()
    df = pd.DataFrame({"id": ["x"], "image": [{"bytes": data, "path": "x.png"}]})
    assert run_job(table_config(tmp_path / "out.parquet", image_column="image"), manifest=df).rows_ok == 1


# -- resume: the ledger knows a table's rows by id and content -----------------------------------------


async def test_the_same_table_twice_sends_nothing_and_one_changed_cell_sends_one_row(tmp_path, endpoint):
    data = [p.read_bytes() for p in images(tmp_path / "in", 4)]
    df = pd.DataFrame({"id": ["a", "b", "c", "d"], "image": data})
    config = table_config(tmp_path / "out.parquet", endpoint.base_url, image_column="image")

    first = await run_job_async(config, manifest=df)
    assert first.rows_new == 4 and requests_seen(endpoint) == 4

    copy = pd.DataFrame({"id": ["a", "b", "c", "d"], "image": [bytes(bytearray(d)) for d in data]})  # new objects
    again = await run_job_async(config, manifest=copy)
    assert again.rows_skipped == 4 and again.attempts == 0 and requests_seen(endpoint) == 4

    changed = copy.copy()
    changed.loc[2, "image"] = data[0]  # row c now holds a's picture
    third = await run_job_async(config, manifest=changed)
    assert third.rows_changed == 1 and third.rows_skipped == 3 and requests_seen(endpoint) == 5
    results = read_results(tmp_path / "out.parquet")
    assert list(results["image_width"]) == [SIZES[0][0], SIZES[1][0], SIZES[0][0], SIZES[3][0]]


async def test_a_path_table_resumes_like_a_file_manifest(tmp_path, endpoint):
    paths = images(tmp_path / "in", 3)
    config = table_config(tmp_path / "out.csv", endpoint.base_url)
    df = pd.DataFrame({"id": ["a", "b", "c"], "path": [str(p) for p in paths]})
    await run_job_async(config, manifest=df)
    second = await run_job_async(config, manifest=pa.Table.from_pandas(df))
    assert second.rows_skipped == 3 and requests_seen(endpoint) == 3


# -- as_arrow, other formats, partitions ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_every_output_format_reads_back_with_the_same_types(tmp_path, suffix):
    paths = images(tmp_path / "in", 2)
    df = pd.DataFrame({"id": ["a", "b"], "path": [str(paths[0]), str(tmp_path / "nope.png")], "label": ["x", "y"]})
    out = tmp_path / f"captions{suffix}"
    run_job(table_config(out), manifest=df)

    arrow = read_results(out, as_arrow=True)
    assert isinstance(arrow, pa.Table)
    assert arrow.schema.field("started_at").type == pa.timestamp("us", tz="UTC")
    assert arrow.schema.field("prompt_tokens").type == pa.int64()
    assert arrow.column("status").to_pylist() == ["ok", "failed"]

    frame = read_results(out)
    assert str(frame.dtypes["finished_at"]) == "datetime64[ns, UTC]" and frame.dtypes["total_tokens"] == "Int64"
    assert list(frame["error_type"].astype(object).fillna("-")) == ["-", "image_missing"]
    assert frame.dtypes["label"] == pd.StringDtype() and list(frame["label"]) == ["x", "y"]


def test_a_partitions_folder_reads_as_one_table_with_its_run_date(tmp_path):
    paths = images(tmp_path / "in", 3)
    config = table_config(tmp_path / "out" / "captions.parquet")
    config["output"]["partition_by"] = "run_date"
    run_job(config, manifest=pd.DataFrame({"id": ["a", "b"], "path": [str(p) for p in paths[:2]]}))
    run_job(config, manifest=pd.DataFrame({"id": ["a", "b", "c"], "path": [str(p) for p in paths]}))

    parts = read_results(tmp_path / "out" / "captions")
    assert sorted(parts["id"]) == ["a", "b", "c"]  # run 1 wrote a and b, run 2 only c
    assert parts["run_date"].str.fullmatch(r"\d{4}-\d{2}-\d{2}").all()  # from the run_date=... folders
    assert str(parts.dtypes["started_at"]) == "datetime64[ns, UTC]"


# -- errors ---------------------------------------------------------------------------------------


def test_no_output_yet_names_the_path_and_what_to_run(tmp_path):
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(table_config(tmp_path / "out" / "captions.parquet")))
    with pytest.raises(OutputMissing) as info:
        read_results(config_file)
    message = str(info.value)
    assert str(tmp_path / "out" / "captions.parquet") in message and f"pipeline run {config_file}" in message
    with pytest.raises(OutputMissing, match="run_job"):
        read_results(table_config(tmp_path / "elsewhere.csv"))
    with pytest.raises(ConfigError, match=r"\.txt"):
        read_results(Path(__file__).with_suffix(".txt"))


async def test_bad_tables_are_refused_before_anything_is_sent(tmp_path, endpoint):
    data = images(tmp_path / "in", 1)[0].read_bytes()
    config = table_config(tmp_path / "out.parquet", endpoint.base_url, image_column="image")
    cases = [
        (pd.DataFrame({"id": ["a", "b", "a"], "image": [data] * 3}),
         r"DataFrame manifest: duplicate id 'a' at rows 1 and 3; ids must be unique \(column 'id'\)"),
        (pd.DataFrame({"id": ["a"], "picture": [data]}),
         r"missing required column 'image' \(columns are: id, picture\); add it or set input.image_column"),
        (pd.DataFrame({"id": ["a", "b"], "image": [data, "img_1.png"]}),
         r"row 2 \(id='b'\): input.image_column 'image' holds a builtins.str, not bytes"),
        (pa.table({"id": ["a", None], "image": [data, data]}), r"Arrow table manifest: empty id .* row\(s\) 2"),
        (pd.DataFrame({"id": ["a", "b"], "image": [data, data], "mixed": [1, "x"]}), r"column 'mixed' cannot be"),
    ]
    for table, expected in cases:
        with pytest.raises(ManifestError, match=expected):
            await run_job_async(config, manifest=table)
    assert requests_seen(endpoint) == 0


def test_an_empty_bytes_cell_fails_that_row_alone(tmp_path):
    data = images(tmp_path / "in", 1)[0].read_bytes()
    df = pd.DataFrame({"id": ["a", "b", "c"], "image": [data, None, b""]})
    summary = run_job(table_config(tmp_path / "out.parquet", image_column="image"), manifest=df)
    assert (summary.rows_ok, summary.rows_failed) == (1, 2)
    failed = read_results(tmp_path / "out.parquet").set_index("id").loc[["b", "c"]]
    assert set(failed["error_type"]) == {"image_missing"}
    assert failed["error_message"].str.contains("no image bytes in this row's image column").all()
    assert list(failed["path"]) == ["<bytes:none>", "<bytes:none>"]


def test_wrong_manifest_arguments_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"manifest= takes a pandas DataFrame or a pyarrow Table, got list"):
        run_job(table_config(tmp_path / "out.parquet"), manifest=[{"id": "a"}])
    with pytest.raises(ConfigError, match=r"set input.manifest .* or input.directory .*manifest=df"):
        run_job(table_config(tmp_path / "out.parquet"))  # no table and no manifest file
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\na,x.png\n")
    with pytest.raises(ConfigError, match=r"input.image_column \('image'\) is for in-memory tables"):
        run_job(table_config(tmp_path / "out.parquet", manifest=str(manifest), image_column="image"))


def test_validate_says_what_is_missing_when_a_config_names_no_rows(tmp_path):
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(table_config(tmp_path / "out.parquet")))
    done = subprocess.run([sys.executable, "-m", "pipeline", "validate", str(config_file)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert "set input.manifest (a CSV, JSONL or Parquet file) or input.directory" in done.stderr


def test_a_table_takes_the_place_of_the_configured_manifest(tmp_path):
    paths = images(tmp_path / "in", 2)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path\nfile-row,x.png\n")
    config = config_from_dict(table_config(tmp_path / "out.parquet", manifest=str(manifest)))
    df = pd.DataFrame({"id": ["t1", "t2"], "path": [str(p) for p in paths]})
    assert pipeline.run_job(config, manifest=df).rows_ok == 2
    assert list(read_results(config)["id"]) == ["t1", "t2"]
