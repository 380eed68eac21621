"""JPEG and PNG headers read by hand, for the pre-flight fast path: no Pillow, no pixel data.

Pillow's lazy ``Image.open`` spends tens of microseconds in Python-level header parsing per image; walking
the same JPEG segments / PNG chunks by their lengths takes a few. ``read_header`` answers only for files
whose header is well formed in every respect that Pillow's opener looks at, and then its answer (size,
mode, EXIF orientation, ...) is what Pillow would report. Anything unusual (truncation, lossless or
arithmetic JPEG, junk between segments, a bad PNG CRC, a compressed text chunk, an APPn segment or PNG
chunk it does not know ...) gives None, and the caller asks Pillow instead. Pillow is not pinned:
``tests/test_imageheader.py`` holds the two to the same answers with whichever Pillow is installed.
"""

from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["ImageHeader", "read_header"]


class ImageHeader(NamedTuple):
    """What ``Image.open(...)`` would say about an image, read from its header alone.

    A NamedTuple, not a frozen dataclass: building one is ~7x cheaper, which matters on this path.
    """

    format: str  # "JPEG" or "PNG" (an MPO is a JPEG with ``multi_picture`` set)
    width: int
    height: int
    mode: str  # Image.open(...).mode: "L" / "RGB" / "CMYK" for JPEG; "1", "L", "I;16", "P", "RGBA" ... for PNG
    orientation: int  # 1..8 as Pillow reads it (JPEG: EXIF IFD0, else XMP; PNG: eXIf); 1 if absent/out of range
    progressive: bool  # JPEG SOF2
    multi_picture: bool  # JPEG whose MPF index lists several pictures: Pillow opens it as "MPO"
    animated: bool  # Pillow's ``is_animated`` for a PNG (an APNG with more than one frame)
    ends_well: bool  # JPEG ends with EOI; PNG's last chunk is IEND


def read_header(data: bytes) -> ImageHeader | None:
    """The header of a JPEG or PNG; None for any other format and for anything Pillow should judge."""
    if data.startswith(b"\xff\xd8\xff"):
        return _read_jpeg(data)
    if data.startswith(_PNG_SIGNATURE):
        return _read_png(data)
    return None


# -- TIFF structures (EXIF, MPF): the first IFD, read the way Pillow's ImageFileDirectory_v2 reads it -------

_TIFF_UNIT_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
_SHORT, _LONG, _RATIONAL, _UNDEFINED = 3, 4, 5, 7
_ENTRY = {"<": struct.Struct("<HHLL"), ">": struct.Struct(">HHLL")}
_U16 = {"<": struct.Struct("<H").unpack_from, ">": struct.Struct(">H").unpack_from}
_U32 = {"<": struct.Struct("<L").unpack_from, ">": struct.Struct(">L").unpack_from}
_ORIENTATION, _X_RESOLUTION, _RESOLUTION_UNIT = 0x0112, 0x011A, 0x0128
_MP_NUMBER_OF_IMAGES, _MP_ENTRY = 0xB001, 0xB002

#: tag -> (type, count, where its value lies in ``data``)
_Tags = dict[int, tuple[int, int, int]]


def _ifd0(data: bytes, start: int, stop: int, wanted: frozenset[int]) -> tuple[str, _Tags] | None:
    """The ``wanted`` tags of the first IFD of the TIFF structure in ``data[start:stop]``, with its byte order.

    None wherever Pillow's reading would stop early, warn or skip (an unusual byte-order mark, the IFD or an
    out-of-line value past the end, a type this reader does not size) or a wanted tag appears twice (Pillow
    versions disagree on which one wins).
    """
    if stop - start < 8:
        return None
    mark = data[start:start + 4]
    order = "<" if mark == b"II*\0" else ">" if mark == b"MM\0*" else ""
    if not order:
        return None
    first = start + _U32[order](data, start + 4)[0]
    if first + 2 > stop:
        return None
    count = _U16[order](data, first)[0]
    entries_at = first + 2
    if entries_at + 12 * count + 4 > stop:  # the entries and the next-IFD pointer
        return None
    span, out_of_line, tags = stop - start, 0, {}
    entries = _ENTRY[order].iter_unpack(memoryview(data)[entries_at:entries_at + 12 * count])
    for index, (tag, kind, number, value) in enumerate(entries):
        unit = _TIFF_UNIT_SIZES.get(kind)
        if unit is None:
            return None
        size = number * unit
        if size > 4:
            out_of_line += size
            if out_of_line > span or value + size > span:
                return None
            where = start + value
        else:
            where = entries_at + 12 * index + 8
        if size and tag in wanted:
            if tag in tags:
                return None
            tags[tag] = (kind, number, where)
    return order, tags


