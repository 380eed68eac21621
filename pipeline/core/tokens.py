"""Token estimates made before a request is sent, so rate limits and budgets can be enforced up front.

Pure: no I/O, no tokenizer download. The numbers are deliberately approximate; the only exact part is
the published image rule. What the endpoint later reports in ``usage`` corrects them
(:class:`TokenEstimator`), so a systematic error in the text rule or a model that prices images
differently (vLLM, Ollama, llama.cpp each have their own vision encoders) fades after a few requests.

* **Text**: about 4 characters per token (OpenAI's own rule of thumb for English), plus a few tokens of
  framing per message. Over-counts code and numbers a little, under-counts CJK text; the correction ratio
  absorbs both.
* **Images**: OpenAI's tile formula. ``low`` costs a fixed 85 tokens. ``high`` (and ``auto``, which may pick
  high, so we assume the dearer one) scales the image to fit 2048x2048, then so its shortest side is at
  most 768 (never up), and charges 170 per 512 px tile plus 85.
* **Output**: the request's ``max_completion_tokens`` or ``max_tokens`` per choice (what a provider's
  limiter reserves too), else the running mean of what was observed, else :data:`DEFAULT_OUTPUT_TOKENS`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Characters per token for the text estimate (OpenAI: "1 token ~= 4 chars in English").
CHARS_PER_TOKEN = 4
#: Framing tokens per message (role, separators) and for priming the reply, as in OpenAI's cookbook.
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
#: Image costs from the published rule.
IMAGE_BASE_TOKENS = 85
IMAGE_TILE_TOKENS = 170
IMAGE_TILE_PX = 512
IMAGE_FIT_PX = 2048
IMAGE_SHORT_SIDE_PX = 768
#: Assumed size when the caller does not know an image's pixels: a 3:2 photo larger than 768 px on its
#: short side, which costs 6 tiles (1105 tokens) at high detail. Typical photos cost 765-1105; the
#: correction ratio takes care of the rest.
DEFAULT_IMAGE_SIZE = (1536, 1024)
#: Output reservation per choice when the request sets no max_tokens and nothing was observed yet.
DEFAULT_OUTPUT_TOKENS = 256
#: The correction ratio (observed / estimated prompt tokens) stays within these bounds, so one odd
#: answer (or a server reporting 0) cannot make the estimate absurd.
MIN_RATIO = 0.2
MAX_RATIO = 5.0

Detail = str  # "low" | "high" | "auto"; None means "auto" (the API's default)
_DETAILS = ("low", "high", "auto")


def estimate_text_tokens(text: str) -> int:
    """Approximate tokens of ``text``: one per 4 characters, rounded up (0 for empty text)."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def image_tokens(width: int, height: int, detail: Detail | None = "auto") -> int:
    """Tokens one image costs under OpenAI's published rule (``auto``/``None`` priced like ``high``)."""
    detail = detail or "auto"
    if detail not in _DETAILS:
        raise ValueError(f"detail must be one of {', '.join(_DETAILS)}, got {detail!r}")
    if detail == "low":
        return IMAGE_BASE_TOKENS
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    w, h = float(width), float(height)
    if max(w, h) > IMAGE_FIT_PX:
        scale = IMAGE_FIT_PX / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > IMAGE_SHORT_SIDE_PX:
        scale = IMAGE_SHORT_SIDE_PX / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / IMAGE_TILE_PX) * math.ceil(h / IMAGE_TILE_PX)
    return IMAGE_TILE_TOKENS * tiles + IMAGE_BASE_TOKENS


