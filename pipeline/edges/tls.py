"""TLS contexts from ``endpoint.tls`` / ``images.tls``: a private CA, a client certificate, no checks.

The system's trust store (and ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``, which OpenSSL reads) always stays in:
``ca_file`` adds a corporate CA to it rather than replacing it, so public endpoints keep working beside a
private gateway. Every file problem is a ``ConfigError`` that names the key and the file, raised when the
client opens, before any request is sent.
"""

from __future__ import annotations

import logging
import ssl
from functools import lru_cache

from pipeline.core.config import Config, TLSConfig
from pipeline.core.errors import ConfigError
from pipeline.edges.http import os_reason

__all__ = ["check_tls_files", "client_context", "warn_unverified"]

log = logging.getLogger("pipeline")


@lru_cache(maxsize=8)
def client_context(tls: TLSConfig, section: str = "endpoint.tls") -> ssl.SSLContext:
    """A client-side context for ``tls`` (cached: a context is costly to build and safe to share)."""
    context = ssl.create_default_context()
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"{section}.ca_file: cannot load {tls.ca_file}: {os_reason(exc)}; point it at a "
                              "PEM file of CA certificates") from None
    if tls.client_cert is not None:
        try:
            context.load_cert_chain(str(tls.client_cert), str(tls.client_key) if tls.client_key else None)
        except (OSError, ssl.SSLError) as exc:
            key = f" / {section}.client_key ({tls.client_key})" if tls.client_key else ""
            raise ConfigError(f"{section}.client_cert ({tls.client_cert}){key}: cannot load the client "
                              f"certificate: {os_reason(exc)}; give a PEM certificate and its unencrypted "
                              "private key") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def check_tls_files(config: Config) -> None:
    """Load every CA file and client certificate the job will use, so ``validate`` and ``run`` refuse a bad
    path before any request (``ConfigError``, exit code 2) rather than on the first connection."""
    if config.endpoint.base_url.startswith("https://"):
        client_context(config.endpoint.tls)
    downloads = config.download_egress
    client_context(downloads.tls, downloads.tls_key)


def warn_unverified(tls: TLSConfig | None, section: str, what: str) -> None:
    """Say so on every run when certificates are not checked: never silently."""
    if tls is not None and not tls.verify:
        log.warning("%s.verify is false: %s certificates are NOT checked; anyone on the network path can "
                    "read and change this traffic. Use %s.ca_file for a private CA instead", section, what, section)
