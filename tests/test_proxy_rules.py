"""Which proxy a URL goes through: proxy URLs, NO_PROXY as curl reads it, the environment, the config keys."""

from __future__ import annotations

import pytest

from pipeline.core.config import (
    ProxyConfig,
    config_from_dict,
    job_secrets,
    with_proxy_environment,
)
from pipeline.core.errors import ConfigError
from pipeline.core.proxy import NoProxy, environment_proxies, parse_proxy_url


def _config(**endpoint: object) -> object:
    return config_from_dict({"endpoint": {"base_url": "https://api.example.com/v1", **endpoint},
                             "request": {"model": "m"}, "input": {"manifest": "m.csv"},
                             "output": {"path": "out.parquet"}})


# --- proxy URLs -------------------------------------------------------------------------------------


def test_proxy_url_parts_and_defaults() -> None:
    proxy = parse_proxy_url("http://alice:s%3Acret@proxy.corp:3128")
    assert (proxy.scheme, proxy.host, proxy.port, proxy.username, proxy.password) == \
        ("http", "proxy.corp", 3128, "alice", "s:cret")
    assert proxy.authorization == "Basic YWxpY2U6czpjcmV0"  # base64("alice:s:cret")
    assert parse_proxy_url("proxy.corp:8080").scheme == "http"  # no scheme: http, as curl reads it
    assert parse_proxy_url("http://proxy.corp").port == 80
    assert parse_proxy_url("https://proxy.corp").port == 443
    assert parse_proxy_url("http://[::1]:3128").display == "http://[::1]:3128"
    assert parse_proxy_url("http://proxy.corp:3128").authorization is None


def test_proxy_url_never_shows_its_credentials() -> None:
    proxy = parse_proxy_url("http://alice:hunter2-secret@proxy.corp:3128")
    for text in (str(proxy), repr(proxy), proxy.display):
        assert "hunter2" not in text and "alice" not in text
    assert "hunter2-secret" in proxy.secret_values()


@pytest.mark.parametrize(("text", "says"), [
    ("socks5://proxy:1080", "only HTTP proxies"),
    ("ftp://proxy:21", "starts with http://"),
    ("http://:3128", "has no host"),
    ("http://proxy:3128/path", "has a path"),
    ("http://proxy:notaport", "not a valid proxy URL"),
])
def test_bad_proxy_urls_are_refused_with_a_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_proxy_url(text)