def _image_parts(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The ``image_url`` objects of every message, in order."""
    parts = []
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") == "image_url":
                    image = part.get("image_url")
                    parts.append(image if isinstance(image, Mapping) else {})
    return parts


def _message_text(message: Any) -> str:
    """Everything in a message that is read as text: content strings, text parts, tool calls."""
    if not isinstance(message, Mapping):
        return ""
    pieces = [str(message.get("role") or ""), str(message.get("name") or "")]
    content = message.get("content")
    if isinstance(content, str):
        pieces.append(content)
    elif isinstance(content, list):
        pieces += [str(part.get("text") or "") for part in content
                   if isinstance(part, Mapping) and part.get("type") == "text"]
    if message.get("tool_calls"):
        pieces.append(json.dumps(message["tool_calls"], separators=(",", ":")))
    return "".join(pieces)


def estimate_prompt_tokens(body: Mapping[str, Any], image_sizes: Sequence[tuple[int, int] | None] | None = None,
                           detail: Detail | None = None) -> int:
    """Input tokens of a Chat Completions body: message text + framing + tools/schema + images.

    ``image_sizes`` gives (width, height) per image part in message order; a missing or ``None`` entry
    uses :data:`DEFAULT_IMAGE_SIZE`. A part's own ``detail`` wins over the ``detail`` argument.
    """
    messages = body.get("messages") or ()
    tokens = REPLY_PRIMING_TOKENS
    for message in messages:
        tokens += MESSAGE_OVERHEAD_TOKENS + estimate_text_tokens(_message_text(message))
    for key in ("tools", "response_format"):
        if body.get(key):
            tokens += estimate_text_tokens(json.dumps(body[key], separators=(",", ":")))
    sizes = list(image_sizes or ())
    for position, part in enumerate(_image_parts(body)):
        size = sizes[position] if position < len(sizes) and sizes[position] else DEFAULT_IMAGE_SIZE
        tokens += image_tokens(size[0], size[1], part.get("detail") or detail)
    return tokens


def output_reservation(body: Mapping[str, Any], default_per_choice: int = DEFAULT_OUTPUT_TOKENS) -> int:
    """Completion tokens the request may produce: max_(completion_)tokens (or the default) x n."""
    per_choice = body.get("max_completion_tokens") or body.get("max_tokens") or default_per_choice
    return int(per_choice) * int(body.get("n") or 1)


def estimate_request_tokens(body: Mapping[str, Any],
                            image_sizes: Sequence[tuple[int, int] | None] | None = None,
                            detail: Detail | None = None) -> int:
    """Prompt estimate plus the output reservation: what a tokens-per-minute limiter should charge."""
    return estimate_prompt_tokens(body, image_sizes, detail) + output_reservation(body)


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """One request's estimate; ``raw_prompt`` is the formula's, ``prompt`` the corrected one."""

    raw_prompt: int
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class TokenEstimator:
    """Estimates that learn from ``usage``: prompt estimates are scaled by observed/estimated so far.

    The ratio is cumulative (sum of observed over sum of raw estimates), not a moving average: every
    request of a captioning job looks alike, so the long-run ratio is the stable, right correction, and
    one outlier moves it little. It is clamped to [:data:`MIN_RATIO`, :data:`MAX_RATIO`].
    """

    def __init__(self, detail: Detail | None = None, *, min_ratio: float = MIN_RATIO,
                 max_ratio: float = MAX_RATIO) -> None:
        if not 0 < min_ratio <= 1 <= max_ratio:
            raise ValueError("need 0 < min_ratio <= 1 <= max_ratio")
        self.detail = detail
        self.min_ratio = min_ratio
        self.max_ratio = max_ratio
        self._raw_sum = 0
        self._observed_sum = 0
        self._completion_sum = 0
        self._choices_seen = 0

    @property
    def ratio(self) -> float:
        """Current correction factor for prompt estimates (1.0 until something was observed)."""
        if self._raw_sum <= 0:
            return 1.0
        return min(self.max_ratio, max(self.min_ratio, self._observed_sum / self._raw_sum))

    @property
    def mean_completion(self) -> float | None:
        """Observed completion tokens per choice, once any usage was seen."""
        return self._completion_sum / self._choices_seen if self._choices_seen else None

    def estimate(self, body: Mapping[str, Any],
                 image_sizes: Sequence[tuple[int, int] | None] | None = None) -> TokenEstimate:
        raw = estimate_prompt_tokens(body, image_sizes, self.detail)
        mean = self.mean_completion
        default = DEFAULT_OUTPUT_TOKENS if mean is None else max(1, math.ceil(mean))
        return TokenEstimate(raw_prompt=raw, prompt=math.ceil(raw * self.ratio),
                             completion=output_reservation(body, default))

    def observe(self, estimate: TokenEstimate, prompt_tokens: int | None,
                completion_tokens: int | None = None, choices: int = 1) -> None:
        """Fold one request's reported usage in (``None`` values, e.g. no usage chunk, are skipped)."""
        if prompt_tokens is not None and prompt_tokens >= 0 and estimate.raw_prompt > 0:
            self._raw_sum += estimate.raw_prompt
            self._observed_sum += prompt_tokens
        if completion_tokens is not None and completion_tokens >= 0 and choices > 0:
            self._completion_sum += completion_tokens
            self._choices_seen += choices
