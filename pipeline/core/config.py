"""The one validated, frozen config object: the model, its validation messages and ``config_from_dict``.

Pure (no I/O, no environment): reading a YAML/TOML file and interpolating ``${VAR}`` lives in
``pipeline.edges.configfile``. Every validation failure becomes one ``ConfigError`` whose lines read
``source: key.path: what is wrong, got <value>``.
"""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.core.errors import ConfigError

#: Keys the pipeline itself owns in the request body; ``extra_body`` may not override them.
RESERVED_BODY_KEYS = frozenset({"model", "messages", "stream"})

OutputFormat = Literal["parquet", "csv", "jsonl"]
ManifestFormat = Literal["csv", "jsonl", "parquet"]


#: ``request.max_response_bytes`` by default: far above any caption or tool call, far below a flood.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class _Model(BaseModel):
    """Frozen, strict about unknown keys: a typo in a config must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Timeouts(_Model):
    """Streaming-aware timeouts, in seconds: a stream may be long yet must keep moving."""

    connect: Annotated[float, Field(gt=0)] = 10.0
    first_byte: Annotated[float, Field(gt=0)] = 60.0
    idle: Annotated[float, Field(gt=0)] = 30.0
    total: Annotated[float, Field(gt=0)] = 600.0
    #: Every choice has its finish_reason but no ``[DONE]`` came, only keep-alive comments: the answer is
    #: complete after this long, rather than waiting for the total timeout and being retried.
    finish_grace: Annotated[float, Field(gt=0)] = 2.0


class LocalEndpointOptions(_Model):
    """Knobs of the embedded endpoint, used only when ``base_url: local``."""

    chunk_delay: Annotated[float, Field(ge=0)] = 0.0
    first_byte_delay: Annotated[float, Field(ge=0)] = 0.0
    faults: list[str] = Field(default_factory=list)


class EndpointConfig(_Model):
    base_url: str = "local"
    api_key: SecretStr | None = None
    auth_scheme: Literal["bearer", "api-key", "none"] = "bearer"
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    timeout: Timeouts = Timeouts()
    local: LocalEndpointOptions = LocalEndpointOptions()

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str) -> str:
        value = value.strip()
        if value == "local":
            return value
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be 'local' or an http(s):// URL such as https://api.openai.com/v1")
        return value.rstrip("/")

    @field_validator("headers")
    @classmethod
    def _no_auth_header(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if name.lower() in ("authorization", "api-key"):
                raise ValueError(f"set the key with endpoint.api_key, not headers.{name}")
        return value

    @property
    def is_local(self) -> bool:
        return self.base_url == "local"


class RequestConfig(_Model):
    """The model, the prompt, and every body parameter of the Chat Completions endpoint."""

    model: str
    system: str | None = None
    prompt: str = "Describe this image in one sentence."
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: dict[str, Annotated[int, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = Field(default_factory=lambda: {"include_usage": True})
    extra_body: dict[str, Any] = Field(default_factory=dict)
    #: Client-side cap on one answer's bytes (never sent, not part of the request key): an answer over it
    #: fails its row as ``response_too_large`` and the connection is dropped, so memory stays bounded.
    max_response_bytes: Annotated[int, Field(ge=1024)] = DEFAULT_MAX_RESPONSE_BYTES

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        for token in value or {}:
            if not token.isdigit():
                raise ValueError(f"keys must be token ids (digits), got {token!r}")
        return value

    @field_validator("extra_body")
    @classmethod
    def _no_reserved(cls, value: dict[str, Any]) -> dict[str, Any]:
        clash = sorted(RESERVED_BODY_KEYS & value.keys())
        if clash:
            raise ValueError(f"may not set {', '.join(clash)}: the pipeline owns those fields")
        return value

    @field_validator("prompt")
    @classmethod
    def _valid_template(cls, value: str) -> str:
        template_fields(value)
        return value

    @property
    def n_choices(self) -> int:
        return self.n or 1


class ImagesConfig(_Model):
    """Image pre-flight policy: validate, orient, resize and re-encode before an image costs tokens.

    Sizes only ever shrink. ``fit``, ``max_side`` and ``max_pixels`` combine: the smallest result wins.
    """

    detail: Literal["auto", "low", "high"] | None = None
    fit: Literal["none", "openai-high", "openai-low"] = "none"
    max_side: Annotated[int, Field(ge=16)] | None = None
    max_pixels: Annotated[int, Field(ge=256)] | None = None
    format: Literal["keep", "jpeg", "png", "webp"] = "keep"
    quality: Annotated[int, Field(ge=1, le=100)] = 85
    max_bytes: Annotated[int, Field(ge=1024)] | None = 20_000_000
    background: str = "#ffffff"
    # Pillow refuses more than 2 x its own 89.5 MP warning level at open time, whatever we allow.
    max_image_pixels: Annotated[int, Field(ge=1, le=178_956_970)] = 100_000_000
    max_source_bytes: Annotated[int, Field(ge=1)] = 100_000_000
    remote: Literal["inline", "pass_through"] = "inline"
    allow_schemes: tuple[Literal["http", "https", "file"], ...] = ("http", "https")
    download_timeout: Annotated[float, Field(gt=0)] = 30.0
    download_attempts: Annotated[int, Field(ge=1, le=10)] = 3

    @field_validator("background")
    @classmethod
    def _hex_colour(cls, value: str) -> str:
        if not re.fullmatch(r"#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})", value.strip()):
            raise ValueError("must be a hex colour such as '#ffffff' or '#fff'")
        return value.strip().lower()

    @property
    def background_rgb(self) -> tuple[int, int, int]:
        """The flattening colour for transparent pixels when the target format has no alpha."""
        digits = self.background[1:]
        if len(digits) == 3:
            digits = "".join(d * 2 for d in digits)
        return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)


class InputConfig(_Model):
    manifest: Path | None = None
    format: ManifestFormat | None = None
    directory: Path | None = None
    glob: str = "**/*"
    id_column: str = "id"
    path_column: str = "path"
    prompt_column: str | None = None
    carry_columns: list[str] | None = None
    chunk_size: Annotated[int, Field(ge=1)] = 10_000
    # when set, every local image must resolve (symlinks followed) inside this folder
    root: Path | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        if (self.manifest is None) == (self.directory is None):
            raise ValueError("set exactly one of input.manifest or input.directory")
        if self.manifest is not None and self.manifest_format is None:
            raise _unknown_format(self.manifest, "input.format", "csv, jsonl or parquet")
        return self

    @property
    def manifest_format(self) -> ManifestFormat | None:
        return _format_of(self.manifest, self.format) if self.manifest is not None else None  # type: ignore[return-value]


_FORMAT_BY_SUFFIX = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def _format_of(path: Path, explicit: str | None) -> str | None:
    """The file format: as configured, else from the suffix, else None."""
    return explicit if explicit is not None else _FORMAT_BY_SUFFIX.get(path.suffix.lower())


def _unknown_format(path: Path, key: str, choices: str) -> ValueError:
    return ValueError(f"cannot tell the format of {str(path)!r} from its suffix; set {key} to {choices}")


class RunConfig(_Model):
    concurrency: Annotated[int, Field(ge=1, le=4096)] = 16
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 5
    backoff_base: Annotated[float, Field(ge=0)] = 0.5
    backoff_max: Annotated[float, Field(ge=0)] = 30.0
    stop_grace: Annotated[float, Field(ge=0)] = 30.0
    max_failed_fraction: Annotated[float, Field(ge=0, le=1)] = 0.0  # failures tolerated before exit code 1
    # auto: uvloop where it is installed (a dependency everywhere but Windows), else asyncio's own loop
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"


class LedgerConfig(_Model):
    """Where the job's durable state lives; by default beside the output (``captions.ledger.sqlite``)."""

    path: Path | None = None
    synchronous: Literal["normal", "full"] = "normal"


