"""The package's public surface: ``pipeline.__all__`` is what a caller may use, and importing it is cheap."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pipeline
import pipeline.api
import pipeline.core.errors as errors


def test_every_public_name_resolves_and_is_listed_by_dir() -> None:
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    assert set(pipeline.__all__) <= set(dir(pipeline))
    for name in ("run_job", "run_job_async", "read_results", "RunSummary", "Config", "load_config"):
        assert getattr(pipeline, name) is getattr(pipeline.api, name)


def test_the_whole_error_tree_is_exported_as_the_same_objects() -> None:
    tree = {name for name, value in vars(errors).items()
            if inspect.isclass(value) and issubclass(value, Exception) and value.__module__ == errors.__name__}
    assert {"PipelineError", "LockHeld", "LedgerError", "ScheduleError", "ProtocolError", "ServerWaitTooLong",
            "TransientDownloadError"} <= tree
    assert tree | {"ExitCode"} <= set(pipeline.__all__)
    for name in tree | {"ExitCode"}:
        assert getattr(pipeline, name) is getattr(errors, name), name
    from pipeline import ExitCode, LockHeld, PipelineError

    assert issubclass(LockHeld, PipelineError) and ExitCode.LOCKED == 3


def test_import_pipeline_leaves_heavy_libraries_unimported() -> None:
    heavy = ["pydantic", "pyarrow", "aiohttp", "PIL", "pandas"]
    probe = ("import json, sys, pipeline; pipeline.LockHeld; dir(pipeline); "
             f"print(json.dumps([m for m in {heavy!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(done.stdout) == []
