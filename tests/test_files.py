"""The one atomic-write helper on real files: replaced whole on success, untouched on failure, no leftovers."""

from __future__ import annotations

import stat
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.edges.files import atomic_path, atomic_write_text, published_mode
from pipeline.edges.sinks import write_atomic


def test_atomic_write_text_replaces_the_file_with_the_umask_mode(tmp_path: Path) -> None:
    target = tmp_path / "metrics" / "job.prom"  # the folder is created on the way
    atomic_write_text(target, "first\n")
    atomic_write_text(target, "second ü\n")
    assert target.read_text(encoding="utf-8") == "second ü\n"
    assert stat.S_IMODE(target.stat().st_mode) == published_mode()
    assert sorted(p.name for p in target.parent.iterdir()) == ["job.prom"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_path(target) as temporary:
        temporary.write_text("half of the new")
        assert temporary.parent == tmp_path and temporary.name.startswith(".out.json.")
        assert temporary.suffix == ".tmp"
        raise RuntimeError("disk on fire")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_table_sink_writes_through_the_same_helper(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.string())])
    target = tmp_path / "out.csv"

    def tables_then_failure():
        yield pa.table({"id": ["a"]}, schema=schema)
        raise OSError("source went away")

    with pytest.raises(OSError, match="source went away"):
        write_atomic(tables_then_failure(), target, "csv", schema)
    assert list(tmp_path.iterdir()) == []
    assert write_atomic([pa.table({"id": ["a", "b"]}, schema=schema)], target, "csv", schema) == 2
    assert target.read_text().splitlines()[1:] == ['"a"', '"b"']
    assert stat.S_IMODE(target.stat().st_mode) == published_mode() and [p.name for p in tmp_path.iterdir()] == ["out.csv"]