class OutputConfig(_Model):
    path: Path
    format: OutputFormat | None = None
    if_exists: Literal["overwrite", "error"] = "overwrite"
    partition_by: Literal["run_date"] | None = None  # also write each run's rows under run_date=YYYY-MM-DD/
    partition_dir: Path | None = None  # default: <output folder>/<output stem>/

    @property
    def partitions(self) -> Path:
        return self.partition_dir if self.partition_dir is not None else self.path.with_suffix("")

    @model_validator(mode="after")
    def _known_format(self) -> OutputConfig:
        if self.output_format is None:
            raise _unknown_format(self.path, "output.format", "parquet, csv or jsonl")
        return self

    @property
    def output_format(self) -> OutputFormat | None:
        return _format_of(self.path, self.format)  # type: ignore[return-value]


class PriceConfig(_Model):
    """Price of one model, per 1M tokens (any currency, as long as ``max_cost`` uses the same)."""

    input: Annotated[float, Field(ge=0)]
    output: Annotated[float, Field(ge=0)]


class LimitsConfig(_Model):
    """Rate limits, adaptive concurrency, circuit breaker and budgets (see ``pipeline.run.limits``); all optional.

    ``run.concurrency`` stays the ceiling; with ``adaptive`` the in-flight limit moves between
    ``min_concurrency`` and it (a ``min_concurrency`` above it is clamped to it).
    """

    requests_per_minute: Annotated[float, Field(gt=0)] | None = None
    tokens_per_minute: Annotated[float, Field(gt=0)] | None = None
    adaptive: bool = True
    min_concurrency: Annotated[int, Field(ge=1)] = 1
    circuit_breaker: bool = True
    breaker_window: Annotated[int, Field(ge=1, le=10_000)] = 20
    breaker_min_calls: Annotated[int, Field(ge=1)] = 10
    breaker_failure_ratio: Annotated[float, Field(gt=0, le=1)] = 0.5
    breaker_cooldown: Annotated[float, Field(gt=0)] = 5.0
    breaker_max_cooldown: Annotated[float, Field(gt=0)] = 60.0
    breaker_give_up_after: Annotated[float, Field(gt=0)] | None = 600.0
    max_retry_wait: Annotated[float, Field(ge=0)] | None = 120.0
    max_requests: Annotated[int, Field(ge=1)] | None = None
    max_total_tokens: Annotated[int, Field(ge=1)] | None = None
    max_cost: Annotated[float, Field(gt=0)] | None = None
    prices: dict[str, PriceConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> LimitsConfig:
        if self.breaker_min_calls > self.breaker_window:
            raise ValueError(f"breaker_min_calls ({self.breaker_min_calls}) must be <= "
                             f"breaker_window ({self.breaker_window})")
        if self.breaker_max_cooldown < self.breaker_cooldown:
            raise ValueError(f"breaker_max_cooldown ({self.breaker_max_cooldown:g}) must be >= "
                             f"breaker_cooldown ({self.breaker_cooldown:g})")
        if self.max_cost is not None and not self.prices:
            raise ValueError("max_cost needs prices: {model: {input: ..., output: ...}} per 1M tokens")
        return self


class NotifyConfig(_Model):
    """Where to send the run report when a run ends (``pipeline.ops.report.post_webhook``).

    The URL is a secret (a Slack webhook's path is its credential): it is masked in dumps and logs.
    """

    webhook_url: SecretStr | None = None
    when: Literal["always", "failure"] = "always"  # failure: only when the run did not succeed
    timeout: Annotated[float, Field(gt=0)] = 10.0

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _empty_url_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value.get_secret_value()):
            raise ValueError("must be an http(s):// URL")
        return value


