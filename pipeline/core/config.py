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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.core.addresses import normalize_allow_entry
from pipeline.core.errors import ConfigError
from pipeline.core.locations import (
    Location,
    location_suffix,
    mask_options,
    option_secrets,
)
from pipeline.core.proxy import (
    NoProxy,
    ProxyURL,
    environment_proxies,
    no_proxy_rules,
    parse_proxy_url,
)
from pipeline.core.redact import MASK, redact_url
from pipeline.core.targets import RemotePath, Target

#: Keys the pipeline itself owns in the request body; ``extra_body`` may not override them.
RESERVED_BODY_KEYS = frozenset({"model", "messages", "stream"})

OutputFormat = Literal["parquet", "csv", "jsonl"]
ManifestFormat = Literal["csv", "jsonl", "parquet"]


#: ``request.max_response_bytes`` by default: far above any caption or tool call, far below a flood.
DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024


class _Model(BaseModel):
    """Frozen, strict about unknown keys: a typo in a config must never be silently ignored."""

    # hide_input_in_errors: a ValidationError that escapes (a model built by hand) never prints a value
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


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


def _proxy_shorthand(value: Any) -> Any:
    """``proxy: none`` turns proxying off; ``proxy: URL`` is the proxy for http:// and https:// alike."""
    if value is False:
        return {"http": None, "https": None}
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "none", "off", "direct"):
            return {"http": None, "https": None}
        return {"http": text, "https": text}
    return value


