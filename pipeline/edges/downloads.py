"""Remote image downloads (``images.remote: inline``), guarded against server-side request forgery.

A manifest made by someone else must not make the pipeline fetch ``http://169.254.169.254/...`` (cloud
credentials) or an internal service and then send the answer to a model. The guard
(``core/addresses.py``: loopback, private, link-local, multicast, reserved and unspecified addresses
are refused unless ``images.allow_hosts`` opens them) is applied to the addresses actually connected to:

- **Host names** go through ``GuardedResolver``, the connector's only resolver. aiohttp connects to the
  addresses a resolver returns, as numeric addresses (``AI_NUMERICHOST``: no second lookup), and caches
  them, so the addresses checked are the addresses dialled: a name that answers a public address to a
  first lookup and ``127.0.0.1`` to a second (DNS rebinding) cannot slip between a check and the connect.
- **IP literals** (``http://10.0.0.5/``) never reach a resolver in aiohttp, so each hop's host is checked
  here before its request; so are legacy numeric forms (``2130706433``, ``0177.1``) that the C library
  would turn into an address.
- **Redirects** are followed here, one hop at a time (``allow_redirects=False``), so every hop passes both
  checks and its scheme is checked against ``images.allow_schemes``.

Pass-through URLs (``images.remote: pass_through``) and ``pipeline estimate`` download nothing and are not
affected.

**Through a proxy** (``images.proxy``, else the endpoint's proxy settings; ``NO_PROXY`` applies per URL) the
proxy resolves names and connects, so the addresses dialled cannot be checked here. What still holds: the
proxy's own host is trusted (it is configured, not taken from a manifest); IP literals are checked as
above; a name that resolves *here* only to refused addresses is refused; a name that does not resolve here
is left to the proxy and its policy. aiohttp's own reading of the environment stays off (``trust_env=False``):
routing comes from the job's config, which took the environment's proxies when it was loaded.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from pipeline.core.addresses import AddressPolicy
from pipeline.core.config import Egress, ImagesConfig
from pipeline.core.errors import (
    RETRYABLE_STATUSES,
    DownloadBlocked,
    ImageError,
    TransientDownloadError,
)
from pipeline.core.proxy import ProxyURL
from pipeline.core.redact import redact_url
from pipeline.core.retry import download_retry_policy
from pipeline.edges.http import proxy_auth_message
from pipeline.edges.tls import client_context, warn_unverified

__all__ = ["MAX_REDIRECTS", "Downloader", "GuardedResolver", "aiohttp_proxy"]

#: Redirect hops followed per download (aiohttp's own default).
MAX_REDIRECTS = 10
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DOWNLOAD_CHUNK = 1 << 16
#: Hosts made only of numeric labels (``2130706433``, ``0177.0.0.1``, ``0x7f.1``): inet_aton would read
#: them as an address, so they must be a canonical IP address or nothing.
_NUMERIC_HOST = re.compile(r"(?i)(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+))*\.?")
_ADVICE = ("remote images may only come from public addresses; if this deployment needs that host, add it "
           "(or its address or network) to images.allow_hosts")


class GuardedResolver(AbstractResolver):
    """aiohttp's default resolver, minus the addresses the guard refuses (see the module docstring).

    A name listed in ``images.allow_hosts`` keeps every address; otherwise refused addresses are dropped
    (a name with a public and a private address connects to the public one) and a name left with none
    raises ``DownloadBlocked``, which aiohttp passes through unchanged.
    """

    def __init__(self, guard: AddressPolicy, trusted: frozenset[str] = frozenset()) -> None:
        self._guard = guard
        self._trusted = trusted  # proxies' host names: configured by the user, not by a manifest
        self._inner = aiohttp.DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if host in self._trusted or self._guard.host_allowed(host):
            return results
        kept: list[ResolveResult] = []
        refused: dict[str, None] = {}
        for result in results:
            reason = self._guard.refusal(ipaddress.ip_address(result["host"]))
            if reason is None:
                kept.append(result)
            else:
                refused[f"{result['host']} ({reason})"] = None
        if not kept:
            raise DownloadBlocked(f"{host} resolves only to refused addresses: {', '.join(refused)}")
        return kept

    async def close(self) -> None:
        await self._inner.close()


class Downloader:
    """One run's downloads: a lazily opened session whose connector resolves through the guard."""

    def __init__(self, images: ImagesConfig, egress: Egress | None = None) -> None:
        self._policy = images
        self._egress = egress or Egress()
        self._guard = AddressPolicy.from_entries(images.allow_hosts)
        self._session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None
        self._proxy_refused: str | None = None  # a 407: no more downloads with credentials the proxy refused

    async def aclose(self) -> None:
        """Close the session and the resolver (the connector does not own a resolver it was given)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._resolver is not None:
            await self._resolver.close()
            self._resolver = None

    async def get(self, url: str, label: str) -> bytes:
        """GET with a size cap, a per-attempt timeout and retries on transient failures (the same tenacity
        mechanism as requests; ``images.download_attempts`` tries). ``label`` is the URL as messages show
        it (``redact_url``)."""
        try:
            return await download_retry_policy(self._policy)(self._attempt, url, label)
        except TransientDownloadError as exc:
            raise ImageError(f"{label}: download failed after {self._policy.download_attempts} attempt(s), "
                             f"last: {exc}; check the URL and the server, or raise images.download_attempts / "
                             "download_timeout", error_type="image_remote_error") from None

    async def _attempt(self, url: str, label: str) -> bytes:
        """One attempt, every redirect hop included, within ``images.download_timeout``."""
        try:
            async with asyncio.timeout(self._policy.download_timeout):
                return await self._follow(URL(url), label)
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            reason = f"timed out after {self._policy.download_timeout:g} s" if isinstance(exc, TimeoutError) \
                else f"{type(exc).__name__}: {exc}"
            raise TransientDownloadError(reason) from None
        except (aiohttp.InvalidURL, ValueError):  # the text of either quotes the whole URL, query and all
            raise ImageError(f"{label}: not a valid URL; fix the row", error_type="image_remote_error") from None
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused the CONNECT: its policy or credentials
            raise ImageError(f"{label}: {self._proxy_refusal(URL(url), exc.status, exc.message)}",
                             error_type="image_remote_error") from None
        except aiohttp.ClientError as exc:  # another try won't help
            raise ImageError(f"{label}: download failed ({type(exc).__name__}: {exc}); fix the URL",
                             error_type="image_remote_error") from None

    async def _follow(self, url: URL, label: str) -> bytes:
        """GET ``url``, following up to ``MAX_REDIRECTS`` redirects, each hop checked by the guard."""
        where = label
        for _ in range(MAX_REDIRECTS + 1):
            try:
                self._check_literal(url)
                proxy = self._egress.proxy_for(str(url))
                if proxy is not None:
                    if self._proxy_refused is not None:  # proxies lock accounts after failed logins
                        raise ImageError(f"{label}: {self._proxy_refused} (not sent: refused already in this run)",
                                         error_type="image_remote_error")
                    await self._check_name_here(url)
                async with self._open().get(url, allow_redirects=False, **aiohttp_proxy(proxy)) as response:
                    if response.status == 407 and proxy is not None:
                        raise ImageError(f"{label}: {self._proxy_refusal(url, 407, response.reason or '')}",
                                         error_type="image_remote_error")
                    location = response.headers.get("Location")
                    if response.status not in _REDIRECT_STATUSES or location is None:
                        return await _body(response, label, self._policy.max_source_bytes)
                    url = self._next_hop(response.url, location, label)
                    where = f"{label}: redirected to {redact_url(str(url))}"
            except DownloadBlocked as exc:
                raise DownloadBlocked(f"{where}: not downloaded: {exc}; {_ADVICE}") from None
        raise ImageError(f"{label}: more than {MAX_REDIRECTS} redirects; fix the URL",
                         error_type="image_remote_error")

    def _check_literal(self, url: URL) -> None:
        """Refuse a hop whose host is an IP literal the guard refuses (aiohttp resolves no literal)."""
        host = url.raw_host or ""
        if ":" not in host and not _NUMERIC_HOST.fullmatch(host):
            return  # a name: GuardedResolver decides
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise DownloadBlocked(f"{host} is not an address in canonical form (write a.b.c.d)") from None
        reason = self._guard.refusal(address)
        if reason is not None:
            raise DownloadBlocked(f"{host} is a {reason} address")

    async def _check_name_here(self, url: URL) -> None:
        """Through a proxy: refuse a name that resolves here only to refused addresses; a name that does not
        resolve here is the proxy's to resolve (and its policy's to allow)."""
        host = url.raw_host or ""
        if ":" in host or _NUMERIC_HOST.fullmatch(host):
            return  # a literal: _check_literal has decided
        self._open()
        assert self._resolver is not None
        try:
            await self._resolver.resolve(host, url.port or 0)
        except OSError:
            return

    def _proxy_refusal(self, url: URL, status: int, reason: str) -> str:
        proxy = self._egress.proxy_for(str(url))
        if status == 407 and proxy is not None:
            self._proxy_refused = f"download: {proxy_auth_message(proxy, '')}"
            return self._proxy_refused
        return f"the proxy {proxy} refused the download (HTTP {status} {reason}); its policy must allow this host"

    def _next_hop(self, current: URL, location: str, label: str) -> URL:
        try:
            target = current.join(URL(location))
        except ValueError:
            raise ImageError(f"{label}: the server redirected to an invalid Location; fix the URL",
                             error_type="image_remote_error") from None
        if target.scheme not in ("http", "https") or target.scheme not in self._policy.allow_schemes:
            raise ImageError(f"{label}: redirected to a {target.scheme or 'relative'}:// URL, which is refused; "
                             f"allowed schemes: {', '.join(self._policy.allow_schemes)}",
                             error_type="image_scheme_refused")
        return target

    def _open(self) -> aiohttp.ClientSession:
        """The session, opened on first use inside the running loop (the resolver needs the loop)."""
        if self._session is None:
            egress = self._egress
            warn_unverified(egress.tls, egress.tls_key, "download servers'")
            self._resolver = GuardedResolver(self._guard, frozenset(egress.proxy_hosts()))
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(resolver=self._resolver, ssl=client_context(egress.tls, egress.tls_key)),
                headers={"User-Agent": "pipeline-image-preflight"}, trust_env=False)
        return self._session


def aiohttp_proxy(proxy: ProxyURL | None) -> dict[str, Any]:
    """aiohttp's per-request proxy option. Credentials ride in the URL: aiohttp sends them for CONNECT and
    for plain-HTTP requests alike (its ``proxy_headers`` only reach CONNECT, and ``proxy_auth`` is deprecated);
    the password is a job secret, so a message that quotes the URL is masked before it is shown."""
    if proxy is None:
        return {}
    return {"proxy": URL.build(scheme=proxy.scheme, user=proxy.username or None, password=proxy.password or None,
                               host=proxy.host, port=proxy.port)}


async def _body(response: aiohttp.ClientResponse, label: str, cap: int) -> bytes:
    """The final hop's body, capped at ``images.max_source_bytes``; HTTP errors classified."""
    if response.status in RETRYABLE_STATUSES or response.status >= 500:
        raise TransientDownloadError(f"HTTP {response.status} {response.reason or ''}".strip())
    if response.status >= 400:
        raise ImageError(f"{label}: download answered HTTP {response.status} {response.reason or ''}; fix the "
                         "URL or its access rights", error_type="image_remote_error")
    if response.content_length is not None and response.content_length > cap:
        raise _too_big(label, f"announces {response.content_length} bytes", cap)
    body = bytearray()
    async for chunk in response.content.iter_chunked(_DOWNLOAD_CHUNK):
        body += chunk
        if len(body) > cap:
            raise _too_big(label, f"sent more than {cap} bytes", cap)
    return bytes(body)


def _too_big(label: str, what: str, cap: int) -> ImageError:
    return ImageError(f"{label}: download {what}, over images.max_source_bytes={cap}; raise the cap or "
                      "use a smaller image", error_type="image_too_large")
