"""Token estimates: the published image rule, the text rule, output reservations, and the correction."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import aiohttp
import pytest
from PIL import Image

from pipeline.core.tokens import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_OUTPUT_TOKENS,
    MAX_RATIO,
    MIN_RATIO,
    TokenEstimate,
    TokenEstimator,
    estimate_prompt_tokens,
    estimate_request_tokens,
    estimate_text_tokens,
    image_tokens,
    output_reservation,
)
from pipeline.server import LocalEndpoint
from pipeline.server.answer import image_tokens as server_image_tokens

IMAGE_CASES = [
    # (width, height, detail, tokens, why)
    (1024, 1024, "high", 765, "OpenAI's example: 768x768 -> 2x2 tiles"),
    (2048, 4096, "high", 1105, "OpenAI's example: fit 2048 -> 1024x2048 -> 768x1536 -> 2x3 tiles"),
    (4096, 4096, "high", 765, "fit 2048, then short side 768"),
    (512, 512, "high", 255, "exactly one tile, never upscaled"),
    (513, 100, "high", 425, "one pixel over a tile edge costs a tile"),
    (800, 600, "high", 765, "short side under 768: no scaling, 2x2 tiles"),
    (320, 240, "auto", 255, "auto is priced like high"),
    (100, 100, None, 255, "unset detail is auto"),
    (4000, 3000, "low", 85, "low is a fixed cost"),
    (1, 1, "low", 85, "low is a fixed cost"),
    (*DEFAULT_IMAGE_SIZE, "high", 1105, "the documented default size: a 3:2 photo, 3x2 tiles"),
]


@pytest.mark.parametrize(("width", "height", "detail", "tokens", "why"), IMAGE_CASES)
def test_image_tokens_follow_the_published_rule(width: int, height: int, detail: str | None, tokens: int,
                                                why: str) -> None:
    assert image_tokens(width, height, detail) == tokens, why


@pytest.mark.parametrize(("width", "height", "detail"), [(w, h, d or "auto") for w, h, d, *_ in IMAGE_CASES])
def test_local_endpoint_charges_what_we_estimate(width: int, height: int, detail: str) -> None:
    assert image_tokens(width, height, detail) == server_image_tokens(width, height, detail)


@pytest.mark.parametrize(("args", "fragment"), [((10, 10, "medium"), "detail must be one of"),
                                                ((0, 10, "high"), "must be positive")])
def test_image_tokens_rejects_bad_input(args: tuple[Any, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        image_tokens(*args)


@pytest.mark.parametrize(("text", "tokens"), [("", 0), ("abcd", 1), ("abcde", 2), ("x" * 400, 100),
                                              ("Describe this image in one sentence.", 9)])
def test_text_is_about_four_characters_per_token(text: str, tokens: int) -> None:
    assert estimate_text_tokens(text) == tokens


def body(*, detail_in_part: str | None = None, images: int = 1, **extra: Any) -> dict[str, Any]:
    image = {"url": "data:image/png;base64,AAAA"}
    if detail_in_part:
        image["detail"] = detail_in_part
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Describe it."}]
    parts += [{"type": "image_url", "image_url": dict(image)} for _ in range(images)]
    return {"model": "m", "messages": [{"role": "system", "content": "You caption."},
                                       {"role": "user", "content": parts}], **extra}


# priming 3 + (4 + "systemYou caption." 18 chars -> 5) + (4 + "userDescribe it." 16 chars -> 4)
TEXT_PART = 3 + 4 + 5 + 4 + 4


@pytest.mark.parametrize(("request_body", "sizes", "detail", "tokens"), [
    (body(), None, "low", TEXT_PART + 85),
    (body(), [(1024, 1024)], "high", TEXT_PART + 765),
    (body(), [(1024, 1024)], None, TEXT_PART + 765),
    (body(), None, "high", TEXT_PART + 1105),                      # unknown size -> default
    (body(images=2), [(512, 512)], "high", TEXT_PART + 255 + 1105),  # second size unknown
    (body(images=2), [None, (512, 512)], "high", TEXT_PART + 1105 + 255),
    (body(detail_in_part="low"), [(4096, 4096)], "high", TEXT_PART + 85),  # the part's detail wins
    (body(images=0), None, "high", TEXT_PART),
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, None, None, 3 + 4 + 2),
    (body(images=0, tools=[{"type": "function", "function": {"name": "f"}}]), None, None,
     TEXT_PART + math.ceil(len('[{"type":"function","function":{"name":"f"}}]') / 4)),
])
def test_prompt_estimate(request_body: dict[str, Any], sizes: Any, detail: str | None, tokens: int) -> None:
    assert estimate_prompt_tokens(request_body, sizes, detail) == tokens


@pytest.mark.parametrize(("extra", "reserved"), [
    ({}, DEFAULT_OUTPUT_TOKENS),
    ({"max_tokens": 200}, 200),
    ({"max_tokens": 200, "n": 3}, 600),
    ({"max_tokens": 200, "max_completion_tokens": 50}, 50),
    ({"n": 2}, 2 * DEFAULT_OUTPUT_TOKENS),
])
def test_output_reservation(extra: dict[str, Any], reserved: int) -> None:
    assert output_reservation(body(**extra)) == reserved
    assert estimate_request_tokens(body(**extra), None, "low") == TEXT_PART + 85 + reserved


@pytest.mark.parametrize(("observations", "ratio"), [
    ([], 1.0),
    ([(100, 150)], 1.5),
    ([(100, 150), (100, 50)], 1.0),           # cumulative, not last-wins
    ([(100, 0)], MIN_RATIO),                  # clamped
    ([(100, 10_000)], MAX_RATIO),
    ([(100, None)], 1.0),                     # no usage reported: nothing learnt
])
def test_estimator_ratio(observations: list[tuple[int, int | None]], ratio: float) -> None:
    estimator = TokenEstimator("low")
    for raw, observed in observations:
        estimator.observe(TokenEstimate(raw, raw, 0), observed)
    assert estimator.ratio == pytest.approx(ratio)


def test_estimator_corrects_prompt_and_learns_output() -> None:
    estimator = TokenEstimator("low")
    first = estimator.estimate(body())
    assert (first.raw_prompt, first.prompt, first.completion) == (TEXT_PART + 85, TEXT_PART + 85,
                                                                 DEFAULT_OUTPUT_TOKENS)
    estimator.observe(first, prompt_tokens=2 * first.raw_prompt, completion_tokens=40, choices=1)
    second = estimator.estimate(body())
    assert second.prompt == 2 * first.raw_prompt and second.raw_prompt == first.raw_prompt
    assert second.completion == 40  # no max_tokens: the observed mean replaces the default
    assert estimator.estimate(body(max_tokens=300)).completion == 300  # an explicit cap always wins
    assert second.total == second.prompt + second.completion


def test_estimator_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        TokenEstimator(min_ratio=2.0)


def png_data_uri(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def test_estimate_converges_on_the_endpoints_usage(local_endpoint: LocalEndpoint) -> None:
    """Over real HTTP: one observed usage makes the next estimate of a like request match the endpoint."""
    request = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe this image in one short sentence, please."},
        {"type": "image_url", "image_url": {"url": png_data_uri((900, 700)), "detail": "high"}}]}]}
    estimator = TokenEstimator()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{local_endpoint.base_url}/chat/completions", json=request) as response:
            usage = (await response.json())["usage"]
    before = estimator.estimate(request, [(900, 700)])
    assert before.raw_prompt - usage["prompt_tokens"] != 0  # the text rules differ (chars vs words)...
    assert abs(before.raw_prompt - usage["prompt_tokens"]) < 0.2 * usage["prompt_tokens"]  # ...a little
    estimator.observe(before, usage["prompt_tokens"], usage["completion_tokens"])
    after = estimator.estimate(request, [(900, 700)])
    assert abs(after.prompt - usage["prompt_tokens"]) <= 1
    assert after.completion == 50