class ProxyConfig(_Model):
    """The proxy for http:// and for https:// URLs (None: go direct). Proxy URLs are secrets: they may
    carry credentials (``http://user:password@proxy:3128``)."""

    http: SecretStr | None = None
    https: SecretStr | None = None

    @field_validator("http", "https", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @model_validator(mode="after")
    def _proxy_urls(self) -> ProxyConfig:
        """One message per distinct URL (``proxy: URL`` sets both); it never quotes the password."""
        values = {v.get_secret_value(): scheme for scheme, v in (("https", self.https), ("http", self.http)) if v}
        for value, scheme in values.items():
            try:
                parse_proxy_url(value)
            except ValueError as exc:
                where = f"the {scheme} proxy " if len(values) > 1 else ""
                raise ValueError(f"{where}{exc}") from None
        return self

    def for_scheme(self, scheme: str) -> ProxyURL | None:
        value = self.https if scheme == "https" else self.http
        return parse_proxy_url(value.get_secret_value()) if value is not None else None

    def secret_values(self) -> list[str]:
        """The proxies' passwords and Basic tokens; the proxy's address itself is not secret (messages name it)."""
        values: list[str] = []
        for value in (self.http, self.https):
            if value is not None:
                values += parse_proxy_url(value.get_secret_value()).secret_values()
        return values


class TLSConfig(_Model):
    """TLS towards a server: a private CA (besides the system's and ``SSL_CERT_FILE``), a client
    certificate for mutual TLS, and the name to send and check when a gateway needs another one."""

    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None  # none: the key is in client_cert's PEM
    verify: bool = True  # false: certificates are not checked (a warning on every run)
    server_name: str | None = None

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TLSConfig:
        if self.client_key is not None and self.client_cert is None:
            raise ValueError("client_key needs client_cert (the certificate that goes with the key)")
        return self


@dataclass(frozen=True, slots=True)
class Egress:
    """How one kind of outgoing request leaves the machine: through which proxy (per URL) and with what TLS.
    ``Config.download_egress`` and ``Config.webhook_egress`` give the ones downloads and the webhook use."""

    proxy: ProxyConfig | None = None
    no_proxy: str = ""
    tls: TLSConfig = TLSConfig()
    tls_key: str = "endpoint.tls"  # where ``tls`` comes from, for messages

    def proxy_for(self, url: str) -> ProxyURL | None:
        return route(self.proxy, no_proxy_rules(self.no_proxy), url)

    def proxy_hosts(self) -> set[str]:
        """The proxies' own host names: the download guard trusts them (the user configured them)."""
        if self.proxy is None:
            return set()
        return {p.host for p in (self.proxy.for_scheme("http"), self.proxy.for_scheme("https")) if p is not None}


def route(proxy: ProxyConfig | None, no_proxy: NoProxy, url: str) -> ProxyURL | None:
    """The proxy ``url`` goes through, or None to go direct (``NO_PROXY`` checked first)."""
    if proxy is None:
        return None
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if (proxy.https if scheme == "https" else proxy.http) is None:
        return None
    if no_proxy.matches(parts.hostname or "", parts.port or (443 if scheme == "https" else 80)):
        return None
    return proxy.for_scheme(scheme)


class EndpointConfig(_Model):
    base_url: str = "local"
    api_key: SecretStr | None = None
    auth_scheme: Literal["bearer", "api-key", "none"] = "bearer"
    headers: dict[str, str] = Field(default_factory=dict)
    query: dict[str, str] = Field(default_factory=dict)
    # header or query parameter names whose values are secret, beyond those that look secret by name
    secret_names: list[str] = Field(default_factory=list)
    timeout: Timeouts = Timeouts()
    local: LocalEndpointOptions = LocalEndpointOptions()
    # unset: from HTTPS_PROXY / HTTP_PROXY / ALL_PROXY / NO_PROXY (filled in by load_config / the API)
    proxy: Annotated[ProxyConfig, BeforeValidator(_proxy_shorthand)] | None = None
    no_proxy: str | None = None
    tls: TLSConfig = TLSConfig()

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_key_is_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("api_key")
    @classmethod
    def _key_fits_a_header(cls, value: SecretStr | None) -> SecretStr | None:
        """The key travels in a header: refuse here what the wire would refuse at run time (never shown)."""
        if value is not None:
            problem = header_problem(value.get_secret_value())
            if problem:
                raise ValueError(f"the key {problem}; copy it again without the extra characters")
        return value

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
    def _headers_fit_the_wire(cls, value: dict[str, str]) -> dict[str, str]:
        """The same header checks the client makes when it builds its requests, so ``validate`` and ``run``
        refuse the same configs; a message names the header, never its value."""
        for name, text in value.items():
            if name.lower() in ("authorization", "api-key"):
                raise ValueError(f"set the key with endpoint.api_key, not headers.{name}")
            if not name or ":" in name or header_problem(name):
                raise ValueError(f"{name!r} is not a valid header name (no colon, line break, NUL or non-Latin-1)")
            problem = header_problem(text)
            if problem:
                raise ValueError(f"the value of headers.{name} {problem}")
        return value

    def __repr_args__(self) -> Any:
        """Header and query values may be credentials: a repr names them, never shows them."""
        for name, value in super().__repr_args__():
            if name in ("headers", "query"):
                value = {key: MASK for key in value}
            yield name, value

    def secret_values(self) -> list[str]:
        """Every configured value sent to the endpoint that must never be stored or shown: the API key,
        base_url credentials, and header / query values that look secret by name or are named in
        ``secret_names``. An endpoint that echoes what it got (an error body quoting the key) is masked
        with these before its message reaches the ledger or the logs."""
        values = [self.api_key.get_secret_value()] if self.api_key is not None else []
        values += self.proxy.secret_values() if self.proxy is not None else []
        password = _url_password(self.base_url)
        values += [password] if password else []
        marked = {name.lower() for name in self.secret_names}
        for name, value in (*self.headers.items(), *self.query.items()):
            if name.lower() in marked or (_SECRET_NAME.search(name) and len(value) >= _MIN_GUESSED_SECRET):
                values.append(value)
        return [v for v in values if v]

    @property
    def is_local(self) -> bool:
        return self.base_url == "local"

    def proxy_for(self, url: str) -> ProxyURL | None:
        """The proxy a request to ``url`` goes through (None: direct); never for the embedded endpoint."""
        return None if self.is_local else route(self.proxy, no_proxy_rules(self.no_proxy or ""), url)


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
    # what downloads may reach besides public addresses (host names, IPs, CIDRs): see core/addresses.py
    allow_hosts: tuple[Annotated[str, AfterValidator(normalize_allow_entry)], ...] = ()
    download_timeout: Annotated[float, Field(gt=0)] = 30.0
    download_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    # unset: the endpoint's proxy and TLS settings (endpoint.proxy / no_proxy / tls)
    proxy: Annotated[ProxyConfig, BeforeValidator(_proxy_shorthand)] | None = None
    tls: TLSConfig | None = None

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


#: ``storage_options``: keyword arguments for the fsspec filesystem of an object-store URL (s3fs, gcsfs,
#: adlfs), top level and per section; a section's keys override the top-level ones key by key.
StorageOptions = dict[str, Any]


class _StoreSection(_Model):
    """A section whose paths may be object-store URLs: its ``storage_options`` never show their secrets."""

    storage_options: StorageOptions = Field(default_factory=dict)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, mask_options(value) if name == "storage_options" else value


class InputConfig(_StoreSection):
    manifest: Location | None = None
    format: ManifestFormat | None = None
    directory: Location | None = None
    glob: str = "**/*"
    id_column: str = "id"
    path_column: str = "path"
    # an in-memory table only (run_job(config, manifest=df)): a column of encoded image bytes to send
    image_column: str | None = None
    prompt_column: str | None = None
    carry_columns: list[str] | None = None
    chunk_size: Annotated[int, Field(ge=1)] = 10_000
    # when set, every local image must resolve (symlinks followed) inside this folder
    root: Path | None = None
    # object-store image reads in flight at once; default: 2 x run.concurrency (Config.store_reads)
    store_concurrency: Annotated[int, Field(ge=1, le=4096)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> InputConfig:
        # neither is allowed here: run_job(config, manifest=df) brings the rows; a reader without a table
        # says what is missing (edges/manifest.py), so validate and run still refuse such a config
        if self.manifest is not None and self.directory is not None:
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


def _format_of(path: Path | str, explicit: str | None) -> str | None:
    """The file format: as configured, else from the suffix, else None."""
    return explicit if explicit is not None else _FORMAT_BY_SUFFIX.get(location_suffix(path).lower())


def _unknown_format(path: Path | str, key: str, choices: str) -> ValueError:
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
    # local: this process's worker pool; ray: a Ray cluster (the ``ray`` section, docs/cluster.md)
    engine: Literal["local", "ray"] = "local"
    # where pixel work runs: worker processes (every core, the event loop left alone) or threads here
    preflight_pool: Literal["process", "thread"] = "process"


class RayConfig(_Model):
    """``run.engine: ray``: where the cluster is and how the job is cut up on it (docs/cluster.md).

    ``run.concurrency`` and the rate limits stay job totals: each actor gets its share (``actor_share``).
    """

    address: str | None = None  # None: RAY_ADDRESS, else a local cluster started for the run; "auto"; "ray://h:10001"
    actors: Annotated[int, Field(ge=1, le=1024)] = 4  # captioning actors; the endpoint's concurrency is split
    rows_per_block: Annotated[int, Field(ge=1, le=100_000)] = 256  # the unit Ray retries (a lost actor's cost)
    cpus_per_actor: Annotated[float, Field(gt=0, le=64)] = 0.25  # I/O-bound: a fraction of a CPU
    preflight_cpus: Annotated[float, Field(gt=0, le=64)] = 1.0  # per pre-flight task (a later stage; see docs)


class LedgerConfig(_StoreSection):
    """Where the job's durable state lives; by default beside the output (``captions.ledger.sqlite``).

    The ledger itself is always a local SQLite file. ``sync`` (an object-store URL) keeps a copy on a store
    for stateless runners: restored at start when the local file is missing or older, saved every
    ``sync_interval`` seconds and at the end; a lock object ``<sync>.lock`` expiring ``lock_ttl`` seconds
    after its last renewal keeps two containers from running the job at once (``ops/ledgersync.py``).
    """

    path: Path | None = None
    synchronous: Literal["normal", "full"] = "normal"
    sync: RemotePath | None = None
    sync_interval: Annotated[float, Field(gt=0)] = 300.0
    lock_ttl: Annotated[float, Field(gt=0)] = 600.0

    @field_validator("path", mode="before")
    @classmethod
    def _local_ledger(cls, value: Any) -> Any:
        if isinstance(value, str) and "://" in value:
            raise ValueError("the ledger is a local SQLite file: give a local path here and the object-store "
                             "URL as ledger.sync")
        return value


#: A key naming where a file is published: URL text becomes a ``RemotePath`` (tried first), else a ``Path``.
TargetField = Annotated[Target, Field(union_mode="left_to_right")]


class OutputConfig(_StoreSection):
    # a local path, or an object-store URL (s3://bucket/key.parquet): staged locally, uploaded whole
    path: TargetField
    format: OutputFormat | None = None
    if_exists: Literal["overwrite", "error"] = "overwrite"
    partition_by: Literal["run_date"] | None = None  # also write each run's rows under run_date=YYYY-MM-DD/
    # default: <output folder>/<output stem>/
    partition_dir: TargetField | None = None

    @property
    def partitions(self) -> Target:
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

    prometheus: TargetField | None = None
    job: Annotated[str, Field(min_length=1)] | None = None


#: How ``pipeline gallery`` (and ``report.gallery``) choose the cards when a job has more rows than the limit.
GallerySample = Literal["failed-first", "newest", "random"]


class ReportConfig(_Model):
    """What is written beside the output after every run, besides the summary JSON / Markdown.

    ``gallery``: ``<output stem>.gallery.html``, one self-contained page of thumbnails and captions
    (``pipeline.ops.gallery``); ``gallery_limit`` cards at most, chosen by ``gallery_sample`` (``random``
    draws with ``gallery_seed``, so the same ledger gives the same page).
    """

    gallery: bool = False
    gallery_limit: Annotated[int, Field(ge=1, le=5_000)] = 500
    gallery_sample: GallerySample = "failed-first"
    gallery_seed: int = 0


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
    report: ReportConfig = ReportConfig()
    ray: RayConfig = RayConfig()
    storage_options: StorageOptions = Field(default_factory=dict)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, mask_options(value) if name == "storage_options" else value

    def storage_options_for(self, section: Literal["input", "output", "ledger"]) -> dict[str, Any]:
        """The fsspec keyword arguments for ``section``'s URLs: the top-level ``storage_options`` with the
        section's own keys laid over them, key by key."""
        return {**self.storage_options, **getattr(self, section).storage_options}

    @property
    def store_reads(self) -> int:
        """Object-store image reads in flight at once: ``input.store_concurrency``, else twice
        ``run.concurrency`` (a read waits on the store's latency, and the next row's read overlaps the
        current row's request)."""
        return self.input.store_concurrency or 2 * self.run.concurrency

    @property
    def download_egress(self) -> Egress:
        """Downloads: ``images.proxy`` / ``images.tls`` where set, else the endpoint's (NO_PROXY shared)."""
        images, endpoint = self.images, self.endpoint
        return Egress(images.proxy if images.proxy is not None else endpoint.proxy, endpoint.no_proxy or "",
                      images.tls or endpoint.tls, "images.tls" if images.tls is not None else "endpoint.tls")

    @property
    def webhook_egress(self) -> Egress:
        """The webhook: the endpoint's proxies and CA (never its client certificate nor its server name)."""
        tls = self.endpoint.tls
        return Egress(self.endpoint.proxy, self.endpoint.no_proxy or "", TLSConfig(ca_file=tls.ca_file, verify=tls.verify))

    @property
    def ledger_path(self) -> Path:
        if self.ledger.path is not None:
            return self.ledger.path
        out = self.output.path
        assert isinstance(out, Path)  # a remote output needs ledger.path (_local_ledger_for_remote_output)
        return out.with_name(f"{out.stem}.ledger.sqlite")

    @model_validator(mode="after")
    def _local_ledger_for_remote_output(self) -> Config:
        if isinstance(self.output.path, RemotePath) and self.ledger.path is None:
            raise ValueError("output.path is on an object store: set ledger.path to a local file for the "
                             "ledger (and ledger.sync to an object-store URL to keep a copy there)")
        return self


def job_secrets(config: Config) -> list[str]:
    """Values that must never appear in logs, the ledger, outputs or reports: the endpoint's secrets
    (``EndpointConfig.secret_values``) and the webhook URL. Computed once per job by whoever masks."""
    values = config.endpoint.secret_values()
    values += config.images.proxy.secret_values() if config.images.proxy is not None else []
    if config.notify.webhook_url is not None:
        values.append(config.notify.webhook_url.get_secret_value())
    for section in (config, config.input, config.output, config.ledger):  # object-store credentials
        values += option_secrets(section.storage_options)
    return [v for v in dict.fromkeys(values) if v]



def with_proxy_environment(config: Config, environ: Mapping[str, str]) -> Config:
    """``config`` with ``endpoint.proxy`` / ``endpoint.no_proxy`` taken from the environment where it leaves
    them unset (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, ``NO_PROXY``, either case), so the job carries
    its routing with it. A proxy variable that is not an HTTP proxy URL is a ``ConfigError`` naming it."""
    endpoint = config.endpoint
    if endpoint.proxy is not None and endpoint.no_proxy is not None:
        return config
    proxies, no_proxy = environment_proxies(environ)
    update: dict[str, Any] = {}
    if endpoint.proxy is None:
        for name, value in filter(None, proxies.values()):
            try:
                parse_proxy_url(value)
            except ValueError as exc:
                raise ConfigError(f"the environment variable {name} {exc}; fix it, or set endpoint.proxy "
                                  "(a URL, or none) in the config") from None
        update["proxy"] = ProxyConfig(**{scheme: pair[1] if pair else None for scheme, pair in proxies.items()})
    if endpoint.no_proxy is None:
        update["no_proxy"] = no_proxy
    return config.model_copy(update={"endpoint": endpoint.model_copy(update=update)})

#: Header / query names whose values are credentials (``Authorization``, ``x-api-key``, ``X-Auth-Token``,
#: ``?key=``, ``?sig=`` of a signed URL, ``?code=`` of an Azure Function, cookies, passwords).
_SECRET_NAME = re.compile(r"(?i)auth|key|token|secret|passw|pwd|cookie|credential|session|signature|^sig$|^code$")
#: A value guessed secret from its name alone is masked from this length on: a short value ("on", "1")
#: is not a credential, and masking it everywhere would garble every message. Named ones are always masked.
_MIN_GUESSED_SECRET = 8


def header_problem(text: str) -> str | None:
    """Why ``text`` cannot go into an HTTP header (None when it can); never quotes the text."""
    if any(c in text for c in "\r\n\0"):
        return "contains a line break or NUL"
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return "has a character HTTP headers cannot carry (use Latin-1)"
    return None


def _url_password(url: str) -> str | None:
    """The password of ``https://user:password@host/...`` (proxy-style credentials in base_url), or a
    token given as the user name."""
    match = re.match(r"^[a-z][a-z0-9+.-]*://([^/@\s]*)@", url, re.IGNORECASE)
    if not match:
        return None
    user, _, password = match.group(1).partition(":")
    return password or (user if len(user) >= _MIN_GUESSED_SECRET else None)  # a token as the user name


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


#: Keys whose values are never echoed in a config error, at any depth (``endpoint.headers.X-Api-Key``).
_SECRET_KEYS = ("api_key", "webhook_url", "proxy")
#: Sections whose values are never echoed: any header or query value may be a credential.
_SECRET_SECTIONS = (("endpoint", "headers"), ("endpoint", "query"))


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
    shown = _show_input(loc, err.get("input"))
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


def _show_input(loc: list[str], value: Any) -> str:
    """The offending value as an error may show it: secrets hidden, URL credentials dropped."""
    if any(s in loc for s in _SECRET_KEYS) or tuple(loc[:2]) in _SECRET_SECTIONS or loc == ["endpoint"] \
            or "storage_options" in loc:
        return "<hidden>"
    if loc[-1:] == ["base_url"] and isinstance(value, str):
        return _show(redact_url(value))
    return _show(value)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