def _orientation_value(data: bytes, order: str, tags: _Tags) -> int | None:
    """0 when the IFD has no orientation; else 1..8 as ``preflight`` reads Pillow's value (out of range -> 1).
    None for an orientation of another type or count than one SHORT (Pillow's conversions differ)."""
    entry = tags.get(_ORIENTATION)
    if entry is None:
        return 0
    kind, count, where = entry
    if kind != _SHORT or count != 1:
        return None
    value = _U16[order](data, where)[0]
    return value if 1 <= value <= 8 else 1


# -- JPEG ---------------------------------------------------------------------------------------------

_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}
#: Huffman-coded DCT frames: baseline, extended sequential, progressive (what libjpeg decodes).
_FRAME_MARKERS = frozenset({0xC0, 0xC1, 0xC2})
#: Segments with a length field this reader accepts before SOS: frames, DHT, SOS, DQT, DRI, APPn, COM.
_LENGTH_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC4, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)})
#: Segments Pillow reads past without looking inside: DHT, DRI, COM (it keeps a comment, never fails on one).
_SKIPPED_MARKERS = frozenset({0xC4, 0xDD, 0xFE})
#: Markers without a length that Pillow steps over: RST0..RST7, SOI.
_NO_LENGTH_MARKERS = frozenset(range(0xD0, 0xD9))
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
#: APPn marker -> the identifiers this reader knows Pillow's handling of (it parses JFIF, Exif, XMP, ICC,
#: MPF, Photoshop and Adobe; it only stores JFXX thumbnails and FlashPix data). Others go to Pillow.
_KNOWN_APPS: dict[int, tuple[bytes, ...]] = {
    0xE0: (b"JFIF", b"JFXX"),
    0xE1: (b"Exif\0\0", _XMP_PREFIX),
    0xE2: (b"ICC_PROFILE\0", b"MPF\0", b"FPXR\0"),
    0xED: (b"Photoshop 3.0\0",),
    0xEE: (b"Adobe",),
}
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # Pillow's own pattern (Image.getexif)
_EXIF_TAGS = frozenset({_ORIENTATION, _X_RESOLUTION, _RESOLUTION_UNIT})
_MPF_TAGS = frozenset({_MP_NUMBER_OF_IMAGES, _MP_ENTRY})
_PNG_EXIF_TAGS = frozenset({_ORIENTATION})  # PNG: pre-flight reads only the orientation (no DPI at open)
_ULTRA_HDR = b' hdrgm:Version="'
_JPEG_MARKER = struct.Struct(">BBH").unpack_from  # 0xFF, marker, length (when the marker has one)
_BIG_U16 = struct.Struct(">H").unpack_from
_BIG_U32 = struct.Struct(">L").unpack_from


@dataclass(slots=True)
class _JpegParts:
    """Where the segments Pillow interprets lie in the data: (start, stop) of their bodies."""

    frame: tuple[int, int, int] | None = None  # (marker, start, stop) of the one SOF segment
    exif: tuple[int, int] | None = None  # the TIFF structure after "Exif\0\0"
    xmp: tuple[int, int] | None = None  # the packet of the last XMP segment (Pillow keeps the last)
    mpf: tuple[int, int] | None = None  # the TIFF structure after "MPF\0"
    app1: list[tuple[int, int]] = field(default_factory=list)


