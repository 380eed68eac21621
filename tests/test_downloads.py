"""The download guard against server-side request forgery, over real HTTP servers on 127.0.0.1 and
127.0.0.2: loopback is refused by default (literal addresses, legacy numeric forms, names that resolve to
it), ``images.allow_hosts`` opens it, and every redirect hop is checked. Nothing is sent to a refused
address: the servers count their requests.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from pipeline.api import run_job_async
from pipeline.core.config import ImagesConfig
from pipeline.core.errors import ImageError
from pipeline.edges.images import ImageLoader, ImagePayload
from pipeline.ops.estimate import estimate_job

from .helpers import job_config, make_image, read_rows


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (9, 7), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


@dataclass
class Server:
    """Serves ``/img/<name>`` (a PNG) and ``/go?to=<url>`` (a 302 to that URL, or to ``/go`` itself);
    counts every request."""

    host: str
    hits: Counter[str] = field(default_factory=Counter)
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def image(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        return web.Response(body=png(), content_type="image/png")

    async def go(self, request: web.Request) -> web.Response:
        self.hits[request.path] += 1
        raise web.HTTPFound(request.query.get("to", request.path))  # no target: back to itself, forever


@pytest.fixture
async def servers() -> AsyncIterator[tuple[Server, Server]]:
    """Two image servers: on 127.0.0.1 and on 127.0.0.2 (both loopback, told apart by address)."""
    runners, started = [], []
    for host in ("127.0.0.1", "127.0.0.2"):
        server = Server(host)
        app = web.Application()
        app.router.add_get("/img/{name}", server.image)
        app.router.add_get("/go", server.go)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, host, 0).start()
        server.port = runner.addresses[0][1]
        runners.append(runner)
        started.append(server)
    yield started[0], started[1]
    for runner in runners:
        await runner.cleanup()


async def load(url: str, **policy: Any) -> ImagePayload:
    async with ImageLoader(ImagesConfig(download_attempts=1, **policy)) as loader:
        return await loader.load(url, Path("/nonexistent"))


async def refused(url: str, **policy: Any) -> str:
    """The row's error message; the error must be ``image_blocked``."""
    with pytest.raises(ImageError) as info:
        await load(url, **policy)
    assert info.value.error_type == "image_blocked", info.value
    assert "images.allow_hosts" in str(info.value)
    return str(info.value)


async def test_loopback_is_refused_by_default_and_opened_by_allow_hosts(servers: tuple[Server, Server]) -> None:
    one, _ = servers
    url = f"http://user:hunter2@127.0.0.1:{one.port}/img/a.png?X-Amz-Signature=SECRET"
    message = await refused(url)
    assert f"http://127.0.0.1:{one.port}/img/a.png?..." in message and "127.0.0.1 is a loopback address" in message
    assert "hunter2" not in message and "SECRET" not in message
    assert one.hits == Counter()  # refused before connecting: nothing was sent
    for allowance in (["127.0.0.1"], ["127.0.0.0/8"]):
        payload = await load(f"{one.base}/img/a.png", allow_hosts=allowance)
        assert payload.report["image_format"] == "PNG"
    assert one.hits["/img/a.png"] == 2


@pytest.mark.parametrize("host", ["2130706433", "0177.0.0.1", "127.1", "0x7f.0.0.1", "[::ffff:127.0.0.1]",
                                  "[::1]", "0.0.0.0"])
async def test_other_spellings_of_this_machine_are_refused(servers: tuple[Server, Server], host: str) -> None:
    one, _ = servers
    await refused(f"http://{host}:{one.port}/img/a.png")
    assert one.hits == Counter()


async def test_a_name_is_judged_by_the_addresses_it_resolves_to(servers: tuple[Server, Server]) -> None:
    """``localhost`` goes through the connector's resolver: refused by what it resolves to, unless the name
    (or the address it resolves to) is allowed."""
    one, _ = servers
    url = f"http://localhost:{one.port}/img/a.png"
    message = await refused(url)
    assert "localhost resolves only to refused addresses: " in message and "127.0.0.1 (loopback)" in message
    assert one.hits == Counter()
    await load(url, allow_hosts=["localhost"])
    await load(url, allow_hosts=["127.0.0.1"])  # ::1, if localhost has it, is dropped; 127.0.0.1 is dialled
    assert one.hits["/img/a.png"] == 2


