"""The CLI as a user runs it: real subprocesses, real files, exit codes, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from .helpers import make_manifest, read_rows

REPO = Path(__file__).resolve().parent.parent


def pipeline(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def write_config(path: Path, manifest: Path, output: str, **overrides) -> Path:
    document = {
        "endpoint": {"base_url": "local", "api_key": "${TEST_KEY:-}"},
        "request": {"model": "gpt-4o", "prompt": "Describe this image in one sentence."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 4, "max_attempts": 3, "backoff_base": 0.01},
        "output": {"path": output},
    }
    for section, values in overrides.items():
        document[section] = {**document.get(section, {}), **values}
    path.write_text(yaml.safe_dump(document))
    return path


def test_run_demo_style_job(tmp_path):
    manifest = make_manifest(tmp_path / "data", 5)
    config = write_config(tmp_path / "job.yaml", manifest, "out/captions.parquet")
    result = pipeline("run", str(config), "--no-progress", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "out/captions.parquet: 5 rows (5 ok, 0 failed)" in result.stdout
    rows = read_rows(tmp_path / "out/captions.parquet")
    assert len(rows) == 5 and all(r["status"] == "ok" and r["content"] for r in rows)


def test_some_rows_failed_exits_1(tmp_path):
    manifest = make_manifest(tmp_path / "data", 3, missing={0})
    config = write_config(tmp_path / "job.yaml", manifest, "out.csv")
    result = pipeline("run", str(config), cwd=tmp_path)
    assert result.returncode == 1
    assert "failed with image_missing: 1" in result.stdout
    assert "row 1 (id=row-0) failed: image_missing" in result.stderr


def test_bad_config_exits_2_with_key_path(tmp_path):
    manifest = make_manifest(tmp_path / "data", 1)
    config = write_config(tmp_path / "job.yaml", manifest, "out.csv", request={"temperature": 3.5, "colour": "x"})
    for command in ("run", "validate"):
        result = pipeline(command, str(config), cwd=tmp_path)
        assert result.returncode == 2
        assert f"{config}: request.temperature: must be <= 2, got 3.5" in result.stderr
        assert "request.colour: unknown key" in result.stderr
        assert "Traceback" not in result.stderr


def test_validate_reports_ok_and_manifest_errors(tmp_path):
    manifest = make_manifest(tmp_path / "data", 4)
    config = write_config(tmp_path / "job.yaml", manifest, "out.parquet")
    result = pipeline("validate", str(config), cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("ok:") and "4 rows" in result.stdout
    manifest.write_text(manifest.read_text() + "row-1,img_001.png,dup\n")
    result = pipeline("validate", str(config), cwd=tmp_path)
    assert result.returncode == 2
    assert "duplicate id 'row-1' at rows 2 and 5" in result.stderr


def test_sigint_stops_cleanly_and_exits_4(tmp_path):
    manifest = make_manifest(tmp_path / "data", 60)
    config = write_config(tmp_path / "job.yaml", manifest, "out/captions.parquet",
                          endpoint={"local": {"chunk_delay": 0.03}}, run={"concurrency": 2})
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "--log-level", "INFO", "run", str(config),
                             "--progress-interval", "0.05"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait for real progress: stderr is no terminal, so no bar but progress lines report finished rows
    seen = ""
    while proc.poll() is None and max(map(int, re.findall(r"(\d+) of 60 rows done", seen)), default=0) < 4:
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=30)
    assert proc.returncode == 4, stdout
    assert "interrupted: run the same command again to resume" in stdout
    rows = read_rows(tmp_path / "out/captions.parquet")
    assert 4 <= len(rows) < 60 and all(r["status"] == "ok" for r in rows)


def test_serve_answers_openai_requests(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--port", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving on http://127.0.0.1:")
        base = line.split()[-1]
        with urllib.request.urlopen(f"{base}/models", timeout=10) as response:
            models = json.load(response)
        assert models["object"] == "list" and models["data"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    assert proc.returncode == 0


def test_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("run", "validate", "serve"):
        assert command in result.stdout


def test_shipped_demo_job_captions_every_sample_image(tmp_path):
    """The README's demo: configs/demo.yaml over data/sample/, run from a copy of the repository root."""
    import shutil

    shutil.copytree(REPO / "data" / "sample", tmp_path / "data" / "sample")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    result = pipeline("run", "configs/demo.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    images = [p for p in (tmp_path / "data" / "sample").iterdir() if p.suffix != ".csv"]
    rows = read_rows(tmp_path / "out" / "demo" / "captions.parquet")
    assert len(rows) == len(images) >= 24
    assert all(r["status"] == "ok" and len(r["content"]) > 20 for r in rows)
    assert sorted(r["path"] for r in rows) == sorted(p.name for p in images)
    gallery = (tmp_path / "out" / "demo" / "captions.gallery.html").read_text()  # report.gallery: true
    assert gallery.count('<article class="card ok"') == gallery.count("data:image/webp;base64,") == len(images)
    assert "gallery    out/demo/captions.gallery.html" in result.stdout


def test_bad_fault_spec_and_empty_manifest_exit_2(tmp_path):
    manifest = make_manifest(tmp_path / "data", 1)
    config = write_config(tmp_path / "job.yaml", manifest, "out.csv", endpoint={"local": {"faults": ["explode:now"]}})
    result = pipeline("validate", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "endpoint.local.faults[0]: bad fault spec 'explode:now': unknown kind 'explode'" in result.stderr
    manifest.write_text("id,path,label\n")
    config = write_config(tmp_path / "job.yaml", manifest, "out.csv")
    result = pipeline("run", str(config), cwd=tmp_path)
    assert result.returncode == 2 and "the manifest has no rows" in result.stderr
    assert not (tmp_path / "out.csv").exists()


HOSTILE_CONFIGS = {
    "laughs.yaml": ("l0: &l0 lol\n" + "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))
                    + "request: {model: m, extra_body: {bomb: *l9}}\n").encode(),
    "deep.yaml": ("request: " + "[" * 50_000 + "]" * 50_000 + "\n").encode(),
    "latin1.yaml": "request: {model: caf\xe9}\n".encode("latin-1"),
}


def test_hostile_config_files_exit_2_with_one_line(tmp_path):
    for name, content in HOSTILE_CONFIGS.items():
        (tmp_path / name).write_bytes(content)
        for command in ("validate", "run"):
            result = pipeline(command, name, cwd=tmp_path)
            assert result.returncode == 2, (name, command, result.stderr[-2000:])
            assert result.stderr.startswith(f"error: {name}: ") and result.stderr.count("\n") == 1, result.stderr
