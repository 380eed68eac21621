"""Test helpers: real image files, real manifests and configs pointing at a real local endpoint."""

from __future__ import annotations

import contextlib
import csv
import io
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from pipeline.core.config import Config, config_from_dict

COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 220), (240, 220, 40), (20, 20, 20), (250, 250, 250)]


def make_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 32), fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def make_manifest(folder: Path, count: int, *, missing: set[int] = frozenset(), extra: dict[str, list[str]] | None = None) -> Path:
    """``count`` small distinct images and a CSV manifest (id,path,label[,extra...]) beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        name = f"img_{i:03d}.png"
        if i not in missing:
            make_image(folder / name, COLOURS[i % len(COLOURS)], size=(40 + i, 30 + (i % 7)))
        row = {"id": f"row-{i}", "path": name, "label": f"label {i}"}
        for column, values in (extra or {}).items():
            row[column] = values[i]
        rows.append(row)
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def job_config(manifest: Path, output: Path, base_url: str = "local", **sections: dict[str, Any]) -> Config:
    """A validated config; keyword arguments are merged into their sections."""
    document: dict[str, Any] = {
        "endpoint": {"base_url": base_url, "timeout": {"connect": 5, "first_byte": 10, "idle": 5, "total": 30}},
        "request": {"model": "test-model", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 4, "max_attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05},
        "output": {"path": str(output)},
    }
    for name, values in sections.items():
        merged = {**document.get(name, {}), **values}
        if name == "endpoint" and "timeout" in values:
            merged["timeout"] = {**document["endpoint"]["timeout"], **values["timeout"]}
        document[name] = merged
    return config_from_dict(document)


def read_rows(path: Path) -> list[dict[str, Any]]:
    return pq.read_table(path).to_pylist()


@contextlib.contextmanager
def standalone_endpoint(folder: Path, chunk_delay: float) -> Iterator[str]:
    """``pipeline serve`` in a process of its own: an endpoint that outlives the runs a test kills, slowed by
    ``chunk_delay`` so a run takes seconds; yields its base URL and stops exactly that process."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", "0", "--chunk-delay", str(chunk_delay)],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout is not None else ""
        assert line.startswith("serving on "), proc.stderr.read() if proc.stderr is not None else line
        yield line.split()[-1]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` a moment ago: nothing listens there now (connecting is refused)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])
