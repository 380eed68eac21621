"""Pure request building: prompt templating and the Chat Completions body.

The static part of the body (model, sampling parameters, tools, extra_body) is computed once per job;
each row only adds its messages. Parameters reach the wire exactly as written in the config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import orjson

from pipeline.core.config import ImagesConfig, RequestConfig

#: RequestConfig fields that are not body parameters, or that are placed by hand.
_NOT_BODY_FIELDS = frozenset({"model", "system", "prompt", "extra_body", "stream_options", "max_response_bytes"})
#: RequestConfig fields that only steer this client (how much of an answer it reads), not the answer.
_CLIENT_SIDE_FIELDS = frozenset({"prompt", "max_response_bytes"})


class _Blank(dict[str, Any]):
    """Row values for ``str.format_map``: a missing or null value renders as an empty string."""

    def __missing__(self, key: str) -> str:
        return ""


def render_prompt(template: str, columns: Mapping[str, Any]) -> str:
    """Fill ``{column}`` fields of a prompt template from a manifest row."""
    if "{" not in template:
        return template
    values = _Blank({k: "" if v is None else v for k, v in columns.items()})
    return template.format_map(values)


class RequestBuilder:
    """Builds streaming Chat Completions bodies in the seed's multimodal shape."""

    def __init__(self, request: RequestConfig, images: ImagesConfig | None = None) -> None:
        self.request = request
        self.detail = images.detail if images else None
        self._head: dict[str, Any] = {"model": request.model}
        self._tail = self._static_params(request)
        self._frame: tuple[bytes, bytes, bytes] | None = None

    @staticmethod
    def _static_params(request: RequestConfig) -> dict[str, Any]:
        params: dict[str, Any] = {"stream": True}
        if request.stream_options is not None:
            params["stream_options"] = request.stream_options
        for name in RequestConfig.model_fields:
            if name in _NOT_BODY_FIELDS:
                continue
            value = getattr(request, name)
            if value is not None:
                params[name] = value
        params.update(request.extra_body)
        return params

    def messages(self, prompt: str, image_url: str) -> list[dict[str, Any]]:
        """``[system?, user: [text, image_url]]``, with ``detail`` only when configured."""
        image: dict[str, Any] = {"url": image_url}
        if self.detail is not None:
            image["detail"] = self.detail
        user = {
            "role": "user",
            "content": [
                {"type": "text", "text": prompt},
                {"type": "image_url", "image_url": image},
            ],
        }
        if self.request.system:
            return [{"role": "system", "content": self.request.system}, user]
        return [user]

    def build(self, prompt: str, image_url: str) -> dict[str, Any]:
        """One request body; the caller's ``prompt`` is already rendered for its row."""
        return {**self._head, "messages": self.messages(prompt, image_url), **self._tail}

    def build_payload(self, prompt: str, image_url: str) -> bytes:
        """``build()`` serialised to JSON bytes, the cheap way: the body around the prompt and the image
        is serialised once per job, and a data URI (Base64 needs no JSON escaping) is spliced in as is,
        instead of a JSON encoder scanning ~50 KB of Base64 for every row."""
        if self._frame is None:
            self._frame = _split_frame(orjson.dumps(self.build(_PROMPT_MARK, _URL_MARK)))
        before, between, after = self._frame
        if image_url.startswith("data:") and image_url.isascii() and '"' not in image_url and "\\" not in image_url:
            return b"".join((before, orjson.dumps(prompt), between, b'"', image_url.encode("ascii"), b'"', after))
        return b"".join((before, orjson.dumps(prompt), between, orjson.dumps(image_url), after))


_PROMPT_MARK = "\x00prompt\x00"
_URL_MARK = "\x00image-url\x00"


def _split_frame(serialised: bytes) -> tuple[bytes, bytes, bytes]:
    """Cut a body serialised with the two marks into the three constant pieces around them."""
    prompt_mark, url_mark = orjson.dumps(_PROMPT_MARK), orjson.dumps(_URL_MARK)
    before, _, rest = serialised.partition(prompt_mark)
    between, _, after = rest.partition(url_mark)
    return before, between, after


# -- identities for the ledger ------------------------------------------------------------------


#: Image settings that decide whether and how an image is fetched, not what the model is shown.
_HOW_IMAGES_ARE_FETCHED = frozenset(
    {"download_timeout", "download_attempts", "max_source_bytes", "allow_schemes", "allow_hosts",
     "max_image_pixels", "proxy", "tls"}
)


def answer_params_digest(request: RequestConfig, images: ImagesConfig | None = None) -> str:
    """Digest of everything in the config that changes an answer (model, sampling, tools, image policy).

    The prompt template is left out: the rendered prompt is part of each row's own key instead; so is
    ``max_response_bytes``, a client-side read limit that changes no answer.
    """
    material = {
        "request": request.model_dump(mode="json", exclude=_CLIENT_SIDE_FIELDS),
        "images": images.model_dump(mode="json", exclude=_HOW_IMAGES_ARE_FETCHED) if images else None,
    }
    return _sha256(json.dumps(material, sort_keys=True, separators=(",", ":")))


def request_key(params_digest: str, image_sha256: str, prompt: str) -> str:
    """Same image bytes + same prompt + same parameters = same request, sent once."""
    return _sha256(f"{params_digest}\0{image_sha256}\0{prompt}")


def input_digest(params_digest: str, fingerprint: str, prompt: str) -> str:
    """A row's inputs as seen without reading the image (file identity from stat), for cheap resume."""
    return _sha256(f"{params_digest}\0{fingerprint}\0{prompt}")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
