"""The local engine runs the cyclic garbage collector less often while rows flow, and gives it back as it was."""

from __future__ import annotations

import gc

from pipeline.run.local import GC_THRESHOLD, fewer_collections


def test_the_collector_is_tuned_while_runs_overlap_and_restored_when_the_last_ends() -> None:
    before = gc.get_threshold()
    first, second = fewer_collections(), fewer_collections()
    first.__enter__()
    assert gc.get_threshold()[0] == max(GC_THRESHOLD, before[0]) and gc.get_freeze_count() > 0
    second.__enter__()
    first.__exit__(None, None, None)  # the first run ends while the second still streams: still tuned
    assert gc.get_threshold()[0] == max(GC_THRESHOLD, before[0])
    second.__exit__(None, None, None)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_a_failing_run_restores_the_collector_too() -> None:
    before = gc.get_threshold()
    try:
        with fewer_collections():
            raise RuntimeError("the run failed")
    except RuntimeError:
        pass
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
