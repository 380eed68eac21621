"""The Ray engine (``run.engine: ray``) on a real two-node local Ray cluster (tests/raycluster.py).

One cluster for the module (two ``ray start --block`` processes, 127.0.0.2 and 127.0.0.3, one CPU each),
on one xdist worker (``--dist loadfile`` in pyproject.toml). The endpoint is the embedded one on 127.0.0.1, started by the test
(or by the CLI for ``base_url: local``); the actors reach it from the cluster's worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from pipeline.api import run_job, run_job_async
from pipeline.core.config import RayConfig, config_from_dict
from pipeline.core.errors import ClusterError, ObjectStoreError
from pipeline.edges.images import ImagePayload
from pipeline.edges.ledger import StateStore
from pipeline.edges.manifest import Row
from pipeline.ops.jobs import job_status
from pipeline.run.plan import RowTask
from pipeline.run.processor import PreparedRow
from pipeline.run.rayengine import (
    BLOCKS_PER_ACTOR,
    LOCAL_RAY_IP,
    actor_config,
    init_options,
)
from pipeline.run.raypreflight import portable, task_cpus
from pipeline.server import LocalEndpoint, parse_fault_spec

from .helpers import job_config, make_manifest, read_rows
from .raycluster import (
    HEAD_IP,
    SECOND_IP,
    RayCluster,
    command_line,
    descendants,
    free_ports,
)

#: The columns that must match between engines (timings and response ids differ run to run).
SAME = ("id", "path", "label", "status", "content", "finish_reason", "choice_index", "error_type", "error_message",
        "attempts", "prompt_tokens", "completion_tokens", "image_format", "image_width", "image_height",
        "sent_bytes", "image_action")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    started = RayCluster(tmp_path_factory.mktemp("raylogs"))
    try:
        yield started
    finally:
        started.stop()


def ray_config(manifest: Path, output: Path, base_url: str, cluster: RayCluster, **sections: dict[str, Any]) -> Any:
    ray = {"address": cluster.address, "actors": 2, "rows_per_block": 4, **sections.pop("ray", {})}
    run = {"engine": "ray", **sections.pop("run", {})}
    return job_config(manifest, output, base_url, run=run, ray=ray, **sections)


def add_faults(endpoint: LocalEndpoint, *specs: str) -> None:
    for spec in specs:
        endpoint.faults.add(parse_fault_spec(spec))


def same_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{name: row[name] for name in SAME} for row in rows]


async def test_ray_gives_the_local_engines_rows(tmp_path, endpoint, cluster):
    manifest = make_manifest(tmp_path / "in", 18, missing={5})
    local_out, ray_out = tmp_path / "local" / "captions.parquet", tmp_path / "ray" / "captions.parquet"
    local = await run_job_async(job_config(manifest, local_out, endpoint.base_url))
    sent_locally = endpoint.stats.snapshot()["requests"]

    summary = await run_job_async(ray_config(manifest, ray_out, endpoint.base_url, cluster))

    assert same_columns(read_rows(ray_out)) == same_columns(read_rows(local_out))
    assert endpoint.stats.snapshot()["requests"] == 2 * sent_locally == 34  # the missing image sends nothing
    assert (summary.rows_ok, summary.rows_failed, summary.exit_code) == (local.rows_ok, local.rows_failed, 1) == (
        17, 1, 1)
    assert summary.errors == {"image_missing": 1} and summary.attempts == local.attempts


def _preflight_tasks() -> Counter[str]:
    """Pre-flight tasks Ray has run so far, by node address (``ray.timeline``: the GCS's task events; a
    task of the stage is named after its operator, ``MapBatches(preflight_block)``; had Ray Data fused the
    stage into the actors' operator, there would be none, only ``MapWorker(...)`` actor tasks)."""
    return Counter(event["pid"] for event in ray.timeline() if event.get("cat") == "task::MapBatches(preflight_block)")


async def _new_preflight_tasks(before: Counter[str], at_least: int) -> Counter[str]:
    """The tasks run since ``before`` once ``at_least`` of them have reached the GCS (workers report task
    events every second or so: polled, bounded)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        new = await asyncio.to_thread(_preflight_tasks) - before
        if new.total() >= at_least or asyncio.get_running_loop().time() > deadline:
            return new
        await asyncio.sleep(0.5)


async def test_preflight_runs_in_tasks_on_both_nodes_with_the_local_engines_results(tmp_path, endpoint, cluster):
    rows, per_block = 12, 2
    manifest = make_manifest(tmp_path / "in", rows, missing={3})
    (tmp_path / "in" / "img_007.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a picture" * 8)  # a broken image
    images = {"format": "jpeg", "max_side": 24}  # every image decoded, resized and re-encoded
    local_out, ray_out = tmp_path / "local" / "captions.parquet", tmp_path / "ray" / "captions.parquet"
    await run_job_async(job_config(manifest, local_out, endpoint.base_url, images=images))
    ray.init(**init_options(cluster.address))  # the run joins this connection (and leaves it open)
    try:
        before = await asyncio.to_thread(_preflight_tasks)
        # preflight_cpus == cpus_per_actor: the remote arguments Ray Data would fuse the two stages on
        summary = await run_job_async(ray_config(manifest, ray_out, endpoint.base_url, cluster, images=images, ray={
            "rows_per_block": per_block, "preflight_cpus": 0.25, "cpus_per_actor": 0.25}))
        new = await _new_preflight_tasks(before, rows // per_block)
    finally:
        ray.shutdown()

    result = read_rows(ray_out)
    assert same_columns(result) == same_columns(read_rows(local_out))
    broken = result[7]
    assert (broken["status"], broken["error_type"], broken["attempts"]) == ("failed", "image_corrupt", 0)
    assert "img_007.png" in broken["error_message"] and result[3]["error_type"] == "image_missing"
    assert {r["image_action"] for i, r in enumerate(result) if i not in (3, 7)} == {"re_encoded"}
    assert (summary.rows_ok, summary.rows_failed) == (rows - 2, 2)
    # one task per block, spread over both nodes (the actors never pre-flighted a row)
    assert new.total() >= rows // per_block and set(new) == {HEAD_IP, SECOND_IP}, new


async def test_failures_stay_rows_a_rerun_sends_nothing_and_retry_resends_them(tmp_path, endpoint, cluster):
    add_faults(endpoint, "status:code=500,message=boom,match=row-2.", "status:code=400,message=no,match=row-6.")
    manifest = make_manifest(tmp_path / "in", 10, missing={8})
    out = tmp_path / "captions.parquet"
    config = ray_config(manifest, out, endpoint.base_url, cluster, run={"max_attempts": 2})

    first = await run_job_async(config)
    rows = {r["id"]: r for r in read_rows(out)}
    assert len(rows) == 10 and first.rows_ok == 7 and first.rows_failed == 3
    assert (rows["row-2"]["status"], rows["row-2"]["error_type"], rows["row-2"]["attempts"]) == (
        "failed", "server_error", 2)
    assert (rows["row-6"]["error_type"], rows["row-8"]["error_type"]) == ("bad_request", "image_missing")
    sent = endpoint.stats.snapshot()["requests"]
    assert sent == 7 + 2 + 1  # ok rows once, row-2 twice, row-6 once, the missing image never

    again = await run_job_async(config)  # row-2's server error may pass now: it alone goes out again
    assert endpoint.stats.snapshot()["requests"] == sent + 2 and again.rows_retried == 1 and again.rows_skipped == 9
    endpoint.faults.clear()
    retried = await run_job_async(config, command="retry")  # every failed row, bad request included
    rows = {r["id"]: r for r in read_rows(out)}
    assert retried.requeued == 3 and retried.rows_ok == 2 and retried.rows_failed == 1
    assert [i for i, r in rows.items() if r["status"] == "failed"] == ["row-8"]
    assert endpoint.stats.snapshot()["requests"] == sent + 2 + 2
    nothing = await run_job_async(config)
    assert nothing.attempts == 0 and endpoint.stats.snapshot()["requests"] == sent + 4


def test_cli_engine_option_runs_the_demo_job_on_the_cluster(tmp_path, cluster):
    manifest = make_manifest(tmp_path / "in", 6)
    path = tmp_path / "job.yaml"
    document = {"endpoint": {"base_url": "local"}, "request": {"model": "m", "prompt": "Describe {id}."},
                "input": {"manifest": str(manifest)}, "output": {"path": str(tmp_path / "out" / "c.parquet")},
                "run": {"concurrency": 4}, "ray": {"address": cluster.address, "actors": 2, "rows_per_block": 2}}
    path.write_text(yaml.safe_dump(document))
    log = tmp_path / "run.log"

    result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--engine", "ray", "--no-progress",
                             "--log-file", str(log)], capture_output=True, text=True, timeout=240, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["status"] for r in read_rows(tmp_path / "out" / "c.parquet")] == ["ok"] * 6
    assert "ray engine: 6 rows to send in 3 blocks of up to 2 rows, 2 actors; the cluster has 2 CPUs on 2 nodes" in (
        log.read_text())
    status = subprocess.run([sys.executable, "-m", "pipeline", "status", str(path), "--json"], capture_output=True,
                            text=True, timeout=60, check=False)
    report = json.loads(status.stdout)
    assert report["rows"]["ok"] == 6 and report["last_run"]["status"] == "finished"


def test_without_ray_installed_the_error_names_the_extra(tmp_path):
    manifest = make_manifest(tmp_path / "in", 2)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"request": {"model": "m"}, "input": {"manifest": str(manifest)},
                                    "output": {"path": str(tmp_path / "c.parquet")}}))
    hide_ray = ("import sys; sys.modules['ray'] = None; from pipeline.cli import main; "
                f"sys.exit(main(['run', {str(path)!r}, '--engine', 'ray', '--no-log-file']))")

    result = subprocess.run([sys.executable, "-c", hide_ray], capture_output=True, text=True, timeout=60, check=False)

    assert result.returncode == 2, result.stderr
    assert "run.engine is 'ray' but Ray is not installed: pip install 'pipeline[ray]'" in result.stderr
    assert not (tmp_path / "c.parquet").exists()


def test_each_actor_gets_its_share_of_the_job_limits(tmp_path):
    config = config_from_dict({
        "request": {"model": "m"}, "input": {"manifest": str(tmp_path / "m.csv"), "root": "images"},
        "output": {"path": str(tmp_path / "c.parquet")}, "run": {"concurrency": 10, "engine": "ray"},
        "ray": {"actors": 4}, "limits": {"requests_per_minute": 600, "tokens_per_minute": 1000, "max_requests": 9,
                                         "min_concurrency": 4}})

    share = actor_config(config)

    assert share.run.concurrency == 2 and share.limits.min_concurrency == 2
    assert (share.limits.requests_per_minute, share.limits.tokens_per_minute) == (150, 250)
    assert share.limits.max_requests == 2 and share.input.root == Path("images").absolute()


@pytest.mark.parametrize(("address", "node_ip"), [
    ("127.0.0.2:6379", "127.0.0.2"), ("ray://127.0.0.3:10001", "127.0.0.3"), ("head.example:6379", None),
    ("auto", None), (None, None)])
def test_a_driver_joining_a_loopback_cluster_registers_on_its_address(address, node_ip):
    assert init_options(address).get("_node_ip_address") == node_ip


def test_a_ray_the_run_starts_itself_is_local_and_on_a_loopback_address():
    options = init_options(None, local=True)
    assert (options["address"], options["_node_ip_address"], options["include_dashboard"]) == (
        "local", LOCAL_RAY_IP, False)


def _map_workers(cluster: RayCluster) -> list[int]:
    """Pids of the cluster's captioning actors (Ray titles them ``ray::MapWorker(...)``)."""
    return [pid for node in cluster.nodes for pid in descendants(node.process.pid)
            if command_line(pid).startswith(b"ray::MapWorker")]


async def test_a_killed_actor_costs_at_most_its_blocks_and_every_row_is_recorded_once(tmp_path, cluster):
    rows, per_block = 24, 3
    manifest = make_manifest(tmp_path / "in", rows)
    out = tmp_path / "captions.parquet"
    killed: list[int] = []

    def kill_one_actor(progress: Any) -> None:
        if progress.done >= 6 and not killed and (workers := _map_workers(cluster)):
            os.kill(workers[0], signal.SIGKILL)
            killed.append(workers[0])

    async with LocalEndpoint(chunk_delay=0.02) as endpoint:  # each answer takes a moment: the kill lands mid-run
        config = ray_config(manifest, out, endpoint.base_url, cluster, ray={"rows_per_block": per_block})
        summary = await run_job_async(config, on_progress=kill_one_actor)
        sent = endpoint.stats.snapshot()["requests"]
        rerun = await run_job_async(config)
        assert endpoint.stats.snapshot()["requests"] == sent and rerun.attempts == 0

    assert killed, "no captioning actor was found to kill"
    result = read_rows(out)
    assert [r["id"] for r in result] == [f"row-{i}" for i in range(rows)]
    assert all(r["status"] == "ok" for r in result) and summary.rows_ok == rows
    # the killed actor's blocks in flight are sent again whole, and nothing else is
    assert rows <= sent <= rows + BLOCKS_PER_ACTOR * per_block


def _recorded_ok(ledger: Path, ids: list[str]) -> int:
    """Rows the ledger holds as ok (read while the driver writes: SQLite WAL readers do not block it)."""
    with StateStore(ledger) as store:
        return sum(1 for state in store.item_states(ids).values() if state.status == "ok")


def _marks_left(ledger: Path) -> int:
    """Provisional in-flight requests (``ray:<digest>``) still in the ledger."""
    with StateStore(ledger) as store:
        return store.db.execute("SELECT COUNT(*) FROM requests WHERE key LIKE 'ray:%'").fetchone()[0]


async def test_a_killed_driver_keeps_the_blocks_it_recorded_and_a_rerun_sends_only_the_rest(tmp_path, cluster):
    rows, per_block, actors = 24, 2, 2
    manifest = make_manifest(tmp_path / "in", rows)
    ids = [f"row-{i}" for i in range(rows)]
    out = tmp_path / "out" / "captions.parquet"
    async with LocalEndpoint(chunk_delay=0.02) as endpoint:
        config = ray_config(manifest, out, endpoint.base_url, cluster,
                            ray={"rows_per_block": per_block, "actors": actors})
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
        driver = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", "run", str(path), "--no-progress", "--no-log-file",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:  # the driver made its ledger before its first request: reading it from then on is safe
            await endpoint.stats.wait_until(lambda stats: stats.streams_completed >= 1, timeout=180)
            deadline = asyncio.get_running_loop().time() + 60
            while (recorded := await asyncio.to_thread(_recorded_ok, config.ledger_path, ids)) < 4:
                assert driver.returncode is None, "the driver ended before it was killed"
                assert asyncio.get_running_loop().time() < deadline, "no block was recorded in 180 s"
                with contextlib.suppress(TimeoutError):  # the pause between polls watches the driver
                    await asyncio.wait_for(driver.wait(), 0.2)
        finally:
            if driver.returncode is None:
                driver.kill()
            await asyncio.wait_for(driver.wait(), 30)
        recorded = await asyncio.to_thread(_recorded_ok, config.ledger_path, ids)
        left = job_status(config)["rows"]  # the dead driver's marks: its blocks handed to the cluster

        rerun = await run_job_async(config)
        sent = endpoint.stats.snapshot()["requests"]

    in_flight = left.get("in_flight", 0)
    assert left["ok"] == recorded and 0 < in_flight <= actors * BLOCKS_PER_ACTOR * per_block
    assert rerun.rows_ok == rows - recorded and rerun.rows_skipped == recorded  # only rows without an outcome
    # as in the local engine: a row marked in flight by a run that died is resumed, the others are new
    assert (rerun.rows_resumed, rerun.rows_new) == (in_flight, rows - recorded - in_flight)
    assert job_status(config)["rows"] == {"ok": rows} and _marks_left(config.ledger_path) == 0
    assert [(r["id"], r["status"]) for r in read_rows(out)] == [(i, "ok") for i in ids]
    # paid twice: at most what was in flight when the driver died (every actor's blocks)
    assert rows <= sent <= rows + actors * BLOCKS_PER_ACTOR * per_block


def test_a_cluster_that_is_not_there_is_one_error_naming_ray_address(tmp_path):
    manifest = make_manifest(tmp_path / "in", 2)
    port = free_ports(HEAD_IP, 1)[0]  # nothing listens there
    config = job_config(manifest, tmp_path / "c.parquet", run={"engine": "ray"},
                        ray={"address": f"{HEAD_IP}:{port}", "actors": 2})

    with pytest.raises(ClusterError, match=rf"ray.address {HEAD_IP}:{port}: cannot join the Ray cluster: .*"
                                           r"start it \(ray start --head\) or fix ray.address"):
        run_job(config)

    assert job_status(config)["last_run"]["status"] == "failed" and not (tmp_path / "c.parquet").exists()


def _hold_the_head(cluster: RayCluster, cpus: float) -> Any:
    """An actor holding ``cpus`` of the head's CPU (so the captioning actors cannot all start there); the
    caller is connected to the cluster and ends it with ``ray.kill``. Defined here: Ray ships it by value."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    head = next(node["NodeID"] for node in ray.nodes() if node["Alive"] and node["NodeManagerAddress"] == HEAD_IP)

    class Ballast:
        def ready(self) -> bool:
            return True

    ballast = ray.remote(num_cpus=cpus)(Ballast).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
    ray.get(ballast.ready.remote(), timeout=120)
    return ballast


async def test_a_lost_node_costs_at_most_the_blocks_in_flight_and_a_rerun_records_every_row_once(tmp_path, cluster):
    """The second node is lost at once (every process of it killed) while a captioning actor runs there; the
    head, freed of its ballast then, takes the actor Ray restarts. The head may hold only one actor before."""
    import ray

    rows, per_block, actors = 24, 2, 2
    manifest = make_manifest(tmp_path / "in", rows)
    out = tmp_path / "captions.parquet"
    second, lost = cluster.nodes[1], []
    ray.init(**init_options(cluster.address))  # the runs below share this connection (they do not end it)
    try:
        ballast = _hold_the_head(cluster, 0.6)  # 0.4 CPU left there: one actor of 0.25 at most

        def lose_the_second_node(progress: Any) -> None:
            if progress.done >= 4 and not lost and any(command_line(pid).startswith(b"ray::MapWorker")
                                                       for pid in descendants(second.process.pid)):
                lost.append(progress.done)  # rows recorded when the node went
                second.lose()
                ray.kill(ballast)

        async with LocalEndpoint(chunk_delay=0.05) as endpoint:  # answers take a moment: the loss lands mid-run
            config = ray_config(manifest, out, endpoint.base_url, cluster,
                                ray={"rows_per_block": per_block, "actors": actors})
            try:
                first = await run_job_async(config, on_progress=lose_the_second_node)
            except ClusterError as exc:  # Ray gave up on the job: one error, the recorded rows kept
                assert "run the same command again to resume" in str(exc)
                first = None
            rerun = await run_job_async(config)
            resent = endpoint.stats.snapshot()["requests"] - rows
    finally:
        ray.shutdown()
        cluster.replace_second()  # the next tests get two nodes again

    assert lost, "no captioning actor ran on the second node"
    assert [(r["id"], r["status"]) for r in read_rows(out)] == [(f"row-{i}", "ok") for i in range(rows)]
    assert rerun.rows_ok + rerun.rows_skipped == rows and (first is None or first.rows_ok == rows)
    # paid twice: at most the blocks out on the cluster and not back on the driver when the node went (the
    # lost node's blocks in flight, and those it finished that the driver had not taken yet: Ray runs them
    # again from their inputs); on an idle machine that is the lost actor's blocks in flight
    assert 0 <= resent <= rows - lost[0], (resent, lost, first)


async def test_identical_requests_are_sent_once_and_the_ledger_matches_the_local_engines(tmp_path, endpoint, cluster):
    folder = tmp_path / "in"
    manifest = make_manifest(folder, 8, missing={5})
    with open(manifest, "a", newline="") as handle:  # images listed again (one twice), the missing one too
        csv.writer(handle).writerows([f"dup-{n}", f"img_{i:03d}.png", f"again {i}"]
                                     for n, i in enumerate((3, 0, 5, 7, 3, 1)))
    local_out, ray_out = tmp_path / "local" / "captions.parquet", tmp_path / "ray" / "captions.parquet"
    request = {"model": "m", "prompt": "Describe it."}  # one prompt: a repeated image is a repeated request
    local_config = job_config(manifest, local_out, endpoint.base_url, request=request)
    local = await run_job_async(local_config)
    sent_locally = endpoint.stats.snapshot()["requests"]
    config = ray_config(manifest, ray_out, endpoint.base_url, cluster, request=request, ray={"rows_per_block": 3})

    summary = await run_job_async(config)

    assert sent_locally == 7 and endpoint.stats.snapshot()["requests"] == 2 * sent_locally  # the unique images
    assert same_columns(read_rows(ray_out)) == same_columns(read_rows(local_out))
    rows = {r["id"]: r for r in read_rows(ray_out)}
    assert rows["dup-4"]["content"] == rows["row-3"]["content"] and rows["dup-2"]["error_type"] == "image_missing"
    assert (summary.rows_ok, summary.rows_failed, summary.rows_deduplicated) == (
        local.rows_ok, local.rows_failed, local.rows_deduplicated) == (12, 2, 5)
    with StateStore(local_config.ledger_path) as a, StateStore(config.ledger_path) as b:
        assert a.status_counts() == b.status_counts() and _mapping(a) == _mapping(b)
    assert _marks_left(config.ledger_path) == 0


def _mapping(store: StateStore) -> list[tuple[str, str, str]]:
    """Each manifest row's request and that request's status (keys differ by nothing between engines)."""
    return store.db.execute("SELECT i.row_id, i.request_key, r.status FROM items i JOIN requests r "
                            "ON r.key = i.request_key ORDER BY i.row_id").fetchall()


def test_a_local_ray_started_by_the_run_stays_on_a_loopback_address(tmp_path):
    """``ray.address: null`` and no cluster to join: the run starts a Ray of its own, on 127.0.0.2. In a
    process of its own, with HOME and Ray's temp folder of its own: Ray 2.60 turns token authentication on
    for a Ray that ``ray.init`` starts, in that process's environment and in ``~/.ray/auth_token``."""
    manifest = make_manifest(tmp_path / "in", 4)
    path = tmp_path / "job.yaml"
    document = {"endpoint": {"base_url": "local"}, "request": {"model": "m", "prompt": "Describe {id}."},
                "input": {"manifest": str(manifest)}, "output": {"path": str(tmp_path / "out" / "c.parquet")},
                "run": {"concurrency": 2}, "ray": {"address": None, "actors": 1, "rows_per_block": 2}}
    path.write_text(yaml.safe_dump(document))
    log = tmp_path / "run.log"
    ray_temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths
    env = {**os.environ, "HOME": str(tmp_path / "home"), "RAY_TMPDIR": str(ray_temp), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        result = subprocess.run([sys.executable, "-m", "pipeline", "run", str(path), "--engine", "ray",
                                 "--no-progress", "--log-file", str(log)],
                                capture_output=True, text=True, timeout=240, check=False, env=env)
        leftovers = [pid for pid in _all_pids() if str(ray_temp).encode() in command_line(pid)]
    finally:
        shutil.rmtree(ray_temp, ignore_errors=True)

    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["status"] for r in read_rows(tmp_path / "out" / "c.parquet")] == ["ok"] * 4
    text = log.read_text()
    assert f"ray engine: started a local Ray for this run on {LOCAL_RAY_IP}" in text
    assert "ray engine: 4 rows to send in 2 blocks of up to 2 rows, 1 actors" in text and "on 1 nodes" in text
    assert not leftovers, "the run's own Ray outlived it"


def _all_pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


async def test_a_stop_ends_the_ray_job_at_once_and_unanswered_rows_stay_to_do(tmp_path, cluster):
    rows, per_block, actors = 12, 2, 2
    manifest = make_manifest(tmp_path / "in", rows)
    ids = [f"row-{i}" for i in range(rows)]
    out = tmp_path / "out" / "captions.parquet"
    async with LocalEndpoint() as endpoint:
        endpoint.faults.add(parse_fault_spec("stall_first_byte:seconds=600"))  # no block comes back by itself
        config = ray_config(manifest, out, endpoint.base_url, cluster,
                            ray={"rows_per_block": per_block, "actors": actors},
                            endpoint={"timeout": {"first_byte": 900, "total": 900}})
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
        driver = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pipeline", "run", str(path), "--no-progress", "--no-log-file",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        try:
            await endpoint.stats.wait_until(lambda stats: stats.in_flight >= 1, timeout=180)
            driver.send_signal(signal.SIGINT)
            await asyncio.wait_for(driver.wait(), 120)  # before: it waited for the next block (600 s)
        finally:
            if driver.returncode is None:
                driver.kill()
                await asyncio.wait_for(driver.wait(), 30)
        await endpoint.stats.wait_until(lambda stats: stats.in_flight == 0, timeout=60)  # the actors are gone
        stopped = job_status(config)["rows"]
        endpoint.faults.clear()
        sent = endpoint.stats.snapshot()["requests"]
        rerun = await run_job_async(config)
        resent = endpoint.stats.snapshot()["requests"] - sent

    assert driver.returncode == 4 and "ok" not in stopped and "failed" not in stopped  # no outcome for any row
    assert rerun.rows_ok == resent == rows and rerun.rows_resumed == stopped.get("in_flight", 0) > 0
    assert [(r["id"], r["status"]) for r in read_rows(out)] == [(i, "ok") for i in ids]


@pytest.mark.parametrize(("preflight", "actors", "nodes", "expected"), [
    (1.0, 2, [1.0, 1.0], 0.5),  # 1-CPU nodes: both actors (0.25 each) may end up on one; a whole CPU never comes free
    (1.0, 4, [8.0, 8.0], 1.0),  # room enough: as configured
    (0.5, 2, [1.0, 1.0], 0.5),
    (2.0, 3, [2.0, 4.0], 2.0),  # the largest node has room
    (1.0, 2, [], 1.0)])  # no node known: as configured
def test_a_preflight_task_asks_for_no_more_cpus_than_fit_beside_the_actors(preflight, actors, nodes, expected):
    settings = RayConfig(preflight_cpus=preflight, actors=actors, cpus_per_actor=0.25)

    assert task_cpus(settings, nodes) == expected


def test_a_prepared_row_travels_without_the_image_twice_and_its_failure_as_a_plain_error(tmp_path):
    row = Row(seq=4, id="r4", path="a.png", prompt=None, columns={}, base_dir=tmp_path, data=b"\x89PNG" * 1000)
    task = RowTask(row, "Describe r4.", "digest")
    image = ImagePayload("data:image/png;base64," + "A" * 4000, "sha", {"sent_width": 3, "sent_height": 2})
    failure = ObjectStoreError("s3://b/a.png: no such object", url="s3://b/a.png", problem="not_found")
    failure.row_specific = True

    sent = pickle.loads(pickle.dumps(portable(PreparedRow(task, image, b"{body}", "key"))))
    failed = pickle.loads(pickle.dumps(portable(PreparedRow(task, failure=failure))))

    assert (sent.task.row.data, sent.image.url, sent.image.report, sent.payload, sent.key) == (
        None, "", image.report, b"{body}", "key")
    assert (failed.failure.message, failed.failure.error_type, failed.failure.row_specific) == (
        failure.message, "object_store_error", True)
