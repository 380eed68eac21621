"""The bad-input corpus: every kind of file a manifest may point at ends as ``ok`` or one precise error.

All images are generated here into a temporary folder (real files, real symlinks, a real FIFO), loaded
through ``ImageLoader`` concurrently, and what would be sent is decoded again to check the pixels. The
last tests send payloads over real HTTP to the embedded endpoint, which reports the size it decoded.

"Unreadable file": CI runs as root, which reads any mode-000 file, so the corpus uses things that fail
for root too: a FIFO (not a regular file) and a path that runs through a file (ENOTDIR).
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image, ImageOps, features

from pipeline.core.config import ImagesConfig, RequestConfig
from pipeline.core.errors import ImageError
from pipeline.core.request import RequestBuilder
from pipeline.edges.images import REPORT_KEYS, ImageLoader, ImagePayload
from pipeline.server import LocalEndpoint

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (0, 255, 0)
BACKGROUND = "#00ff00"  # the flattening colour used by the JPEG-target corpus: easy to recognise


# --- corpus makers: each writes one file (or link, fifo, folder) and returns nothing -----------------


def save(path: Path, image: Image.Image, fmt: str, **options: Any) -> None:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    path.write_bytes(buffer.getvalue())


def jpeg_bytes(size: tuple[int, int] = (120, 90), colour: tuple[int, int, int] = RED) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A well-formed PNG header announcing ``width`` x ``height`` over a tiny IDAT (a decompression bomb)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def half_transparent(mode: str = "RGBA") -> Image.Image:
    """Left half opaque red, right half fully transparent."""
    image = Image.new("RGBA", (40, 20), (*RED, 255))
    image.paste((0, 0, 0, 0), (20, 0, 40, 20))
    return image if mode == "RGBA" else image.convert(mode)


def palette_with_transparency() -> Image.Image:
    image = Image.new("P", (40, 20), 0)
    image.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    image.paste(1, (20, 0, 40, 20))
    image.info["transparency"] = 1  # palette index 1 (the right half) is transparent
    return image


def upright_marker() -> Image.Image:
    """40 wide, 60 tall: red top half, blue bottom half (so 'upright' is checkable)."""
    image = Image.new("RGB", (40, 60), BLUE)
    image.paste(RED, (0, 0, 40, 30))
    return image


def exif_rotated_jpeg(path: Path) -> None:
    """Stored lying on its side with EXIF orientation 6 (rotate 90 degrees clockwise to view)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    save(path, upright_marker().transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def animated_gif(path: Path) -> None:
    frames = [Image.new("RGB", (30, 20), colour) for colour in (RED, BLUE, GREEN)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    path.write_bytes(buffer.getvalue())


def animated_webp(path: Path) -> None:
    frames = [Image.new("RGB", (30, 20), colour) for colour in (RED, BLUE)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    path.write_bytes(buffer.getvalue())


def heic_signature() -> bytes:
    """The first box of a real HEIC file (ftyp heic / mif1), then filler: enough to be recognised."""
    ftyp = b"ftypheic" + b"\0\0\0\0" + b"mif1heic"
    return struct.pack(">I", len(ftyp) + 4) + ftyp + b"\0" * 64


def write_heic(path: Path) -> None:
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        path.write_bytes(heic_signature())
        return
    pillow_heif.from_pillow(Image.new("RGB", (64, 48), RED)).save(path, quality=90)


def write_avif(path: Path) -> None:
    if features.check("avif"):
        save(path, Image.new("RGB", (64, 48), RED), "AVIF", quality=90)
    else:
        path.write_bytes(struct.pack(">I", 28) + b"ftypavif\0\0\0\0avifmif1miaf" + b"\0" * 64)


def heif_readable() -> bool:
    return importlib.util.find_spec("pillow_heif") is not None


Maker = Callable[[Path], None]
CORPUS: dict[str, Maker] = {
    "zero.jpg": lambda p: p.write_bytes(b""),
    "truncated.jpg": lambda p: p.write_bytes(jpeg_bytes((400, 300))[:-300]),
    "text.jpg": lambda p: p.write_text("hello, this is a text file and not a JPEG\n"),
    "bomb.png": lambda p: p.write_bytes(png_claiming(50_000, 50_000)),
    "cmyk.jpg": lambda p: save(p, Image.new("CMYK", (60, 40), (0, 255, 255, 0)), "JPEG", quality=95),
    "sixteen.png": lambda p: save(p, Image.new("I;16", (32, 32), 40_000), "PNG"),
    "rgba.png": lambda p: save(p, half_transparent(), "PNG"),
    "la.png": lambda p: save(p, half_transparent("LA"), "PNG"),
    "palette.png": lambda p: save(p, palette_with_transparency(), "PNG", transparency=1),
    "animated.gif": animated_gif,
    "animated.webp": animated_webp,
    "photo.tiff": lambda p: save(p, Image.new("RGB", (50, 30), RED), "TIFF"),
    "photo.bmp": lambda p: save(p, Image.new("RGB", (50, 30), RED), "BMP"),
    "icon.ico": lambda p: save(p, Image.new("RGBA", (32, 32), (*RED, 255)), "ICO", sizes=[(32, 32)]),
    "photo.ppm": lambda p: save(p, Image.new("RGB", (50, 30), RED), "PPM"),
    "rotated.jpg": exif_rotated_jpeg,
    "café 写真.jpg": lambda p: p.write_bytes(jpeg_bytes()),
    "folder.jpg": lambda p: p.mkdir(),
    "fifo.jpg": lambda p: os.mkfifo(p),
    "phone.heic": write_heic,
    "photo.avif": write_avif,
}

#: name -> expected error_type, and a fragment its message must contain.
FAILURES = {
    "zero.jpg": ("image_empty", "0 bytes"),
    "truncated.jpg": ("image_corrupt", "truncated"),
    "text.jpg": ("image_unsupported", "not an image"),
    "bomb.png": ("image_too_large", "decompression bomb"),
    "folder.jpg": ("image_unreadable", "is a directory"),
    "fifo.jpg": ("image_unreadable", "not a regular file"),
    "missing.jpg": ("image_missing", "not found"),
    "zero.jpg/inside.jpg": ("image_unreadable", "a part of the path is a file, not a folder"),
    "escape.jpg": ("image_path_outside_root", "outside input.root"),
    "../outside.jpg": ("image_path_outside_root", "outside input.root"),
    "../../../../../../etc/passwd": ("image_path_outside_root", "outside input.root"),
}
if not heif_readable():
    FAILURES["phone.heic"] = ("image_needs_extra", "pip install 'pipeline[heif]'")
    if not features.check("avif"):
        FAILURES["photo.avif"] = ("image_needs_extra", "pip install 'pipeline[heif]'")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """``tmp_path/root`` full of good and bad inputs, plus a file outside the root and a link to it."""
    root = tmp_path / "root"
    root.mkdir()
    for name, make in CORPUS.items():
        make(root / name)
    (tmp_path / "outside.jpg").write_bytes(jpeg_bytes())
    (root / "escape.jpg").symlink_to(tmp_path / "outside.jpg")
    return root


def decode(payload: ImagePayload) -> tuple[str, Image.Image]:
    """The image actually carried by a data URI, and its MIME type."""
    head, encoded = payload.url.split(",", 1)
    assert head.startswith("data:") and head.endswith(";base64")
    image = Image.open(io.BytesIO(base64.b64decode(encoded, validate=True)))
    image.load()
    return head[5:-7], image


def close_to(pixel: Any, colour: tuple[int, ...], tolerance: int = 24) -> bool:
    values = pixel if isinstance(pixel, tuple) else (pixel,)
    return all(abs(int(a) - int(b)) <= tolerance for a, b in zip(values, colour, strict=False))


async def load_all(loader: ImageLoader, root: Path, names: list[str]) -> dict[str, ImagePayload | BaseException]:
    """Load every name concurrently; exceptions are kept, not raised, so one bad row cannot stop the rest."""
    outcomes = await asyncio.gather(*(loader.load(name, root) for name in names), return_exceptions=True)
    return dict(zip(names, outcomes, strict=True))


def jpeg_target() -> ImagesConfig:
    return ImagesConfig(format="jpeg", background=BACKGROUND)


# --- the corpus ---------------------------------------------------------------------------------------


async def test_every_corpus_row_ends_ok_or_with_a_precise_error(corpus: Path) -> None:
    names = sorted(CORPUS) + ["missing.jpg", "zero.jpg/inside.jpg", "escape.jpg", "../outside.jpg",
                              "../../../../../../etc/passwd"]
    async with ImageLoader(jpeg_target(), root=corpus) as loader:
        outcomes = await load_all(loader, corpus, names)

    for name, outcome in outcomes.items():
        if name in FAILURES:
            error_type, fragment = FAILURES[name]
            assert isinstance(outcome, ImageError), f"{name}: expected {error_type}, got {outcome!r}"
            assert outcome.error_type == error_type, f"{name}: {outcome.error_type}: {outcome}"
            assert fragment in str(outcome), f"{name}: {outcome}"
            assert not outcome.retryable
            assert name.split("/")[-1] in str(outcome) or name in str(outcome)  # the message names the row
        else:
            assert isinstance(outcome, ImagePayload), f"{name}: expected ok, got {outcome!r}"
            assert set(outcome.report) == set(REPORT_KEYS)
            mime, sent = decode(outcome)
            assert mime == "image/jpeg" and sent.format == "JPEG" and sent.mode in ("RGB", "L"), name
            assert (sent.width, sent.height) == (outcome.report["sent_width"], outcome.report["sent_height"])


async def test_normalised_pixels_are_right(corpus: Path) -> None:
    names = ["cmyk.jpg", "sixteen.png", "rgba.png", "la.png", "palette.png", "animated.gif", "animated.webp",
             "photo.tiff", "photo.bmp", "icon.ico", "photo.ppm"]
    async with ImageLoader(jpeg_target(), root=corpus) as loader:
        outcomes = await load_all(loader, corpus, names)
    sent = {name: decode(outcome)[1] for name, outcome in outcomes.items()}  # type: ignore[arg-type]

    assert sent["cmyk.jpg"].mode == "RGB" and close_to(sent["cmyk.jpg"].getpixel((30, 20)), (255, 0, 0), 40)
    # 16-bit 40000/65535 is ~61% grey: scaled, not clipped to white
    assert sent["sixteen.png"].mode == "L" and close_to(sent["sixteen.png"].getpixel((16, 16)), (156,), 3)
    for name in ("rgba.png", "palette.png"):  # opaque half kept, transparent half on the background
        assert close_to(sent[name].getpixel((5, 10)), RED), name
        assert close_to(sent[name].getpixel((35, 10)), GREEN), name
    assert close_to(sent["la.png"].getpixel((35, 10)), GREEN)
    for name in ("animated.gif", "animated.webp"):  # the first frame only
        assert close_to(sent[name].getpixel((15, 10)), RED), name
        assert outcomes[name].report["image_action"] == "re_encoded"  # type: ignore[union-attr]
    for name in ("photo.tiff", "photo.bmp", "icon.ico", "photo.ppm"):
        assert close_to(sent[name].getpixel((10, 10)), RED), name
    report = outcomes["photo.tiff"].report  # type: ignore[union-attr]
    assert report["image_format"] == "TIFF" and report["sent_format"] == "JPEG"


async def test_exif_rotated_jpeg_is_sent_upright(corpus: Path) -> None:
    stored = Image.open(corpus / "rotated.jpg")
    assert stored.size == (60, 40)  # lying on its side on disk ...
    assert ImageOps.exif_transpose(stored).size == (40, 60)  # ... and upright for a viewer
    async with ImageLoader(ImagesConfig(), root=corpus) as loader:
        payload = await loader.load("rotated.jpg", corpus)
    _, sent = decode(payload)
    assert sent.size == (40, 60)
    assert close_to(sent.getpixel((20, 5)), RED) and close_to(sent.getpixel((20, 55)), BLUE)
    assert sent.getexif().get(0x0112) in (None, 1)  # no orientation left for the endpoint to apply again
    assert payload.report["image_action"] == "re_encoded"
    assert (payload.report["image_width"], payload.report["image_height"]) == (40, 60)


async def test_keep_policy_passes_good_files_through_byte_for_byte(corpus: Path) -> None:
    names = ["café 写真.jpg", "rgba.png", "palette.png"]
    async with ImageLoader(ImagesConfig(), root=corpus) as loader:
        outcomes = await load_all(loader, corpus, names)
    for name in names:
        payload = outcomes[name]
        assert isinstance(payload, ImagePayload), name
        original = (corpus / name).read_bytes()
        assert base64.b64decode(payload.url.split(",", 1)[1]) == original, name
        assert payload.report["image_action"] == "pass_through"
        assert payload.report["image_bytes"] == payload.report["sent_bytes"] == len(original)
    assert outcomes["rgba.png"].report["sent_format"] == "PNG"  # type: ignore[union-attr]


async def test_keep_policy_still_converts_what_endpoints_reject(corpus: Path) -> None:
    names = ["cmyk.jpg", "sixteen.png", "animated.gif", "photo.tiff", "icon.ico"]
    async with ImageLoader(ImagesConfig(), root=corpus) as loader:
        outcomes = await load_all(loader, corpus, names)
    formats = {name: outcome.report["sent_format"] for name, outcome in outcomes.items()}  # type: ignore[union-attr]
    # JPEG stays JPEG, PNG stays PNG, GIF becomes PNG, others PNG with alpha else JPEG
    assert formats == {"cmyk.jpg": "JPEG", "sixteen.png": "PNG", "animated.gif": "PNG", "photo.tiff": "JPEG",
                       "icon.ico": "PNG"}
    assert all(o.report["image_action"] == "re_encoded" for o in outcomes.values())  # type: ignore[union-attr]


async def test_without_root_a_symlink_is_followed(corpus: Path) -> None:
    async with ImageLoader(ImagesConfig()) as loader:
        payload = await loader.load("escape.jpg", corpus)
    assert payload.report["image_action"] == "pass_through"


# --- the fit rule, proven on the wire -----------------------------------------------------------------


def big_photo(path: Path) -> bytes:
    image = Image.linear_gradient("L").resize((4000, 3000)).convert("RGB")
    image.paste(RED, (0, 0, 2000, 1500))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


async def post_chat(endpoint: LocalEndpoint, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(f"{endpoint.base_url}/chat/completions", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()


async def test_openai_high_sends_1024x768_and_the_endpoint_sees_it(tmp_path: Path,
                                                                   local_endpoint: LocalEndpoint) -> None:
    original = big_photo(tmp_path / "big.jpg")
    async with ImageLoader(ImagesConfig(fit="openai-high", detail="high"), root=tmp_path) as loader:
        payload = await loader.load("big.jpg", tmp_path)
    mime, sent = decode(payload)
    assert (mime, sent.size) == ("image/jpeg", (1024, 768))
    assert close_to(sent.getpixel((100, 100)), RED)  # top-left quarter is still the red one
    assert payload.report == {
        "image_format": "JPEG", "image_width": 4000, "image_height": 3000, "image_bytes": len(original),
        "sent_format": "JPEG", "sent_width": 1024, "sent_height": 768, "sent_bytes": payload.report["sent_bytes"],
        "image_action": "re_encoded",
    }
    assert payload.report["sent_bytes"] < len(original)

    builder = RequestBuilder(RequestConfig(model="test-model"), ImagesConfig(detail="high"))
    body = builder.build("Describe the image.", payload.url)
    assert body["messages"][-1]["content"][1]["image_url"]["detail"] == "high"
    answer = await post_chat(local_endpoint, {**body, "stream": False})
    assert "1024x768" in answer["choices"][0]["message"]["content"]
    assert local_endpoint.stats.snapshot()["requests"] == 1


async def test_decode_without_draft_gives_the_same_size(tmp_path: Path) -> None:
    from pipeline.edges.preflight import prepare

    data = big_photo(tmp_path / "big.jpg")
    for use_draft in (True, False):
        prepared = prepare(data, "big.jpg", ImagesConfig(fit="openai-high"), use_draft=use_draft)
        assert (prepared.report["sent_width"], prepared.report["sent_height"]) == (1024, 768)


async def test_the_whole_corpus_through_a_real_run(corpus: Path, tmp_path: Path) -> None:
    """Every corpus row ends with a recorded outcome in the output, over real HTTP; the run never crashes."""
    import csv

    import pyarrow.parquet as pq

    from pipeline.api import run_job_async
    from pipeline.core.config import config_from_dict
    from pipeline.server import LocalEndpoint

    names = sorted(CORPUS) + ["missing.jpg", "escape.jpg", "../../../../../../etc/passwd"]
    manifest = corpus / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path"])
        writer.writerows([f"row-{i}", name] for i, name in enumerate(names))
    out = tmp_path / "out" / "captions.parquet"
    async with LocalEndpoint() as endpoint:
        config = config_from_dict({
            "endpoint": {"base_url": endpoint.base_url},
            "request": {"model": "m"},
            "images": {"format": "jpeg", "fit": "openai-high", "background": BACKGROUND},
            "input": {"manifest": str(manifest), "root": str(corpus)},
            "run": {"concurrency": 4, "backoff_base": 0.01},
            "output": {"path": str(out)},
        })
        summary = await run_job_async(config)
        sent = endpoint.stats.snapshot()["requests"]
    rows = {r["path"]: r for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == sorted(names)  # one outcome per manifest row
    for name, row in rows.items():
        if name in FAILURES:
            assert (row["status"], row["error_type"]) == ("failed", FAILURES[name][0]), name
            assert row["attempts"] == 0  # nothing was sent for a row that failed pre-flight
        else:
            assert row["status"] == "ok" and row["content"], name
            assert f"{row['sent_width']}x{row['sent_height']}" in row["content"]  # what the endpoint saw
    ok = sum(r["status"] == "ok" for r in rows.values())
    assert sent == ok and summary.rows_ok == ok and summary.rows_failed == len(rows) - ok