def _read_jpeg(data: bytes) -> ImageHeader | None:
    segments = _jpeg_segments(data)
    parts = _jpeg_parts(data, segments) if segments is not None else None
    if parts is None or parts.frame is None:
        return None
    marker, start, stop = parts.frame
    frame = _frame(data, start, stop)
    orientation = _jpeg_orientation(data, parts)
    multi_picture = _multi_picture(data, parts)
    if frame is None or orientation is None or multi_picture is None:
        return None
    width, height, mode = frame
    return ImageHeader("JPEG", width, height, mode, orientation, marker == 0xC2, multi_picture, False,
                       data.endswith(b"\xff\xd9"))


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]] | None:
    """Walk the segments after SOI by their lengths up to SOS; returns (marker, body start, body stop) of
    those Pillow interprets (frames, DQT, APPn), not of the ones it only skips (DHT, DRI, COM).

    Fill bytes (runs of 0xFF) and RSTn/SOI are stepped over as Pillow does. Whatever Pillow would scan
    byte by byte (junk, 0xFF00), refuse (TEM, reserved markers) or read differently (JPGn, DNL, DHP ...),
    a segment running past the end and a missing SOS give None.
    """
    end, pos, segments = len(data), 2, []
    while pos + 4 <= end:
        prefix, marker, length = _JPEG_MARKER(data, pos)
        if prefix != 0xFF:
            return None
        if marker == 0xFF or marker in _NO_LENGTH_MARKERS:
            pos += 1 if marker == 0xFF else 2
            continue
        stop = pos + 2 + length
        if marker not in _LENGTH_MARKERS or length < 2 or stop > end:
            return None
        if marker == 0xDA:
            return segments
        if marker not in _SKIPPED_MARKERS:
            segments.append((marker, pos + 4, stop))
        pos = stop
    return None


def _jpeg_parts(data: bytes, segments: list[tuple[int, int, int]]) -> _JpegParts | None:
    """Check each segment the way Pillow's opener parses it and note where the interesting ones lie."""
    parts = _JpegParts()
    for marker, start, stop in segments:
        if marker in _FRAME_MARKERS:
            if parts.frame is not None:
                return None
            parts.frame = (marker, start, stop)
        elif marker == 0xDB:
            if not _tables_fit(data, start, stop):
                return None
        elif 0xE0 <= marker <= 0xEF and not _note_app(data, marker, start, stop, parts):
            return None
    return parts


def _frame(data: bytes, start: int, stop: int) -> tuple[int, int, str] | None:
    """(width, height, mode) from a SOF body: 8-bit samples, 1/3/4 components, a non-zero size."""
    if stop - start < 6:
        return None
    components = data[start + 5]
    mode = _JPEG_MODES.get(components)
    height, width = _BIG_U16(data, start + 1)[0], _BIG_U16(data, start + 3)[0]
    if data[start] != 8 or mode is None or stop - start != 6 + 3 * components or not width or not height:
        return None
    return width, height, mode


def _tables_fit(data: bytes, start: int, stop: int) -> bool:
    """DQT: the quantisation tables (65 or 129 bytes each) exactly fill the segment, or Pillow refuses it."""
    pos = start
    while pos < stop:
        pos += 65 if data[pos] < 16 else 129
    return pos == stop


def _note_app(data: bytes, marker: int, start: int, stop: int, parts: _JpegParts) -> bool:
    """False where Pillow's APPn parsing would fail (short JFIF/Adobe/ICC), where this reader leaves the
    file to Pillow (a second Exif or MPF segment) or where it does not know the segment (an APPn without
    an identifier from ``_KNOWN_APPS``: a later Pillow may read it); notes Exif, XMP, MPF in ``parts``."""
    if not data.startswith(_KNOWN_APPS.get(marker, ()), start, stop):
        return False
    if marker == 0xE1:
        parts.app1.append((start, stop))
        if data.startswith(b"Exif\0\0", start, stop):
            if parts.exif is not None:  # Pillow 13 concatenates several, older versions kept the first
                return False
            parts.exif = (start + 6, stop)
        else:
            parts.xmp = (start + len(_XMP_PREFIX), stop)
        return True
    if marker == 0xE2:
        if data.startswith(b"ICC_PROFILE\0", start, stop):
            return stop - start >= 14  # Pillow indexes the fragment count at byte 13
        if data.startswith(b"MPF\0", start, stop):
            if parts.mpf is not None:
                return False
            parts.mpf = (start + 4, stop)
        return True
    if marker == 0xE0:
        return stop - start >= 7 or not data.startswith(b"JFIF", start, stop)  # JFIF version at byte 5
    if marker == 0xEE:
        return stop - start >= 7  # Adobe version at byte 5
    return _photoshop_blocks_ok(data, start, stop)  # APP13 "Photoshop 3.0"