# --- NO_PROXY ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("no_proxy", "host", "port", "bypass"), [
    ("*", "anything.example", 443, True),
    ("corp.example", "corp.example", 443, True),
    ("corp.example", "api.corp.example", 443, True),
    ("corp.example", "notcorp.example", 443, False),  # a suffix only counts at a label boundary
    (".corp.example", "corp.example", 443, True),  # a leading dot is ignored, as curl does
    (".corp.example", "a.b.corp.example", 443, True),
    ("CORP.example", "Api.Corp.Example.", 443, True),  # case and a trailing dot do not matter
    ("10.0.0.0/8", "10.20.30.40", 443, True),
    ("10.0.0.0/8", "11.0.0.1", 443, False),
    ("10.0.0.0/8", "ten.example", 443, False),  # names are never resolved for NO_PROXY
    ("192.168.1.5", "192.168.1.5", 80, True),
    ("::1", "[::1]", 443, True),
    ("fd00::/8", "fd12::1", 443, True),
    ("api.example.com:8443", "api.example.com", 8443, True),
    ("api.example.com:8443", "api.example.com", 443, False),  # a port limits the entry to that port
    ("[::1]:8080", "::1", 8080, True),
    ("localhost, 127.0.0.1 .internal", "svc.internal", 80, True),  # commas and spaces both separate
    ("", "api.example.com", 443, False),
])
def test_no_proxy_reads_like_curl(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    assert NoProxy(no_proxy).matches(host, port) is bypass


# --- the environment --------------------------------------------------------------------------------


def test_environment_order_lower_case_first_then_all_proxy() -> None:
    proxies, no_proxy = environment_proxies({
        "HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:1", "ALL_PROXY": "http://all:1",
        "NO_PROXY": ".corp"})
    assert proxies["https"] == ("https_proxy", "http://lower:1")
    assert proxies["http"] == ("ALL_PROXY", "http://all:1")  # no HTTP_PROXY: ALL_PROXY stands in
    assert no_proxy == ".corp"
    assert environment_proxies({"HTTPS_PROXY": "  "})[0]["https"] is None  # empty: no proxy


def test_config_takes_the_environment_only_where_it_is_silent() -> None:
    env = {"HTTPS_PROXY": "http://env-proxy:3128", "NO_PROXY": "internal.example"}
    from_env = with_proxy_environment(_config(), env)
    assert str(from_env.endpoint.proxy_for("https://api.example.com/v1/chat/completions")) == "http://env-proxy:3128"
    assert from_env.endpoint.proxy_for("https://svc.internal.example/v1") is None
    assert from_env.endpoint.proxy_for("http://api.example.com/v1") is None  # no HTTP_PROXY

    pinned = with_proxy_environment(_config(proxy="http://cfg-proxy:8080", no_proxy=""), env)
    assert str(pinned.endpoint.proxy_for("https://svc.internal.example/v1")) == "http://cfg-proxy:8080"
    assert str(pinned.endpoint.proxy_for("http://api.example.com/v1")) == "http://cfg-proxy:8080"

    off = with_proxy_environment(_config(proxy="none"), env)
    assert off.endpoint.proxy_for("https://api.example.com/v1") is None


def test_a_bad_proxy_variable_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment variable https_proxy is a socks5 proxy"):
        with_proxy_environment(_config(), {"https_proxy": "socks5://user:pw@gw:1080"})


def test_embedded_endpoint_is_never_proxied() -> None:
    config = with_proxy_environment(config_from_dict({
        "request": {"model": "m"}, "input": {"manifest": "m.csv"}, "output": {"path": "out.parquet"}}),
        {"HTTP_PROXY": "http://env-proxy:3128"})
    assert config.endpoint.is_local
    # the client asks for the route of the URL the embedded endpoint listens on
    from pipeline.edges.client import ChatClient

    assert ChatClient(config.endpoint, base_url="http://127.0.0.1:9/v1").proxy is None


# --- config keys ------------------------------------------------------------------------------------


def test_proxy_key_forms() -> None:
    assert _config(proxy="none").endpoint.proxy == ProxyConfig()
    split = _config(proxy={"https": "http://tls-proxy:3128"}).endpoint
    assert split.proxy_for("https://api.example.com/v1") is not None
    assert split.proxy_for("http://api.example.com/v1") is None


def test_bad_proxy_key_hides_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        _config(proxy="socks5://alice:topsecret@gw:1080")
    text = str(caught.value)
    assert "endpoint.proxy: is a socks5 proxy" in text and "topsecret" not in text
    assert text.count("\n") == 0  # one message for the shorthand, not one per scheme


def test_proxy_credentials_are_job_secrets_and_hidden_in_reprs() -> None:
    config = _config(proxy="http://alice:topsecret@gw:3128")
    secrets = job_secrets(config)
    assert "topsecret" in secrets
    assert parse_proxy_url("http://alice:topsecret@gw:3128").authorization.split()[1] in secrets
    assert "topsecret" not in repr(config) and "topsecret" not in str(config.endpoint)


def test_tls_key_without_cert_is_refused() -> None:
    with pytest.raises(ConfigError, match="client_key needs client_cert"):
        _config(tls={"client_key": "client.key"})


def test_download_and_webhook_egress_default_to_the_endpoint() -> None:
    config = config_from_dict({
        "endpoint": {"base_url": "https://api.example.com/v1", "proxy": "http://gw:3128", "no_proxy": ".lan",
                     "tls": {"ca_file": "corp-ca.pem", "client_cert": "me.pem"}},
        "request": {"model": "m"}, "input": {"manifest": "m.csv"}, "output": {"path": "out.parquet"}})
    downloads = config.download_egress
    assert str(downloads.proxy_for("https://images.example.com/a.jpg")) == "http://gw:3128"
    assert downloads.proxy_for("http://nas.lan/a.jpg") is None
    assert downloads.tls.client_cert is not None and downloads.tls_key == "endpoint.tls"
    webhook = config.webhook_egress
    assert str(webhook.tls.ca_file) == "corp-ca.pem" and webhook.tls.client_cert is None  # no client cert to Slack
    own = config.model_copy(update={"images": config.images.model_copy(update={"proxy": ProxyConfig()})})
    assert own.download_egress.proxy_for("https://images.example.com/a.jpg") is None
