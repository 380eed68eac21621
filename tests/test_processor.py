"""The row processor on its own, against the real embedded endpoint over HTTP: every row ends as an
outcome (never an exception), retries and budget stops included."""

from __future__ import annotations

from pipeline.run.plan import Plan, RowTask
from pipeline.run.processor import RowOutcome, RowProcessor
from pipeline.server import LocalEndpoint

from .helpers import job_config, make_manifest


def requests_seen(ep: LocalEndpoint) -> int:
    return ep.stats.snapshot()["requests"]


def row_tasks(config) -> dict[str, RowTask]:
    plan = Plan(config)
    return {task.row.id: task for batch in plan.batches() for task in plan.triage(batch, None)}


async def test_a_good_row_is_answered_and_handed_over_as_soon_as_it_is_complete(tmp_path, endpoint):
    config = job_config(make_manifest(tmp_path / "in", 1), tmp_path / "out.csv", endpoint.base_url)
    handed: list[RowOutcome] = []
    async with RowProcessor(config, base_url=endpoint.base_url) as processor:
        outcome = await processor.process(row_tasks(config)["row-0"], on_answer=handed.append)
    assert outcome.status == "ok" and outcome.attempts == 1 and outcome.budget_stop is None
    assert handed == [outcome] and handed[0] is outcome  # the one handed over is the one that stands
    assert len(outcome.results) == 1 and len(outcome.results[0]["content"]) > 10
    assert outcome.results[0]["sent_width"] == 40 and outcome.results[0]["status"] == "ok"


async def test_a_missing_or_broken_image_is_a_failed_outcome_without_a_request(tmp_path, endpoint):
    manifest = make_manifest(tmp_path / "in", 2, missing={0})
    (manifest.parent / "img_001.png").write_bytes(b"not an image at all")
    config = job_config(manifest, tmp_path / "out.csv", endpoint.base_url)
    tasks = row_tasks(config)
    async with RowProcessor(config, base_url=endpoint.base_url) as processor:
        prepared = await processor.prepare(tasks["row-0"])
        assert prepared.failure is not None and prepared.payload == b""
        missing = await processor.send(prepared)
        broken = await processor.process(tasks["row-1"])
    assert (missing.status, missing.error_type, missing.attempts) == ("failed", "image_missing", 0)
    assert missing.key == f"image:{tasks['row-0'].digest}" and missing.final
    assert broken.status == "failed" and broken.error_type.startswith("image_") and broken.attempts == 0
    assert broken.results[0]["error_message"] == broken.error_message
    assert requests_seen(endpoint) == 0


async def test_a_400_fails_the_row_at_once_and_a_5xx_is_retried_until_it_passes(tmp_path, endpoint):
    endpoint.faults.add("status:code=400,message=nope,match=row-0")
    endpoint.faults.add("status:code=500,message=flaky,match=row-1,times=2")
    config = job_config(make_manifest(tmp_path / "in", 2), tmp_path / "out.csv", endpoint.base_url)
    tasks = row_tasks(config)
    async with RowProcessor(config, base_url=endpoint.base_url) as processor:
        refused = await processor.process(tasks["row-0"])
        assert requests_seen(endpoint) == 1  # a bad request is not retried
        flaky = await processor.process(tasks["row-1"])
    assert (refused.status, refused.error_type, refused.attempts, refused.final) == ("failed", "bad_request", 1, True)
    assert "nope" in refused.error_message and refused.results[0]["status"] == "failed"
    assert (flaky.status, flaky.attempts, flaky.error_type) == ("ok", 3, None)
    assert flaky.results[0]["attempts"] == 3 and requests_seen(endpoint) == 4


async def test_the_budget_stops_the_run_without_failing_the_row(tmp_path, endpoint):
    config = job_config(make_manifest(tmp_path / "in", 2), tmp_path / "out.csv", endpoint.base_url,
                        limits={"max_requests": 1})
    tasks = row_tasks(config)
    async with RowProcessor(config, base_url=endpoint.base_url) as processor:
        first = await processor.process(tasks["row-0"])
        second = await processor.process(tasks["row-1"])
    assert first.status == "ok" and first.budget_stop is None
    assert second.status is None and second.results == [] and second.error_type is None
    assert "max_requests=1" in second.budget_stop
    assert requests_seen(endpoint) == 1


async def test_an_answer_over_max_response_bytes_fails_its_row_once_and_stores_no_answer(tmp_path, endpoint):
    config = job_config(make_manifest(tmp_path / "in", 1), tmp_path / "out.csv", endpoint.base_url,
                        request={"model": "test-model", "prompt": "Describe {id}.", "max_response_bytes": 1024,
                                 "n": 4})  # four choices streamed: well over 1 KB
    async with RowProcessor(config, base_url=endpoint.base_url) as processor:
        outcome = await processor.process(row_tasks(config)["row-0"])
    assert (outcome.status, outcome.error_type, outcome.attempts) == ("failed", "response_too_large", 1)
    assert "request.max_response_bytes (1024)" in outcome.error_message
    assert [r["content"] for r in outcome.results] == [None] and outcome.results[0]["status"] == "failed"
    assert requests_seen(endpoint) == 1  # not retried
