"""Fault injection for the local endpoint: rules parsed from short spec strings.

Tests (and people with curl) describe misbehaviour as ``KIND[:key=value,...]``, e.g. ``status:code=429,
retry_after=1,times=2`` or ``truncate:after=3,per_image=1``, so retry and timeout handling can be
exercised over real HTTP. Rules are plain synchronous objects: mutating a plan from a test running in the
server's event loop is safe because nothing here awaits.
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

#: Every fault kind, in the order the docs list them.
FAULT_KINDS: tuple[str, ...] = (
    "status", "drop", "truncate", "stall", "stall_first_byte", "slow", "error_event", "malformed", "down",
    "linger", "html",
)

#: Options every kind accepts: how often and to which requests a rule applies.
COMMON_OPTIONS: tuple[str, ...] = ("times", "p", "seed", "match", "per_image")

#: Options specific to each kind.
KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "status": ("code", "message", "type", "error_code", "retry_after", "retry_after_ms",
               "reset_requests", "reset_tokens", "remaining_requests"),
    "drop": (),
    "truncate": ("after", "mode"),
    "stall": ("after", "seconds"),
    "stall_first_byte": ("seconds",),
    "slow": ("delay",),
    "error_event": ("after", "message", "type", "error_code", "style"),
    "malformed": ("after",),
    "linger": ("seconds",),
    "html": (),
    "down": ("seconds", "mode", "code"),
}

#: Allowed ``mode=`` values (first is the default) for the kinds that have one.
KIND_MODES: dict[str, tuple[str, ...]] = {"truncate": ("close", "eof"), "down": ("status", "drop")}

_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|h|m|s))+$")


@dataclass(frozen=True)
class RequestTraits:
    """What a rule may look at when deciding whether it applies to a request."""

    text: str = ""
    image_keys: tuple[str, ...] = ()


@dataclass(eq=False)
class FaultRule:
    """One kind of misbehaviour plus when it applies; keeps its own firing state."""

    kind: str
    spec: str = ""
    # kind options
    code: int | None = None
    message: str | None = None
    error_type: str | None = None
    error_code: str | None = None
    retry_after: str | None = None
    retry_after_ms: int | None = None
    reset_requests: str | None = None
    reset_tokens: str | None = None
    remaining_requests: int | None = None
    after: int = 0
    seconds: float = 3600.0
    delay: float = 0.1
    style: str = "data"
    mode: str | None = None
    # common options
    times: int | None = None
    p: float | None = None
    seed: int | None = None
    match: str | None = None
    per_image: int | None = None
    # state
    fired: int = field(default=0, init=False)
    _image_hits: Counter[str] = field(default_factory=Counter, init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)
    _window_end: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (expected one of: {', '.join(FAULT_KINDS)})")
        modes = KIND_MODES.get(self.kind, ())
        if self.mode is None and modes:
            self.mode = modes[0]
        elif self.mode is not None and self.mode not in modes:
            raise ValueError(f"mode={self.mode!r} is not valid for {self.kind!r} (allowed: {', '.join(modes)})")
        if self.style not in ("data", "event"):
            raise ValueError(f"style={self.style!r} is not valid (allowed: data, event)")
        if not self.spec:
            self.spec = self.kind
        self._rng = random.Random(self.seed)

    @property
    def status(self) -> int:
        """The HTTP status a ``status`` or ``down`` rule answers with."""
        return self.code if self.code is not None else (503 if self.kind == "down" else 500)

    def headers(self) -> dict[str, str]:
        """Rate-limit style response headers requested by a ``status`` rule."""
        pairs = {
            "Retry-After": self.retry_after,
            "retry-after-ms": self.retry_after_ms,
            "x-ratelimit-reset-requests": self.reset_requests,
            "x-ratelimit-reset-tokens": self.reset_tokens,
            "x-ratelimit-remaining-requests": self.remaining_requests,
        }
        return {name: str(value) for name, value in pairs.items() if value is not None}

    def activate(self, now: float) -> None:
        """Start a ``down`` rule's window; called when the rule joins a plan."""
        if self.kind == "down" and self._window_end is None:
            self._window_end = now + self.seconds

    def spent(self, now: float) -> bool:
        """True once ``times`` is used up or a ``down`` window has passed."""
        if self.times is not None and self.fired >= self.times:
            return True
        return self._window_end is not None and now >= self._window_end

    def claim(self, traits: RequestTraits, now: float) -> bool:
        """Decide whether this rule fires for a request; if it does, record the firing."""
        self.activate(now)
        if self.spent(now):
            return False
        if self.match is not None and self.match not in traits.text:
            return False
        fresh = [key for key in traits.image_keys
                 if self.per_image is None or self._image_hits[key] < self.per_image]
        if self.per_image is not None and not fresh:
            return False
        if self.p is not None and self._rng.random() >= self.p:
            return False
        self.fired += 1
        self._image_hits.update(fresh)
        return True

    def snapshot(self, now: float) -> dict[str, Any]:
        """JSON-ready view for the admin endpoint."""
        return {"spec": self.spec, "kind": self.kind, "fired": self.fired, "spent": self.spent(now)}


