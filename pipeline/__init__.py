"""pipeline: caption large image collections through any OpenAI-compatible streaming vision endpoint.

``run_job(config_or_path)`` / ``run_job_async(...)`` run a job from Python; see ``pipeline.api``.
"""

from __future__ import annotations

from typing import Any

from pipeline.core.version import __version__

__all__ = ["run_job", "run_job_async", "__version__"]


def __getattr__(name: str) -> Any:
    """Import the API lazily: ``import pipeline`` stays cheap for the CLI's --help and for tools."""
    if name in ("run_job", "run_job_async"):
        from pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
