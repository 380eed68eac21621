"""The gallery page of a real run: the embedded endpoint's fault knobs make failed rows (an HTTP 400 whose
message has markup, a 401 that quotes the API key back, a missing image) and ``say`` answers with markup and
with the key, ``pipeline run`` writes the page (``report.gallery: true``), and a real headless Chromium opens
it from ``file://``: the cards, the failed filter clicked, a column filter typed, ``<script>`` shown as text
and never run, and not one console error.
"""

from __future__ import annotations

import html
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.api import run_job
from pipeline.cli import main
from pipeline.edges.configfile import load_config
from pipeline.edges.ledger import StateStore
from pipeline.ops.gallery import GalleryOptions, gallery_path, pick_rows, write_gallery

from .browser import chromium
from .helpers import make_manifest

ROWS = 12
SECRET = "sk-" "gallerytest0123456789abcdef"  # split: not a real key, and must not look like one
MARKUP = "<script>alert(1)</script>"
FAULTS = [
    f"say:text={MARKUP},match=Describe row-7.",
    f"say:text=the key is {SECRET} here,match=Describe row-10.",
    "status:code=400,message=bad <b>request</b> for this row,match=Describe row-3.",
    "echo_auth:code=401,match=Describe row-9.",
]
FAILED = {"row-3", "row-5", "row-9"}  # the 400, the missing image, the 401


