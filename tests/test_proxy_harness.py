"""The proxy/TLS test harness itself (tests/proxies.py), driven by aiohttp as the client.

These prove the harness does what the proxy tests of the pipeline's own client rely on: a real forward
proxy (absolute-form and CONNECT), names only the proxy resolves, basic auth, refused and dropped
CONNECTs, an https proxy, a request log, a private CA and an mTLS endpoint.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509

from pipeline.server import LocalEndpoint
from tests.proxies import (
    CLIENT_NAME,
    PRIVATE_HOST,
    ForwardProxy,
    ProxyEntry,
    TlsMaterial,
    tls_endpoint,
    tls_material,
)

pytestmark = pytest.mark.timeout(60)
QUICK = aiohttp.ClientTimeout(total=5)


async def model_ids(url: str, **request: object) -> list[str]:
    async with aiohttp.ClientSession(timeout=QUICK) as session:
        async with session.get(url, **request) as response:  # type: ignore[arg-type]
            assert response.status == 200, await response.text()
            return [model["id"] for model in (await response.json())["data"]]


def plain_answer(port: int) -> bytes:
    """What a plain-HTTP request to ``port`` gets back (b"" when the peer resets the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        raw.sendall(b"GET http://127.0.0.1:9/ HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
        try:
            return raw.recv(100)
        except ConnectionResetError:
            return b""


@pytest.fixture
def material(tmp_path: Path) -> TlsMaterial:
    return tls_material(tmp_path / "tls")


# --- plain http targets: absolute-form -------------------------------------------------------------


async def test_http_target_goes_through_the_proxy_in_absolute_form(local_endpoint: LocalEndpoint) -> None:
    async with ForwardProxy() as proxy:
        assert await model_ids(f"{local_endpoint.base_url}/models", proxy=proxy.url) == ["local-vision"]
        async with aiohttp.ClientSession(timeout=QUICK) as session:
            async with session.post(f"{local_endpoint.base_url.removesuffix('/v1')}/_admin/reset",
                                    proxy=proxy.url, json={}) as response:
                assert response.status == 200
        origin = f"http://127.0.0.1:{local_endpoint.port}"
        assert proxy.requests() == [ProxyEntry("GET", f"{origin}/v1/models", 200),
                                    ProxyEntry("POST", f"{origin}/_admin/reset", 200)]


async def test_every_request_on_a_kept_alive_connection_is_logged(local_endpoint: LocalEndpoint) -> None:
    """proxy.py's own access log has one line per client connection; the harness log one per request."""
    async with ForwardProxy() as proxy:
        async with aiohttp.ClientSession(timeout=QUICK) as session:
            for _ in range(3):
                async with session.get(f"{local_endpoint.base_url}/models", proxy=proxy.url) as response:
                    assert response.status == 200
                    await response.read()
        assert [entry.status for entry in proxy.requests()] == [200, 200, 200]


# --- https targets: CONNECT ------------------------------------------------------------------------


async def test_https_target_goes_through_a_connect_tunnel_with_the_private_ca(material: TlsMaterial) -> None:
    async with tls_endpoint(material) as endpoint, ForwardProxy() as proxy:
        assert endpoint.base_url.startswith("https://127.0.0.1:")
        url = f"{endpoint.base_url}/models"
        assert await model_ids(url, proxy=proxy.url, ssl=material.client_context()) == ["local-vision"]
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await model_ids(url, proxy=proxy.url, ssl=ssl.create_default_context())  # system CAs only
        target = f"127.0.0.1:{endpoint.port}"
        assert proxy.requests() == [ProxyEntry("CONNECT", target, 200), ProxyEntry("CONNECT", target, 200)]


# --- names only the proxy resolves -----------------------------------------------------------------


async def test_a_private_name_resolves_through_the_proxy_only(local_endpoint: LocalEndpoint) -> None:
    url = f"http://{PRIVATE_HOST}:{local_endpoint.port}/v1/models"
    with pytest.raises(aiohttp.ClientConnectorError):
        await model_ids(url)  # direct: the name does not resolve
    async with ForwardProxy(host_map={PRIVATE_HOST: ("127.0.0.1", local_endpoint.port)}) as proxy:
        assert await model_ids(url, proxy=proxy.url) == ["local-vision"]
        assert proxy.requests() == [ProxyEntry("GET", url, 200)]
    async with ForwardProxy() as unmapped, aiohttp.ClientSession(timeout=QUICK) as session:
        async with session.get(url, proxy=unmapped.url) as response:
            assert response.status == 502  # the proxy could not resolve it either: the map is what works
        assert unmapped.requests() == [ProxyEntry("GET", url, 502)]


async def test_a_private_name_over_connect_maps_any_port(material: TlsMaterial) -> None:
    """``https://api.via-proxy.test/v1`` (port 443) reaches the endpoint's real port through the map."""
    async with tls_endpoint(material) as endpoint:
        host_map = {PRIVATE_HOST: ("127.0.0.1", endpoint.port)}
        async with ForwardProxy(host_map=host_map) as proxy:
            ids = await model_ids(f"https://{PRIVATE_HOST}/v1/models", proxy=proxy.url,
                                  ssl=material.client_context())
            assert ids == ["local-vision"]
            assert proxy.requests() == [ProxyEntry("CONNECT", f"{PRIVATE_HOST}:443", 200)]


# --- proxy authentication --------------------------------------------------------------------------


async def test_basic_auth_answers_407_without_or_with_wrong_credentials(local_endpoint: LocalEndpoint) -> None:
    url = f"{local_endpoint.base_url}/models"
    async with ForwardProxy(basic_auth="alice:s3cret") as proxy:
        async with aiohttp.ClientSession(timeout=QUICK) as session:
            for proxy_url in (proxy.url, proxy.url_with_credentials("alice:wrong")):
                async with session.get(url, proxy=proxy_url) as response:
                    assert response.status == 407
                    assert response.headers["Proxy-Authenticate"] == "Basic"
        assert proxy.url_with_credentials() == f"http://alice:s3cret@127.0.0.1:{proxy.port}"
        assert await model_ids(url, proxy=proxy.url_with_credentials()) == ["local-vision"]
        assert [entry.status for entry in proxy.requests()] == [407, 407, 200]


async def test_basic_auth_answers_407_to_connect(material: TlsMaterial) -> None:
    async with tls_endpoint(material) as endpoint, ForwardProxy(basic_auth="alice:s3cret") as proxy:
        url = f"{endpoint.base_url}/models"
        with pytest.raises(aiohttp.ClientHttpProxyError) as caught:
            await model_ids(url, proxy=proxy.url, ssl=material.client_context())
        assert caught.value.status == 407
        ids = await model_ids(url, proxy=proxy.url_with_credentials(), ssl=material.client_context())
        assert ids == ["local-vision"]
        target = f"127.0.0.1:{endpoint.port}"
        assert proxy.requests() == [ProxyEntry("CONNECT", target, 407), ProxyEntry("CONNECT", target, 200)]


# --- refused and dropped tunnels -------------------------------------------------------------------


async def test_a_refused_connect_gets_403(material: TlsMaterial) -> None:
    async with tls_endpoint(material) as endpoint, ForwardProxy(refuse_connect_ports={endpoint.port}) as proxy:
        with pytest.raises(aiohttp.ClientHttpProxyError) as caught:
            await model_ids(f"{endpoint.base_url}/models", proxy=proxy.url, ssl=material.client_context())
        assert caught.value.status == 403
        assert proxy.requests() == [ProxyEntry("CONNECT", f"127.0.0.1:{endpoint.port}", 403)]


async def test_a_dropped_connect_closes_the_connection_unanswered(material: TlsMaterial) -> None:
    async with tls_endpoint(material) as endpoint, ForwardProxy(close_connect_ports={endpoint.port}) as proxy:
        with pytest.raises(aiohttp.ClientError) as caught:
            await model_ids(f"{endpoint.base_url}/models", proxy=proxy.url, ssl=material.client_context())
        assert not isinstance(caught.value, aiohttp.ClientResponseError)  # no status line at all
        # aiohttp tries a dropped request once more: every try is logged, none answered
        assert set(proxy.requests()) == {ProxyEntry("CONNECT", f"127.0.0.1:{endpoint.port}", None)}
        assert endpoint.stats.snapshot() == LocalEndpoint().stats.snapshot()  # nothing reached the endpoint


def test_an_unreachable_upstream_gets_502_and_is_logged_when_the_proxy_closes() -> None:
    with socket.socket() as bound, ForwardProxy() as proxy:
        bound.bind(("127.0.0.1", 0))  # bound, not listening: connecting to it is refused
        port = bound.getsockname()[1]
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
            raw.sendall(f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            assert raw.recv(100).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
        assert proxy.wait_for_requests(1) == [ProxyEntry("CONNECT", f"127.0.0.1:{port}", 502)]


# --- an https proxy (TLS between client and proxy) -------------------------------------------------


async def test_an_https_proxy_serves_aiohttp_for_http_and_https_targets(tmp_path: Path,
                                                                         material: TlsMaterial) -> None:
    async with tls_endpoint(material) as endpoint, ForwardProxy(tls=True) as proxy:
        assert proxy.url.startswith("https://127.0.0.1:")
        context = material.client_context()
        context.load_verify_locations(cafile=str(proxy.write_ca_pem(tmp_path / "proxy-ca.pem")))
        assert await model_ids(f"{endpoint.base_url}/models", proxy=proxy.url, ssl=context) == ["local-vision"]
        async with LocalEndpoint() as plain:
            assert await model_ids(f"{plain.base_url}/models", proxy=proxy.url, ssl=context) == ["local-vision"]
            assert [entry.method for entry in proxy.requests()] == ["CONNECT", "GET"]


def test_an_https_proxy_presents_a_certificate_of_its_ca_and_refuses_plain_http() -> None:
    with ForwardProxy(tls=True) as proxy:
        assert proxy.ca is not None
        context = ssl.create_default_context()
        proxy.ca.configure_trust(context)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                assert ("IP Address", "127.0.0.1") in tls.getpeercert()["subjectAltName"]
        assert not plain_answer(proxy.port).startswith(b"HTTP/")  # the proxy only speaks TLS
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
                ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")


# --- the mTLS endpoint -----------------------------------------------------------------------------


async def test_the_mtls_endpoint_wants_a_client_certificate_of_the_ca(material: TlsMaterial) -> None:
    async with tls_endpoint(material, require_client_cert=True) as endpoint:
        url = f"{endpoint.base_url}/models"
        with pytest.raises(aiohttp.ClientError):
            await model_ids(url, ssl=material.client_context())
        assert await model_ids(url, ssl=material.client_context(with_client_cert=True)) == ["local-vision"]
        stranger = tls_material(material.ca_pem.parent.parent / "stranger")  # same names, another CA
        context = material.client_context()
        context.load_cert_chain(stranger.client_cert, stranger.client_key)
        with pytest.raises(aiohttp.ClientError):
            await model_ids(url, ssl=context)


async def test_mtls_works_through_a_connect_tunnel(material: TlsMaterial) -> None:
    async with tls_endpoint(material, require_client_cert=True) as endpoint, ForwardProxy() as proxy:
        ids = await model_ids(f"{endpoint.base_url}/models", proxy=proxy.url,
                              ssl=material.client_context(with_client_cert=True))
        assert ids == ["local-vision"]


def test_tls_material_writes_pem_files_for_the_server_names_and_the_client(material: TlsMaterial) -> None:
    for path in (material.ca_pem, material.server_cert, material.server_key, material.client_cert,
                 material.client_key):
        assert path.read_bytes().startswith(b"-----BEGIN ")
    assert alt_names(material.client_cert) == [CLIENT_NAME]
    assert alt_names(material.server_cert) == [PRIVATE_HOST, "localhost", "127.0.0.1"]


def alt_names(pem: Path) -> list[str]:
    """The subjectAltName entries of the first certificate in ``pem`` (cryptography, trustme's own base)."""
    certificate = x509.load_pem_x509_certificate(pem.read_bytes())
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names]


# --- the process itself ----------------------------------------------------------------------------


def test_the_proxy_is_stopped_by_pid_and_its_port_closed() -> None:
    with ForwardProxy() as proxy:
        pid, port = proxy.pid, proxy.port
        os.kill(pid, 0)  # alive
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_proxy_that_cannot_start_says_why(tmp_path: Path) -> None:
    proxy = ForwardProxy(workdir=tmp_path, start_timeout=15)
    (tmp_path / "harness.json").mkdir()  # the plugin settings cannot be written: proxy.py is never started
    with pytest.raises(IsADirectoryError):
        proxy.start()