class MetricsConfig(_Model):
    """Prometheus textfile-collector output (``pipeline.ops.report.render_prometheus``), written after a run.

    ``prometheus``: a ``.prom`` file, or a folder (node_exporter's ``--collector.textfile.directory``) in
    which ``<job>.prom`` is written. ``job``: the ``job`` label; default the output file's stem.
    """

    prometheus: Path | None = None
    job: Annotated[str, Field(min_length=1)] | None = None


class Config(_Model):
    endpoint: EndpointConfig = EndpointConfig()
    request: RequestConfig
    input: InputConfig
    run: RunConfig = RunConfig()
    output: OutputConfig
    images: ImagesConfig = ImagesConfig()
    ledger: LedgerConfig = LedgerConfig()
    limits: LimitsConfig = LimitsConfig()
    notify: NotifyConfig = NotifyConfig()
    metrics: MetricsConfig = MetricsConfig()

    @property
    def ledger_path(self) -> Path:
        if self.ledger.path is not None:
            return self.ledger.path
        out = self.output.path
        return out.with_name(f"{out.stem}.ledger.sqlite")


# ---------------------------------------------------------------------------------------------
# templates


def template_fields(template: str) -> list[str]:
    """Names a ``str.format`` template refers to; raises ValueError on a broken template."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"not a valid template ({exc}); write a literal brace as {{{{ or }}}}") from None
    names = []
    for _, field, _, _ in parsed:
        if field is None:
            continue
        if not field or not field.isidentifier():
            raise ValueError(
                f"template field {{{field}}} must be a manifest column name; "
                "write a literal brace as {{ or }}"
            )
        names.append(field)
    return names


# ---------------------------------------------------------------------------------------------
# validation


def config_from_dict(document: Mapping[str, Any], source: str = "<config>") -> Config:
    """Validate an already-parsed document (used by the loader and by the Python API)."""
    try:
        return Config.model_validate(document)
    except ValidationError as exc:
        lines = [f"{source}: {describe_error(err)}" for err in _most_specific(exc.errors())]
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def _most_specific(errors: list[Any]) -> list[Any]:
    """A value that fails every branch of a union gets one error per branch; keep the telling ones."""
    by_key: dict[tuple[Any, ...], list[Any]] = {}
    for err in errors:
        key = tuple(p for p in err["loc"] if not _is_union_branch(p))
        by_key.setdefault(key, []).append(err)
    kept = []
    for group in by_key.values():
        specific = [e for e in group if not e["type"].endswith("_type")]
        kept.extend(specific or group[:1])
    return kept


_SECRET_KEYS = ("api_key", "webhook_url")


def describe_error(err: Mapping[str, Any]) -> str:
    """One pydantic error as ``key.path: what is wrong, got <value>`` (secrets never echoed)."""
    parts = [part for part in err["loc"] if not _is_union_branch(part)]
    loc = [str(part) for part in parts]
    key = _dotted(parts)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{key}: unknown key{_suggest(loc)}"
    if kind == "missing":
        return f"{key}: required key is missing"
    text = _MESSAGES.get(kind, "").format(**{k: _num(v) for k, v in ctx.items()}) or _lower_first(err["msg"])
    if kind == "value_error":
        text = _lower_first(str(ctx.get("error", err["msg"])))
    shown = "<hidden>" if any(s in loc for s in _SECRET_KEYS) else _show(err.get("input"))
    return f"{key}: {text}, got {shown}" if key else f"{text}"


_MESSAGES = {
    "less_than_equal": "must be <= {le}",
    "less_than": "must be < {lt}",
    "greater_than_equal": "must be >= {ge}",
    "greater_than": "must be > {gt}",
    "too_long": "must have at most {max_length} items",
    "literal_error": "must be one of {expected}",
}


def _is_union_branch(part: Any) -> bool:
    text = str(part)
    return text.startswith(("function-", "constrained-", "list[", "dict[", "str", "float", "int"))


def _dotted(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _suggest(loc: list[str]) -> str:
    """'did you mean' for a misspelt key, from the known fields of the enclosing section."""
    model: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part) if model else None
        annotation = field.annotation if field else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1)
    allowed = ", ".join(model.model_fields)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{hint}; allowed keys: {allowed}"


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
