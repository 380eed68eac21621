"""Fast start: the CLI loads the HTTP client, Pillow, Arrow and pydantic only in the commands that use
them, so ``--help`` stays instant and ``validate`` does not pay for what it never calls."""

from __future__ import annotations

import subprocess
import sys

from .helpers import job_config, make_manifest

HEAVY = ("pyarrow", "aiohttp", "PIL", "pydantic")


def modules_loaded_after(code: str) -> set[str]:
    """The ``HEAVY`` top-level modules imported by ``code`` in a fresh interpreter."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_importing_the_cli_and_building_its_parser_loads_nothing_heavy():
    assert modules_loaded_after("import pipeline.cli; pipeline.cli.build_parser()") == set()


def test_validate_loads_neither_the_http_client_nor_pillow(tmp_path):
    manifest = make_manifest(tmp_path / "in", 3)
    config = job_config(manifest, tmp_path / "out.parquet", "http://127.0.0.1:9")
    path = tmp_path / "job.json"  # JSON is YAML: the config file as the CLI reads it
    path.write_text(config.model_dump_json(exclude_none=True))
    loaded = modules_loaded_after(f"from pipeline.cli import main\nassert main(['validate', {str(path)!r}]) == 0")
    assert "aiohttp" not in loaded and "PIL" not in loaded


def test_the_run_path_loads_aiohttp_only_for_downloads():
    """``run`` over local files never downloads: aiohttp (~0.15 s of every start) waits for an http(s) image."""
    loaded = modules_loaded_after("import pipeline.ops.jobrun, pipeline.run.processor, pipeline.edges.images")
    assert "aiohttp" not in loaded and "pyarrow" in loaded  # the probe did load the run path


def test_help_prints_every_command_without_loading_asyncio():
    """``pipeline --help`` imports asyncio only in commands that run a loop (a third of its start-up)."""
    probe = ("import contextlib, io, sys\nfrom pipeline.cli import main\nout = io.StringIO()\n"
             "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n    main(['--help'])\n"
             "print('asyncio' in sys.modules)\nprint(out.getvalue())")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    loaded, _, text = result.stdout.partition("\n")
    assert loaded == "False"
    for command in ("run", "retry", "validate", "status", "export", "estimate", "serve", "schedule"):
        assert f"    {command}" in text, text
