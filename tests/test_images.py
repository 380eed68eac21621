"""Image pre-flight units over real files and real HTTP: sniffing, the size rule, pass-through, re-encoding
under ``max_bytes``, remote images from a small aiohttp server on 127.0.0.1, schemes, fingerprints, config.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from pipeline.core.config import ImagesConfig, config_from_dict
from pipeline.core.errors import ConfigError, ImageError
from pipeline.core.redact import redact_url
from pipeline.edges.images import (
    ImageLoader,
    ImagePayload,
    image_fingerprint,
    read_image_file,
    sniff_mime,
)
from pipeline.edges.preflight import prepare, target_size
from tests.helpers import free_port


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noise(size: tuple[int, int], seed: int = 7) -> Image.Image:
    """Incompressible pixels, so byte limits really bite."""
    return Image.frombytes("RGB", size, random.Random(seed).randbytes(size[0] * size[1] * 3))


def sent_bytes(payload: ImagePayload) -> bytes:
    return base64.b64decode(payload.url.split(",", 1)[1])


def sent_image(payload: ImagePayload) -> Image.Image:
    return Image.open(io.BytesIO(sent_bytes(payload)))


async def load_one(tmp_path: Path, name: str, data: bytes, policy: ImagesConfig) -> ImagePayload:
    (tmp_path / name).write_bytes(data)
    async with ImageLoader(policy) as loader:
        return await loader.load(name, tmp_path)


# --- pure pieces ------------------------------------------------------------------------------------


@pytest.mark.parametrize("head, mime", [
    (b"\xff\xd8\xff\xe0\0\x10JFIF", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "image/png"),
    (b"GIF89a\x01\0\x01\0", "image/gif"),
    (b"RIFF\0\0\0\0WEBPVP8 ", "image/webp"),
    (b"II*\0\x08\0\0\0", "image/tiff"),
    (b"BM" + b"\0" * 14, "image/bmp"),
    (b"\0\0\0\x18ftypheic\0\0\0\0", "image/heic"),
    (b"\0\0\0\x1cftypavif\0\0\0\0", "image/avif"),
    (b"RIFF\0\0\0\0WAVEfmt ", None),
    (b"hello, world", None),
    (b"", None),
])
def test_sniff_mime(head: bytes, mime: str | None) -> None:
    assert sniff_mime(head) == mime


@pytest.mark.parametrize("size, policy, expected", [
    ((4000, 3000), {"fit": "openai-high"}, (1024, 768)),
    ((3000, 4000), {"fit": "openai-high"}, (768, 1024)),
    ((5000, 1000), {"fit": "openai-high"}, (2048, 409)),  # fits 2048 first; short side already < 768
    ((1000, 500), {"fit": "openai-high"}, (1000, 500)),  # nothing to discard: never upscaled
    ((4000, 3000), {"fit": "openai-low"}, (512, 384)),
    ((1000, 10), {"max_side": 100}, (100, 1)),
    ((1000, 1000), {"max_pixels": 10_000}, (100, 100)),
    ((4000, 3000), {"fit": "openai-high", "max_side": 800}, (800, 600)),  # the smallest rule wins
    ((10, 10), {"max_side": 4000, "max_pixels": 10**9}, (10, 10)),
    ((4000, 3000), {}, (4000, 3000)),
])
def test_target_size(size: tuple[int, int], policy: dict[str, Any], expected: tuple[int, int]) -> None:
    assert target_size(*size, ImagesConfig(**policy)) == expected


def test_redact_url_hides_credentials_and_query() -> None:
    assert redact_url("https://user:pw@host.example:8443/a/b.jpg?X-Amz-Signature=abc#f") == \
        "https://host.example:8443/a/b.jpg?..."
    assert redact_url("data:image/png;base64,AAAA") == "data:... URI"


def test_redact_url_origin_only_hides_a_secret_path() -> None:
    """Webhook URLs carry their secret in the path: the report's warnings show scheme, host and port only."""
    assert redact_url("https://hooks.example/services/T0/B0/secret-token", keep_path=False) == "https://hooks.example"
    assert redact_url("http://user:pw@127.0.0.1:8080/hook?k=v", keep_path=False) == "http://127.0.0.1:8080"
    assert redact_url("not a url", keep_path=False) == "?://?"
    assert redact_url("http://host.example:99999/x") == "<unparseable URL>"