def _photoshop_blocks_ok(data: bytes, start: int, stop: int) -> bool:
    """Pillow walks the 8BIM resource blocks at open: a block cut short where its name length belongs
    raises IndexError (the open fails); a block cut short elsewhere only ends its walk."""
    pos = start + 14
    while data.startswith(b"8BIM", pos, stop):
        if pos + 6 >= stop:  # no room for the resource code (Pillow stops) or for the name length (it fails)
            return pos + 6 > stop
        code = _BIG_U16(data, pos + 4)[0]
        pos += 7 + data[pos + 6]
        pos += (pos - start) & 1
        if pos + 4 > stop:
            return True
        size = _BIG_U32(data, pos)[0]
        pos += 4
        if code == 0x03ED and min(size, stop - pos) < 14:  # ResolutionInfo too short: Pillow stops here
            return True
        pos += size
        pos += (pos - start) & 1
    return True


def _jpeg_orientation(data: bytes, parts: _JpegParts) -> int | None:
    """Pillow's ``getexif`` orientation: EXIF IFD0, else the XMP packet's ``tiff:Orientation``.

    The EXIF checks include the resolution tags Pillow reads at open for the DPI (an odd type can make
    that raise), so a header this reader accepts opens cleanly in Pillow too.
    """
    if parts.exif is not None:
        found = _ifd0(data, *parts.exif, _EXIF_TAGS)
        if found is None or not _resolution_tags_plain(found[1]):
            return None
        value = _orientation_value(data, *found)
        if value != 0:
            return value
    if parts.xmp is not None:
        match = _XMP_ORIENTATION.search(data, *parts.xmp)
        if match:
            value = int(match[2])
            return value if 1 <= value <= 8 else 1
    return 1


def _resolution_tags_plain(tags: _Tags) -> bool:
    """ResolutionUnit one SHORT and XResolution one SHORT/LONG/RATIONAL, or absent: what Pillow's DPI
    reading handles without surprises."""
    unit, resolution = tags.get(_RESOLUTION_UNIT), tags.get(_X_RESOLUTION)
    if unit is not None and unit[:2] != (_SHORT, 1):
        return False
    return resolution is None or (resolution[0] in (_SHORT, _LONG, _RATIONAL) and resolution[1] == 1)


def _multi_picture(data: bytes, parts: _JpegParts) -> bool | None:
    """True when Pillow opens the file as MPO: an MPF index listing several JPEG pictures (not Ultra HDR).

    None for an index Pillow would find malformed (it then warns and reads a plain JPEG).
    """
    if parts.mpf is None:
        return False
    found = _ifd0(data, *parts.mpf, _MPF_TAGS)
    if found is None:
        return None
    order, tags = found
    number, entries = tags.get(_MP_NUMBER_OF_IMAGES), tags.get(_MP_ENTRY)
    if number is None or entries is None or number[:2] != (_LONG, 1) or entries[0] != _UNDEFINED:
        return None
    pictures = _U32[order](data, number[2])[0]
    if entries[1] < 16 * pictures:
        return None
    attribute = _U32[order]
    if any(attribute(data, entries[2] + 16 * index)[0] & 0x07000000 for index in range(pictures)):
        return None  # a picture that is not JPEG: Pillow falls back to plain JPEG with a warning
    return pictures > 1 and not any(data.find(_ULTRA_HDR, start, stop) >= 0 for start, stop in parts.app1)


