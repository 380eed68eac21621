"""The plan: manifest checks and the triage of rows against a real ledger written by real runs."""

from __future__ import annotations

import csv

import pytest

from pipeline.api import run_job_async
from pipeline.core.config import config_from_dict
from pipeline.core.errors import ConfigError, ManifestError
from pipeline.edges.ledger import StateStore
from pipeline.run.plan import Plan

from .helpers import COLOURS, job_config, make_image, make_manifest


def triage_all(plan: Plan, store: StateStore | None) -> list[str]:
    return [task.row.id for batch in plan.batches() for task in plan.triage(batch, store)]


async def test_triage_counts_rows_new_changed_resumed_retried_and_skipped(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 6, missing={4})
    endpoint.faults.add("status:code=400,message=nope,match=row-1")  # a failure of the row: settled
    endpoint.faults.add("status:code=500,message=flaky,match=row-2")  # may pass next time: retried
    config = job_config(manifest, tmp_path / "captions.parquet", endpoint.base_url, run={"max_attempts": 1})
    first = await run_job_async(config)
    assert (first.rows_ok, first.rows_failed) == (3, 3)  # row-4's image is missing: a settled failure too

    make_image(manifest.parent / "img_003.png", COLOURS[0], size=(90, 90))  # row-3: changed
    with open(manifest, "a", newline="") as handle:  # row-6: new
        make_image(manifest.parent / "img_006.png", COLOURS[1])
        csv.writer(handle).writerow(["row-6", "img_006.png", "label 6"])
    with StateStore(config.ledger_path) as store:
        assert store.requeue_failed("bad_request") == 1  # row-1: pending again, as ``retry`` leaves it
        plan = Plan(config)
        assert plan.check().rows == 7
        assert triage_all(plan, store) == ["row-1", "row-2", "row-3", "row-6"]
    counts = plan.counts
    assert (counts.new, counts.changed, counts.resumed, counts.retried, counts.skipped) == (1, 1, 1, 1, 3)


def test_without_a_ledger_every_row_is_new_and_the_manifest_digest_follows_the_ids(tmp_path):
    manifest = make_manifest(tmp_path / "in", 5)
    config = job_config(manifest, tmp_path / "out.csv", "http://127.0.0.1:9")
    plan = Plan(config)
    assert triage_all(plan, None) == [f"row-{i}" for i in range(5)]
    assert plan.counts.new == 5 and plan.counts.skipped == 0
    again = Plan(config)
    triage_all(again, None)
    assert again.manifest_digest == plan.manifest_digest
    make_manifest(tmp_path / "in", 6)
    grown = Plan(config)
    triage_all(grown, None)
    assert grown.manifest_digest != plan.manifest_digest


def test_check_refuses_an_existing_output_and_an_empty_manifest(tmp_path):
    manifest = make_manifest(tmp_path / "in", 2)
    (tmp_path / "out.csv").write_text("id\n")
    config = config_from_dict({"endpoint": {"base_url": "http://127.0.0.1:9"}, "request": {"model": "m"},
                               "input": {"manifest": str(manifest)},
                               "output": {"path": str(tmp_path / "out.csv"), "if_exists": "error"}})
    with pytest.raises(ConfigError, match="output.if_exists is 'error'"):
        Plan(config).check()
    manifest.write_text("id,path,label\n")
    with pytest.raises(ManifestError, match="no rows"):
        Plan(job_config(manifest, tmp_path / "other.csv", "http://127.0.0.1:9")).check()
