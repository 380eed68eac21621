"""Blocking work in a thread that outlives no cancellation of its caller.

``asyncio.to_thread`` returns as soon as its caller is cancelled, but the thread runs on: a caller inside
``with StateStore(...)`` then closes the SQLite connection while the thread still uses it, which crashes the
process (CPython's sqlite3 does not guard a connection closed under another thread's query). A thread cannot
be stopped, so the caller waits for it: the work is short (a batch of rows, a commit, an export).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from typing import TypeVar

__all__ = ["in_thread"]

T = TypeVar("T")


async def in_thread(fn: Callable[..., T], /, *args: object) -> T:
    """``fn(*args)`` in the loop's default executor (with the caller's context, as ``asyncio.to_thread``);
    if the caller is cancelled meanwhile, the cancellation goes on only once ``fn`` has returned."""
    loop = asyncio.get_running_loop()
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    future = loop.run_in_executor(None, call)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await _outlast(future)
        raise


async def _outlast(future: asyncio.Future[T]) -> None:
    """Until ``future`` is done, whatever further cancellations come (its outcome is the thread's own)."""
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            continue
    if not future.cancelled():
        future.exception()  # retrieved: its error, if any, is not news once the caller is cancelled
