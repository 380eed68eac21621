"""Generate ``data/sample/``: ~36 small synthetic images plus ``manifest.csv`` (id,path,label).

Deterministic: fixed seeds, no timestamps or metadata, so a re-run writes byte-identical files (with the
same Pillow build). Used by examples, the quick start and the pipeline's end-to-end tests.

    python scripts/make_sample_data.py [--out data/sample]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Painter = Callable[[int, int], Image.Image]

SEED = 20240601
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}


@dataclass(frozen=True)
class SampleSpec:
    """One sample image: what to paint, at what size, in which format, and its manifest label."""

    label: str
    width: int
    height: int
    fmt: str
    paint: Painter


# --- painters ---------------------------------------------------------------------------------------


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t), round(a[2] + (b[2] - a[2]) * t))


def gradient(a: RGB, b: RGB, direction: str = "horizontal") -> Painter:
    """Linear gradient from ``a`` to ``b`` (horizontal, vertical or diagonal)."""
    def paint(w: int, h: int) -> Image.Image:
        img = Image.new("RGB", (w, h))
        draw = ImageDraw.Draw(img)
        if direction == "vertical":
            for y in range(h):
                draw.line([(0, y), (w, y)], fill=_mix(a, b, y / max(h - 1, 1)))
        elif direction == "diagonal":
            for d in range(w + h):
                draw.line([(d, 0), (d - h, h)], fill=_mix(a, b, d / max(w + h - 1, 1)))
        else:
            for x in range(w):
                draw.line([(x, 0), (x, h)], fill=_mix(a, b, x / max(w - 1, 1)))
        return img
    return paint


def stripes(a: RGB, b: RGB, width: int, vertical: bool = True) -> Painter:
    def paint(w: int, h: int) -> Image.Image:
        img = Image.new("RGB", (w, h), a)
        draw = ImageDraw.Draw(img)
        for start in range(0, w if vertical else h, 2 * width):
            box = (start, 0, start + width - 1, h) if vertical else (0, start, w, start + width - 1)
            draw.rectangle(box, fill=b)
        return img
    return paint


def circles(background: RGB, colors: list[RGB], count: int, seed: int) -> Painter:
    """``count`` filled circles at seeded random places."""
    def paint(w: int, h: int) -> Image.Image:
        rng = random.Random(seed)
        img = Image.new("RGB", (w, h), background)
        draw = ImageDraw.Draw(img)
        for i in range(count):
            r = rng.randint(min(w, h) // 10, min(w, h) // 3)
            x, y = rng.randint(0, w), rng.randint(0, h)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colors[i % len(colors)])
        return img
    return paint


def rings(a: RGB, b: RGB, step: int) -> Painter:
    """Concentric rings around the centre."""
    def paint(w: int, h: int) -> Image.Image:
        img = Image.new("RGB", (w, h), a)
        draw = ImageDraw.Draw(img)
        radius = int(math.hypot(w, h) / 2) + step
        for i, r in enumerate(range(radius, 0, -step)):
            draw.ellipse((w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r), fill=b if i % 2 else a)
        return img
    return paint


def checkerboard(a: RGB, b: RGB, cell: int) -> Painter:
    def paint(w: int, h: int) -> Image.Image:
        img = Image.new("RGB", (w, h), a)
        draw = ImageDraw.Draw(img)
        for row in range(0, h, cell):
            for col in range(0, w, cell):
                if (row // cell + col // cell) % 2:
                    draw.rectangle((col, row, col + cell - 1, row + cell - 1), fill=b)
        return img
    return paint


def noise(seed: int, tint: RGB = (255, 255, 255)) -> Painter:
    """Seeded random pixels, scaled by ``tint`` per channel."""
    def paint(w: int, h: int) -> Image.Image:
        rng = random.Random(seed)
        raw = bytes(rng.randrange(256) * tint[i % 3] // 255 for i in range(w * h * 3))
        return Image.frombytes("RGB", (w, h), raw)
    return paint


def solid(color: RGB) -> Painter:
    def paint(w: int, h: int) -> Image.Image:
        return Image.new("RGB", (w, h), color)
    return paint


def transparent_badge(color: RGB) -> Painter:
    """An RGBA image: a coloured disc on a fully transparent background."""
    def paint(w: int, h: int) -> Image.Image:
        img = Image.new("RGBA", (w, h), (0, 0, 0, 0))
        ImageDraw.Draw(img).ellipse((w // 8, h // 8, w - w // 8, h - h // 8), fill=(*color, 255))
        return img
    return paint


# --- the catalogue ----------------------------------------------------------------------------------

RED, ORANGE, YELLOW, GREEN = (220, 30, 30), (255, 140, 0), (250, 225, 30), (40, 170, 40)
BLUE, NAVY, PURPLE, PINK = (30, 80, 230), (10, 20, 110), (130, 40, 160), (250, 150, 200)
WHITE, BLACK, GREY, TEAL, BROWN = (255, 255, 255), (0, 0, 0), (128, 128, 128), (0, 128, 128), (130, 80, 40)

SAMPLES: tuple[SampleSpec, ...] = (
    SampleSpec("gradient", 320, 240, "JPEG", gradient(NAVY, ORANGE)),
    SampleSpec("gradient", 240, 320, "PNG", gradient(BLACK, WHITE, "vertical")),
    SampleSpec("gradient", 200, 200, "WEBP", gradient(RED, YELLOW, "diagonal")),
    SampleSpec("gradient", 160, 96, "GIF", gradient(GREEN, BLUE)),
    SampleSpec("gradient", 128, 128, "JPEG", gradient(PURPLE, PINK, "vertical")),
    SampleSpec("gradient", 256, 144, "WEBP", gradient(TEAL, WHITE, "diagonal")),
    SampleSpec("stripes", 320, 200, "PNG", stripes(WHITE, BLACK, 16)),
    SampleSpec("stripes", 180, 300, "GIF", stripes(RED, WHITE, 12, vertical=False)),
    SampleSpec("stripes", 256, 256, "JPEG", stripes(BLUE, YELLOW, 8)),
    SampleSpec("stripes", 300, 120, "WEBP", stripes(GREEN, BROWN, 20, vertical=False)),
    SampleSpec("stripes", 96, 96, "PNG", stripes(NAVY, ORANGE, 4)),
    SampleSpec("circles", 320, 240, "JPEG", circles(NAVY, [ORANGE, YELLOW], 6, seed=SEED + 1)),
    SampleSpec("circles", 240, 240, "PNG", circles(WHITE, [RED, BLUE, GREEN], 9, seed=SEED + 2)),
    SampleSpec("circles", 200, 300, "WEBP", circles(GREEN, [YELLOW], 4, seed=SEED + 3)),
    SampleSpec("circles", 160, 120, "GIF", circles(BLACK, [PINK, TEAL], 12, seed=SEED + 4)),
    SampleSpec("rings", 256, 256, "PNG", rings(BLACK, WHITE, 12)),
    SampleSpec("rings", 300, 200, "JPEG", rings(BLUE, ORANGE, 20)),
    SampleSpec("rings", 120, 160, "GIF", rings(RED, YELLOW, 8)),
    SampleSpec("checkerboard", 256, 256, "PNG", checkerboard(BLACK, WHITE, 32)),
    SampleSpec("checkerboard", 320, 160, "GIF", checkerboard(RED, BLUE, 20)),
    SampleSpec("checkerboard", 144, 216, "WEBP", checkerboard(GREY, YELLOW, 18)),
    SampleSpec("checkerboard", 200, 150, "JPEG", checkerboard(GREEN, PURPLE, 10)),
    SampleSpec("checkerboard", 64, 64, "PNG", checkerboard(WHITE, NAVY, 8)),
    SampleSpec("noise", 128, 96, "JPEG", noise(SEED + 10)),
    SampleSpec("noise", 96, 96, "PNG", noise(SEED + 11, (255, 120, 40))),
    SampleSpec("noise", 128, 128, "WEBP", noise(SEED + 12, (60, 160, 255))),
    SampleSpec("noise", 64, 80, "GIF", noise(SEED + 13)),
    SampleSpec("noise", 160, 120, "JPEG", noise(SEED + 14, (120, 255, 120))),
    SampleSpec("solid", 320, 240, "JPEG", solid(RED)),
    SampleSpec("solid", 100, 100, "PNG", solid(BLUE)),
    SampleSpec("solid", 150, 300, "WEBP", solid(YELLOW)),
    SampleSpec("solid", 120, 80, "GIF", solid(GREEN)),
    SampleSpec("badge", 128, 128, "PNG", transparent_badge(ORANGE)),
    SampleSpec("gradient", 64, 240, "JPEG", gradient(WHITE, BROWN, "vertical")),
    SampleSpec("circles", 300, 300, "JPEG", circles(PINK, [PURPLE, WHITE], 7, seed=SEED + 5)),
    SampleSpec("stripes", 240, 180, "GIF", stripes(TEAL, WHITE, 6)),
)


# --- encoding and writing ---------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str) -> bytes:
    """Encode without metadata, with fixed encoder settings so output is reproducible."""
    buffer = io.BytesIO()
    if fmt == "JPEG":
        img.convert("RGB").save(buffer, "JPEG", quality=85, optimize=False, progressive=False)
    elif fmt == "PNG":
        img.save(buffer, "PNG", optimize=False, compress_level=9)
    elif fmt == "GIF":
        paletted = img.convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        paletted.save(buffer, "GIF", optimize=False)
    elif fmt == "WEBP":
        img.save(buffer, "WEBP", quality=80, method=4, exact=False)
    else:
        raise ValueError(f"unsupported format {fmt}")
    return buffer.getvalue()


def write_samples(out_dir: Path) -> list[tuple[str, str, str]]:
    """Write every sample image and the manifest; returns the manifest rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for number, spec in enumerate(SAMPLES, start=1):
        name = f"img_{number:03d}.{EXTENSIONS[spec.fmt]}"
        (out_dir / name).write_bytes(encode(spec.paint(spec.width, spec.height), spec.fmt))
        rows.append((f"img_{number:03d}", name, spec.label))
    written = {path for _, path, _ in rows}
    for stale in out_dir.glob("img_*"):
        if stale.name not in written:
            stale.unlink()
    with (out_dir / "manifest.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(("id", "path", "label"))
        writer.writerows(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parent.parent / "data" / "sample"
    parser.add_argument("--out", type=Path, default=default_out, help="output folder (default: data/sample)")
    args = parser.parse_args()
    rows = write_samples(args.out)
    total = sum((args.out / path).stat().st_size for _, path, _ in rows)
    print(f"wrote {len(rows)} images ({total / 1024:.0f} KiB) and manifest.csv to {args.out}")


if __name__ == "__main__":
    main()
