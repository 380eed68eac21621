"""Honest, deterministic image descriptions for the local endpoint.

The local endpoint is not a vision model: it measures a few plain facts about the pixels (size, format,
dominant colours, brightness, amount of detail) and phrases them as a caption. Statistics are taken on a
~64 px thumbnail (JPEGs are decoded at reduced scale via ``Image.draft``) so large images stay cheap.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, cast

from PIL import Image, ImageFilter, ImageStat

#: Side of the thumbnail that all statistics are computed on.
THUMBNAIL_SIDE = 64

#: Named colours a pixel is snapped to (nearest by RGB distance).
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (0, 0, 0)),
    ("dark grey", (64, 64, 64)),
    ("grey", (128, 128, 128)),
    ("light grey", (200, 200, 200)),
    ("white", (255, 255, 255)),
    ("red", (220, 30, 30)),
    ("dark red", (120, 10, 10)),
    ("orange", (255, 140, 0)),
    ("yellow", (250, 225, 30)),
    ("brown", (130, 80, 40)),
    ("green", (40, 170, 40)),
    ("dark green", (10, 80, 20)),
    ("teal", (0, 128, 128)),
    ("light blue", (130, 200, 240)),
    ("blue", (30, 80, 230)),
    ("dark blue", (10, 20, 110)),
    ("purple", (130, 40, 160)),
    ("pink", (250, 150, 200)),
)

#: Palette index used to mark transparent pixels so they are not counted as a colour.
_TRANSPARENT_INDEX = 255

#: (upper bound of mean CIE L*, word) — first bound the mean falls under wins.
BRIGHTNESS_WORDS: tuple[tuple[float, str], ...] = (
    (15.0, "very dark"),
    (30.0, "dark"),
    (45.0, "fairly dark"),
    (60.0, "mid-toned"),
    (75.0, "fairly bright"),
    (90.0, "bright"),
    (101.0, "very bright"),
)

#: (upper bound of mean edge strength on the thumbnail, word).
DETAIL_WORDS: tuple[tuple[float, str], ...] = (
    (6.0, "little detail"),
    (30.0, "moderate detail"),
    (256.0, "a lot of detail"),
)

_FORMAT_NAMES = {"WEBP": "WebP", "JPEG": "JPEG", "PNG": "PNG", "GIF": "GIF", "TIFF": "TIFF", "BMP": "BMP"}


class UnreadableImage(ValueError):
    """The bytes are not an image Pillow can open and decode."""


@dataclass(frozen=True)
class ImageFacts:
    """What the local endpoint can truthfully say about one image."""

    width: int
    height: int
    format: str
    orientation: str
    colors: tuple[str, ...]
    brightness: str
    detail: str
    has_transparency: bool
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (colours as a list)."""
        data = asdict(self)
        data["colors"] = list(self.colors)
        return data


def describe_image(data: bytes) -> ImageFacts:
    """Measure ``data`` (encoded image bytes); raises :class:`UnreadableImage` if Pillow can't read it."""
    return _describe(data, hashlib.sha256(data).hexdigest())


def _describe(data: bytes, digest: str) -> ImageFacts:
    """:func:`describe_image` with the digest already known (the cache computes it first)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return _measure(img, digest)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot read image: {exc}") from exc


def _measure(img: Image.Image, digest: str) -> ImageFacts:
    """Collect the facts from an opened (not yet decoded) image."""
    width, height = _displayed_size(img)
    fmt = img.format or "unknown"
    if fmt == "JPEG":
        img.draft("RGB", (THUMBNAIL_SIDE * 2, THUMBNAIL_SIDE * 2))
    thumb = _eight_bit(img).convert("RGBA")
    thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    rgb = thumb.convert("RGB")
    opaque = thumb.getchannel("A").point(lambda a: 255 if a >= 128 else 0)
    return ImageFacts(
        width=width,
        height=height,
        format=fmt,
        orientation=_orientation(width, height),
        colors=_dominant_colors(rgb, opaque),
        brightness=_brightness_word(rgb, opaque),
        detail=_detail_word(rgb),
        has_transparency=_min_value(thumb.getchannel("A")) < 255,
        sha256=digest,
    )


def _eight_bit(img: Image.Image) -> Image.Image:
    """16/32-bit integer greyscale (e.g. 16-bit PNG) scaled to 8 bits; Pillow's convert would clip it."""
    if img.mode.startswith("I;16") or img.mode == "I":
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return img


def _displayed_size(img: Image.Image) -> tuple[int, int]:
    """Size as a viewer shows it: EXIF orientations 5-8 rotate by 90 degrees."""
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block should not make the image unreadable
        orientation = None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _min_value(band: Image.Image) -> int:
    """Smallest value of a single-band 8-bit image."""
    low, _ = cast(tuple[int, int], band.getextrema())
    return low


def _has_any(band: Image.Image) -> bool:
    """True if some pixel of a single-band image is non-zero."""
    return band.getbbox() is not None


def _orientation(width: int, height: int) -> str:
    if width == height:
        return "square"
    return "landscape" if width > height else "portrait"


def _palette_image() -> Image.Image:
    """A "P" image whose palette is :data:`PALETTE`, for C-speed nearest-colour mapping."""
    flat: list[int] = []
    for _, rgb in PALETTE:
        flat.extend(rgb)
    pal = Image.new("P", (1, 1))
    pal.putpalette(flat)
    return pal


