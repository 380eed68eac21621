"""Counters of what the local endpoint did, so tests can assert on server-side behaviour."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any


class EndpointStats:
    """Request, response, fault and concurrency counters; ``wait_until`` replaces sleep-and-poll in tests."""

    def __init__(self) -> None:
        self._waiters: list[tuple[Callable[[EndpointStats], bool], asyncio.Future[None]]] = []
        self.in_flight = 0
        self.reset()

    def reset(self) -> None:
        """Zero every counter (requests still in flight keep counting down from their own +1)."""
        self.requests = 0
        self.responses_by_status: Counter[str] = Counter()
        self.streams_completed = 0
        self.completed_by_image: Counter[str] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.max_in_flight = self.in_flight
        self._changed()

    def request_started(self) -> None:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self._changed()

    def request_finished(self) -> None:
        self.in_flight -= 1
        self._changed()

    def responded(self, status: int) -> None:
        self.responses_by_status[str(status)] += 1
        self._changed()

    def fault_injected(self, kind: str) -> None:
        self.faults_injected[kind] += 1
        self._changed()

    def answer_completed(self, image_keys: Iterable[str], *, streamed: bool) -> None:
        """A full answer reached the client (a stream up to ``[DONE]``, or a whole JSON body)."""
        if streamed:
            self.streams_completed += 1
        self.completed_by_image.update(set(image_keys))
        self._changed()

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter."""
        return {
            "requests": self.requests,
            "responses_by_status": dict(self.responses_by_status),
            "streams_completed": self.streams_completed,
            "completed_by_image": dict(self.completed_by_image),
            "faults_injected": dict(self.faults_injected),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
        }

    async def wait_until(self, predicate: Callable[[EndpointStats], bool], timeout: float = 2.0) -> None:
        """Return once ``predicate(stats)`` holds; TimeoutError after ``timeout`` seconds."""
        if predicate(self):
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _changed(self) -> None:
        """Wake waiters whose condition now holds."""
        for predicate, future in list(self._waiters):
            if not future.done() and predicate(self):
                future.set_result(None)
