"""What the local endpoint answers: captions cut into word pieces, per choice, plus token usage.

Pure and deterministic for a given request and images (only tool-call ids are random), so the pipeline's
tests can compare answers across retries. A "token" here is one streamed piece: a word with its leading
whitespace, or a fragment of tool-call arguments.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.server.describe import ImageFacts, caption
from pipeline.server.protocol import ChatRequest, ImagePart

NO_IMAGE_TEXT = "No image was provided; this local endpoint only describes images."

#: Schema property names filled from the image facts rather than the caption.
FACT_PROPERTIES = frozenset({"width", "height", "format", "orientation", "brightness", "detail",
                             "colors", "colours"})
#: Property names preferred for the caption, before "first string property".
CAPTION_PROPERTIES = ("caption", "description", "alt_text", "text")

_PIECE = re.compile(r"\s*\S+|\s+")


@dataclass(frozen=True)
class ToolCallHead:
    """Identity of the function call one choice makes."""

    id: str
    name: str


@dataclass(frozen=True)
class ChoicePlan:
    """One choice: its streamed pieces (content words or argument fragments) and how it ends."""

    index: int
    pieces: tuple[str, ...]
    finish_reason: str
    tool_call: ToolCallHead | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(frozen=True)
class Answer:
    choices: tuple[ChoicePlan, ...]
    usage: Usage


def plan_answer(request: ChatRequest, facts: Mapping[str, ImageFacts], say: str | None = None) -> Answer:
    """Build every choice of the answer; ``facts`` maps image sha256 to its described facts. ``say`` (a
    ``say`` fault rule's text) replaces the description, so a test can get any caption it needs."""
    question = [facts[image.sha256] for image in request.question_images]
    choices = tuple(_plan_choice(request, question, index, say) for index in range(request.n))
    completion = sum(len(choice.pieces) for choice in choices)
    return Answer(choices, Usage(prompt_tokens(request, facts), completion))


def _plan_choice(request: ChatRequest, question: list[ImageFacts], index: int, say: str | None) -> ChoicePlan:
    text = described_text(question, index) if say is None else say
    first = question[0] if question else None
    if request.function is not None:
        arguments = json.dumps(fill_arguments(request.function.parameters, first, text))
        pieces, finish = _limit(split_pieces(arguments), request.max_tokens, "tool_calls")
        head = ToolCallHead(id=f"call_{secrets.token_hex(12)}", name=request.function.name)
        return ChoicePlan(index, pieces, finish, head)
    if request.response_format == "json_schema" and request.json_schema:
        text = json.dumps(fill_arguments(request.json_schema, first, text))
    elif request.response_format in ("json_object", "json_schema"):
        text = json.dumps(_facts_object(question, text))
    text, finish = _cut_at_stop(text, request.stop)
    pieces, finish = _limit(split_pieces(text), request.max_tokens, finish)
    return ChoicePlan(index, pieces, finish)


def described_text(question: list[ImageFacts], variant: int = 0) -> str:
    """The caption of the one image, each image's caption numbered, or the honest no-image text."""
    if not question:
        return NO_IMAGE_TEXT
    if len(question) == 1:
        return caption(question[0], variant)
    return " ".join(f"Image {k}: {caption(f, variant)}" for k, f in enumerate(question, start=1))


def split_pieces(text: str) -> tuple[str, ...]:
    """Words with their leading whitespace; ``"".join`` gives back ``text`` exactly."""
    return tuple(_PIECE.findall(text))


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str]:
    """Text up to (not including) the earliest stop sequence; finish_reason is "stop" either way."""
    hits = [found for found in (text.find(stop) for stop in stops) if found >= 0]
    return (text[: min(hits)] if hits else text), "stop"


def _limit(pieces: tuple[str, ...], max_tokens: int | None, finish: str) -> tuple[tuple[str, ...], str]:
    if max_tokens is not None and len(pieces) > max_tokens:
        return pieces[:max_tokens], "length"
    return pieces, finish


def _facts_object(question: list[ImageFacts], text: str) -> dict[str, Any]:
    """JSON mode: the facts and caption of one image flat, or a list for several."""
    if len(question) == 1:
        return {"caption": text, **question[0].as_dict()}
    return {"caption": text, "images": [f.as_dict() for f in question]}


# --- JSON-schema filling (tools and json_schema) ----------------------------------------------------


def fill_arguments(schema: Mapping[str, Any], facts: ImageFacts | None, text: str) -> dict[str, Any]:
    """An object for ``schema``: the caption in its caption-like property, facts in fact-named ones."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    caption_key = _caption_property(properties)
    arguments: dict[str, Any] = {}
    if caption_key is None:
        arguments["description"] = text
    for name, prop in properties.items():
        if name == caption_key:
            arguments[name] = text
        elif facts is not None and name in FACT_PROPERTIES:
            arguments[name] = _fact_value(facts, name, prop)
    return arguments


def _types_of(prop: Any) -> set[str]:
    kind = prop.get("type") if isinstance(prop, dict) else None
    if isinstance(kind, str):
        return {kind}
    return {k for k in kind if isinstance(k, str)} if isinstance(kind, list) else set()


def _caption_property(properties: Mapping[str, Any]) -> str | None:
    for name in CAPTION_PROPERTIES:
        if name in properties:
            return name
    for name, prop in properties.items():
        if name not in FACT_PROPERTIES and "string" in _types_of(prop):
            return name
    return None


def _fact_value(facts: ImageFacts, name: str, prop: Any) -> Any:
    wants_string = _types_of(prop) == {"string"}
    if name in ("colors", "colours"):
        return ", ".join(facts.colors) if wants_string else list(facts.colors)
    value = getattr(facts, name)
    return str(value) if wants_string else value


# --- usage ------------------------------------------------------------------------------------------


def image_tokens(width: int, height: int, detail: str) -> int:
    """OpenAI's vision formula: 85 base + 170 per 512 px tile after fitting 2048 and shortest side 768."""
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def prompt_tokens(request: ChatRequest, facts: Mapping[str, ImageFacts]) -> int:
    """Words of all text x 1.3, plus each image's tile tokens."""
    words = sum(len(text.split()) for text in request.texts)
    return round(words * 1.3) + sum(_image_part_tokens(image, facts) for image in request.images)


def _image_part_tokens(image: ImagePart, facts: Mapping[str, ImageFacts]) -> int:
    described = facts[image.sha256]
    return image_tokens(described.width, described.height, image.detail)
