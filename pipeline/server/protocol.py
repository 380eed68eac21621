"""Parse and validate Chat Completions request bodies the way OpenAI does, with OpenAI-shaped errors.

The pipeline's client is written against real endpoints, so the stand-in must reject what they reject
(bad ranges, unknown parts, remote image URLs it cannot fetch) with the same status and error shape.
Pure: no I/O and no Pillow; image bytes are base64-decoded here and described elsewhere.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

#: Roles accepted in ``messages``.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_CHOICES = 16
MAX_STOP_SEQUENCES = 4

_DATA_URI = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*);base64,(?P<data>.*)$", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status, like OpenAI's API does."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 error_type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or error_type_for_status(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, param=self.param, code=self.code)


def error_type_for_status(status: int) -> str:
    """OpenAI's error ``type`` for a status: rate limit, server or request error."""
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, error_type: str, *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def invalid(param: str | None, message: str, code: str | None = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ImagePart:
    """One decoded inline image; ``param`` locates it in the request for error messages."""

    data: bytes
    detail: str
    param: str
    sha256: str


@dataclass(frozen=True)
class FunctionSpec:
    """The function the answer will call, with its JSON-schema ``parameters``."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChatRequest:
    """The parts of a validated request that shape the answer."""

    model: str
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    response_format: str = "text"
    json_schema: dict[str, Any] | None = None
    function: FunctionSpec | None = None
    texts: tuple[str, ...] = ()
    images: tuple[ImagePart, ...] = ()
    question_images: tuple[ImagePart, ...] = ()

    @property
    def text(self) -> str:
        """All text of all messages, for ``match=`` fault rules and prompt-token estimates."""
        return "\n".join(self.texts)

    @property
    def image_keys(self) -> tuple[str, ...]:
        """Distinct sha256 digests of the images, in first-seen order."""
        return tuple(dict.fromkeys(image.sha256 for image in self.images))


def parse_body(raw: bytes) -> dict[str, Any]:
    """Decode the JSON body; anything but a JSON object is a 400."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise invalid(None, f"We could not parse the JSON body of your request: {exc}", "invalid_json") from None
    if not isinstance(body, dict):
        raise invalid(None, "The request body must be a JSON object.", "invalid_json")
    return body


def parse_chat_request(body: dict[str, Any]) -> ChatRequest:
    """Validate a Chat Completions body; raises :class:`ApiError` naming the offending ``param``."""
    model = _model(body)
    texts, images, question_images = _parse_messages(body.get("messages"))
    _check_sampling(body)
    response_format, json_schema = _parse_response_format(body.get("response_format"))
    return ChatRequest(
        model=model,
        stream=bool(_optional_bool(body, "stream")),
        include_usage=_include_usage(body.get("stream_options")),
        n=_integer(body, "n", 1, MAX_CHOICES) or 1,
        max_tokens=_max_tokens(body),
        stop=_stop(body.get("stop")),
        response_format=response_format,
        json_schema=json_schema,
        function=_chosen_function(body.get("tools"), body.get("tool_choice")),
        texts=tuple(texts),
        images=tuple(images),
        question_images=tuple(question_images),
    )


# --- scalar parameters ------------------------------------------------------------------------------


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if model is None:
        raise invalid("model", "you must provide a model parameter", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        raise invalid("model", "'model' must be a non-empty string")
    return model


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_number(value) or not low <= value <= high:
        raise invalid(name, f"'{name}' must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    in_range = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not in_range or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f">= {low}"
        raise invalid(name, f"'{name}' must be an integer {bounds}, got {value!r}")
    return int(value)


def _optional_bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be a boolean, got {value!r}")
    return value


def _check_sampling(body: dict[str, Any]) -> None:
    """Range checks for knobs the local endpoint accepts but does not need."""
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    bias = body.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise invalid("logit_bias", "'logit_bias' must be an object mapping token ids to numbers")
    for token, value in bias.items():
        if not _is_number(value) or not -100 <= value <= 100:
            raise invalid("logit_bias", f"logit_bias[{token!r}] must be between -100 and 100, got {value!r}")


def _max_tokens(body: dict[str, Any]) -> int | None:
    """``max_completion_tokens`` (newer name) wins over ``max_tokens``."""
    legacy = _integer(body, "max_tokens", 1)
    newer = _integer(body, "max_completion_tokens", 1)
    return newer if newer is not None else legacy


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid("stop", "'stop' must be a string or an array of strings")
    if len(value) > MAX_STOP_SEQUENCES:
        raise invalid("stop", f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences, got {len(value)}")
    return tuple(item for item in value if item)


def _include_usage(options: Any) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise invalid("stream_options", "'stream_options' must be an object")
    return bool(_optional_bool(options, "include_usage"))


def _parse_response_format(value: Any) -> tuple[str, dict[str, Any] | None]:
    if value is None:
        return "text", None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise invalid("response_format", "'response_format.type' must be text, json_object or json_schema")
    if kind != "json_schema":
        return str(kind), None
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise invalid("response_format", "'response_format.json_schema' must be an object with a 'schema'")
    return kind, spec.get("schema", {})


# --- tools ------------------------------------------------------------------------------------------


def _parse_tools(tools: Any) -> list[FunctionSpec]:
    if not isinstance(tools, list) or not tools:
        raise invalid("tools", "'tools' must be a non-empty array")
    specs = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise invalid(f"tools[{i}]", "each tool must be {\"type\": \"function\", \"function\": {...}}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise invalid(f"tools[{i}].function.name", "a function needs a non-empty 'name'")
        parameters = function.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters", "'parameters' must be a JSON schema object")
        specs.append(FunctionSpec(name, parameters))
    return specs


def _chosen_function(tools: Any, choice: Any) -> FunctionSpec | None:
    """The function the model will call: the one ``tool_choice`` names, else the first; none for "none"."""
    if tools is None:
        if isinstance(choice, dict):
            raise invalid("tool_choice", "'tool_choice' names a function but no 'tools' were given")
        return None
    specs = _parse_tools(tools)
    if choice is None or choice in ("auto", "required"):
        return specs[0]
    if choice == "none":
        return None
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str):
        raise invalid("tool_choice", "'tool_choice' must be none, auto, required or "
                                     "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    for spec in specs:
        if spec.name == name:
            return spec
    raise invalid("tool_choice", f"tool_choice names function {name!r}, which is not in 'tools'")


# --- messages ---------------------------------------------------------------------------------------


def _parse_messages(messages: Any) -> tuple[list[str], list[ImagePart], list[ImagePart]]:
    """All texts, all images, and the images of the last user message (the ones to describe)."""
    if messages is None:
        raise invalid("messages", "you must provide a messages parameter", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "'messages' must be a non-empty array")
    texts: list[str] = []
    images: list[ImagePart] = []
    question: list[ImagePart] = []
    for i, message in enumerate(messages):
        role = _role(message, i)
        message_texts, message_images = _parse_content(message.get("content"), f"messages[{i}]", role)
        texts.extend(message_texts)
        images.extend(message_images)
        if role == "user":
            question = message_images
    return texts, images, question


def _role(message: Any, i: int) -> str:
    if not isinstance(message, dict):
        raise invalid(f"messages[{i}]", "each message must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"messages[{i}].role", f"role must be one of {', '.join(sorted(ROLES))}, got {role!r}")
    return str(role)


def _parse_content(content: Any, where: str, role: str) -> tuple[list[str], list[ImagePart]]:
    if content is None:
        if role in ("assistant", "function"):
            return [], []
        raise invalid(f"{where}.content", f"{where}.content is required for role {role!r}",
                      "missing_required_parameter")
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise invalid(f"{where}.content", "content must be a string or an array of content parts")
    texts: list[str] = []
    images: list[ImagePart] = []
    for j, part in enumerate(content):
        text, image = _parse_part(part, f"{where}.content[{j}]")
        if text is not None:
            texts.append(text)
        if image is not None:
            images.append(image)
    return texts, images


def _parse_part(part: Any, where: str) -> tuple[str | None, ImagePart | None]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise invalid(f"{where}.text", "a text part needs a string 'text'")
        return text, None
    if kind == "image_url":
        return None, _parse_image_part(part.get("image_url"), f"{where}.image_url")
    if kind in ("refusal", "input_audio", "file"):
        raise invalid(f"{where}.type", f"content parts of type {kind!r} are not supported by the local endpoint")
    raise invalid(f"{where}.type", f"unknown content part type {kind!r} (expected 'text' or 'image_url')")


def _parse_image_part(image_url: Any, where: str) -> ImagePart:
    if isinstance(image_url, str):  # some clients send the URL directly
        image_url = {"url": image_url}
    url = image_url.get("url") if isinstance(image_url, dict) else None
    if not isinstance(url, str):
        raise invalid(f"{where}.url", "an image_url part needs {\"url\": \"data:image/...;base64,...\"}")
    detail = image_url.get("detail") or "auto"
    if detail not in ("auto", "low", "high"):
        raise invalid(f"{where}.detail", f"detail must be auto, low or high, got {detail!r}")
    data = decode_data_uri(url, f"{where}.url")
    return ImagePart(data=data, detail=detail, param=f"{where}.url", sha256=hashlib.sha256(data).hexdigest())


def decode_data_uri(url: str, param: str) -> bytes:
    """Bytes of a ``data:image/...;base64,...`` URI; remote URLs are refused (no network here)."""
    if url.startswith(("http://", "https://")):
        raise invalid(param, "the local endpoint does not fetch remote image URLs; send the image inline "
                             "as a data:image/...;base64,... URI", "invalid_image_url")
    match = _DATA_URI.match(url)
    if not match:
        raise invalid(param, "image_url must be a data:image/...;base64,... URI", "invalid_image_url")
    if not match["mime"].lower().startswith("image/"):
        raise invalid(param, f"the data URI has media type {match['mime']!r}, expected image/*", "invalid_image")
    try:
        data = base64.b64decode(_WHITESPACE.sub("", match["data"]), validate=True)
    except (binascii.Error, ValueError):
        raise invalid(param, "the image data URI is not valid base64", "invalid_image") from None
    if not data:
        raise invalid(param, "the image data URI is empty", "invalid_image")
    return data
