"""The pipeline behind a real forward proxy and with its TLS options (issue 13).

Every proxy here is proxy.py in a subprocess on 127.0.0.1 (tests/proxies.py). ``api.via-proxy.test`` is
a name only that proxy resolves (``host_map``), so an endpoint under it is reachable through the proxy and
nowhere else; the proxy logs every request it sees. The endpoint is the embedded one, over http or over
https with a private CA made by trustme.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from aiohttp import web

from pipeline.api import run_job_async
from pipeline.core.errors import ConfigError
from pipeline.run.summary import RunSummary
from pipeline.server import LocalEndpoint
from tests.helpers import free_port, job_config, make_image, make_manifest, read_rows
from tests.proxies import (
    PRIVATE_HOST,
    ForwardProxy,
    TlsMaterial,
    tls_endpoint,
    tls_material,
)

pytestmark = pytest.mark.timeout(120)
ROWS = 6
PASSWORD = "s3cret-Proxy-pass"  # long enough to be masked everywhere


@pytest.fixture
def material(tmp_path: Path) -> TlsMaterial:
    return tls_material(tmp_path / "tls")


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    return make_manifest(tmp_path / "in", ROWS)


async def run(manifest: Path, out: Path, base_url: str, **sections: dict[str, Any]) -> tuple[RunSummary, list[dict[str, Any]]]:
    summary = await run_job_async(job_config(manifest, out, base_url, **sections))
    return summary, read_rows(out)


def errors(rows: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(row["error_type"], row["error_message"]) for row in rows}


# --- the endpoint through the proxy -----------------------------------------------------------------


async def test_https_endpoint_reachable_only_through_the_proxy(tmp_path: Path, manifest: Path,
                                                               material: TlsMaterial) -> None:
    async with tls_endpoint(material) as endpoint, \
            ForwardProxy(host_map={PRIVATE_HOST: ("127.0.0.1", endpoint.port)}) as proxy:
        base = f"https://{PRIVATE_HOST}:{endpoint.port}/v1"
        tls = {"ca_file": str(material.ca_pem)}
        summary, rows = await run(manifest, tmp_path / "direct.parquet", base, endpoint={"proxy": "none", "tls": tls},
                                  run={"max_attempts": 1})
        assert summary.rows_failed == ROWS and endpoint.stats.requests == 0
        (kind, message), = errors(rows)
        assert kind == "connect_error" and f"cannot resolve {PRIVATE_HOST}" in message and "HTTPS_PROXY" in message

        summary, rows = await run(manifest, tmp_path / "out.parquet", base, endpoint={"proxy": proxy.url, "tls": tls})
        assert summary.rows_ok == ROWS and endpoint.stats.requests == ROWS
        assert all(row["status"] == "ok" and row["content"] for row in rows)
        tunnels = proxy.requests()
        assert {(e.method, e.target, e.status) for e in tunnels} == {("CONNECT", f"{PRIVATE_HOST}:{endpoint.port}", 200)}
        assert len(tunnels) <= 4 < ROWS  # concurrency 4: tunnels are kept alive and reused, not one per request


async def test_http_endpoint_gets_absolute_form_requests(tmp_path: Path, manifest: Path,
                                                         local_endpoint: LocalEndpoint) -> None:
    port = local_endpoint.port
    async with ForwardProxy(host_map={PRIVATE_HOST: ("127.0.0.1", port)}) as proxy:
        summary, _ = await run(manifest, tmp_path / "out.parquet", f"http://{PRIVATE_HOST}:{port}/v1",
                               endpoint={"proxy": proxy.url})
        assert summary.rows_ok == ROWS
        entries = proxy.requests()
        assert len(entries) == ROWS
        assert {(e.method, e.target, e.status) for e in entries} == \
            {("POST", f"http://{PRIVATE_HOST}:{port}/v1/chat/completions", 200)}


async def test_tls_to_an_https_proxy_and_to_the_endpoint_inside_it(tmp_path: Path, manifest: Path,
                                                                   material: TlsMaterial) -> None:
    async with tls_endpoint(material) as endpoint, \
            ForwardProxy(tls=True, host_map={PRIVATE_HOST: ("127.0.0.1", endpoint.port)}) as proxy:
        assert proxy.url.startswith("https://")
        base = f"https://{PRIVATE_HOST}:{endpoint.port}/v1"
        only_endpoint_ca = {"ca_file": str(material.ca_pem)}
        summary, rows = await run(manifest, tmp_path / "untrusted.parquet", base,
                                  endpoint={"proxy": proxy.url, "tls": only_endpoint_ca}, run={"max_attempts": 1})
        (kind, message), = errors(rows)
        assert kind == "proxy_error" and f"TLS handshake with the proxy {proxy.url} failed" in message
        assert "certificate verify failed" in message and "endpoint.tls.ca_file" in message

        bundle = tmp_path / "both-cas.pem"
        bundle.write_bytes(material.ca_pem.read_bytes() + proxy.ca.cert_pem.bytes())  # type: ignore[union-attr]
        summary, _ = await run(manifest, tmp_path / "out.parquet", base,
                               endpoint={"proxy": proxy.url, "tls": {"ca_file": str(bundle)}})
        assert summary.rows_ok == ROWS and endpoint.stats.requests == ROWS


# --- proxy credentials ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_proxy_credentials_accepted_missing_and_refused(tmp_path: Path, material: TlsMaterial,
                                                              scheme: str) -> None:
    manifest = make_manifest(tmp_path / "in", 3 * ROWS)
    async with tls_endpoint(material) as secure, LocalEndpoint() as plain:
        endpoint = secure if scheme == "https" else plain
        async with ForwardProxy(basic_auth=f"alice:{PASSWORD}",
                                host_map={PRIVATE_HOST: ("127.0.0.1", endpoint.port)}) as proxy:
            base = f"{scheme}://{PRIVATE_HOST}:{endpoint.port}/v1"
            tls = {"ca_file": str(material.ca_pem)}
            cases = {"none": proxy.url, "wrong": proxy.url_with_credentials("alice:not-the-password"),
                     "right": proxy.url_with_credentials()}
            outcomes, refusals = {}, []
            for name, url in cases.items():
                before = len(proxy.requests())
                _, rows = await run(manifest, tmp_path / f"{name}.parquet", base, endpoint={"proxy": url, "tls": tls})
                outcomes[name] = errors(rows)
                refusals.append(sum(e.status == 407 for e in proxy.requests()[before:]))
            assert endpoint.stats.requests == 3 * ROWS  # only the run with the right credentials got through
            proxy_url = proxy.url
    # once refused, the credentials are not tried again in that run (proxies lock accounts): at most one 407
    # per request already in flight (concurrency 4), not one per row, and no retries
    assert 1 <= refusals[0] <= 4 and 1 <= refusals[1] <= 4 and refusals[2] == 0
    kinds = {kind for kind, _ in outcomes["none"]}
    messages = " | ".join(message for _, message in outcomes["none"])
    assert kinds == {"proxy_auth_error"} and "requires authentication (HTTP 407)" in messages
    assert "http://USER:PASSWORD@host:port" in messages and proxy_url in messages
    assert "not sent: the proxy refused this run's credentials already" in messages
    kinds = {kind for kind, _ in outcomes["wrong"]}
    messages = " | ".join(message for _, message in outcomes["wrong"])
    assert kinds == {"proxy_auth_error"} and "refused the credentials given in the proxy URL" in messages
    assert "not-the-password" not in messages
    assert outcomes["right"] == {(None, None)}


async def test_proxy_from_the_environment_and_no_proxy_through_the_cli(tmp_path: Path, manifest: Path,
                                                                       material: TlsMaterial) -> None:
    """What a user does: HTTPS_PROXY with credentials, then NO_PROXY; the password never lands anywhere."""
    async with tls_endpoint(material) as endpoint, \
            ForwardProxy(basic_auth=f"alice:{PASSWORD}", host_map={PRIVATE_HOST: ("127.0.0.1", endpoint.port)}) as proxy:
        env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
        env["HTTPS_PROXY"] = proxy.url_with_credentials()
        first = await cli_run(tmp_path / "via", manifest, f"https://{PRIVATE_HOST}:{endpoint.port}/v1", material, env)
        assert first == 0 and endpoint.stats.requests == ROWS
        seen = len(proxy.requests())
        # through the proxy, tunnels only (their reuse is the first test's; here a busy machine may see a row
        # start before a finished stream's connection is back in the pool, and open one more tunnel)
        assert 1 <= seen <= ROWS and {e.method for e in proxy.requests()} == {"CONNECT"}

        env["NO_PROXY"] = "localhost,127.0.0.0/8"
        second = await cli_run(tmp_path / "bypass", manifest, f"https://127.0.0.1:{endpoint.port}/v1", material, env)
        assert second == 0 and endpoint.stats.requests == 2 * ROWS
        assert len(proxy.requests()) == seen  # NO_PROXY matched: the proxy saw nothing
    written = [p for p in tmp_path.rglob("*") if p.is_file() and "tls" not in p.parts and p.suffix != ".png"]
    assert any(p.suffix == ".log" for p in written) and any(p.suffix == ".sqlite" for p in written)
    for path in written:
        assert PASSWORD.encode() not in path.read_bytes(), path


async def cli_run(folder: Path, manifest: Path, base_url: str, material: TlsMaterial, env: dict[str, str]) -> int:
    folder.mkdir()
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump({
        "endpoint": {"base_url": base_url, "tls": {"ca_file": str(material.ca_pem)}},
        "request": {"model": "m"}, "input": {"manifest": str(manifest)}, "run": {"concurrency": 4},
        "output": {"path": str(folder / "captions.parquet")}}))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline", "run", str(config), "--no-progress", "--log-level", "DEBUG", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    (folder / "cli-output.txt").write_bytes(output)  # checked for the password with the other files
    return process.returncode  # type: ignore[return-value]


# --- what the errors say --------------------------------------------------------------------------------


async def test_a_proxy_that_is_down(tmp_path: Path, manifest: Path, local_endpoint: LocalEndpoint) -> None:
    port = free_port()  # nothing listens there
    summary, rows = await run(manifest, tmp_path / "out.parquet", f"http://{PRIVATE_HOST}:{local_endpoint.port}/v1",
                              endpoint={"proxy": f"http://alice:{PASSWORD}@127.0.0.1:{port}"})
    (kind, message), = errors(rows)
    assert summary.rows_failed == ROWS and kind == "proxy_error"
    assert message.startswith(f"cannot connect to the proxy http://127.0.0.1:{port}: Connection refused")
    assert "HTTPS_PROXY" in message and PASSWORD not in message
    assert all(row["attempts"] == 3 for row in rows)  # retried: a proxy may come back


async def test_connect_refused_and_tunnel_closed(tmp_path: Path, manifest: Path, material: TlsMaterial) -> None:
    async with tls_endpoint(material) as endpoint:
        base = f"https://{PRIVATE_HOST}:{endpoint.port}/v1"
        tls = {"ca_file": str(material.ca_pem)}
        target = f"{PRIVATE_HOST}:{endpoint.port}"
        async with ForwardProxy(refuse_connect_ports={endpoint.port}) as proxy:
            proxy_url = proxy.url
            _, rows = await run(manifest, tmp_path / "refused.parquet", base, endpoint={"proxy": proxy_url, "tls": tls})
        (kind, message), = errors(rows)
        assert kind == "proxy_refused" and all(row["attempts"] == 1 for row in rows)  # its policy: not retried
        assert f"the proxy {proxy_url} refused to open a tunnel to {target}: HTTP 403" in message
        assert "NO_PROXY" in message
        async with ForwardProxy(close_connect_ports={endpoint.port}) as proxy:
            _, rows = await run(manifest, tmp_path / "closed.parquet", base, endpoint={"proxy": proxy.url, "tls": tls})
        (kind, message), = errors(rows)
        assert kind == "proxy_error" and message == "the proxy closed the connection before answering CONNECT"
        assert endpoint.stats.requests == 0


# --- downloads and the webhook --------------------------------------------------------------------------


@pytest.fixture
async def image_server(tmp_path: Path) -> AsyncIterator[tuple[int, list[str]]]:
    """Serves /img/<name> from a folder of PNGs on 127.0.0.1; yields its port and the paths it served."""
    served: list[str] = []
    folder = tmp_path / "served"
    folder.mkdir()
    for i in range(ROWS):
        make_image(folder / f"{i}.png", (10 * i, 100, 200), size=(30 + i, 20))

    async def image(request: web.Request) -> web.FileResponse:
        served.append(request.path)
        return web.FileResponse(folder / request.match_info["name"])

    app = web.Application()
    app.router.add_get("/img/{name}", image)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield int(runner.addresses[0][1]), served
    finally:
        await runner.cleanup()


async def test_downloads_go_through_the_proxy_and_the_guard_still_holds(
        tmp_path: Path, image_server: tuple[int, list[str]]) -> None:
    port, served = image_server
    images_host = "images.via-proxy.test"
    urls = [f"http://{images_host}:{port}/img/{i}.png" for i in range(ROWS)]
    manifest = tmp_path / "remote.csv"
    manifest.write_text("id,path\n" + "".join(f"r{i},{url}\n" for i, url in enumerate(urls))
                        + f"local,http://localhost:{port}/img/0.png\n")
    async with ForwardProxy(host_map={images_host: ("127.0.0.1", port)}) as proxy:
        summary, rows = await run(manifest, tmp_path / "out.parquet", "local", endpoint={"proxy": proxy.url},
                                  images={"download_attempts": 1})
        entries = proxy.requests()
    by_id = {row["id"]: row for row in rows}
    assert summary.rows_ok == ROWS and all(by_id[f"r{i}"]["status"] == "ok" for i in range(ROWS))
    assert sorted(served) == sorted(f"/img/{i}.png" for i in range(ROWS))
    # a name that resolves here to loopback is refused even through the proxy, and never reaches it
    assert by_id["local"]["error_type"] == "image_blocked"
    assert "localhost resolves only to refused addresses" in by_id["local"]["error_message"]
    assert sorted(e.target for e in entries) == sorted(urls)  # the embedded endpoint is never proxied
    assert {e.method for e in entries} == {"GET"}


async def test_downloads_stop_asking_a_proxy_that_refused_their_credentials(
        tmp_path: Path, image_server: tuple[int, list[str]]) -> None:
    port, served = image_server
    images_host = "images.via-proxy.test"
    manifest = tmp_path / "remote.csv"
    manifest.write_text("id,path\n" + "".join(f"r{i},http://{images_host}:{port}/img/{i % ROWS}.png\n"
                                               for i in range(3 * ROWS)))
    async with ForwardProxy(basic_auth=f"alice:{PASSWORD}", host_map={images_host: ("127.0.0.1", port)}) as proxy:
        summary, rows = await run(manifest, tmp_path / "out.parquet", "local", endpoint={"proxy": proxy.url})
        refusals = [e for e in proxy.requests() if e.status == 407]
    assert summary.rows_failed == 3 * ROWS and served == []
    assert {row["error_type"] for row in rows} == {"image_remote_error"}
    messages = " | ".join(row["error_message"] for row in rows)
    assert "requires authentication (HTTP 407)" in messages and "refused already in this run" in messages
    assert 1 <= len(refusals) <= 4  # the downloads in flight when the first 407 came, not one per row


async def test_webhook_goes_through_the_proxy(tmp_path: Path, manifest: Path) -> None:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook/{token}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    try:
        async with ForwardProxy(host_map={"hooks.via-proxy.test": ("127.0.0.1", port)}) as proxy:
            url = f"http://hooks.via-proxy.test:{port}/hook/T0KEN"
            summary, _ = await run(manifest, tmp_path / "out.parquet", "local", endpoint={"proxy": proxy.url},
                                   notify={"webhook_url": url})
            entries = proxy.requests()
    finally:
        await runner.cleanup()
    assert summary.rows_ok == ROWS and len(received) == 1 and received[0]["summary"]["rows"]["ok"] == ROWS
    assert [(e.method, e.target) for e in entries] == [("POST", url)]


# --- TLS options ------------------------------------------------------------------------------------------


async def test_mutual_tls_with_a_client_certificate(tmp_path: Path, manifest: Path, material: TlsMaterial) -> None:
    async with tls_endpoint(material, require_client_cert=True) as endpoint:
        base = f"https://127.0.0.1:{endpoint.port}/v1"
        _, rows = await run(manifest, tmp_path / "anonymous.parquet", base,
                            endpoint={"proxy": "none", "tls": {"ca_file": str(material.ca_pem)}},
                            run={"max_attempts": 1})
        (kind, message), = errors(rows)
        assert kind in ("connect_error", "protocol_error") and "client certificate" in message
        assert "endpoint.tls.client_cert" in message
        summary, _ = await run(manifest, tmp_path / "out.parquet", base, endpoint={"proxy": "none", "tls": {
            "ca_file": str(material.ca_pem), "client_cert": str(material.client_cert),
            "client_key": str(material.client_key)}})
        assert summary.rows_ok == ROWS and endpoint.stats.requests == ROWS


async def test_private_ca_server_name_and_verify(tmp_path: Path, manifest: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A gateway whose certificate names only ``gateway.internal``, served on 127.0.0.1."""
    ca = trustme.CA()
    ca_file = tmp_path / "corp-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("gateway.internal").configure_cert(context)
    endpoint = LocalEndpoint()
    await endpoint.start(ssl_context=context)
    try:
        base = f"https://127.0.0.1:{endpoint.port}/v1"
        outcomes = {}
        for name, tls in {"no-ca": {}, "wrong-name": {"ca_file": str(ca_file)},
                          "named": {"ca_file": str(ca_file), "server_name": "gateway.internal"}}.items():
            _, rows = await run(manifest, tmp_path / f"{name}.parquet", base, endpoint={"proxy": "none", "tls": tls},
                                run={"max_attempts": 1})
            outcomes[name] = errors(rows)
        with caplog.at_level(logging.WARNING, logger="pipeline"):
            summary, _ = await run(manifest, tmp_path / "unchecked.parquet", base,
                                   endpoint={"proxy": "none", "tls": {"verify": False}})
    finally:
        await endpoint.stop()
    (kind, message), = outcomes["no-ca"]
    assert kind == "connect_error" and "certificate verify failed" in message
    assert "set endpoint.tls.ca_file" in message
    (kind, message), = outcomes["wrong-name"]
    assert kind == "connect_error" and "certificate verify failed" in message and "mismatch" in message
    assert "endpoint.tls.server_name" in message
    assert outcomes["named"] == {(None, None)}
    assert summary.rows_ok == ROWS
    assert "endpoint.tls.verify is false" in caplog.text and "NOT checked" in caplog.text


async def test_tls_files_are_checked_before_any_request(tmp_path: Path, manifest: Path,
                                                        local_endpoint: LocalEndpoint) -> None:
    broken = tmp_path / "not-a-ca.pem"
    broken.write_text("hello\n")
    for tls, says in (({"ca_file": str(tmp_path / "missing.pem")}, "endpoint.tls.ca_file: cannot load"),
                      ({"ca_file": str(broken)}, "endpoint.tls.ca_file: cannot load"),
                      ({"client_cert": str(broken)}, "endpoint.tls.client_cert")):
        with pytest.raises(ConfigError, match=says):
            await run_job_async(job_config(manifest, tmp_path / "out.parquet", "https://127.0.0.1:9/v1",
                                           endpoint={"tls": tls}))
    with pytest.raises(ConfigError, match="images.tls.ca_file: cannot load"):
        await run_job_async(job_config(manifest, tmp_path / "out.parquet", local_endpoint.base_url,
                                       images={"tls": {"ca_file": str(broken)}}))
    assert local_endpoint.stats.requests == 0
