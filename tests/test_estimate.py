"""`pipeline estimate` against hand-computed numbers: known image sizes, known detail and resize policy."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from pipeline.api import run_job_async
from pipeline.ops.estimate import estimate_job
from pipeline.server import FaultPlan, LocalEndpoint

from .helpers import job_config, make_image, read_rows

# the role and the text, "user" + "Describe.", are 13 characters = 4 tokens (4 characters a token, rounded
# up); one message costs 4 more for its framing, and the reply priming 3
TEXT_TOKENS = 4 + 4 + 3


def manifest_with_sizes(folder, sizes):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, size in enumerate(sizes):
        make_image(folder / f"img_{i}.png", (10 * i, 80, 160), size=size)
        rows.append({"id": f"row-{i}", "path": f"img_{i}.png"})
    rows.append({"id": "broken", "path": "missing.png"})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "path"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


@pytest.mark.parametrize(
    "images, expected_image_tokens",
    [
        ({"detail": "high"}, 765 + 1105),          # 1024x1024 -> 768x768: 4 tiles; 2048x4096 -> 768x1536: 6 tiles
        ({"detail": "low"}, 85 + 85),
        ({"detail": "high", "fit": "openai-low"}, 255 + 255),  # fit in 512x512 first: one tile each
    ],
)
def test_estimate_matches_hand_computed_tokens_and_cost(tmp_path, images, expected_image_tokens):
    manifest = manifest_with_sizes(tmp_path / "in", [(1024, 1024), (2048, 4096)])
    config = job_config(manifest, tmp_path / "out.parquet", request={"model": "gpt-4o", "prompt": "Describe.",
                                                                      "max_tokens": 100, "n": 2},
                        images=images, limits={"prices": {"gpt-4o": {"input": 2.5, "output": 10.0}}})
    report = estimate_job(config)
    assert report.manifest_rows == 3 and report.rows_new == 3
    assert report.rows_invalid == 1 and report.invalid_examples[0]["id"] == "broken"
    assert report.rows_to_send == 2
    assert report.input_tokens == 2 * TEXT_TOKENS + expected_image_tokens
    assert report.output_tokens == 2 * 100 * 2
    assert report.cost == pytest.approx((report.input_tokens * 2.5 + report.output_tokens * 10.0) / 1e6)


async def test_estimate_knows_what_is_done_and_uses_history(tmp_path):
    manifest = manifest_with_sizes(tmp_path / "in", [(64, 48), (32, 32)])
    out = tmp_path / "out.parquet"
    async with LocalEndpoint(FaultPlan()) as ep:
        config = job_config(manifest, out, ep.base_url, request={"model": "m", "prompt": "Describe."})
        await run_job_async(config)
    completion = [r["completion_tokens"] for r in read_rows(out) if r["status"] == "ok"]
    with open(manifest, "a", newline="") as handle:
        csv.writer(handle).writerow(["row-new", "img_0.png"])
    report = estimate_job(config)
    assert report.rows_done == 3  # two ok, one failed for a missing image (row-specific, stays failed)
    assert report.rows_new == 1 and report.rows_to_send == 1
    assert report.output_tokens == round(sum(completion) / len(completion) + 0.4999)
    assert "history" in report.output_basis


def test_estimate_cli_json(tmp_path):
    manifest = manifest_with_sizes(tmp_path / "in", [(100, 100)])
    config = tmp_path / "job.yaml"
    config.write_text(json.dumps({"request": {"model": "m", "prompt": "Describe.", "max_tokens": 50},
                                  "input": {"manifest": str(manifest)}, "images": {"detail": "low"},
                                  "output": {"path": str(tmp_path / "o.csv")}}))
    result = subprocess.run([sys.executable, "-m", "pipeline", "estimate", str(config), "--json"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["input_tokens"] == TEXT_TOKENS + 85 and data["output_tokens"] == 50
    assert data["cost"] is None and not (tmp_path / "o.ledger.sqlite").exists()
