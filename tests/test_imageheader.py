"""The hand-written JPEG/PNG header reader against Pillow, over a generated corpus.

Two promises are checked. Whenever ``read_header`` answers, its answer is what Pillow's lazy open reports
(format, size, mode, orientation as pre-flight reads it, animation). And ``pass_through`` / ``prepare``
with the fast path give exactly what the Pillow-only path gives (the code before the fast path, kept
here as ``pillow_pass_through``): the same bytes, mime and report, the same None, or the same error.

The corpus: JPEGs in L/RGB/CMYK, baseline and progressive, EXIF orientation 1..8 in both byte orders,
JFIF/Adobe, restart markers, comments, ICC profiles, XMP, Photoshop blocks, MPO; PNGs of every colour
type and bit depth, tRNS, text chunks, iCCP, eXIf, APNG; then truncations, byte mutations and garbage.

Pillow is not pinned: all of this runs against whichever Pillow is installed, so a release that reads a
header differently fails here rather than in a run (the reader then leaves that case to Pillow).
"""

from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from PIL import Image, PngImagePlugin

from pipeline.core.config import ImagesConfig
from pipeline.core.errors import ImageError
from pipeline.edges import preflight
from pipeline.edges.imageheader import ImageHeader, read_header
from pipeline.edges.preflight import Prepared, pass_through, prepare

POLICIES = (
    ImagesConfig(),
    ImagesConfig(format="jpeg"),
    ImagesConfig(format="png"),
    ImagesConfig(max_side=64),
    ImagesConfig(fit="openai-low"),
    ImagesConfig(max_bytes=1024),
    ImagesConfig(max_image_pixels=5000),
    ImagesConfig(max_pixels=256),
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- builders -----------------------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def picture(mode: str = "RGB", size: tuple[int, int] = (96, 64), seed: int = 1) -> Image.Image:
    """A little texture, so that encoders produce real tables and scans."""
    rng = random.Random(seed)
    grey = Image.frombytes("L", size, rng.randbytes(size[0] * size[1]))
    rgb = Image.merge("RGB", (grey, Image.linear_gradient("L").resize(size), grey.rotate(90)))
    return rgb if mode == "RGB" else rgb.convert(mode)


def jpeg(mode: str = "RGB", size: tuple[int, int] = (96, 64), **options: Any) -> bytes:
    return encoded(picture(mode, size), "JPEG", quality=80, **options)


def segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(payload) + 2) + payload


def after_soi(data: bytes, *segments: bytes) -> bytes:
    return data[:2] + b"".join(segments) + data[2:]


def before_marker(data: bytes, marker: int, insert: bytes) -> bytes:
    """``insert`` just before the first ``marker`` segment (found by walking, not by searching)."""
    pos = 2
    while data[pos + 1] != marker:
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return data[:pos] + insert + data[pos:]


def without_segment(data: bytes, marker: int) -> bytes:
    pos = 2
    while data[pos + 1] != marker:
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return data[:pos] + data[pos + 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]:]


def tiff(order: str, entries: list[tuple[int, int, int, bytes]], *, ifd_at: int = 8) -> bytes:
    """A TIFF structure (as EXIF and MPF embed it): one IFD, values over 4 bytes placed after it."""
    mark = b"II*\0" if order == "<" else b"MM\0*"
    ifd_end = ifd_at + 2 + 12 * len(entries) + 4
    table, extra = struct.pack(order + "H", len(entries)), b""
    for tag, kind, count, value in entries:
        if len(value) > 4:
            field = struct.pack(order + "L", ifd_end + len(extra))
            extra += value
        else:
            field = value.ljust(4, b"\0")
        table += struct.pack(order + "HHL", tag, kind, count) + field
    return mark + struct.pack(order + "L", ifd_at) + b"\0" * (ifd_at - 8) + table + b"\0\0\0\0" + extra


def short(order: str, *values: int) -> bytes:
    return struct.pack(order + "H" * len(values), *values)


def rational(order: str, numerator: int, denominator: int) -> bytes:
    return struct.pack(order + "LL", numerator, denominator)


def exif_jpeg(order: str, entries: list[tuple[int, int, int, bytes]], base: bytes | None = None) -> bytes:
    return after_soi(base or jpeg(), segment(0xE1, b"Exif\0\0" + tiff(order, entries)))


def oriented(order: str, value: int) -> list[tuple[int, int, int, bytes]]:
    return [(0x0112, 3, 1, short(order, value))]


def photoshop(*blocks: bytes) -> bytes:
    return segment(0xED, b"Photoshop 3.0\0" + b"".join(blocks))


def resource(code: int, data: bytes, name: bytes = b"") -> bytes:
    """One 8BIM block: code, Pascal name padded to even, size, data padded to even."""
    named = bytes((len(name),)) + name
    named += b"\0" * (len(named) % 2)
    return b"8BIM" + struct.pack(">H", code) + named + struct.pack(">L", len(data)) + data + b"\0" * (len(data) % 2)