class FaultPlan:
    """The ordered rules of one endpoint plus its global latency knobs (seconds)."""

    def __init__(
        self,
        rules: Iterable[FaultRule | str] = (),
        *,
        chunk_delay: float = 0.0,
        first_byte_delay: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.chunk_delay = chunk_delay
        self.first_byte_delay = first_byte_delay
        self._clock = clock
        self._rules: list[FaultRule] = []
        self.add(*rules)

    @property
    def rules(self) -> tuple[FaultRule, ...]:
        return tuple(self._rules)

    def add(self, *rules: FaultRule | str) -> None:
        """Append rules (spec strings are parsed); ``down`` windows start now."""
        parsed = [parse_fault_spec(rule) if isinstance(rule, str) else rule for rule in rules]
        now = self._clock()
        for rule in parsed:
            rule.activate(now)
        self._rules.extend(parsed)

    def replace(self, rules: Iterable[FaultRule | str]) -> None:
        """Swap all rules at once (parsing first, so a bad spec leaves the plan unchanged)."""
        parsed = [parse_fault_spec(rule) if isinstance(rule, str) else rule for rule in rules]
        self._rules.clear()
        self.add(*parsed)

    def clear(self) -> None:
        self._rules.clear()

    def pick(self, traits: RequestTraits, extra: FaultRule | None = None) -> FaultRule | None:
        """The first rule that fires for this request (``extra``, from the X-Fault header, goes first)."""
        now = self._clock()
        candidates = ([extra] if extra is not None else []) + self._rules
        return next((rule for rule in candidates if rule.claim(traits, now)), None)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view of the rules and latency knobs."""
        now = self._clock()
        return {
            "rules": [rule.snapshot(now) for rule in self._rules],
            "chunk_delay": self.chunk_delay,
            "first_byte_delay": self.first_byte_delay,
        }


# --- parsing ----------------------------------------------------------------------------------------


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be a whole number >= 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise ValueError("must be a whole number >= 1")
    return value


def _seconds(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a number of seconds >= 0")
    return value


def _probability(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be a probability between 0 and 1")
    return value


def _error_status(raw: str) -> int:
    value = int(raw)
    if not 400 <= value <= 599:
        raise ValueError("must be an HTTP error status between 400 and 599")
    return value


def _text(raw: str) -> str:
    if not raw:
        raise ValueError("must not be empty")
    return raw


def _retry_after(raw: str) -> str:
    """Seconds (``1``, ``0.5``) or an HTTP-date, passed through as written."""
    try:
        if _seconds(raw) >= 0:
            return raw
    except ValueError:
        pass
    try:
        parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        raise ValueError("must be seconds >= 0 or an HTTP-date") from None
    return raw


def _duration(raw: str) -> str:
    """OpenAI-style reset durations such as ``1s``, ``20ms``, ``6m0s``."""
    if not _DURATION.match(raw):
        raise ValueError("must be a duration such as 1s, 20ms or 6m0s")
    return raw


_CONVERTERS: dict[str, Callable[[str], Any]] = {
    "times": _positive_int, "p": _probability, "seed": int, "match": _text, "per_image": _positive_int,
    "code": _error_status, "message": _text, "type": _text, "error_code": _text,
    "retry_after": _retry_after, "retry_after_ms": _non_negative_int,
    "reset_requests": _duration, "reset_tokens": _duration, "remaining_requests": _non_negative_int,
    "after": _non_negative_int, "seconds": _seconds, "delay": _seconds, "style": _text, "mode": _text,
}

#: Option names that differ from the FaultRule field they fill.
_FIELD_FOR_OPTION = {"type": "error_type"}


def _split_options(text: str) -> list[tuple[str, str]]:
    """``a=1,b=x, y`` -> [(a, 1), (b, "x, y")]: a piece without ``=`` continues the previous value."""
    pairs: list[tuple[str, str]] = []
    for piece in text.split(","):
        if "=" in piece:
            key, value = piece.split("=", 1)
            pairs.append((key.strip(), value.strip()))
        elif pairs:
            key, value = pairs[-1]
            pairs[-1] = (key, f"{value},{piece}".strip())
        elif piece.strip():
            raise ValueError(f"expected key=value, got {piece.strip()!r}")
    return pairs


def parse_fault_spec(spec: str) -> FaultRule:
    """Parse ``KIND[:key=value,...]`` into a rule; ValueError names the spec and the bad part."""
    text = spec.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip()
    try:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown kind {kind!r} (expected one of: {', '.join(FAULT_KINDS)})")
        allowed = KIND_OPTIONS[kind] + COMMON_OPTIONS
        options: dict[str, Any] = {}
        for key, raw in _split_options(rest):
            if key not in allowed:
                raise ValueError(f"option {key!r} is not valid for {kind!r} (allowed: {', '.join(allowed)})")
            if key in options:
                raise ValueError(f"option {key!r} given twice")
            try:
                options[key] = _CONVERTERS[key](raw)
            except ValueError as exc:
                reason = str(exc) if "must" in str(exc) else "has the wrong type"
                raise ValueError(f"option {key}={raw!r} {reason}") from None
        fields = {_FIELD_FOR_OPTION.get(key, key): value for key, value in options.items()}
        return FaultRule(kind=kind, spec=text, **fields)
    except ValueError as exc:
        raise ValueError(f"bad fault spec {spec!r}: {exc}") from None
