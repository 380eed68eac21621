"""Image pre-flight, the synchronous part: bytes in, the bytes to send out (runs in a worker thread).

Fast path first: an image already in a format endpoints accept, inside the size policy, upright and
structurally complete is sent as its original bytes after a lazy header parse (no pixel decode). For JPEG
and PNG that parse is ``imageheader.read_header`` (no Pillow); whenever it cannot vouch for the file alone,
Pillow's lazy ``Image.open`` decides, as it does for every other format.
Everything else is decoded (JPEGs at reduced scale via ``Image.draft``), normalised to 8-bit
L/LA/RGB/RGBA, turned upright, resized and re-encoded, shrinking until it fits ``max_bytes``.
"""

from __future__ import annotations

import functools
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from PIL import Image

from pipeline.core.errors import ImageError
from pipeline.edges.imageheader import ImageHeader, read_header

if TYPE_CHECKING:  # only for hints: a worker process never imports pydantic and the config (see PixelPolicy)
    from pipeline.core.config import ImagesConfig

#: Formats Pillow may open here. Deliberately short: EPS (Ghostscript) and other exotic plugins stay out.
#: (MPO, the multi-picture JPEG of phones, comes in through the JPEG opener.)
READABLE_FORMATS = (
    "JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "DIB", "ICO", "PPM", "TGA", "AVIF", "JPEG2000",
    "QOI", "PCX", "SGI",
)

#: Formats endpoints accept as-is, with the modes they accept them in (CMYK / 16-bit are re-encoded).
PASS_THROUGH_MODES: dict[str, frozenset[str]] = {
    "JPEG": frozenset({"L", "RGB"}),
    "MPO": frozenset({"L", "RGB"}),  # a JPEG with extra pictures appended (phones); the first one is a JPEG
    "PNG": frozenset({"1", "L", "LA", "P", "RGB", "RGBA"}),
    "GIF": frozenset({"L", "P"}),
    "WEBP": frozenset({"RGB", "RGBA"}),
}

MIME_BY_FORMAT = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif",
                  "WEBP": "image/webp"}

#: ``sniff_mime`` answer -> the one Pillow opener to try (AVIF only where this Pillow build reads it).
_FORMAT_BY_MIME = {"image/jpeg": "JPEG", "image/png": "PNG", "image/gif": "GIF", "image/webp": "WEBP",
                   "image/tiff": "TIFF", "image/bmp": "BMP", "image/avif": "AVIF"}

#: ``images.format`` value -> Pillow format name of the encoder.
TARGET_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}

#: ftyp brands of the ISO-BMFF image family (HEIC/HEIF need pillow-heif; AVIF Pillow reads natively).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

#: EXIF orientation -> the transpose that makes the image upright (as ``ImageOps.exif_transpose``).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

_OPENAI_HIGH_BOX, _OPENAI_HIGH_SHORT, _OPENAI_LOW_BOX = 2048, 768, 512
_SHRINK_QUALITIES = (75, 60, 45, 30)
_MIN_SIDE = 16
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})
_HEIF_EXTRA_HINT = "install the optional extra: pip install 'pipeline[heif]'"


@dataclass(frozen=True, slots=True)
class PixelPolicy:
    """What pre-flight reads of ``images``, as a plain object: sent to a worker process with each image
    instead of the ``ImagesConfig`` itself, so that the fork server and its workers never import pydantic
    and the config schema (0.15 of the fork server's 0.2 CPU-s of imports, before the first photo). A new
    image setting that pre-flight reads must be added here too (a test reads pre-flight's ``policy.*``)."""

    fit: str
    max_side: int | None
    max_pixels: int | None
    format: str
    quality: int
    max_bytes: int | None
    background_rgb: tuple[int, int, int]
    max_image_pixels: int
    max_source_bytes: int

    @classmethod
    def of(cls, images: ImagesConfig) -> PixelPolicy:
        return cls(images.fit, images.max_side, images.max_pixels, images.format, images.quality,
                   images.max_bytes, images.background_rgb, images.max_image_pixels, images.max_source_bytes)