async def test_every_redirect_hop_is_checked(servers: tuple[Server, Server]) -> None:
    one, two = servers
    hop = f"{two.base}/img/b.png?token=SECRET"
    start = f"{one.base}/go?to={hop}"
    message = await refused(start, allow_hosts=["127.0.0.1"])
    assert f"redirected to {two.base}/img/b.png?..." in message and "127.0.0.2 is a loopback address" in message
    assert "SECRET" not in message
    assert one.hits["/go"] == 1 and two.hits == Counter()  # the blocked hop never got a request
    payload = await load(start, allow_hosts=["127.0.0.1", "127.0.0.2"])  # followed when both are allowed
    assert payload.report["image_format"] == "PNG" and two.hits["/img/b.png"] == 1


async def test_a_redirect_to_a_name_is_resolved_and_checked(servers: tuple[Server, Server]) -> None:
    one, two = servers
    message = await refused(f"{two.base}/go?to=http://localhost:{one.port}/img/a.png", allow_hosts=["127.0.0.2"])
    assert f"redirected to http://localhost:{one.port}/img/a.png" in message and "localhost resolves" in message
    assert two.hits["/go"] == 1 and one.hits == Counter()


async def test_redirects_to_other_schemes_and_endless_redirects_fail_the_row(
        servers: tuple[Server, Server]) -> None:
    one, _ = servers
    with pytest.raises(ImageError) as info:
        await load(f"{one.base}/go?to=file:///etc/passwd", allow_hosts=["127.0.0.1"])
    assert info.value.error_type == "image_scheme_refused" and "redirected to a file:// URL" in str(info.value)
    with pytest.raises(ImageError) as info:
        await load(f"{one.base}/go", allow_hosts=["127.0.0.1"])
    assert info.value.error_type == "image_remote_error" and "more than 10 redirects" in str(info.value)
    assert one.hits["/go"] == 1 + 11  # the file:// redirect, then the first request and 10 redirects


async def test_pass_through_urls_and_estimate_are_not_checked(tmp_path: Path,
                                                               servers: tuple[Server, Server]) -> None:
    """Only what the pipeline itself downloads is guarded: a URL passed to the endpoint is not fetched here."""
    one, _ = servers
    url = f"{one.base}/img/a.png"
    payload = await load(url, remote="pass_through")
    assert payload.url == url and payload.report["image_action"] == "remote_url" and one.hits == Counter()
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path\nremote,{url}\n")
    report = estimate_job(job_config(manifest, tmp_path / "o.parquet"))
    assert report.rows_invalid == 0 and report.rows_to_send == 1 and one.hits == Counter()


async def test_a_run_fails_only_the_blocked_row_and_says_which_key_to_set(
        tmp_path: Path, servers: tuple[Server, Server], endpoint: Any) -> None:
    one, _ = servers
    make_image(tmp_path / "local.png", (10, 200, 10))
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as handle:
        csv.writer(handle).writerows([["id", "path"], ["local", "local.png"],
                                      ["remote", f"{one.base}/img/a.png?sig=SECRET"]])
    out = tmp_path / "out.parquet"
    await run_job_async(job_config(manifest, out, endpoint.base_url))
    rows = {row["id"]: row for row in read_rows(out)}
    assert rows["local"]["status"] == "ok" and rows["remote"]["status"] == "failed"
    assert rows["remote"]["error_type"] == "image_blocked" and rows["remote"]["attempts"] == 0
    assert "images.allow_hosts" in rows["remote"]["error_message"]
    assert "SECRET" not in rows["remote"]["error_message"] and one.hits == Counter()
    allowed = job_config(manifest, out, endpoint.base_url, images={"allow_hosts": ["127.0.0.1"]})
    summary = await run_job_async(allowed, command="retry", error_type="image_blocked")
    assert {row["id"]: row["status"] for row in read_rows(out)} == {"local": "ok", "remote": "ok"}
    assert one.hits["/img/a.png"] == 1
    assert summary.attempts == 1  # allow_hosts changes no answer: the done row is not sent again
