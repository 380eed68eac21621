"""How big and how slow is the gallery of a large job? Builds a synthetic job (a CSV manifest of ROWS rows
over a few images, and a ledger with one finished run: 98% ok, 2% failed over four error types, latencies
and finish times spread over the run), then times ``pipeline.ops.gallery.write_gallery`` and prints the
page's size, cards and thumbnails. Nothing is sent anywhere.

    .venv/bin/python scripts/gallery_scale.py [--rows 100000] [--images sample|noise] [--limit 500]

``--images noise`` uses 640x480 JPEGs of random pixels, the worst case for thumbnail size (each about
four times a photo's), to show the thumbnail budget at work; ``sample`` cycles through data/sample/.
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from PIL import Image

from pipeline.core.config import config_from_dict
from pipeline.core.results import ResultRow
from pipeline.edges.ledger import StateStore, Write
from pipeline.ops.gallery import GalleryOptions, write_gallery

REPO = Path(__file__).resolve().parent.parent
ERRORS = [("rate_limited", "HTTP 429: Rate limit reached, retry later"), ("image_missing", "image file not found"),
          ("server_error", "HTTP 500: The server had an error"), ("timeout", "no data for 30 s (idle timeout)")]
CAPTION = ("A {w}x{h} photograph of a quiet street at dusk, mostly grey and blue with a little orange from "
           "the lamps, fairly dark, with moderate detail and two people walking away from the camera.")


def images(folder: Path, kind: str) -> list[Path]:
    if kind == "sample":
        return sorted(p for p in (REPO / "data" / "sample").iterdir() if p.suffix != ".csv")
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    paths = []
    for i in range(40):
        path = folder / f"noise_{i}.jpg"
        Image.frombytes("RGB", (640, 480), rng.randbytes(640 * 480 * 3)).save(path, quality=90)
        paths.append(path)
    return paths


def build_job(folder: Path, rows: int, kind: str) -> dict:
    pictures = images(folder / "img", kind)
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "path", "label", "shard"])
        for i in range(rows):
            writer.writerow([f"row-{i:06d}", str(pictures[i % len(pictures)]), f"label {i % 97}", i % 16])
    document = {"request": {"model": "m", "prompt": "Describe this image."}, "input": {"manifest": str(manifest)},
                "output": {"path": str(folder / "out" / "captions.parquet")}}
    return document


def fill_ledger(path: Path, rows: int) -> None:
    rng = random.Random(1)
    start = datetime(2026, 12, 1, 2, 0, tzinfo=UTC)
    with StateStore(path) as store:
        run_id = store.start_run("run", "scale")
        writes = []
        for i in range(rows):
            finished = start + timedelta(seconds=100 * i / rows)
            latency = rng.lognormvariate(6.5, 0.4)
            if rng.random() < 0.02:
                error_type, message = ERRORS[i % len(ERRORS)]
                row = ResultRow(status="failed", error_type=error_type, error_message=message, attempts=3,
                                finished_at=finished)
                writes.append(Write(f"k{i}", "failed", 3, error_type, message, [row.to_json()],
                                    ((f"row-{i:06d}", f"d{i}"),)))
            else:
                row = ResultRow(status="ok", content=CAPTION.format(w=640, h=480), finish_reason="stop",
                                prompt_tokens=271, completion_tokens=38, total_tokens=309, attempts=1,
                                latency_ms=latency, ttft_ms=latency / 3, finished_at=finished)
                writes.append(Write(f"k{i}", "ok", 1, results=[row.to_json()], items=((f"row-{i:06d}", f"d{i}"),)))
            if len(writes) == 5_000:
                store.commit(writes, run_id)
                writes = []
        store.commit(writes, run_id)
        store.finish_run(run_id, "finished", {"rows_total": rows, "rows_new": rows, "elapsed_s": 100.0,
                                              "attempts": rows, "rows_ok": int(rows * 0.98)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--images", choices=["sample", "noise"], default="sample")
    parser.add_argument("--limit", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config = config_from_dict(build_job(folder, args.rows, args.images))
        fill_ledger(config.ledger_path, args.rows)
        for sample in ("failed-first", "random"):
            began = time.perf_counter()
            result = write_gallery(config, GalleryOptions(limit=args.limit, sample=sample))
            took = time.perf_counter() - began
            print(f"{args.rows:,} rows, {args.images} images, --limit {args.limit} --sample {sample}: "
                  f"{result.bytes / 1e6:.2f} MB, {result.cards} cards, {result.thumbnails} thumbnails, "
                  f"{result.left_out} left out, built in {took:.1f} s")


if __name__ == "__main__":
    main()