#: Either serves: the config in this process, its ``PixelPolicy`` copy in a worker.
Policy = Union["ImagesConfig", PixelPolicy]


@dataclass(frozen=True, slots=True)
class Prepared:
    """What pre-flight decided to send: ``data`` is the original object itself on the fast path."""

    data: bytes
    mime: str
    report: dict[str, Any]


def sniff_mime(head: bytes) -> str | None:
    """The image type from the first 16 bytes; the file name's suffix is never trusted."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if head[:2] == b"BM" and len(head) >= 14:
        return "image/bmp"
    if head[4:8] == b"ftyp":
        if head[8:12] in _AVIF_BRANDS:
            return "image/avif"
        if head[8:12] in _HEIF_BRANDS:
            return "image/heic"
    return None


#: Leading bytes of the files most often found where an image was expected -> what to call them.
_NON_IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "a PDF document"),
    (b"PK\x03\x04", "a ZIP archive (or a document packed as one: docx, xlsx, epub)"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Microsoft Office document"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\x7fELF", "an executable (ELF)"),
    (b"8BPS", "a Photoshop document (PSD)"),
    (b"ID3", "an MP3 audio file"),
    (b"OggS", "an Ogg audio/video file"),
    (b"fLaC", "a FLAC audio file"),
    (b"\x1a\x45\xdf\xa3", "a Matroska/WebM video"),
)


def describe_non_image(head: bytes) -> str:
    """What a file that is not a readable image is, in words (``a PDF document``, ``an HTML page``), from its
    first bytes. A message names the type and never quotes the bytes: they are someone's data."""
    for magic, name in _NON_IMAGE_MAGIC:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF":
        return {b"WAVE": "a WAV audio file", b"AVI ": "an AVI video"}.get(head[8:12], "a RIFF media file")
    if head[4:8] == b"ftyp":
        return "an MP4/QuickTime video or other ISO media file"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # a multi-byte character cut by the 512-byte window is still text
        text = head[:exc.start].decode("utf-8") if exc.start > len(head) - 4 else ""
    if not text or not all(c.isprintable() or c in "\t\r\n\f" for c in text):
        return "binary data of an unknown type"
    return _text_kind(text.lstrip("\ufeff \t\r\n").lower())


def _text_kind(text: str) -> str:
    if text.startswith(("<!doctype html", "<html")):
        return "an HTML page (an error page saved in place of the image?)"
    if "<svg" in text:
        return "an SVG drawing (vector images are not sent; convert it to PNG)"
    if text.startswith("<?xml"):
        return "an XML document"
    if text.startswith(("{", "[")):
        return "JSON text"
    return "plain text"


def target_size(width: int, height: int, policy: Policy) -> tuple[int, int]:
    """The size to send: the policy's rules combined (smallest wins); never larger than the source.

    ``openai-high`` is OpenAI's own rule (fit in 2048x2048, then the shortest side down to 768), so
    4000x3000 becomes 1024x768; ``openai-low`` fits in 512x512. Sides are floored so no limit is crossed.
    """
    scale = 1.0
    long_side, short_side = max(width, height), min(width, height)
    if policy.fit == "openai-high":
        scale = min(scale, _OPENAI_HIGH_BOX / long_side)
        scale = min(scale, _OPENAI_HIGH_SHORT / short_side)
    elif policy.fit == "openai-low":
        scale = min(scale, _OPENAI_LOW_BOX / long_side)
    if policy.max_side is not None:
        scale = min(scale, policy.max_side / long_side)
    if policy.max_pixels is not None:
        scale = min(scale, math.sqrt(policy.max_pixels / (width * height)))
    if scale >= 1.0:
        return width, height
    return max(1, int(width * scale + 1e-6)), max(1, int(height * scale + 1e-6))