def mpf(order: str, pictures: int, *, entry_bytes: int | None = None, attribute: int = 0x00030000) -> bytes:
    entries = b"".join(struct.pack(order + "LLLHH", attribute if i == 0 else 0x00010001, 1000, 0, 0, 0)
                       for i in range(pictures))
    entries = entries[:entry_bytes] if entry_bytes is not None else entries
    return segment(0xE2, b"MPF\0" + tiff(order, [(0xB000, 7, 4, b"0100"), (0xB001, 4, 1, struct.pack(order + "L", pictures)),
                                                  (0xB002, 7, len(entries), entries)]))


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(width: int, height: int, depth: int, colour: int, *chunks: bytes, interlace: int = 0) -> bytes:
    """A minimal PNG written by hand (for the depth/colour pairs Pillow does not write): zero rows."""
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row = b"\0" + bytes((width * channels * depth + 7) // 8)
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    return (PNG_SIGNATURE + chunk(b"IHDR", header) + b"".join(chunks) + chunk(b"IDAT", zlib.compress(row * height))
            + chunk(b"IEND", b""))


def png(mode: str = "RGB", size: tuple[int, int] = (40, 30), **options: Any) -> bytes:
    return encoded(picture("RGB", size).convert(mode), "PNG", **options)


def before_idat(data: bytes, *chunks: bytes) -> bytes:
    at = data.index(b"IDAT") - 4
    return data[:at] + b"".join(chunks) + data[at:]


def text_info(*entries: tuple[str, str, str]) -> PngImagePlugin.PngInfo:
    """PngInfo from (kind, key, value): kind "tEXt", "zTXt", "iTXt" or "iTXt-zip"."""
    info = PngImagePlugin.PngInfo()
    for kind, key, value in entries:
        if kind == "tEXt":
            info.add_text(key, value)
        elif kind == "zTXt":
            info.add_text(key, value, zip=True)
        else:
            info.add_itxt(key, value, lang="en", tkey="t", zip=kind == "iTXt-zip")
    return info


def apng(frames: int) -> bytes:
    images = [picture("RGB", (30, 20), seed) for seed in range(frames)]
    return encoded(images[0], "PNG", save_all=True, append_images=images[1:], duration=100)


def mpo() -> bytes:
    return encoded(picture(), "MPO", save_all=True, append_images=[picture(seed=2)], quality=80)


def with_png_exif(order: str, value: int, *, prefix: bytes = b"") -> bytes:
    return before_idat(png(), chunk(b"eXIf", prefix + tiff(order, oriented(order, value))))


# --- the corpus: name -> builder --------------------------------------------------------------------


def jpeg_cases() -> dict[str, Callable[[], bytes]]:
    cases: dict[str, Callable[[], bytes]] = {
        "jpeg L": lambda: jpeg("L"),
        "jpeg RGB": lambda: jpeg(),
        "jpeg CMYK (Adobe)": lambda: jpeg("CMYK"),
        "jpeg RGB progressive": lambda: jpeg(progressive=True),
        "jpeg L progressive": lambda: jpeg("L", progressive=True),
        "jpeg CMYK progressive": lambda: jpeg("CMYK", progressive=True),
        "jpeg RGB 4:4:4": lambda: jpeg(subsampling=0),
        "jpeg RGB large": lambda: jpeg(size=(900, 600)),
        "jpeg optimised tables": lambda: jpeg(optimize=True),
        "jpeg restart markers": lambda: jpeg(restart_marker_blocks=1),
        "jpeg restart rows": lambda: jpeg(restart_marker_rows=1),
        "jpeg comment": lambda: jpeg(comment=b"made for the header test"),
        "jpeg ICC profile": lambda: jpeg(icc_profile=b"\x01" * 3000),
        "jpeg ICC profile in 3 fragments": lambda: jpeg(icc_profile=bytes(range(256)) * 600),
        "jpeg dpi": lambda: jpeg(dpi=(300, 300)),
        "jpeg without JFIF": lambda: without_segment(jpeg(), 0xE0),
        "jpeg RGB with Adobe transform 0": lambda: after_soi(jpeg(), segment(0xEE, b"Adobe\0\x64\0\0\0\0\0")),
        "jpeg RGB with Adobe transform 1": lambda: after_soi(jpeg(), segment(0xEE, b"Adobe\0\x64\0\0\0\0\1")),
        "jpeg Adobe without transform byte": lambda: after_soi(jpeg(), segment(0xEE, b"Adobe\0\x64")),
        "jpeg Adobe too short (Pillow fails)": lambda: after_soi(jpeg(), segment(0xEE, b"Adobe\0")),
        "jpeg JFIF too short (Pillow fails)": lambda: after_soi(without_segment(jpeg(), 0xE0),
                                                                segment(0xE0, b"JFIF\0\1")),
        "jpeg JFIF without density": lambda: after_soi(without_segment(jpeg(), 0xE0), segment(0xE0, b"JFIF\0\1\2")),
        "jpeg fill bytes": lambda: before_marker(jpeg(), 0xC0, b"\xff\xff\xff"),
        "jpeg RST and SOI before the frame": lambda: before_marker(jpeg(), 0xC0, b"\xff\xd0\xff\xd8"),
        "jpeg TEM before the frame": lambda: before_marker(jpeg(), 0xC0, b"\xff\x01"),
        "jpeg junk before the frame": lambda: before_marker(jpeg(), 0xC0, b"\x00\x17"),
        "jpeg escaped ff00 before the frame": lambda: before_marker(jpeg(), 0xC0, b"\xff\x00"),
        "jpeg JPG13 before the frame": lambda: before_marker(jpeg(), 0xC0, b"\xff\xfd"),
        "jpeg EOI before the frame": lambda: before_marker(jpeg(), 0xC0, b"\xff\xd9"),
        "jpeg APP15 and COM": lambda: after_soi(jpeg(), segment(0xEF, b"vendor"), segment(0xFE, b"")),
        "jpeg APP12 Ducky": lambda: after_soi(jpeg(), segment(0xEC, b"Ducky\0\1\0\4\0\0\0\x50\0\0")),
        "jpeg APP1 extended XMP": lambda: after_soi(jpeg(), segment(0xE1, b"http://ns.adobe.com/xmp/extension/\0x")),
        "jpeg APP0 JFXX": lambda: after_soi(jpeg(), segment(0xE0, b"JFXX\0\x13")),
        "jpeg APP2 FlashPix": lambda: after_soi(jpeg(), segment(0xE2, b"FPXR\0\0\0\1")),
        "jpeg empty APP1": lambda: after_soi(jpeg(), segment(0xE1, b"")),
        "jpeg DQT with trailing byte": lambda: before_marker(jpeg(), 0xC0, segment(0xDB, bytes(66))),
        "jpeg 16-bit DQT": lambda: before_marker(jpeg(), 0xC0, segment(0xDB, b"\x11" + bytes(128))),
        "jpeg second frame header": lambda: before_marker(jpeg(), 0xC4, segment(0xC0, b"\x08\0\x10\0\x10\x01\x01\x11\0")),
        "jpeg lossless SOF3": lambda: jpeg().replace(b"\xff\xc0", b"\xff\xc3", 1),
        "jpeg arithmetic SOF9": lambda: jpeg().replace(b"\xff\xc0", b"\xff\xc9", 1),
        "jpeg extended SOF1": lambda: jpeg().replace(b"\xff\xc0", b"\xff\xc1", 1),
        "jpeg height 0 (DNL)": lambda: height_zero(jpeg()),
        "jpeg 12-bit frame": lambda: twelve_bit(jpeg()),
        "jpeg XMP orientation 6": lambda: jpeg(xmp=b'<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'),
        "jpeg XMP orientation 1": lambda: jpeg(xmp=b"<rdf:Description><tiff:Orientation>1</tiff:Orientation>"),
        "jpeg XMP orientation 9": lambda: jpeg(xmp=b'<rdf:Description tiff:Orientation="9"/>'),
        "jpeg XMP orientation 0 under EXIF 1": lambda: exif_jpeg("<", oriented("<", 1), jpeg(
            xmp=b'<rdf:Description tiff:Orientation="6"/>')),
        "jpeg XMP without orientation": lambda: jpeg(xmp=b"<x:xmpmeta/>"),
        "jpeg two XMP, the last rotated": lambda: after_soi(
            jpeg(), segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<tiff:Orientation>1<"),
            segment(0xE1, b"http://ns.adobe.com/xap/1.0/\0<tiff:Orientation>8<")),
        "jpeg Photoshop resolution": lambda: after_soi(jpeg(), photoshop(
            resource(0x03ED, struct.pack(">LHHLHH", 72 << 16, 1, 1, 72 << 16, 1, 1)), resource(0x0404, b"iptc", b"n"))),
        "jpeg Photoshop short resolution": lambda: after_soi(jpeg(), photoshop(resource(0x03ED, b"\0" * 6))),
        "jpeg Photoshop cut after code (Pillow fails)": lambda: after_soi(jpeg(), photoshop(b"8BIM\x04\x04")),
        "jpeg Photoshop cut in code": lambda: after_soi(jpeg(), photoshop(b"8BIM\x04")),
        "jpeg Photoshop cut in size": lambda: after_soi(jpeg(), photoshop(b"8BIM\x04\x04\0\0\0")),
        "jpeg ICC fragment too short (Pillow fails)": lambda: after_soi(jpeg(), segment(0xE2, b"ICC_PROFILE\0\1")),
        "jpeg MPO": mpo,
        "jpeg MPO little-endian index": lambda: after_soi(jpeg(), mpf("<", 2)),
        "jpeg MPF one picture": lambda: after_soi(jpeg(), mpf(">", 1)),
        "jpeg MPF entries cut short": lambda: after_soi(jpeg(), mpf(">", 3, entry_bytes=20)),
        "jpeg MPF non-JPEG picture": lambda: after_soi(jpeg(), mpf(">", 2, attribute=0x07000000)),
        "jpeg MPF Ultra HDR": lambda: after_soi(jpeg(), mpf(">", 2), segment(0xE1, b'x hdrgm:Version="1.0"')),
        "jpeg MPF bad byte order": lambda: after_soi(jpeg(), segment(0xE2, b"MPF\0XX*\0\0\0\0\x08")),
        "jpeg two MPF": lambda: after_soi(jpeg(), mpf(">", 2), mpf(">", 2)),
        "jpeg two Exif": lambda: after_soi(jpeg(), segment(0xE1, b"Exif\0\0" + tiff("<", oriented("<", 1))),
                                           segment(0xE1, b"Exif\0\0" + tiff("<", oriented("<", 6)))),
    }
    for order in ("<", ">"):
        for value in range(0, 10):
            cases[f"jpeg EXIF {order} orientation {value}"] = (
                lambda order=order, value=value: exif_jpeg(order, oriented(order, value)))
        cases[f"jpeg EXIF {order} orientation 6, CMYK"] = lambda order=order: exif_jpeg(
            order, oriented(order, 6), jpeg("CMYK"))
        cases[f"jpeg EXIF {order} orientation 1, progressive L"] = lambda order=order: exif_jpeg(
            order, oriented(order, 1), jpeg("L", progressive=True))
        cases.update(exif_variants(order))
    for value in range(1, 9):  # Pillow's own writer (big-endian), with its JFIF segment
        cases[f"jpeg Pillow EXIF orientation {value}"] = lambda value=value: jpeg(exif=pillow_exif(value))
    return cases


def exif_variants(order: str) -> dict[str, Callable[[], bytes]]:
    """EXIF IFD0 shapes that Pillow reads in its own way: types, counts, offsets, resolution tags."""
    o = order
    variants: dict[str, list[tuple[int, int, int, bytes]]] = {
        "orientation as LONG": [(0x0112, 4, 1, struct.pack(o + "L", 6))],
        "orientation as two SHORTs": [(0x0112, 3, 2, short(o, 1, 6))],
        "orientation as BYTE": [(0x0112, 1, 1, b"\x06")],
        "orientation as RATIONAL": [(0x0112, 5, 1, rational(o, 6, 1))],
        "orientation with unknown type": [(0x0112, 99, 1, short(o, 6))],
        "orientation with count 0": [(0x0112, 3, 0, b"")],
        "orientation twice": [(0x0112, 3, 1, short(o, 1)), (0x0112, 3, 1, short(o, 6))],
        "make pointing past the end": [(0x010F, 2, 64, b""), (0x0112, 3, 1, short(o, 1))],
        "make inside": [(0x010F, 2, 8, b"Pillow\0\0"), (0x0112, 3, 1, short(o, 1))],
        "unknown type elsewhere": [(0x010F, 17, 1, b"abcd"), (0x0112, 3, 1, short(o, 1))],
        "dpi rational": [(0x011A, 5, 1, rational(o, 300, 1)), (0x0128, 3, 1, short(o, 2)),
                         (0x0112, 3, 1, short(o, 1))],
        "dpi zero denominator": [(0x011A, 5, 1, rational(o, 300, 0)), (0x0128, 3, 1, short(o, 3))],
        "dpi as SHORT": [(0x011A, 3, 1, short(o, 96)), (0x0128, 3, 1, short(o, 2))],
        "dpi as one ASCII char (Pillow fails)": [(0x011A, 2, 2, b"7\0"), (0x0128, 3, 1, short(o, 2))],
        "dpi as ASCII": [(0x011A, 2, 4, b"300\0"), (0x0128, 3, 1, short(o, 2))],
        "dpi unit as LONG": [(0x011A, 5, 1, rational(o, 300, 1)), (0x0128, 4, 1, struct.pack(o + "L", 2))],
        "resolution without unit": [(0x011A, 7, 1, b"\x07")],
    }
    cases: dict[str, Callable[[], bytes]] = {
        f"jpeg EXIF {o} {name}": (lambda entries=entries: exif_jpeg(o, entries))
        for name, entries in variants.items()
    }
    cases[f"jpeg EXIF {o} make cut short"] = lambda: after_soi(jpeg(), segment(0xE1, b"Exif\0\0" + tiff(
        o, [(0x010F, 2, 64, b"x" * 64), (0x0112, 3, 1, short(o, 1))])[:-40]))
    cases[f"jpeg EXIF {o} IFD past the end"] = lambda: after_soi(jpeg(), segment(
        0xE1, b"Exif\0\0" + tiff(o, oriented(o, 6), ifd_at=8)[:12]))
    cases[f"jpeg EXIF {o} IFD further in"] = lambda: after_soi(jpeg(), segment(
        0xE1, b"Exif\0\0" + tiff(o, oriented(o, 3), ifd_at=20)))
    cases[f"jpeg EXIF {o} twice prefixed"] = lambda: after_soi(jpeg(), segment(
        0xE1, b"Exif\0\0Exif\0\0" + tiff(o, oriented(o, 6))))
    cases[f"jpeg EXIF {o} header only"] = lambda: after_soi(jpeg(), segment(0xE1, b"Exif\0\0" + tiff(o, [])[:8]))
    return cases


def pillow_exif(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    exif[0x0131] = "header test"
    return exif.tobytes()


def height_zero(data: bytes) -> bytes:
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + b"\0\0" + data[at + 2:]


def twelve_bit(data: bytes) -> bytes:
    at = data.index(b"\xff\xc0") + 4
    return data[:at] + b"\x0c" + data[at + 1:]


def png_cases() -> dict[str, Callable[[], bytes]]:
    palette = chunk(b"PLTE", bytes(range(48)))
    cases: dict[str, Callable[[], bytes]] = {
        "png 1": lambda: png("1"),
        "png L": lambda: png("L"),
        "png LA": lambda: png("LA"),
        "png P": lambda: png("P"),
        "png P 1-bit": lambda: encoded(picture().convert("P", colors=2), "PNG", bits=1),
        "png P 2-bit": lambda: encoded(picture().convert("P", colors=4), "PNG", bits=2),
        "png P 4-bit": lambda: encoded(picture().convert("P", colors=16), "PNG", bits=4),
        "png P with tRNS index": lambda: png("P", transparency=3),
        "png P with tRNS table": lambda: before_idat(png("P"), chunk(b"tRNS", bytes(range(0, 255, 5)))),
        "png RGB": lambda: png(),
        "png RGB large": lambda: png(size=(700, 500)),
        "png RGBA": lambda: png("RGBA"),
        "png RGB with tRNS": lambda: png(transparency=(1, 2, 3)),
        "png L with tRNS": lambda: png("L", transparency=7),
        "png 1 with tRNS": lambda: before_idat(png("1"), chunk(b"tRNS", b"\0\1")),
        "png I;16": lambda: png("I;16"),
        "png L 4-bit (Pillow)": lambda: png("L", bits=4),
        "png dpi": lambda: png(dpi=(144, 144)),
        "png interlaced (hand-made)": lambda: raw_png(20, 10, 8, 2, interlace=1),
        "png interlace method 2": lambda: raw_png(20, 10, 8, 2, interlace=2),
        "png filter method 1 (Pillow fails)": lambda: filter_method(raw_png(20, 10, 8, 2)),
        "png L 2-bit": lambda: raw_png(20, 10, 2, 0),
        "png L 4-bit": lambda: raw_png(20, 10, 4, 0),
        "png RGB 16-bit": lambda: raw_png(20, 10, 16, 2),
        "png LA 16-bit": lambda: raw_png(20, 10, 16, 4),
        "png RGBA 16-bit": lambda: raw_png(20, 10, 16, 6),
        "png P 8-bit hand-made": lambda: raw_png(20, 10, 8, 3, palette),
        "png P without PLTE": lambda: raw_png(20, 10, 8, 3),
        "png RGB 4-bit (no such mode)": lambda: raw_png(20, 10, 4, 2),
        "png width 0": lambda: raw_png(0, 10, 8, 2),
        "png tEXt": lambda: png(pnginfo=text_info(("tEXt", "Comment", "hello"))),
        "png tEXt keyed exif": lambda: png(pnginfo=text_info(("tEXt", "exif", "MM\0*"))),
        "png tEXt without value": lambda: before_idat(png(), chunk(b"tEXt", b"Title")),
        "png zTXt": lambda: png(pnginfo=text_info(("zTXt", "Comment", "hello " * 50))),
        "png iTXt": lambda: png(pnginfo=text_info(("iTXt", "XML:com.adobe.xmp", '<x tiff:Orientation="6"/>'))),
        "png iTXt compressed": lambda: png(pnginfo=text_info(("iTXt-zip", "Comment", "hello " * 50))),
        "png iTXt keyed exif": lambda: png(pnginfo=text_info(("iTXt", "exif", "x"))),
        "png iCCP": lambda: png(icc_profile=b"\x02" * 5000),
        "png iCCP incompressible": lambda: png(icc_profile=random.Random(3).randbytes(4000)),
        "png iCCP over Pillow's limit (Pillow fails)": lambda: png(icc_profile=b"\0" * (1024 * 1024 + 10)),
        "png iCCP unknown method": lambda: before_idat(png(), chunk(b"iCCP", b"p\0\1" + zlib.compress(b"x"))),
        "png iCCP without method": lambda: before_idat(png(), chunk(b"iCCP", b"p\0")),
        "png iCCP broken stream": lambda: before_idat(png(), chunk(b"iCCP", b"p\0\0" + b"\xff" * 2000)),
        "png gAMA cHRM sRGB": lambda: before_idat(png(), chunk(b"gAMA", struct.pack(">I", 45455)),
                                                  chunk(b"cHRM", bytes(32)), chunk(b"sRGB", b"\0")),
        "png short gAMA (Pillow fails)": lambda: before_idat(png(), chunk(b"gAMA", b"\0\0")),
        "png short cHRM (Pillow fails)": lambda: before_idat(png(), chunk(b"cHRM", bytes(31))),
        "png empty sRGB (Pillow fails)": lambda: before_idat(png(), chunk(b"sRGB", b"")),
        "png short pHYs (Pillow fails)": lambda: before_idat(png(), chunk(b"pHYs", bytes(8))),
        "png short tRNS for RGB (Pillow fails)": lambda: before_idat(png(), chunk(b"tRNS", bytes(4))),
        "png tRNS for RGBA (ignored)": lambda: before_idat(png("RGBA"), chunk(b"tRNS", b"\0")),
        "png private chunk": lambda: before_idat(png(), chunk(b"prVt", b"anything")),
        "png bKGD tIME sBIT": lambda: before_idat(png(), chunk(b"bKGD", bytes(6)), chunk(b"tIME", bytes(7)),
                                                  chunk(b"sBIT", b"\x08\x08\x08")),
        "png cICP": lambda: before_idat(png(), chunk(b"cICP", b"\x01\x0d\x00\x01")),
        "png unknown critical chunk": lambda: before_idat(png(), chunk(b"CRIT", b"anything")),
        "png chunk type with a digit": lambda: before_idat(png(), chunk(b"ab1d", b"")),
        "png bad CRC before IDAT": lambda: bad_crc(before_idat(png(), chunk(b"tEXt", b"k\0v"))),
        "png bad CRC in IDAT": lambda: bad_idat_crc(png()),
        "png second IHDR": lambda: before_idat(png(), chunk(b"IHDR", struct.pack(">IIBBBBB", 9, 9, 8, 2, 0, 0, 0))),
        "png IEND before IDAT": lambda: before_idat(png(), chunk(b"IEND", b"")),
        "png trailing data after IEND": lambda: png() + b"trailer",
        "png APNG": lambda: apng(2),
        "png APNG one frame": lambda: apng(1),
        "png acTL short (Pillow fails)": lambda: before_idat(png(), chunk(b"acTL", b"\0\0\0\1")),
        "png APNG default image plus one frame": lambda: before_idat(png(), chunk(b"acTL", struct.pack(">LL", 1, 0))),
        "png APNG two acTL": lambda: before_idat(apng(2), chunk(b"acTL", struct.pack(">LL", 2, 0))),
        "png APNG zero frames": lambda: before_idat(png(), chunk(b"acTL", struct.pack(">LL", 0, 0))),
        "png fcTL without acTL": lambda: before_idat(png(), frame_control(0, 40, 30)),
        "png fcTL sequence 1 (Pillow fails)": lambda: before_idat(png(), frame_control(1, 40, 30)),
        "png fcTL frame too wide (Pillow fails)": lambda: before_idat(png(), frame_control(0, 41, 30)),
        "png eXIf after IDAT": lambda: png()[:-12] + chunk(b"eXIf", tiff("<", oriented("<", 6))) + png()[-12:],
        "png eXIf empty": lambda: before_idat(png(), chunk(b"eXIf", b"")),
        "png eXIf broken": lambda: before_idat(png(), chunk(b"eXIf", b"MM\0*\0\0\0\x40")),
        "png Pillow eXIf orientation 1": lambda: png(exif=pillow_exif(1)),
        "png Pillow eXIf orientation 6": lambda: png(exif=pillow_exif(6)),
    }
    for order in ("<", ">"):
        for value in (0, 1, 2, 3, 5, 6, 8, 9):
            cases[f"png eXIf {order} orientation {value}"] = (
                lambda order=order, value=value: with_png_exif(order, value))
        cases[f"png eXIf {order} with Exif prefix"] = lambda order=order: with_png_exif(
            order, 6, prefix=b"Exif\0\0")
        cases[f"png eXIf {order} with two Exif prefixes"] = lambda order=order: with_png_exif(
            order, 6, prefix=b"Exif\0\0Exif\0\0")
    return cases


def frame_control(sequence: int, width: int, height: int) -> bytes:
    return chunk(b"fcTL", struct.pack(">LLLLLHHBB", sequence, width, height, 0, 0, 1, 10, 0, 0))


def filter_method(data: bytes) -> bytes:
    header = bytearray(data[16:29])
    header[11] = 1
    return data[:8] + chunk(b"IHDR", bytes(header)) + data[33:]


def bad_crc(data: bytes) -> bytes:
    at = data.index(b"tEXt") + 5
    return data[:at] + bytes((data[at] ^ 1,)) + data[at + 1:]


def bad_idat_crc(data: bytes) -> bytes:
    at = data.index(b"IEND") - 5
    return data[:at] + bytes((data[at] ^ 1,)) + data[at + 1:]


CASES: dict[str, Callable[[], bytes]] = {**jpeg_cases(), **png_cases()}

#: Everyday files the fast reader must answer for (else the equivalence would hold trivially).
ANSWERED = [
    "jpeg L", "jpeg RGB", "jpeg CMYK (Adobe)", "jpeg RGB progressive", "jpeg restart markers", "jpeg comment",
    "jpeg ICC profile in 3 fragments", "jpeg without JFIF", "jpeg fill bytes", "jpeg RST and SOI before the frame",
    "jpeg XMP orientation 6", "jpeg Photoshop resolution", "jpeg MPO", "jpeg EXIF < orientation 6",
    "jpeg EXIF > orientation 1", "jpeg Pillow EXIF orientation 3", "jpeg EXIF < dpi rational",
    "png 1", "png L", "png LA", "png P", "png P 2-bit", "png P with tRNS index", "png RGB", "png RGBA",
    "png I;16", "png RGB 16-bit", "png tEXt", "png iTXt", "png iCCP", "png iCCP incompressible", "png APNG",
    "png Pillow eXIf orientation 6", "png eXIf < orientation 8", "png gAMA cHRM sRGB", "png APNG one frame",
    "png APNG default image plus one frame", "png fcTL without acTL", "png bKGD tIME sBIT",
    "jpeg APP0 JFXX", "jpeg APP2 FlashPix",
]

#: Segments and chunks the reader does not know: a later Pillow may read them, so Pillow decides.
UNKNOWN_TO_THE_READER = ["jpeg APP15 and COM", "jpeg APP12 Ducky", "jpeg APP1 extended XMP", "jpeg MPF Ultra HDR",
                         "png private chunk", "png cICP", "png zTXt", "png iTXt compressed"]


# --- the reference: the Pillow-only path -----------------------------------------------------------


def pillow_pass_through(data: bytes, source: str, policy: ImagesConfig) -> Prepared | None:
    """``preflight.pass_through`` as it was before the hand-read header: Pillow's lazy open decides."""
    header = preflight._inspect(data, source, policy)
    if header.passable and preflight._ends_well(header.image, data):
        return preflight._as_is(header, data)
    return None


Decision = Callable[[bytes, str, ImagesConfig], Prepared | None]


def outcome(decide: Decision, data: bytes, policy: ImagesConfig) -> tuple[Any, ...]:
    """What a decision amounts to: the bytes, mime and report sent, None, or the error raised."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = decide(data, "corpus-file", policy)
    except ImageError as exc:
        return "error", type(exc), exc.error_type, str(exc)
    if prepared is None:
        return ("none",)
    return "sent", prepared.data, prepared.mime, prepared.report


def pillow_view(data: bytes) -> dict[str, Any]:
    """What Pillow's lazy open says, in ``ImageHeader`` terms (orientation as pre-flight reads it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = Image.open(io.BytesIO(data), formats=["JPEG", "PNG"])
        return {"format": "JPEG" if image.format == "MPO" else image.format, "width": image.width,
                "height": image.height, "mode": image.mode, "orientation": preflight._orientation(image),
                "multi_picture": image.format == "MPO",
                "progressive": bool(image.info.get("progressive")),
                "animated": bool(getattr(image, "is_animated", False)) and image.format == "PNG"}


def header_view(header: ImageHeader) -> dict[str, Any]:
    view = header._asdict()
    del view["ends_well"]
    return view


def assert_same_decisions(data: bytes, policies: tuple[ImagesConfig, ...] = POLICIES) -> None:
    for policy in policies:
        fast = outcome(pass_through, data, policy)
        assert fast == outcome(pillow_pass_through, data, policy), policy
        if fast[0] == "sent":
            assert outcome(prepare, data, policy) == fast, policy


def assert_header_is_pillows(data: bytes) -> None:
    header = read_header(data)
    if header is None:
        return
    if header.width * header.height > 2 * (Image.MAX_IMAGE_PIXELS or header.width * header.height):
        with pytest.raises(Image.DecompressionBombError):  # Pillow will not even open it: nothing to compare
            pillow_view(data)
        return
    assert header_view(header) == pillow_view(data)
    assert header.ends_well == (data.endswith(b"\xff\xd9") if header.format == "JPEG" else data[-8:-4] == b"IEND")


# --- tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_decides_as_the_pillow_path(name: str) -> None:
    data = CASES[name]()
    assert_header_is_pillows(data)
    assert_same_decisions(data)


@pytest.mark.parametrize("name", ANSWERED)
def test_everyday_files_are_answered_without_pillow(name: str) -> None:
    assert read_header(CASES[name]()) is not None


@pytest.mark.parametrize("name", UNKNOWN_TO_THE_READER)
def test_what_the_reader_does_not_know_is_left_to_pillow(name: str) -> None:
    data = CASES[name]()
    assert read_header(data) is None
    assert outcome(pass_through, data, ImagesConfig())[0] == "sent"  # Pillow's path still sends it as it is


def test_plain_files_pass_through_by_header() -> None:
    """The common case really takes the fast path: same answer, and it is an answer."""
    for data in (jpeg(), jpeg("L", progressive=True), png("RGBA"), png("P", transparency=3), mpo()):
        header = read_header(data)
        assert header is not None and header.orientation == 1 and header.ends_well
        assert outcome(pass_through, data, ImagesConfig())[0] == "sent"


@pytest.mark.parametrize("name", ["jpeg EXIF < dpi rational", "jpeg Pillow EXIF orientation 6", "jpeg MPO",
                                  "jpeg Photoshop resolution", "jpeg ICC profile in 3 fragments", "png iCCP",
                                  "png eXIf > orientation 1", "png tEXt", "png P with tRNS table", "png APNG"])
def test_every_truncation_decides_as_the_pillow_path(name: str) -> None:
    data = CASES[name]()
    header_end = scan_start(data)
    cuts = sorted({*range(0, min(header_end, 1500)), *range(max(0, header_end - 24), header_end + 16),
                   *range(0, len(data) + 1, max(1, len(data) // 60)), len(data) - 1, len(data) - 2, len(data) - 8})
    for cut in cuts:
        piece = data[:cut]
        assert_header_is_pillows(piece)
        assert_same_decisions(piece, POLICIES[:1])


@pytest.mark.parametrize("name", ["jpeg EXIF > dpi rational", "jpeg EXIF < orientation 1", "jpeg MPO",
                                  "jpeg Photoshop resolution", "jpeg XMP orientation 1", "jpeg CMYK (Adobe)",
                                  "png Pillow eXIf orientation 1", "png P with tRNS index", "png iTXt",
                                  "png iCCP", "png APNG", "png L with tRNS"])
def test_every_header_byte_mutation_decides_as_the_pillow_path(name: str) -> None:
    """Each byte of the header set to 0x00, 0xFF, 0x01 and flipped in its top bit (PNG chunks keep a valid
    CRC, so the mutation reaches the chunk's meaning): whatever the reader makes of it, pass-through must
    come out as Pillow's path has it."""
    data = CASES[name]()
    for at in range(2, min(scan_start(data), 2000)):
        for value in {0x00, 0xFF, 0x01, data[at] ^ 0x80}:
            mutated = mutate(data, at, value)
            assert_header_is_pillows(mutated)
            assert_same_decisions(mutated, POLICIES[:1])


def test_garbage_is_left_to_pillow() -> None:
    rng = random.Random(11)
    samples = [b"", b"\xff\xd8", b"\xff\xd8\xff", PNG_SIGNATURE, PNG_SIGNATURE + b"\0\0\0\x0dIHDR",
               b"GIF89a" + rng.randbytes(40), b"not an image at all"]
    samples += [prefix + rng.randbytes(size) for prefix in (b"\xff\xd8\xff", PNG_SIGNATURE, b"")
                for size in (1, 7, 64, 700)]
    for data in samples:
        if data[:3] != b"\xff\xd8\xff" and not data.startswith(PNG_SIGNATURE):
            assert read_header(data) is None
        assert_header_is_pillows(data)
        assert_same_decisions(data, POLICIES[:2])


def test_a_header_over_pillows_bomb_warning_is_left_to_pillow() -> None:
    """90 MP: under the policy's limit but over Pillow's warning level; Pillow's path warns, so it decides."""
    data = raw_png(10_000, 9_000, 1, 0)[:33] + chunk(b"IDAT", b"") + chunk(b"IEND", b"")
    header = read_header(data)
    assert header is not None and header.width * header.height > (Image.MAX_IMAGE_PIXELS or 0)
    with pytest.warns(Image.DecompressionBombWarning):
        assert pass_through(data, "big", ImagesConfig()) is not None


def mutate(data: bytes, at: int, value: int) -> bytes:
    """``data`` with byte ``at`` set to ``value``; in a PNG chunk header or body (not IDAT) the CRC is redone."""
    mutated = bytearray(data)
    mutated[at] = value
    pos = 8 if data.startswith(PNG_SIGNATURE) else len(data)
    while pos + 8 <= len(data):
        stop = pos + 8 + struct.unpack(">I", data[pos:pos + 4])[0]
        if pos + 4 <= at < stop and data[pos + 4:pos + 8] != b"IDAT":
            mutated[stop:stop + 4] = struct.pack(">I", zlib.crc32(mutated[pos + 4:stop]))
            break
        pos = stop + 4
    return bytes(mutated)


def scan_start(data: bytes) -> int:
    """Where the header ends: JPEG's SOS segment, PNG's first IDAT (the whole data when neither is found)."""
    at = data.find(b"\xff\xda") if data.startswith(b"\xff\xd8") else data.find(b"IDAT")
    return at + 8 if at >= 0 else len(data)


def test_a_palette_png_without_its_palette_fails_as_corrupt() -> None:
    """Re-encoding it (here to JPEG) must end as a precise error, not as Pillow's AssertionError."""
    data, to_jpeg = CASES["png P without PLTE"](), ImagesConfig(format="jpeg")
    assert read_header(data) is None and outcome(pass_through, data, to_jpeg) == ("none",)
    assert outcome(prepare, data, to_jpeg)[:3] == ("error", ImageError, "image_corrupt")