# -- PNG ----------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: (bit depth, colour type) -> Image.open(...).mode (PngImagePlugin._MODES).
_PNG_MODES = {
    (1, 0): "1", (2, 0): "L", (4, 0): "L", (8, 0): "L", (16, 0): "I;16",
    (8, 2): "RGB", (16, 2): "RGB",
    (1, 3): "P", (2, 3): "P", (4, 3): "P", (8, 3): "P",
    (8, 4): "LA", (16, 4): "RGBA",
    (8, 6): "RGBA", (16, 6): "RGBA",
}
#: Chunks Pillow refuses when shorter (it raises ValueError).
_PNG_MIN_LENGTHS = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9, b"acTL": 8, b"fcTL": 26}
_TRNS_MIN_LENGTHS = {"1": 2, "L": 2, "I;16": 2, "RGB": 6}
#: Ancillary chunks left to Pillow: zTXt is inflated at open; fdAT before IDAT is an unusual APNG.
#: Ancillary chunks that cannot change what Pillow reports at open (it skips them) and that this reader
#: therefore steps over; any other chunk, known to Pillow or not (zTXt, fdAT, cICP ...), is left to Pillow.
_PNG_INERT = frozenset({b"bKGD", b"tIME", b"sBIT", b"hIST", b"sPLT"})
_PNG_CHUNK_HEAD = struct.Struct(">L4s").unpack_from
_PNG_IHDR = struct.Struct(">LLBBBBB").unpack_from
_PNG_FRAME = struct.Struct(">LLLLL").unpack_from  # fcTL: sequence, width, height, x offset, y offset
_MAX_TEXT_CHUNK = 1024 * 1024  # PngImagePlugin.MAX_TEXT_CHUNK: the most Pillow inflates of one chunk
_TEXT_BUDGET = 1024 * 1024  # far below Pillow's 64 MiB text limit, so that limit never decides
_DEFLATE_MAX_RATIO = 1100  # deflate expands at most 1032:1, so a stream this much smaller cannot exceed


@dataclass(slots=True)
class _PngFacts:
    """What the chunks before IDAT say beyond IHDR."""

    palette: bool = False
    frames: int | None = None  # acTL's frame count: an APNG
    default_image: bool = True  # no fcTL before IDAT: in an APNG, IDAT is then one more (static) frame
    exif: tuple[int, int] | None = None  # the last eXIf chunk's body (Pillow keeps the last)
    text_bytes: int = 0

    @property
    def animated(self) -> bool:
        """Pillow's ``is_animated``: more than one frame, counting a default image outside the animation."""
        return self.frames is not None and self.frames + self.default_image > 1


def _read_png(data: bytes) -> ImageHeader | None:
    chunks = _png_chunks(data)
    if not chunks or chunks[0][0] != b"IHDR":
        return None
    image = _png_image(data, chunks[0][1], chunks[0][2])
    facts = _png_facts(data, chunks[1:], image) if image is not None else None
    if image is None or facts is None or (image[2] == "P" and not facts.palette):
        return None
    orientation = _png_orientation(data, facts.exif)
    if orientation is None:
        return None
    width, height, mode = image
    return ImageHeader("PNG", width, height, mode, orientation, False, False, facts.animated,
                       data[-8:-4] == b"IEND")


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]] | None:
    """(type, body start, body stop) of each chunk before the first IDAT, CRC-checked as Pillow's opener
    checks them (IDAT's contents are never read). None for a bad CRC, a chunk running past the end, a type
    that is not four letters, IEND before any IDAT, or no IDAT at all."""
    end, pos, chunks, view = len(data), 8, [], memoryview(data)
    while pos + 8 <= end:
        length, kind = _PNG_CHUNK_HEAD(data, pos)
        if kind == b"IDAT":
            return chunks
        start, stop = pos + 8, pos + 8 + length
        if kind == b"IEND" or not kind.isalpha() or stop + 4 > end:
            return None
        if zlib.crc32(view[pos + 4:stop]) != _BIG_U32(data, stop)[0]:
            return None
        chunks.append((kind, start, stop))
        pos = stop + 4
    return None


def _png_image(data: bytes, start: int, stop: int) -> tuple[int, int, str] | None:
    """(width, height, mode) from IHDR: 13 bytes, a known depth/colour pair, standard methods."""
    if stop - start != 13:
        return None
    width, height, depth, colour, compression, filtering, interlace = _PNG_IHDR(data, start)
    mode = _PNG_MODES.get((depth, colour))
    if mode is None or compression or filtering or interlace > 1 or not width or not height:
        return None
    return width, height, mode