def pass_through(data: bytes, source: str, policy: Policy) -> Prepared | None:
    """Header-only decision, cheap enough for the event loop: the original bytes when they can go as they
    are, None when pixel work (or a verifying decode) is needed; definite failures raise ``ImageError``."""
    fast = _pass_through_by_header(data, policy)
    if fast is not None:
        return fast
    header = _inspect(data, source, policy)
    if header.passable and _ends_well(header.image, data):
        return _as_is(header, data)
    return None


def prepare(data: bytes, source: str, policy: Policy, *, use_draft: bool = True) -> Prepared:
    """Validate ``data`` and decide what to send; raises ``ImageError`` naming ``source`` and the fix.

    ``use_draft=False`` exists for the benchmark (full-scale JPEG decode before the resize).
    """
    fast = _pass_through_by_header(data, policy)
    if fast is not None:
        return fast
    header = _inspect(data, source, policy)
    image, size = header.image, header.size
    if header.passable:
        if not _ends_well(image, data):
            _load(image, source)  # raises image_corrupt when the data really is cut short
        return _as_is(header, data)
    source_mode = image.mode
    pixels = _standard_mode(_decode(image, size, source, use_draft))
    if pixels.size != size:
        pixels = pixels.resize(size, Image.Resampling.LANCZOS)
    if header.orientation in _UPRIGHT:
        pixels = pixels.transpose(_UPRIGHT[header.orientation])
    out_format = _output_format(image.format or "", pixels, policy)
    if out_format == "JPEG":
        pixels = _flatten(pixels, policy.background_rgb)
    icc = _matching_icc(image.info.get("icc_profile"), source_mode, pixels.mode)
    encoded, sent = _encode_within(pixels, out_format, policy, source, icc)
    return Prepared(encoded, MIME_BY_FORMAT[out_format], {
        **header.original, "sent_format": out_format, "sent_width": sent.width, "sent_height": sent.height,
        "sent_bytes": len(encoded), "image_action": "re_encoded",
    })


@dataclass(frozen=True, slots=True)
class _Header:
    """What the header says, and whether the original bytes may go as they are."""

    image: Image.Image
    orientation: int
    size: tuple[int, int]  # target size, in stored (pre-rotation) orientation
    original: dict[str, Any]  # the report's image_* keys
    passable: bool


def _inspect(data: bytes, source: str, policy: Policy) -> _Header:
    if not data:
        raise ImageError(f"{source}: image file is empty (0 bytes); remove the row or fix the file",
                         error_type="image_empty")
    image = _open(data, source, policy.max_image_pixels)
    width, height = image.size
    _check_pixels(width, height, policy.max_image_pixels, source)
    orientation = _orientation(image)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    original = {"image_format": _format_name(image), "image_width": upright[0], "image_height": upright[1],
                "image_bytes": len(data)}
    size = target_size(width, height, policy)
    passable = _can_pass_through(image, data, policy, orientation, size)
    return _Header(image, orientation, size, original, passable)


def _pass_through_by_header(data: bytes, policy: Policy) -> Prepared | None:
    """The pass-through answer from the hand-read JPEG/PNG header, without Pillow (a few us instead of
    tens). Only ever a yes: None means "ask Pillow", which also keeps every error message Pillow's."""
    header = read_header(data)
    if header is None or not _header_passable(header, data, policy):
        return None
    fmt = "MPO" if header.multi_picture else header.format
    width, height, name = header.width, header.height, header.format  # report name: an MPO is a JPEG
    return Prepared(data, MIME_BY_FORMAT[fmt], {
        "image_format": name, "image_width": width, "image_height": height, "image_bytes": len(data),
        "sent_format": name, "sent_width": width, "sent_height": height, "sent_bytes": len(data),
        "image_action": "pass_through",
    })


