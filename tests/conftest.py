"""Shared fixtures. Keep each one generic and clearly named; modules add their own helpers locally."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from pipeline.server import LocalEndpoint


@pytest.fixture
async def local_endpoint() -> AsyncIterator[LocalEndpoint]:
    """A started embedded endpoint on 127.0.0.1 (random free port), no faults, no API key."""
    async with LocalEndpoint() as endpoint:
        yield endpoint


@pytest.fixture
async def endpoint(local_endpoint: LocalEndpoint) -> LocalEndpoint:
    """The embedded endpoint under the short name the end-to-end tests use (they add faults to it)."""
    return local_endpoint