# --- local files: pass-through, re-encoding, limits ------------------------------------------------


async def test_pass_through_sends_original_bytes_with_their_real_type(tmp_path: Path) -> None:
    for fmt, mime in (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("GIF", "image/gif"), ("WEBP", "image/webp")):
        data = encoded(Image.new("RGB", (8, 6), (200, 10, 10)), fmt)
        payload = await load_one(tmp_path, "misnamed.bmp", data, ImagesConfig())
        assert payload.url.startswith(f"data:{mime};base64,")
        assert sent_bytes(payload) == data
        assert payload.sha256 == hashlib.sha256(data).hexdigest()
        assert payload.report["image_action"] == "pass_through"


async def test_mpo_and_trailing_bytes_pass_through(tmp_path: Path) -> None:
    first, second = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (40, 30), (10, 10, 200))
    mpo = encoded(first, "MPO", save_all=True, append_images=[second])
    payload = await load_one(tmp_path, "camera.jpg", mpo, ImagesConfig())
    assert payload.url.startswith("data:image/jpeg;") and payload.report["image_format"] == "JPEG"
    assert payload.report["image_action"] == "pass_through"
    padded = encoded(first, "JPEG") + b"\0trailer written by some camera"
    payload = await load_one(tmp_path, "padded.jpg", padded, ImagesConfig())
    assert payload.report["image_action"] == "pass_through"  # no EOI at the end, but the decoder is happy


@pytest.mark.parametrize("fmt, cut", [("PNG", 40), ("GIF", 10), ("WEBP", 30)])
async def test_truncated_files_are_corrupt_rows(tmp_path: Path, fmt: str, cut: int) -> None:
    data = encoded(noise((64, 64)), fmt)
    with pytest.raises(ImageError) as info:
        await load_one(tmp_path, f"cut.{fmt.lower()}", data[:-cut], ImagesConfig())
    assert info.value.error_type == "image_corrupt" and "truncated or corrupt" in str(info.value)


async def test_format_targets(tmp_path: Path) -> None:
    data = encoded(Image.new("RGB", (30, 20), (10, 200, 10)), "JPEG")
    for target, mime in (("png", "image/png"), ("webp", "image/webp"), ("jpeg", "image/jpeg")):
        payload = await load_one(tmp_path, "photo.jpg", data, ImagesConfig(format=target))
        assert payload.url.startswith(f"data:{mime};base64,")
        assert payload.report["sent_format"] == target.upper()
        expected = "pass_through" if target == "jpeg" else "re_encoded"
        assert payload.report["image_action"] == expected


async def test_max_side_and_max_pixels(tmp_path: Path) -> None:
    data = encoded(Image.new("RGB", (1000, 500), (10, 10, 200)), "PNG")
    payload = await load_one(tmp_path, "wide.png", data, ImagesConfig(max_side=200))
    assert sent_image(payload).size == (200, 100) and payload.report["sent_format"] == "PNG"
    payload = await load_one(tmp_path, "wide.png", data, ImagesConfig(max_pixels=20_000))
    assert sent_image(payload).size == (200, 100)


async def test_max_bytes_lowers_jpeg_quality_first(tmp_path: Path) -> None:
    data = encoded(noise((400, 300)), "JPEG", quality=95)
    limit = len(data) // 2
    payload = await load_one(tmp_path, "noisy.jpg", data, ImagesConfig(max_bytes=limit))
    assert payload.report["image_action"] == "re_encoded"
    assert payload.report["sent_bytes"] == len(sent_bytes(payload)) <= limit
    assert sent_image(payload).size == (400, 300)