def _header_passable(header: ImageHeader, data: bytes, policy: Policy) -> bool:
    """``_can_pass_through`` and ``_ends_well`` on a hand-read header; False also wherever the Pillow path
    would raise or warn (over ``max_image_pixels`` or Pillow's own bomb limit), so that it does so."""
    pixels = header.width * header.height
    bomb_limit = Image.MAX_IMAGE_PIXELS  # Pillow warns above it (and refuses above twice it) at open
    if pixels > policy.max_image_pixels or (bomb_limit is not None and pixels > bomb_limit):
        return False
    if header.animated or header.orientation != 1 or not header.ends_well:
        return False
    fmt = "MPO" if header.multi_picture else header.format
    if header.mode not in PASS_THROUGH_MODES[fmt]:
        return False
    if policy.format != "keep" and TARGET_FORMATS[policy.format] != header.format:
        return False
    if policy.max_bytes is not None and len(data) > policy.max_bytes:
        return False
    return target_size(header.width, header.height, policy) == (header.width, header.height)


def _as_is(header: _Header, data: bytes) -> Prepared:
    image = header.image
    return Prepared(data, MIME_BY_FORMAT[image.format or ""], {
        **header.original, "sent_format": header.original["image_format"], "sent_width": image.width,
        "sent_height": image.height, "sent_bytes": len(data), "image_action": "pass_through",
    })


# -- opening and checking ---------------------------------------------------------------------------


def _check_pixels(width: int, height: int, limit: int, source: str) -> None:
    """The decompression-bomb guard, applied to the header's size before any pixel is decoded."""
    if width * height > limit:
        raise ImageError(
            f"{source}: image is {width}x{height} ({width * height / 1e6:.1f} MP), over "
            f"images.max_image_pixels={limit}; refused before decoding (possible decompression bomb); "
            "raise images.max_image_pixels if the image is genuine",
            error_type="image_too_large",
        )


def _open(data: bytes, source: str, max_pixels: int) -> Image.Image:
    """Lazy open (header only); every failure becomes a precise per-row error."""
    mime = sniff_mime(data[:16])
    if mime == "image/heic":
        return _open_heif(data, source, "HEIC/HEIF", max_pixels)
    try:
        return Image.open(io.BytesIO(data), formats=_formats_for(mime))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{source}: refused before decoding as a possible decompression bomb ({exc}); "
                         "images.max_image_pixels cannot lift Pillow's own hard limit",
                         error_type="image_too_large") from None
    except Image.UnidentifiedImageError:
        if mime == "image/avif":
            return _open_heif(data, source, "AVIF", max_pixels)
        if mime is not None:
            raise ImageError(f"{source}: looks like {mime} but its header cannot be parsed; the file is "
                             "truncated or corrupt; re-export it", error_type="image_corrupt") from None
        raise ImageError(
            f"{source}: not an image this pipeline can read: the file is {describe_non_image(data[:512])}; "
            f"readable formats: {', '.join(READABLE_FORMATS)}, HEIC (extra); fix the path or convert the file",
            error_type="image_unsupported",
        ) from None
    except Exception as exc:  # Pillow plugins raise many kinds on hostile headers
        raise ImageError(f"{source}: image header cannot be parsed ({type(exc).__name__}: {exc}); the file "
                         "is truncated or corrupt; re-export it", error_type="image_corrupt") from None


def _formats_for(mime: str | None) -> tuple[str, ...]:
    """Only the sniffed format's opener when there is one (a JPEG's also yields MPO): trying the others
    costs time and could only turn a corrupt file into a misread one; all readable formats otherwise."""
    fmt = _FORMAT_BY_MIME.get(mime or "")
    openable = _openable_formats()
    return (fmt,) if fmt in openable else openable


@functools.cache
def _openable_formats() -> tuple[str, ...]:
    """``READABLE_FORMATS`` this Pillow build registers (``Image.open`` raises KeyError on the others)."""
    Image.init()  # a no-op once done
    return tuple(name for name in READABLE_FORMATS if name in Image.OPEN)