def write_job(folder: Path, **report: Any) -> Path:
    """A YAML job over ``ROWS`` images (row-5's file missing) on the embedded endpoint with ``FAULTS``."""
    manifest = make_manifest(folder / "in", ROWS, missing={5})
    document = {
        "endpoint": {"base_url": "local", "api_key": SECRET, "local": {"faults": FAULTS},
                     "timeout": {"connect": 5, "first_byte": 10, "idle": 5, "total": 30}},
        "request": {"model": "test-model", "prompt": "Describe {id}."},
        "input": {"manifest": str(manifest)},
        "run": {"concurrency": 4, "max_attempts": 2, "backoff_base": 0.01, "backoff_max": 0.05},
        "output": {"path": str(folder / "out" / "captions.parquet")},
        "report": {"gallery": True, **report},
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real run of the job (the page is written after it); returns the config file."""
    config_path = write_job(tmp_path_factory.mktemp("gallery"))
    summary = run_job(config_path)
    assert summary.exit_code == 1 and summary.rows_failed == len(FAILED), summary
    return config_path


def page_of(job: Path) -> str:
    return gallery_path(load_config(job).output.path).read_text(encoding="utf-8")


def card_ids(page: str) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'<article class="card [a-z]+" data-i="\d+" data-id="([^"]*)"', page)]


async def test_gallery_in_chromium(job: Path, tmp_path: Path) -> None:
    """The page a run wrote, in a real browser: every row a card, the failed filter clicked shows exactly
    the failed rows, a column filter typed narrows them, the caption ``<script>alert(1)</script>`` is text
    (no script element, no dialog), and the console stays free of errors (CSP refusals included)."""
    url = gallery_path(load_config(job).output.path).as_uri()
    async with chromium(tmp_path / "profile") as browser:
        page = await browser.open(url)
        assert await page.evaluate("document.body.getAttribute('data-ready')") == "1"
        assert await page.evaluate("document.querySelectorAll('#grid .card').length") == ROWS
        visible = "[...document.querySelectorAll('#grid .card')].filter(c => !c.hidden)"
        assert await page.evaluate(f"{visible}.length") == ROWS

        await page.click("#f-status-failed")
        shown = await page.evaluate(f"{visible}.map(c => [c.dataset.id, c.dataset.status])")
        assert sorted(shown) == sorted([row_id, "failed"] for row_id in FAILED)
        assert await page.evaluate("document.getElementById('shown').textContent") == f"3 of {ROWS} cards match"

        await page.click("#f-status-all")
        await page.evaluate("(() => { const s = document.getElementById('f-column'); "
                            "s.value = [...s.options].find(o => o.textContent === 'label').value; "
                            "s.dispatchEvent(new Event('change')); })()")
        await page.type_into("#f-value", "label 1")
        assert sorted(await page.evaluate(f"{visible}.map(c => c.dataset.id)")) == ["row-1", "row-10", "row-11"]

        caption = await page.evaluate("document.querySelector('.card[data-id=\"row-7\"] .caption').textContent")
        assert caption == MARKUP
        assert await page.evaluate("document.querySelectorAll('#grid script, #failures script').length") == 0
        assert await page.evaluate("document.querySelectorAll('script').length") == 1  # the page's own
        assert page.dialogs == [] and page.console_errors == [], (page.dialogs, page.console_errors)


async def test_pager_in_chromium(job: Path, tmp_path: Path) -> None:
    """The pager shows ``page_size`` cards at a time, next / previous walk through every card once, and a
    filter starts again at page 1 over the matching cards only."""
    out = tmp_path / "paged.html"
    write_gallery(load_config(job), GalleryOptions(page_size=5), out=out)
    visible = "[...document.querySelectorAll('#grid .card')].filter(c => !c.hidden).map(c => c.dataset.id)"
    async with chromium(tmp_path / "profile") as browser:
        page = await browser.open(out.as_uri())
        seen = [await page.evaluate(visible)]
        for _ in range(2):
            await page.click("#next")
            seen.append(await page.evaluate(visible))
        assert [len(ids) for ids in seen] == [5, 5, 2] and len({i for ids in seen for i in ids}) == ROWS
        assert await page.evaluate("document.getElementById('next').disabled") is True
        assert await page.evaluate("document.getElementById('page').textContent") == "page 3 of 3"
        await page.click("#prev")
        assert await page.evaluate(visible) == seen[1]
        await page.click("#f-status-failed")
        assert sorted(await page.evaluate(visible)) == sorted(FAILED)
        assert await page.evaluate("document.getElementById('page').textContent") == "page 1 of 1"
        assert page.dialogs == [] and page.console_errors == [], (page.dialogs, page.console_errors)


def test_page_is_self_contained_masked_and_complete(job: Path) -> None:
    """Nothing to fetch (no http(s) URL in any src/href, only data: images, a CSP that forbids the rest), no
    secret anywhere (the key a 401 quoted back and the one an answer said), markup escaped, the failures
    grouped by type with their rows, and the run's numbers at the top."""
    page = page_of(job)
    assert not re.search(r'(?:src|href)\s*=\s*"(?!data:)', page)
    assert re.search(r"default-src 'none'; img-src data:;", page)
    assert len(re.findall(r'<img src="data:image/webp;base64,', page)) == ROWS - 1  # row-5 has no file
    assert SECRET not in page and SECRET[:12] not in page
    assert html.escape(MARKUP) in page and MARKUP not in page
    assert "bad &lt;b&gt;request&lt;/b&gt; for this row" in page
    groups = re.findall(r'<span class="etype">([^<]+)</span> (\d+) rows?.*?<tbody>(.*?)</tbody>', page)
    assert [(t, n, re.findall(r"<tr><td>([^<]+)</td>", body)) for t, n, body in groups] == [
        ("auth_error", "1", ["row-9"]), ("bad_request", "1", ["row-3"]), ("image_missing", "1", ["row-5"])]
    assert sorted(card_ids(page)[:3]) == sorted(FAILED)  # failed first
    assert re.search(rf'id="n-rows">{ROWS}<', page) and re.search(r'id="n-failed">3<', page)
    assert page.count("<svg") == 2 and page.count('class="bar"') >= 20


def test_cli_limit_sample_seed_and_run(job: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pipeline gallery``: --limit with failed-first keeps the failed rows, a seeded random sample is the
    same for the same seed, --run picks that run's rows, and an unknown run is one precise error."""
    out = tmp_path / "g.html"
    assert main(["gallery", str(job), "--limit", "4", "--out", str(out)]) == 0
    assert "4 of 12 rows as cards" in capsys.readouterr().out
    ids = card_ids(out.read_text())
    assert len(ids) == 4 and set(ids[:3]) == FAILED
    picks = []
    for seed in (1, 1, 2):
        assert main(["gallery", str(job), "--limit", "5", "--sample", "random", "--seed", str(seed),
                     "--out", str(out)]) == 0
        picks.append(card_ids(out.read_text()))
    assert picks[0] == picks[1] and picks[0] != picks[2] and len(picks[0]) == 5
    assert main(["gallery", str(job), "--run", "1", "--sample", "newest", "--out", str(out)]) == 0
    assert len(card_ids(out.read_text())) == ROWS
    assert main(["gallery", str(job), "--run", "7"]) == 2
    assert "--run 7: no such run" in capsys.readouterr().err


def test_size_bound_leaves_cards_out(job: Path, tmp_path: Path) -> None:
    """The page never grows past its bound: cards are left out from the end, and the page says so."""
    config = load_config(job)
    full = write_gallery(config, out=tmp_path / "full.html")
    bound = full.bytes - 2_000
    small = write_gallery(config, GalleryOptions(max_bytes=bound), out=tmp_path / "small.html")
    assert small.bytes <= bound < full.bytes and small.left_out > 0
    assert small.cards + small.left_out == full.cards == ROWS
    assert f"{small.left_out} more cards were left out" in (tmp_path / "small.html").read_text()


def test_a_missing_manifest_still_gives_a_page(job: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ledger alone: every card with its caption and outcome, no images or columns, and a warning."""
    document = yaml.safe_load(job.read_text())
    document["input"]["manifest"] = str(tmp_path / "gone.csv")
    moved = tmp_path / "job.yaml"
    moved.write_text(yaml.safe_dump(document))
    result = write_gallery(load_config(moved), out=tmp_path / "g.html")
    page = (tmp_path / "g.html").read_text()
    assert result.cards == ROWS and result.thumbnails == 0 and html.escape(MARKUP) in page
    assert page.count("not in the manifest") == ROWS
    assert any("gone.csv" in r.getMessage() for r in caplog.records if r.name == "pipeline.ops.gallery")


def test_a_gallery_error_never_fails_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A page that cannot be written (a folder sits where it goes) is a warning; the run ends as it would."""
    config_path = write_job(tmp_path)
    output = load_config(config_path).output.path
    gallery_path(output).mkdir(parents=True)
    summary = run_job(config_path)
    assert summary.exit_code == 1 and summary.gallery_path is None
    assert (output.with_name("captions.summary.json")).exists()
    assert any("gallery not written" in r.getMessage() for r in caplog.records)
    shutil.rmtree(gallery_path(output))


@pytest.mark.parametrize(("sample", "expected"), [
    ("newest", ["d", "c", "b"]),
    ("failed-first", ["c", "a", "d"]),
    ("random", "drawn with the seed, shown in row id order"),
])
def test_pick_rows(sample: str, expected: list[str] | str) -> None:
    rows = [("a", "failed", "2026-01-01T00:00:01"), ("b", "ok", "2026-01-01T00:00:02"),
            ("c", "failed", "2026-01-01T00:00:03"), ("d", "ok", "2026-01-01T00:00:04")]
    picked = [row_id for row_id, _, _ in pick_rows(rows, 3, sample, seed=3)]  # type: ignore[arg-type]
    if sample == "random":
        again = [row_id for row_id, _, _ in pick_rows(rows, 3, sample, seed=3)]  # type: ignore[arg-type]
        assert picked == again == sorted(picked) and len(set(picked)) == 3
    else:
        assert picked == expected


def test_finished_rows_by_run(job: Path) -> None:
    with StateStore(load_config(job).ledger_path) as store:
        everything = store.finished_rows()
        assert len(everything) == ROWS and {r[0] for r in everything if r[1] == "failed"} == FAILED
        assert store.finished_rows(1) == everything and store.finished_rows(2) == []