def _png_facts(data: bytes, chunks: list[tuple[bytes, int, int]], image: tuple[int, int, str]) -> _PngFacts | None:
    facts = _PngFacts()
    for kind, start, stop in chunks:
        if not _png_chunk_ok(data, kind, start, stop, image[2]):
            return None
        if kind == b"PLTE":
            facts.palette = True
        elif kind == b"acTL":
            if facts.frames is not None:  # Pillow warns and drops the animation
                return None
            facts.frames = _BIG_U32(data, start)[0]
            if not 0 < facts.frames <= 0x80000000:  # likewise
                return None
        elif kind == b"fcTL":
            if not facts.default_image or not _first_frame_ok(data, start, image):
                return None
            facts.default_image = False
        elif kind == b"eXIf":
            facts.exif = (start, stop)
        elif kind in (b"tEXt", b"iTXt"):
            facts.text_bytes += stop - start
            if facts.text_bytes > _TEXT_BUDGET:
                return None
    return facts


def _first_frame_ok(data: bytes, start: int, image: tuple[int, int, str]) -> bool:
    """An fcTL before IDAT as Pillow checks it: sequence number 0, the frame inside the image."""
    sequence, width, height, left, top = _PNG_FRAME(data, start)
    return sequence == 0 and left + width <= image[0] and top + height <= image[1]


def _png_chunk_ok(data: bytes, kind: bytes, start: int, stop: int, mode: str) -> bool:
    """True when Pillow's handler for this chunk cannot fail on it and it cannot change what the caller
    needs; chunks this reader does not know (ancillary or critical) are Pillow's to judge."""
    length = stop - start
    if kind in _PNG_MIN_LENGTHS:
        return length >= _PNG_MIN_LENGTHS[kind]
    if kind == b"tRNS":
        return length >= _TRNS_MIN_LENGTHS.get(mode, 0)
    if kind in (b"tEXt", b"iTXt"):
        return _text_ok(data, kind, start, stop)
    if kind == b"iCCP":
        return _icc_ok(data, start, stop)
    return kind in (b"PLTE", b"eXIf") or kind in _PNG_INERT


def _text_ok(data: bytes, kind: bytes, start: int, stop: int) -> bool:
    """A text chunk keyed "exif" becomes Pillow's EXIF, and a compressed iTXt is inflated: both to Pillow."""
    nul = data.find(b"\0", start, stop)
    key_end = stop if nul < 0 else nul
    if key_end - start == 4 and data.startswith(b"exif", start):
        return False
    return kind == b"tEXt" or nul < 0 or nul + 1 >= stop or data[nul + 1] == 0


def _icc_ok(data: bytes, start: int, stop: int) -> bool:
    """iCCP: Pillow raises on a missing or unknown compression method and on a profile inflating past
    ``MAX_TEXT_CHUNK``; a profile too small to get there is not inflated here."""
    nul = data.find(b"\0", start, stop)
    if nul < 0 or nul + 1 >= stop or data[nul + 1] != 0:
        return False
    compressed = memoryview(data)[nul + 2:stop]
    if len(compressed) * _DEFLATE_MAX_RATIO <= _MAX_TEXT_CHUNK:
        return True
    inflater = zlib.decompressobj()
    try:
        inflater.decompress(compressed, _MAX_TEXT_CHUNK)
    except zlib.error:
        return True  # Pillow drops the profile and opens the image
    return not inflater.unconsumed_tail


def _png_orientation(data: bytes, exif: tuple[int, int] | None) -> int | None:
    """The eXIf chunk's IFD0 orientation, read as ``preflight`` reads Pillow's ``info["exif"]``."""
    if exif is None:
        return 1
    start, stop = exif
    if data.startswith(b"Exif\0\0", start, stop):  # some writers repeat the JPEG prefix; Pillow strips it
        start += 6
    found = _ifd0(data, start, stop, _PNG_EXIF_TAGS)
    value = _orientation_value(data, *found) if found is not None else None
    return None if value is None else value or 1