async def test_max_bytes_shrinks_lossless_png(tmp_path: Path) -> None:
    data = encoded(noise((300, 300)), "PNG")
    payload = await load_one(tmp_path, "noisy.png", data, ImagesConfig(max_bytes=60_000))
    image = sent_image(payload)
    assert image.format == "PNG" and image.width < 300 and image.width == image.height
    assert len(sent_bytes(payload)) <= 60_000


async def test_max_bytes_that_cannot_be_met_fails_the_row_with_the_reason(tmp_path: Path) -> None:
    data = encoded(noise((4000, 20)), "PNG")
    with pytest.raises(ImageError) as info:
        await load_one(tmp_path, "strip.png", data, ImagesConfig(max_bytes=1024))
    assert info.value.error_type == "image_too_large"
    assert "cannot encode under images.max_bytes=1024" in str(info.value) and "strip.png" in str(info.value)


async def test_bomb_guard_and_source_size_cap(tmp_path: Path) -> None:
    data = encoded(Image.new("L", (2000, 1000)), "PNG")
    with pytest.raises(ImageError) as info:
        await load_one(tmp_path, "big.png", data, ImagesConfig(max_image_pixels=1_000_000))
    assert info.value.error_type == "image_too_large"
    assert "2000x1000" in str(info.value) and "images.max_image_pixels=1000000" in str(info.value)
    with pytest.raises(ImageError) as info:
        await load_one(tmp_path, "big.png", data, ImagesConfig(max_source_bytes=100))
    assert info.value.error_type == "image_too_large" and "max_source_bytes=100" in str(info.value)


async def test_without_draft_prepare_matches(tmp_path: Path) -> None:
    data = encoded(noise((800, 600)), "JPEG")
    policy = ImagesConfig(max_side=300)
    with_draft, without = prepare(data, "x", policy), prepare(data, "x", policy, use_draft=False)
    assert with_draft.report["sent_width"] == without.report["sent_width"] == 300


async def test_pool_path_gives_the_same_answer_as_the_inline_path(tmp_path: Path) -> None:
    data = encoded(Image.new("RGB", (64, 48), (200, 10, 10)), "JPEG")
    (tmp_path / "a.jpg").write_bytes(data)
    async with ImageLoader(ImagesConfig()) as inline, ImageLoader(ImagesConfig(), inline_bytes=0) as pooled:
        assert await inline.load("a.jpg", tmp_path) == await pooled.load("a.jpg", tmp_path)


async def test_odd_paths_fail_their_row(tmp_path: Path) -> None:
    async with ImageLoader(ImagesConfig()) as loader:
        with pytest.raises(ImageError) as info:
            await loader.load("a\0b.jpg", tmp_path)
        assert info.value.error_type == "image_unreadable" and "NUL" in str(info.value)
        with pytest.raises(ImageError) as info:
            await loader.load("", tmp_path)
        assert info.value.error_type == "image_missing"
    (tmp_path / "real.jpg").write_bytes(b"x")
    (tmp_path / "link.jpg").symlink_to(tmp_path / "real.jpg")
    with pytest.raises(ImageError) as info:  # how a link swapped in after the root check is refused
        read_image_file(tmp_path / "link.jpg", "link.jpg", 1000, no_follow=True)
    assert info.value.error_type == "image_unreadable"


# --- fingerprints ---------------------------------------------------------------------------------------


