"""Fault injection for the local endpoint: rules parsed from short spec strings.

Tests (and people with curl) describe misbehaviour as ``KIND[:key=value,...]``, e.g. ``status:code=429,
retry_after=1,times=2`` or ``truncate:after=3,per_image=1``, so retry and timeout handling can be
exercised over real HTTP.

Two kinds are *limits* rather than faults: ``concurrency_limit:max=N`` answers 429 (with no rate-limit
headers, as a proxy in front of vLLM would) while N requests are already being answered, and
``rpm_limit:rpm=N`` answers 429 when a token bucket of ``burst`` requests (default one second's worth),
refilled at N per minute, is empty; with ``headers=1`` it also sends OpenAI's ``x-ratelimit-*-requests``
headers, on the 429 and on every answer it lets through. A bucket, not a 60 s window, because that is how
providers enforce per-minute limits (over short slices) and because a 60 s window could not tell pacing
from bursting in a test that lasts seconds. Limit rules are checked before every other rule.

``say:text=TEXT`` is no fault either: it answers normally with TEXT as the caption (for a test that needs a
given caption, markup and all). Rules are plain synchronous objects: mutating a plan from a test running in
the server's event loop is safe because nothing here awaits.
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
    "linger", "html", "echo_auth", "concurrency_limit", "rpm_limit", "say",
)

#: Kinds that limit load rather than misbehave; checked before the other rules.
LIMIT_KINDS = frozenset({"concurrency_limit", "rpm_limit"})

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
    "echo_auth": ("code",),
    "down": ("seconds", "mode", "code"),
    "concurrency_limit": ("max",),
    "rpm_limit": ("rpm", "burst", "headers"),
    "say": ("text",),
}

#: Allowed ``mode=`` values (first is the default) for the kinds that have one.
KIND_MODES: dict[str, tuple[str, ...]] = {"truncate": ("close", "eof"), "down": ("status", "drop")}

_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|h|m|s))+$")


@dataclass(frozen=True)
class RequestTraits:
    """What a rule may look at when deciding whether it applies to a request."""

    text: str = ""
    image_keys: tuple[str, ...] = ()
    in_flight: int = 0  # requests the endpoint is already answering (for concurrency_limit)


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
    max_in_flight: int | None = None
    rpm: float | None = None
    burst: float | None = None
    rate_headers: bool = False
    text: str | None = None  # say: the answer's text instead of the image's description
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
    _bucket: float | None = field(default=None, init=False, repr=False)
    _bucket_stamp: float = field(default=0.0, init=False, repr=False)

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
        if self.kind == "concurrency_limit" and self.max_in_flight is None:
            raise ValueError("concurrency_limit needs max=N (requests answered at once)")
        if self.kind == "rpm_limit":
            if self.rpm is None:
                raise ValueError("rpm_limit needs rpm=N (requests per minute)")
            if self.burst is None:
                self.burst = max(1.0, self.rpm / 60.0)
        if self.kind == "say" and self.text is None:
            raise ValueError("say needs text=TEXT (the answer to give)")
        if not self.spec:
            self.spec = self.kind
        self._rng = random.Random(self.seed)

    @property
    def status(self) -> int:
        """The HTTP status a ``status``, ``down`` or ``echo_auth`` rule answers with."""
        return self.code if self.code is not None else {"down": 503, "echo_auth": 401}.get(self.kind, 500)

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

    def _bucket_level(self, now: float) -> float:
        """Requests the ``rpm_limit`` bucket holds at ``now`` (full when first used)."""
        assert self.rpm is not None and self.burst is not None
        if self._bucket is None:
            self._bucket, self._bucket_stamp = self.burst, now
        elif now > self._bucket_stamp:
            self._bucket = min(self.burst, self._bucket + (now - self._bucket_stamp) * self.rpm / 60.0)
            self._bucket_stamp = now
        return self._bucket

    def _within_limit(self, traits: RequestTraits, now: float) -> bool:
        """For limit kinds: True (and the request is counted) when it may be answered."""
        if self.kind == "concurrency_limit":
            assert self.max_in_flight is not None
            return traits.in_flight < self.max_in_flight
        if self._bucket_level(now) >= 1.0 - 1e-9:
            self._bucket = (self._bucket or 0.0) - 1.0
            return True
        return False

    def rate_limit_headers(self, now: float) -> dict[str, str]:
        """OpenAI's request-limit headers for an ``rpm_limit`` rule with ``headers=1`` (else empty)."""
        if self.kind != "rpm_limit" or not self.rate_headers:
            return {}
        assert self.rpm is not None and self.burst is not None
        level = max(0.0, self._bucket_level(now))
        return {
            "x-ratelimit-limit-requests": f"{self.rpm:g}",
            "x-ratelimit-remaining-requests": str(math.floor(level + 1e-9)),
            "x-ratelimit-reset-requests": format_duration((self.burst - level) * 60.0 / self.rpm),
        }

    def claim(self, traits: RequestTraits, now: float) -> bool:
        """Decide whether this rule fires for a request; if it does, record the firing."""
        self.activate(now)
        if self.spent(now):
            return False
        if self.match is not None and self.match not in traits.text:
            return False
        if self.kind in LIMIT_KINDS and self._within_limit(traits, now):
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
        """The first rule that fires for this request: ``extra`` (the X-Fault header's) first, then the
        limit rules (a rate limiter sits in front of the model), then the others in order."""
        now = self._clock()
        limits = [rule for rule in self._rules if rule.kind in LIMIT_KINDS]
        others = [rule for rule in self._rules if rule.kind not in LIMIT_KINDS]
        candidates = ([extra] if extra is not None else []) + limits + others
        return next((rule for rule in candidates if rule.claim(traits, now)), None)

    def rate_limit_headers(self) -> dict[str, str]:
        """Headers every answer carries now: those of ``rpm_limit`` rules with ``headers=1``."""
        now = self._clock()
        headers: dict[str, str] = {}
        for rule in self._rules:
            if not rule.spent(now):
                headers.update(rule.rate_limit_headers(now))
        return headers

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


def format_duration(seconds: float) -> str:
    """Seconds as OpenAI writes reset durations: ``250ms``, ``1.5s``, ``6m0s``."""
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m" + (f"{rest:.3f}".rstrip("0").rstrip(".") or "0") + "s"


def _positive_number(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be a number > 0")
    return value


def _flag(raw: str) -> bool:
    if raw not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return raw == "1"


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
    "max": _positive_int, "rpm": _positive_number, "burst": _positive_number, "headers": _flag, "text": _text,
}

#: Option names that differ from the FaultRule field they fill.
_FIELD_FOR_OPTION = {"type": "error_type", "max": "max_in_flight", "headers": "rate_headers"}


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