def _open_heif(data: bytes, source: str, kind: str, max_pixels: int) -> Image.Image:
    """HEIC/HEIF (and AVIF where Pillow lacks it) through the optional ``pillow-heif`` package."""
    try:
        import pillow_heif  # type: ignore[import-not-found]
    except ImportError:
        raise ImageError(f"{source}: is a {kind} image and reading it needs pillow-heif; {_HEIF_EXTRA_HINT}",
                         error_type="image_needs_extra") from None
    try:
        heif = pillow_heif.open_heif(io.BytesIO(data), convert_hdr_to_8bit=True)
        _check_pixels(*heif.size, max_pixels, source)  # to_pillow() decodes: check first
        image: Image.Image = heif.to_pillow()
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{source}: {kind} data cannot be decoded ({type(exc).__name__}: {exc}); the file "
                         "is truncated or corrupt; re-export it", error_type="image_corrupt") from None
    image.format = "HEIF" if kind != "AVIF" else "AVIF"
    return image


def _format_name(image: Image.Image) -> str:
    """The format for the report; an MPO is a JPEG to everyone but Pillow."""
    fmt = image.format or "unknown"
    return "JPEG" if fmt == "MPO" else fmt


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1 = upright) without decoding: PNG's ``getexif`` would load the pixels."""
    try:
        if image.format == "PNG":
            raw = image.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = image.getexif()
        value = exif.get(0x0112, 1)
    except Exception:  # a broken EXIF block must not fail an otherwise good image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _can_pass_through(image: Image.Image, data: bytes, policy: Policy, orientation: int,
                      size: tuple[int, int]) -> bool:
    """True when the original bytes are exactly what re-encoding would aim for."""
    fmt = image.format or ""
    if image.mode not in PASS_THROUGH_MODES.get(fmt, ()):
        return False
    if policy.format != "keep" and TARGET_FORMATS[policy.format] != ("JPEG" if fmt == "MPO" else fmt):
        return False
    if orientation != 1 or size != image.size:
        return False
    if policy.max_bytes is not None and len(data) > policy.max_bytes:
        return False
    return fmt == "MPO" or not getattr(image, "is_animated", False)


def _ends_well(image: Image.Image, data: bytes) -> bool:
    """Cheap end-of-data check (EOI, IEND, trailer, RIFF size); False means "decode to be sure"."""
    fmt = image.format
    if fmt in ("JPEG", "MPO"):
        return data.endswith(b"\xff\xd9")
    if fmt == "PNG":
        return data[-8:-4] == b"IEND"
    if fmt == "GIF":
        return data.endswith(b";")
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return False


def _load(image: Image.Image, source: str) -> None:
    try:
        image.load()
    except Exception as exc:
        raise ImageError(f"{source}: {_format_name(image)} data is truncated or corrupt ({exc}); "
                         "re-export or re-download the file", error_type="image_corrupt") from None


# -- pixels -----------------------------------------------------------------------------------------


def _decode(image: Image.Image, size: tuple[int, int], source: str, use_draft: bool) -> Image.Image:
    """Decode the first frame; a JPEG that will shrink is decoded at the smallest scale >= ``size``."""
    if use_draft and image.format in ("JPEG", "MPO") and size != image.size:
        image.draft(None, size)
    _load(image, source)
    if image.mode in ("P", "PA") and image.palette is None:  # a PNG without PLTE: Pillow asserts later
        raise ImageError(f"{source}: {_format_name(image)} palette image has no palette; the file is corrupt; "
                         "re-export it", error_type="image_corrupt")
    return image


