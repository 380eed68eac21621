"""The Ray engine's pre-flight stage: image loading, decode/resize/re-encode and the request body, run as
Ray Data tasks spread over the cluster, so the captioning actors only send.

Why a stage of its own: a 12 MP camera JPEG costs ~130 CPU-ms to pre-flight, a request costs the actor
next to nothing; in the actors, pre-flight would run on the few CPUs the actors hold (``cpus_per_actor``,
a fraction) instead of every free core of the cluster. As tasks of ``ray.preflight_cpus`` CPUs each, Ray
Data runs as many as the cluster has room for, on every node, and retries a task lost with its node.

No Ray import here (the engine module is the only one): a task is a plain function over one block, an
Arrow table of pickled ``RowTask``s in, the same rows with pickled ``PreparedRow``s out. It never raises
for a row: a broken image is a ``PreparedRow`` with a ``failure``, which the actor turns into the failed
row the local engine writes (same error type, same message), without sending anything.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import pickle
from collections.abc import Sequence

import pyarrow as pa

from pipeline.core.config import Config, RayConfig
from pipeline.core.errors import PipelineError
from pipeline.edges.images import ImagePayload
from pipeline.run.plan import RowTask
from pipeline.run.processor import PreparedRow, RowPreparer

log = logging.getLogger("pipeline")

#: The column a pre-flight task adds (and the actors read): one pickled ``PreparedRow`` per row.
PREPARED = "prepared"
#: Rows of a block whose images are read and prepared at once, per pixel thread (bounds a task's memory:
#: 256 camera photos read together would be a gigabyte).
ROWS_PER_THREAD = 4


def preflight_block(batch: pa.Table, config: Config, threads: int) -> pa.Table:
    """One block's rows prepared (Ray Data calls this in a task): the ``task`` column is replaced by
    ``prepared``. A failure of the stage itself fails every row of the block, as retryable, never the job."""
    tasks: list[RowTask] = [pickle.loads(blob) for blob in batch.column("task").to_pylist()]
    try:
        prepared = asyncio.run(_prepare_all(config, tasks, threads))
    except Exception as exc:  # noqa: BLE001 - a raising task would abort the whole Ray job
        log.exception("ray pre-flight: a block of %d rows failed", batch.num_rows)
        failure = PipelineError(f"internal error in the ray pre-flight: {type(exc).__name__}: {exc}")
        prepared = [PreparedRow(task, failure=failure) for task in tasks]
    blobs = pa.array([pickle.dumps(portable(row)) for row in prepared], pa.binary())
    return batch.drop_columns(["task"]).append_column(PREPARED, blobs)


async def _prepare_all(config: Config, tasks: Sequence[RowTask], threads: int) -> list[PreparedRow]:
    slots = asyncio.Semaphore(ROWS_PER_THREAD * threads)

    async def one(preparer: RowPreparer, task: RowTask) -> PreparedRow:
        async with slots:
            return await preparer.prepare(task)

    async with RowPreparer(config, workers=threads) as preparer:
        return list(await asyncio.gather(*(one(preparer, task) for task in tasks)))


def portable(prepared: PreparedRow) -> PreparedRow:
    """What an actor needs of a prepared row, and no more: the body carries the image now, so neither the
    row's in-memory image bytes nor the payload's data URI travel again; the failure becomes a plain
    ``PipelineError`` with the same type, message and verdicts (any subclass pickles, whatever its
    constructor wants)."""
    task = dataclasses.replace(prepared.task, row=dataclasses.replace(prepared.task.row, data=None))
    image = prepared.image
    if image is not None:
        image = ImagePayload("", image.sha256, image.report)  # ``send`` reads the report, not the URI
    failure = prepared.failure
    if failure is not None:
        plain = PipelineError(failure.message)
        plain.error_type = failure.error_type  # type: ignore[misc]
        plain.row_specific, plain.retryable = failure.row_specific, failure.retryable
        failure = plain
    return PreparedRow(task, image, prepared.payload, prepared.key, failure)


def task_cpus(settings: RayConfig, node_cpus: Sequence[float]) -> float:
    """CPUs one pre-flight task asks for: ``ray.preflight_cpus``, lowered to what fits beside all the actors
    on the largest node. A task that fits on no node never starts and Ray Data waits for it silently
    (the default of 1 CPU on nodes of 1 CPU, say, whose actors hold a part); the actors may all end up on
    one node (Ray packs them, or restarts them on the nodes left after one is lost)."""
    if not node_cpus:
        return settings.preflight_cpus
    largest = max(node_cpus)
    room = largest - min(largest, settings.actors * settings.cpus_per_actor)
    if room >= settings.preflight_cpus:
        return settings.preflight_cpus
    return max(0.05, math.floor(room * 100) / 100)


def task_threads(cpus: float) -> int:
    """Pixel threads in one task: Pillow releases the GIL, so a task of 2 CPUs uses 2."""
    return max(1, math.ceil(cpus - 1e-9))
