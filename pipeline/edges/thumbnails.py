"""Small previews of the input images, for the gallery page (``pipeline.ops.gallery``).

Only local files (plain paths and ``file://`` URLs) are read: the gallery never downloads anything, so a
remote image gets a placeholder in the page rather than a request to its host. The same path rules as a
run apply (``input.root``, ``images.max_source_bytes``), through ``read_image_file``. Any file Pillow cannot
read gives no thumbnail: a broken image is already a failed row, and a page must still be written.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from PIL import Image, ImageOps

from pipeline.core.errors import ImageError
from pipeline.edges.images import file_url_path, read_image_file

#: Longest side of a thumbnail, in pixels (the page shows them at this size or smaller).
THUMB_SIDE = 160
#: WebP quality: at 160 px a photo is 3-6 KB, a flat drawing well under 1 KB.
THUMB_QUALITY = 50


def local_image_path(source: str, base_dir: Path) -> Path | None:
    """The file a manifest ``path`` value names, or None for a remote URL, a data URI or an empty value."""
    if not source or "\0" in source:
        return None
    if "://" not in source and not source[:5].lower().startswith("data:"):
        path = Path(source).expanduser()
        return path if path.is_absolute() else base_dir / path
    if source[:7].lower() == "file://":
        try:
            return file_url_path(source)
        except ImageError:
            return None
    return None


def thumbnail(path: Path, *, root: Path | None, max_source_bytes: int, side: int = THUMB_SIDE,
              quality: int = THUMB_QUALITY) -> bytes | None:
    """A WebP thumbnail of the image at ``path`` (longest side ``side``, EXIF orientation applied), or None
    when there is nothing to show: the file is missing, outside ``root``, too big, or not an image."""
    try:
        if root is not None:
            path = Path(os.path.realpath(path))
            if not path.is_relative_to(root.resolve()):
                return None
        data = read_image_file(path, str(path), max_source_bytes, no_follow=root is not None)
        if data is None:
            return None
        return _webp(data, side, quality)
    except ImageError:
        return None
    except Exception:  # noqa: BLE001 - Pillow raises many kinds of error for a bad file; none may stop a page
        return None


def _webp(data: bytes, side: int, quality: int) -> bytes:
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side * 2, side * 2))  # JPEG: decode at a fraction of the size (fast, less memory)
        shown = ImageOps.exif_transpose(image)
        shown.thumbnail((side, side))
        has_alpha = shown.mode in ("RGBA", "LA") or (shown.mode == "P" and "transparency" in shown.info)
        shown = shown.convert("RGBA" if has_alpha else "RGB")
        out = io.BytesIO()
        shown.save(out, "WEBP", quality=quality, method=0)  # 3x faster than the default 4, ~10% larger
        return out.getvalue()
