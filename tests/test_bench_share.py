"""``scripts/bench.py --client-share F`` (scripts/bench_share.py): the nice levels chosen for a share, the hog
process (pinned, niced, killed by its pid) and the option's checking. Never a timing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_share  # noqa: E402


def test_the_weights_are_the_kernels() -> None:
    """sched_prio_to_weight: nice 0 is 1024, each level ~1.25x, 40 levels."""
    assert len(bench_share.NICE_WEIGHTS) == 40
    assert bench_share.weight(0) == 1024 and bench_share.weight(-20) == 88761 and bench_share.weight(19) == 15
    assert all(1.19 < a / b < 1.3 for a, b in zip(bench_share.NICE_WEIGHTS, bench_share.NICE_WEIGHTS[1:]))


@pytest.mark.parametrize(("share", "client_nice", "hog_nice"), [
    (1.0, 0, None),   # the core to itself: no hog
    (0.5, 0, 0),      # equal weights
    (0.6, 0, 2),      # 1024 / (1024 + 655) = 0.610
    (0.75, 0, 5),     # 1024 / (1024 + 335) = 0.753
    (0.9, 0, 10),     # 1024 / (1024 + 110) = 0.903
    (0.4, 2, 0),      # under a half: the client is niced, not the hog (no privilege needed)
])
def test_plan_for_a_share_picks_the_nearest_weights(share: float, client_nice: int, hog_nice: int | None) -> None:
    plan = bench_share.plan_for(share)
    assert (plan.client_nice, plan.hog_nice) == (client_nice, hog_nice)
    assert plan.requested == share


def test_every_share_gets_within_half_a_nice_step() -> None:
    """From a half up the hog's weight moves F by at most ~10% a level (<= ~5.5% off); below it the
    client's own weight does (~25% a level, <= ~11% off)."""
    for permille in range(50, 1001):
        share = permille / 1000
        plan = bench_share.plan_for(share)
        assert abs(plan.nominal - share) / share < (0.055 if share >= 0.5 else 0.11), (share, plan)
        assert plan.client_nice == 0 or plan.hog_nice == 0  # only one of the two is ever niced


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.01])
def test_a_share_outside_zero_to_one_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="must be in \\(0, 1\\]"):
        bench_share.plan_for(bad)


def test_the_option_says_what_is_wrong() -> None:
    for text, message in [("0", "0 is outside (0, 1]"), ("half", "'half' is not a number")]:
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--client-share", text],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert f"argument --client-share: {message}" in proc.stderr


def test_the_hog_runs_pinned_and_niced_and_is_killed_by_its_pid() -> None:
    core = min(os.sched_getaffinity(0))
    with bench_share.Hog(core, 3) as hog:
        pid = hog.proc.pid
        assert os.sched_getaffinity(pid) == {core}
        assert os.getpriority(os.PRIO_PROCESS, pid) == os.getpriority(os.PRIO_PROCESS, 0) + 3
        assert hog.cpu_s() >= 0.0
        assert hog.proc.poll() is None  # a busy loop: it runs until killed
    assert hog.proc.returncode == -9  # killed (and reaped) on exit, not left behind


def test_the_probes_report_a_share_and_ordered_lateness() -> None:
    """The two measurements ``check`` prints: a CPU share (CPU / wall of a busy loop: in (0, 1]) and
    wake-up lateness as median <= p99 <= max, with and without work before each sleep."""
    core = min(os.sched_getaffinity(0))
    share = bench_share.cpu_share(core, 0, seconds=0.2)
    assert 0 < share <= 1.02  # process_time and monotonic tick apart: a hair over 1 is rounding
    for work in (0.0, 0.0005):
        late = bench_share.wakeup_lateness(core, 0, period_s=0.001, count=50, work_s=work)
        assert set(late) == {"p50", "p99", "max"}
        assert late["p50"] <= late["p99"] <= late["max"]
