"""What every limit shares: an injectable clock and sleep, so each one's tests run on a fake clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

#: Slack for float comparisons of token levels and limits (a level of 0.9999999999 is 1).
EPS = 1e-9