def _standard_mode(image: Image.Image) -> Image.Image:
    """8-bit L / LA / RGB / RGBA; transparency kept as alpha, 16-bit scaled (Pillow's convert clips)."""
    mode = image.mode
    if mode in ("L", "RGB") and "transparency" in image.info:
        return image.convert("LA" if mode == "L" else "RGBA")
    if mode in ("L", "LA", "RGB", "RGBA"):
        return image
    if mode in ("P", "PA"):
        return image.convert("RGBA" if image.has_transparency_data else "RGB")
    if mode.startswith("I;16") or mode == "I":
        low, high = image.getextrema()  # type: ignore[misc]
        wide = image.convert("I")
        return (wide.point(lambda v: v * (1 / 256)) if high > 255 else wide).convert("L")
    if mode in ("1", "F"):
        return image.convert("L")
    if mode == "La":
        return image.convert("LA")
    if mode == "RGBa":
        return image.convert("RGBA")
    return image.convert("RGBA" if image.has_transparency_data else "RGB")  # CMYK, YCbCr, LAB, HSV ...


def _output_format(source_format: str, image: Image.Image, policy: Policy) -> str:
    """``keep`` keeps JPEG/PNG/WebP; GIF becomes PNG; others become PNG with alpha, else JPEG."""
    if policy.format != "keep":
        return TARGET_FORMATS[policy.format]
    if source_format in ("JPEG", "MPO"):
        return "JPEG"
    if source_format in ("PNG", "WEBP"):
        return source_format
    if source_format == "GIF" or image.mode in ("LA", "RGBA"):
        return "PNG"
    return "JPEG"


def _flatten(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """JPEG has no alpha: composite onto the configured background instead of dropping the channel."""
    if image.mode not in ("LA", "RGBA"):
        return image
    rgba = image.convert("RGBA")
    flat = Image.new("RGB", rgba.size, background)
    flat.paste(rgba, mask=rgba.getchannel("A"))
    return flat


def _matching_icc(icc: bytes | None, source_mode: str, sent_mode: str) -> bytes | None:
    """Keep the colour profile only while it still describes the pixels (grey stays grey, RGB stays RGB)."""
    if not icc or source_mode == "CMYK":
        return None
    source_grey = source_mode in _GREY_MODES or source_mode.startswith("I;16")
    return icc if source_grey == (sent_mode in _GREY_MODES) else None


def _encode(image: Image.Image, fmt: str, quality: int, icc: bytes | None) -> bytes:
    buffer = io.BytesIO()
    extra: dict[str, Any] = {"icc_profile": icc} if icc else {}
    if fmt == "PNG":
        image.save(buffer, "PNG", compress_level=6, **extra)
    else:
        image.save(buffer, fmt, quality=quality, **extra)
    return buffer.getvalue()


def _encode_within(image: Image.Image, fmt: str, policy: Policy, source: str,
                   icc: bytes | None) -> tuple[bytes, Image.Image]:
    """Encode; over ``max_bytes``, lower the quality (lossy formats), then shrink, or fail the row."""
    quality = policy.quality
    encoded = _encode(image, fmt, quality, icc)
    limit = policy.max_bytes
    if limit is None or len(encoded) <= limit:
        return encoded, image
    if fmt != "PNG":
        for quality in (q for q in _SHRINK_QUALITIES if q < policy.quality):
            encoded = _encode(image, fmt, quality, icc)
            if len(encoded) <= limit:
                return encoded, image
    smaller = image
    for _ in range(12):
        factor = min(0.9, max(0.5, math.sqrt(limit / len(encoded)) * 0.95))
        size = (int(smaller.width * factor), int(smaller.height * factor))
        if min(size) < _MIN_SIDE:
            break
        smaller = image.resize(size, Image.Resampling.LANCZOS)
        encoded = _encode(smaller, fmt, quality, icc)
        if len(encoded) <= limit:
            return encoded, smaller
    raise ImageError(
        f"{source}: cannot encode under images.max_bytes={limit}: the smallest attempt was {len(encoded)} "
        f"bytes ({fmt} {smaller.width}x{smaller.height}, quality {quality}); raise images.max_bytes or "
        "set images.max_side", error_type="image_too_large",
    )