def _dominant_colors(rgb: Image.Image, opaque: Image.Image) -> tuple[str, ...]:
    """Top 1-3 palette colours by pixel share, ignoring transparent pixels."""
    indexed = rgb.quantize(palette=_palette_image(), dither=Image.Dither.NONE)
    indexed.paste(_TRANSPARENT_INDEX, mask=opaque.point(lambda a: 255 - a))
    counts = indexed.getcolors(maxcolors=256) or []
    counted = [(n, int(idx)) for n, idx in counts if isinstance(idx, int) and idx < len(PALETTE)]
    total = sum(n for n, _ in counted)
    if total == 0:
        return ()
    ranked = sorted(counted, key=lambda pair: (-pair[0], pair[1]))
    names = [PALETTE[ranked[0][1]][0]]
    for n, idx in ranked[1:3]:
        if n / total >= 0.1:
            names.append(PALETTE[idx][0])
    return tuple(names)


def _lightness_of_luminance(y: float) -> float:
    """CIE L* (0..100) of relative luminance ``y`` (0..1)."""
    return 116.0 * y ** (1.0 / 3.0) - 16.0 if y > 0.008856 else 903.3 * y


def _linear_channel(value: int) -> int:
    """sRGB-encoded 0..255 to linear-light 0..255."""
    c = value / 255.0
    linear = c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    return round(linear * 255.0)


def _brightness_word(rgb: Image.Image, opaque: Image.Image) -> str:
    """Word for the mean perceived lightness (CIE L*), so pure blue reads darker than pure yellow."""
    linear = rgb.point([_linear_channel(v) for v in range(256)] * 3)
    luminance = linear.convert("L", (0.2126, 0.7152, 0.0722, 0.0))
    mask = opaque if _has_any(opaque) else None
    histogram = luminance.histogram(mask)
    total = sum(histogram) or 1
    mean_l = sum(n * _lightness_of_luminance(level / 255.0) for level, n in enumerate(histogram)) / total
    return next(word for bound, word in BRIGHTNESS_WORDS if mean_l < bound)


def _detail_word(rgb: Image.Image) -> str:
    """Word for the mean edge strength inside the thumbnail (its 1 px border is unfiltered)."""
    edges = rgb.convert("L").filter(ImageFilter.FIND_EDGES)
    w, h = edges.size
    if w <= 2 or h <= 2:
        return DETAIL_WORDS[0][1]
    inner = edges.crop((1, 1, w - 1, h - 1))
    strength = ImageStat.Stat(inner).mean[0]
    return next(word for bound, word in DETAIL_WORDS if strength < bound)


# --- captions ---------------------------------------------------------------------------------------


def _format_name(facts: ImageFacts) -> str:
    return _FORMAT_NAMES.get(facts.format, facts.format)


def _color_list(colors: tuple[str, ...]) -> str:
    """"red", "red and blue", "red, blue and white"."""
    if not colors:
        return "fully transparent pixels"
    if len(colors) == 1:
        return colors[0]
    return ", ".join(colors[:-1]) + " and " + colors[-1]


def _color_phrase(colors: tuple[str, ...]) -> str:
    """"mostly red", "mostly red with some blue", "mostly red with some blue and a little white"."""
    if not colors:
        return "with no opaque pixels"
    phrase = f"mostly {colors[0]}"
    if len(colors) > 1:
        phrase += f" with some {colors[1]}"
    if len(colors) > 2:
        phrase += f" and a little {colors[2]}"
    return phrase


def _caption_v0(f: ImageFacts) -> str:
    alpha = " with transparency" if f.has_transparency else ""
    return (f"A {f.width}x{f.height} {f.orientation} {_format_name(f)} image{alpha}, "
            f"{_color_phrase(f.colors)}, {f.brightness}, with {f.detail}.")


def _caption_v1(f: ImageFacts) -> str:
    alpha = " Parts of it are transparent." if f.has_transparency else ""
    return (f"This {f.orientation} {_format_name(f)} picture is {f.width} pixels wide and {f.height} pixels "
            f"tall. It is {f.brightness} overall, its main colours are {_color_list(f.colors)}, "
            f"and it has {f.detail}.{alpha}")


def _caption_v2(f: ImageFacts) -> str:
    alpha = ", partly transparent" if f.has_transparency else ""
    return (f"{f.brightness.capitalize()} {_format_name(f)} image of {f.width} by {f.height} pixels "
            f"({f.orientation}{alpha}) in {_color_list(f.colors)} tones, with {f.detail}.")


def _caption_v3(f: ImageFacts) -> str:
    alpha = " with transparent areas" if f.has_transparency else ""
    return (f"Mainly {_color_list(f.colors)}: a {f.brightness} {f.orientation} {_format_name(f)} image{alpha}, "
            f"{f.width}x{f.height} pixels, showing {f.detail}.")


_CAPTIONS = (_caption_v0, _caption_v1, _caption_v2, _caption_v3)


def caption(facts: ImageFacts, variant: int = 0) -> str:
    """One or two sentences about ``facts``; ``variant`` picks one of four phrasings (cycling)."""
    return _CAPTIONS[variant % len(_CAPTIONS)](facts)


# --- cache ------------------------------------------------------------------------------------------


class FactsCache:
    """A small thread-safe LRU of facts keyed by sha256, so retries of one image are not re-decoded."""

    def __init__(self, maxsize: int = 256) -> None:
        self._maxsize = maxsize
        self._items: OrderedDict[str, ImageFacts] = OrderedDict()
        self._lock = threading.Lock()

    def describe(self, data: bytes) -> ImageFacts:
        """Facts for ``data``, from the cache when the same bytes were seen recently."""
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if digest in self._items:
                self._items.move_to_end(digest)
                return self._items[digest]
        facts = _describe(data, digest)
        with self._lock:
            self._items[digest] = facts
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return facts

    def __len__(self) -> int:
        return len(self._items)
