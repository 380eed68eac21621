"""Image loading and encoding over real files: types by magic bytes, per-row errors."""

import base64
import io

import pytest
from PIL import Image

from pipeline.errors import ImageError
from pipeline.images import load_image, sniff_mime


def image_bytes(fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 10, 10)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("GIF", "image/gif"),
                                       ("WEBP", "image/webp")])
async def test_encodes_real_type_whatever_the_suffix(tmp_path, fmt, mime):
    data = image_bytes(fmt)
    path = tmp_path / "misnamed.bmp"
    path.write_bytes(data)
    payload = await load_image(path)
    assert payload.mime == mime and payload.nbytes == len(data)
    prefix = f"data:{mime};base64,"
    assert payload.data_uri.startswith(prefix)
    assert base64.b64decode(payload.data_uri[len(prefix):]) == data


async def test_per_row_errors(tmp_path):
    cases = {}
    with pytest.raises(ImageError) as info:
        await load_image(tmp_path / "missing.jpg")
    cases["missing"] = info.value
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError) as info:
        await load_image(tmp_path / "empty.jpg")
    cases["empty"] = info.value
    (tmp_path / "text.jpg").write_text("hello, not an image")
    with pytest.raises(ImageError) as info:
        await load_image(tmp_path / "text.jpg")
    cases["text"] = info.value
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(ImageError) as info:
        await load_image(tmp_path / "folder.jpg")
    cases["dir"] = info.value

    assert cases["missing"].error_type == "image_missing" and "not found" in str(cases["missing"])
    assert cases["empty"].error_type == "image_empty" and "0 bytes" in str(cases["empty"])
    assert cases["text"].error_type == "image_unsupported" and "not a JPEG, PNG, GIF or WebP" in str(cases["text"])
    assert cases["dir"].error_type == "image_unreadable" and "directory" in str(cases["dir"])
    assert all(not e.retryable for e in cases.values())


def test_sniff_unknown():
    assert sniff_mime(b"BM\x00\x00") is None
    assert sniff_mime(b"RIFF\x00\x00\x00\x00WAVE") is None
