"""Which proxy a URL goes through: proxy URLs, ``NO_PROXY`` as curl reads it, and the environment's say.

Pure: the environment arrives as a mapping from whoever reads it (``edges/configfile.py`` and ``api.py``),
and is turned into config values there, once, so every part of a job (requests, downloads, the webhook,
a Ray actor far from the shell that started the job) routes the same way.

Rules, as curl and httpx apply them:

* ``https_proxy`` for https:// URLs, ``http_proxy`` for http:// URLs, ``all_proxy`` for either when the
  scheme's own is unset; lower case wins over upper case; an empty value means "no proxy".
* A proxy URL without a scheme is ``http://``; without a port, 80 (http) or 443 (https). SOCKS is refused.
* ``NO_PROXY``: entries separated by commas or spaces; ``*`` bypasses every host; ``corp.example`` and
  ``.corp.example`` both match ``corp.example`` and every name under it; an IP address or CIDR range
  matches IP literals in it (names are never resolved for this); ``host:port`` matches that port only.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

__all__ = ["NoProxy", "ProxyURL", "environment_proxies", "no_proxy_rules", "parse_proxy_url"]

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Environment variables, in the order they are looked at, for each kind of target URL.
PROXY_VARIABLES = {
    "http": ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"),
    "https": ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"),
}
NO_PROXY_VARIABLES = ("no_proxy", "NO_PROXY")


@dataclass(frozen=True, slots=True)
class ProxyURL:
    """A parsed proxy URL. Its credentials never show: ``str()`` and ``repr()`` print ``display``."""

    scheme: str  # http (plain to the proxy) or https (TLS to the proxy)
    host: str
    port: int
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)

    @property
    def display(self) -> str:
        """The proxy as messages name it: scheme, host and port, never the credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.display

    def __repr__(self) -> str:
        return f"ProxyURL({self.display!r}, credentials={'yes' if self.username or self.password else 'no'})"

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value (Basic), when the URL carries credentials."""
        if not (self.username or self.password):
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"

    def secret_values(self) -> list[str]:
        """What must be masked wherever text is shown: the password and the Basic token."""
        auth = self.authorization
        return [v for v in (self.password, quote(self.password, safe=""), auth.split(" ", 1)[1] if auth else "") if v]


@functools.lru_cache(maxsize=64)
def parse_proxy_url(text: str) -> ProxyURL:
    """Parse a proxy URL; raises ValueError with a message that never quotes a password. Cached: routing
    asks again for every download and redirect hop, and a ``ProxyURL`` is immutable."""
    text = text.strip()
    if "://" not in text:
        text = f"http://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError("is not a valid proxy URL (write http://host:port or http://user:password@host:port)") from None
    scheme = parts.scheme.lower()
    if scheme.startswith("socks"):
        raise ValueError(f"is a {scheme} proxy; only HTTP proxies (http:// or https://) are supported")
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"has the scheme {scheme!r}; a proxy URL starts with http:// or https://")
    if not parts.hostname:
        raise ValueError("has no host (write http://host:port)")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError("has a path or query; a proxy URL is scheme://[user:password@]host[:port]")
    return ProxyURL(scheme, parts.hostname, port or _DEFAULT_PORTS[scheme],
                    unquote(parts.username or ""), unquote(parts.password or ""))


@dataclass(frozen=True, slots=True)
class _Entry:
    """One ``NO_PROXY`` entry: a domain, or a network, and maybe a port."""

    domain: str | None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None


class NoProxy:
    """The hosts that bypass the proxy, read as curl reads ``NO_PROXY`` (see the module docstring)."""

    def __init__(self, text: str = "") -> None:
        self.text = text
        self.everything = False
        self._entries: list[_Entry] = []
        for raw in text.replace(",", " ").split():
            self._add(raw.strip().lower())

    def _add(self, raw: str) -> None:
        if raw == "*":
            self.everything = True
            return
        host, port = _split_port(raw)
        try:
            self._entries.append(_Entry(None, ipaddress.ip_network(host.strip("[]"), strict=False), port))
        except ValueError:
            self._entries.append(_Entry(host.lstrip(".").rstrip("."), None, port))

    def matches(self, host: str, port: int | None = None) -> bool:
        """True when ``host`` (a name or an IP literal, as in the URL) goes direct."""
        if self.everything:
            return True
        host = host.strip("[]").rstrip(".").lower()
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            address = None
        for entry in self._entries:
            if entry.port is not None and entry.port != port:
                continue
            if entry.network is not None:
                if address is not None and address.version == entry.network.version and address in entry.network:
                    return True
            elif entry.domain and (host == entry.domain or host.endswith("." + entry.domain)):
                return True
        return False


@functools.lru_cache(maxsize=16)
def no_proxy_rules(text: str) -> NoProxy:
    """``NoProxy(text)``, parsed once per text (routing asks for every download and redirect hop)."""
    return NoProxy(text)


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port`` or a bare host / address / CIDR (a bare IPv6 address has no port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def environment_proxies(environ: Mapping[str, str]) -> tuple[dict[str, tuple[str, str] | None], str]:
    """For each scheme, the variable that names its proxy and its value (None: no proxy), and the
    ``NO_PROXY`` text; see the module docstring for the order. An empty variable means no proxy."""
    proxies: dict[str, tuple[str, str] | None] = {}
    for scheme, names in PROXY_VARIABLES.items():
        name = next((name for name in names if name in environ), None)
        value = environ[name].strip() if name is not None else ""
        proxies[scheme] = (name, value) if name is not None and value else None
    no_proxy = next((environ[name] for name in NO_PROXY_VARIABLES if name in environ), "")
    return proxies, no_proxy