def test_fingerprint_is_cheap_identity(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(b"one")
    first = image_fingerprint("a.png", tmp_path)
    assert first.startswith(str(path)) and first == image_fingerprint("a.png", tmp_path)
    path.write_bytes(b"three")
    assert image_fingerprint("a.png", tmp_path) != first
    assert image_fingerprint("nope.png", tmp_path) == f"missing:{tmp_path / 'nope.png'}"
    assert image_fingerprint("https://x.example/a.png", tmp_path) == "https://x.example/a.png"
    assert image_fingerprint(f"file://{path}", tmp_path) == image_fingerprint("a.png", tmp_path)
    assert image_fingerprint("file://otherhost/a.png", tmp_path) == "file://otherhost/a.png"


# --- remote images over real HTTP --------------------------------------------------------------------


@dataclass
class ImageServer:
    """A tiny aiohttp server on 127.0.0.1 that serves, fails, stalls and over-sends on purpose."""

    files: dict[str, bytes]
    hits: Counter[str] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    base: str = ""

    async def serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[request.path] += 1
        kind = request.match_info["kind"]
        if kind == "flaky" and self.hits[request.path] == 1:
            return web.Response(status=503, text="busy")
        if kind == "status":
            return web.Response(status=int(name), text="no")
        if kind == "hang":
            await self.release.wait()
        if kind == "endless":
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(64):
                await response.write(b"\0" * 1024)
            return response
        return web.Response(body=self.files[name], content_type="application/octet-stream")


@pytest.fixture
async def image_server() -> AsyncIterator[ImageServer]:
    photo = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
    server = ImageServer({"photo.jpg": encoded(photo, "JPEG"), "small.png": encoded(Image.new("RGB", (9, 7)), "PNG"),
                          "note.jpg": b"just some text"})
    app = web.Application()
    app.router.add_get("/{kind}/{name}", server.serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield server
    server.release.set()
    await runner.cleanup()


#: The image server is on loopback, which downloads refuse unless allowed (tests/test_downloads.py).
LOCAL_SERVER = ["127.0.0.1"]


async def load_url(url: str, **policy: Any) -> ImagePayload:
    async with ImageLoader(ImagesConfig(**policy)) as loader:
        return await loader.load(url, Path("/nonexistent"))


async def test_remote_inline_downloads_and_preflights(image_server: ImageServer) -> None:
    payload = await load_url(f"{image_server.base}/img/photo.jpg", fit="openai-high", allow_hosts=LOCAL_SERVER)
    assert sent_image(payload).size == (1024, 768)
    assert payload.sha256 == hashlib.sha256(image_server.files["photo.jpg"]).hexdigest()
    assert payload.report["image_bytes"] == len(image_server.files["photo.jpg"])
    assert image_server.hits["/img/photo.jpg"] == 1


async def test_remote_pass_through_sends_the_url_untouched(image_server: ImageServer) -> None:
    url = f"{image_server.base}/img/photo.jpg?size=large"
    payload = await load_url(url, remote="pass_through")
    assert payload.url == url and payload.sha256 == hashlib.sha256(url.encode()).hexdigest()
    assert payload.report["image_action"] == "remote_url"
    assert [k for k, v in payload.report.items() if v is not None] == ["image_action"]
    assert sum(image_server.hits.values()) == 0


async def test_remote_transient_failure_is_retried(image_server: ImageServer) -> None:
    payload = await load_url(f"{image_server.base}/flaky/small.png", allow_hosts=LOCAL_SERVER)
    assert payload.report["image_action"] == "pass_through"
    assert image_server.hits["/flaky/small.png"] == 2


async def test_remote_client_error_fails_at_once_and_hides_the_query(image_server: ImageServer) -> None:
    with pytest.raises(ImageError) as info:
        await load_url(f"{image_server.base}/status/404?X-Amz-Signature=SECRET", allow_hosts=LOCAL_SERVER)
    assert info.value.error_type == "image_remote_error" and "HTTP 404" in str(info.value)
    assert "SECRET" not in str(info.value) and "/status/404?..." in str(info.value)
    assert image_server.hits["/status/404"] == 1


async def test_remote_size_caps(image_server: ImageServer) -> None:
    with pytest.raises(ImageError) as info:
        await load_url(f"{image_server.base}/img/photo.jpg", max_source_bytes=1000, allow_hosts=LOCAL_SERVER)
    assert info.value.error_type == "image_too_large" and "announces" in str(info.value)
    with pytest.raises(ImageError) as info:
        await load_url(f"{image_server.base}/endless/x", max_source_bytes=10_000, allow_hosts=LOCAL_SERVER)
    assert info.value.error_type == "image_too_large" and "sent more than 10000 bytes" in str(info.value)


async def test_remote_timeout_is_retried_then_fails(image_server: ImageServer) -> None:
    with pytest.raises(ImageError) as info:
        await load_url(f"{image_server.base}/hang/x", download_timeout=0.2, download_attempts=2,
                       allow_hosts=LOCAL_SERVER)
    assert info.value.error_type == "image_remote_error" and "timed out" in str(info.value)
    assert "2 attempt(s)" in str(info.value) and image_server.hits["/hang/x"] == 2


async def test_remote_connection_refused() -> None:
    port = free_port()
    with pytest.raises(ImageError) as info:
        await load_url(f"http://127.0.0.1:{port}/a.jpg", download_attempts=1, allow_hosts=LOCAL_SERVER)
    assert info.value.error_type == "image_remote_error" and "1 attempt(s)" in str(info.value)


async def test_remote_non_image_is_unsupported(image_server: ImageServer) -> None:
    with pytest.raises(ImageError) as info:
        await load_url(f"{image_server.base}/img/note.jpg", allow_hosts=LOCAL_SERVER)
    assert info.value.error_type == "image_unsupported" and "/img/note.jpg" in str(info.value)


async def test_schemes_refused_unless_enabled(tmp_path: Path) -> None:
    data = encoded(Image.new("RGB", (8, 6)), "PNG")
    (tmp_path / "a b.png").write_bytes(data)
    file_url = f"file://{tmp_path}/a%20b.png"
    # s3:// (gs://, az://) images are read through the object store (tests/test_objectstore_input.py)
    for url in ("ftp://example.com/a.png", "data:image/png;base64,AAAA", file_url):
        with pytest.raises(ImageError) as info:
            await load_url(url)
        assert info.value.error_type == "image_scheme_refused", url
        assert "images.allow_schemes" in str(info.value)
    payload = await load_url(file_url, allow_schemes=["http", "https", "file"])
    assert sent_bytes(payload) == data
    with pytest.raises(ImageError) as info:
        await load_url("file://otherhost/a.png", allow_schemes=["file"])
    assert info.value.error_type == "image_scheme_refused"
    async with ImageLoader(ImagesConfig(allow_schemes=["file"]), root=tmp_path / "sub") as loader:
        with pytest.raises(ImageError) as info:
            await loader.load(file_url, tmp_path)
    assert info.value.error_type == "image_path_outside_root"


# --- config -------------------------------------------------------------------------------------------


def job(images: dict[str, Any] | None = None, **input_keys: Any) -> dict[str, Any]:
    return {"request": {"model": "m"}, "input": {"manifest": "m.csv", **input_keys},
            "output": {"path": "o.parquet"}, **({"images": images} if images is not None else {})}


def test_images_config_defaults() -> None:
    config = config_from_dict(job())
    images = config.images
    assert (images.fit, images.format, images.quality, images.max_bytes) == ("none", "keep", 85, 20_000_000)
    assert (images.remote, images.allow_schemes, images.background_rgb) == ("inline", ("http", "https"),
                                                                             (255, 255, 255))
    assert config.input.root is None
    assert config_from_dict(job(root="photos")).input.root == Path("photos")
    assert ImagesConfig(background="#0F8").background_rgb == (0, 255, 136)


@pytest.mark.parametrize("images, message", [
    ({"fit": "openai"}, "images.fit: must be one of 'none', 'openai-high' or 'openai-low'"),
    ({"background": "white"}, "images.background: must be a hex colour such as '#ffffff'"),
    ({"max_image_pixels": 200_000_000}, "images.max_image_pixels: must be <= 178956970"),
    ({"quality": 0}, "images.quality: must be >= 1"),
    ({"allow_schemes": ["ftp"]}, "images.allow_schemes[0]: must be one of 'http', 'https' or 'file'"),
    ({"max_sides": 100}, "images.max_sides: unknown key (did you mean 'max_side'?)"),
])
def test_images_config_errors_name_the_key(images: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(job(images))
    assert message in str(info.value)
