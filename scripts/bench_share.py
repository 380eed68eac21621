"""``scripts/bench.py --client-share F``: emulate a slower client core (issue 16, "(b) held on slower cores").

Scenario (b) was 90.7% of ideal on a slower 2-core machine of the same kind and 97-98% here, and no slower
machine is at hand. So the client's core is shared: while each client runs, a CPU hog pinned to the same core
(a Python busy loop that touches almost no memory) competes with it, at nice levels whose CFS/EEVDF load
weights give the client ``F = w(client) / (w(client) + w(hog))`` of the core whenever both want it. For
CPU-bound work that is a core ``1/F`` times as fast. It is not a slower core in every other way: the hog
does not slow the caches, memory or the kernel's own work on other cores, and the kernel's work on the
client's core (softirqs, loopback TCP) is shared as the scheduler accounts it; it adds wake-up lateness a
slower core would not have (the client waits for the hog's slice to end), which :func:`wakeup_lateness`
measures. :func:`check` measures both the share a pure-CPU probe actually gets and that lateness, so every
run prints what the emulation did rather than what it was meant to do.

Weights depend only on the nice *difference*, so the hog is niced up (``F >= 0.5``), or the client is
(``F < 0.5``): no privilege is needed either way. Both run in the bench's own session (one autogroup), where
nice levels weigh against each other.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

#: The kernel's load weight per nice level -20..19 (``sched_prio_to_weight`` in kernel/sched/core.c).
NICE_WEIGHTS = (88761, 71755, 56483, 46273, 36291, 29154, 23254, 18705, 14949, 11916,
                9548, 7620, 6100, 4904, 3906, 3121, 2501, 1991, 1586, 1277,
                1024, 820, 655, 526, 423, 335, 272, 215, 172, 137,
                110, 87, 70, 56, 45, 36, 29, 23, 18, 15)

#: The hog: the interpreter's loop and nothing else (no allocation, a few bytes of data).
HOG_CODE = "while True:\n    pass\n"


def weight(nice: int) -> int:
    """The load weight of a task at ``nice`` (-20..19)."""
    if not -20 <= nice <= 19:
        raise ValueError(f"nice level {nice} is outside -20..19")
    return NICE_WEIGHTS[nice + 20]


@dataclass(frozen=True)
class SharePlan:
    """How to give the client ``requested`` of its core: the two nice levels, and the share they give."""

    requested: float
    client_nice: int = 0
    hog_nice: int | None = None  # None: no hog (F = 1)

    @property
    def nominal(self) -> float:
        """The client's share of the core by the weights, when both want it all the time."""
        if self.hog_nice is None:
            return 1.0
        client = weight(self.client_nice)
        return client / (client + weight(self.hog_nice))

    def describe(self) -> str:
        if self.hog_nice is None:
            return "no hog (the client has its core to itself)"
        return (f"hog at nice {self.hog_nice}, client at nice {self.client_nice}: "
                f"weights {weight(self.client_nice)} vs {weight(self.hog_nice)}, nominal share {self.nominal:.3f} "
                f"(a core {1 / self.nominal:.2f}x slower for CPU-bound work)")


def plan_for(share: float) -> SharePlan:
    """The nice levels whose weights come closest to ``share`` (ties: the client left at nice 0).

    Weights step by ~1.25x per nice level, so from a half up the nominal share is within ~5% of the
    request (0.6 -> 0.610 with the hog at nice 2), below a half within ~10%; ``SharePlan.nominal`` says
    what it is, and the tables use it."""
    if not 0 < share <= 1:
        raise ValueError(f"--client-share must be in (0, 1], got {share}")
    candidates = [SharePlan(share)]  # no hog
    candidates += [SharePlan(share, 0, hog) for hog in range(0, 20)]
    candidates += [SharePlan(share, client, 0) for client in range(1, 20)]
    return min(candidates, key=lambda p: (abs(p.nominal - share), p.client_nice))


def parse_share(text: str) -> float:
    """argparse type for ``--client-share``: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number; give a fraction such as 0.6") from None
    if not 0 < value <= 1:
        raise ValueError(f"{text} is outside (0, 1]; 1 means no hog, 0.5 half the core")
    return value


def _pinned(core: int | None, nice: int):
    def setup() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})
        if nice:
            os.nice(nice)
    return setup


class Hog:
    """The CPU hog on ``core`` at ``nice``, started on enter and killed (by its pid) on exit."""

    def __init__(self, core: int | None, nice: int) -> None:
        self.core, self.nice = core, nice
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Hog:
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", HOG_CODE], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, preexec_fn=_pinned(self.core, self.nice))
        return self

    def cpu_s(self) -> float:
        """The hog's user+sys CPU seconds so far (``/proc/PID/stat``), to keep it out of other counts."""
        assert self.proc is not None
        try:
            with open(f"/proc/{self.proc.pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


_CPU_PROBE = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
started_wall, started_cpu = time.monotonic(), time.process_time()
while time.monotonic() < end:
    pass
print((time.process_time() - started_cpu) / (time.monotonic() - started_wall))
"""

_SLEEP_PROBE = """
import sys, time
period, count, work = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
late = []
for _ in range(count):
    t = time.thread_time() + work
    while time.thread_time() < t:
        pass
    t = time.perf_counter()
    time.sleep(period)
    late.append(time.perf_counter() - t - period)
print(" ".join(f"{x:.6f}" for x in late))
"""


def _probe(code: str, args: list[str], core: int | None, nice: int) -> str:
    proc = subprocess.run([sys.executable, "-S", "-c", code, *args], capture_output=True, text=True,
                          timeout=120, preexec_fn=_pinned(core, nice), check=True)
    return proc.stdout


def cpu_share(core: int | None, nice: int, seconds: float = 3.0) -> float:
    """The share of its core a pure-CPU probe at ``nice`` gets over ``seconds`` (its CPU / wall)."""
    return float(_probe(_CPU_PROBE, [str(seconds)], core, nice))


def wakeup_lateness(core: int | None, nice: int, period_s: float = 0.001, count: int = 2000,
                    work_s: float = 0.0) -> dict[str, float]:
    """How late a ``period_s`` sleep wakes on ``core`` (ms): median, p99, max over ``count`` sleeps, each
    after ``work_s`` of CPU work (a task that wants part of the core, as a busy client does)."""
    args = [str(period_s), str(count), str(work_s)]
    late = sorted(float(x) * 1000 for x in _probe(_SLEEP_PROBE, args, core, nice).split())
    return {"p50": statistics.median(late), "p99": late[int(0.99 * (len(late) - 1))], "max": late[-1]}


def check(plan: SharePlan, core: int | None) -> list[str]:
    """Measure the emulation: a pure-CPU probe beside the hog, and wake-up lateness with and without it."""
    if plan.hog_nice is None:
        return [f"client share {plan.requested:g}: {plan.describe()}"]
    idle = wakeup_lateness(core, plan.client_nice)
    idle_busy = wakeup_lateness(core, plan.client_nice, count=1000, work_s=0.001)
    with Hog(core, plan.hog_nice) as hog:
        hog_before, started = hog.cpu_s(), time.monotonic()
        measured = cpu_share(core, plan.client_nice)
        hog_share = (hog.cpu_s() - hog_before) / (time.monotonic() - started)  # the probe's start-up included
        hogged = wakeup_lateness(core, plan.client_nice)
        hogged_busy = wakeup_lateness(core, plan.client_nice, count=1000, work_s=0.001)

    def fmt(d: dict[str, float]) -> str:
        return f"median {d['p50']:.2f}, p99 {d['p99']:.2f}, max {d['max']:.2f} ms"

    return [f"client share {plan.requested:g}: {plan.describe()}",
            f"  measured: a pure-CPU probe beside the hog got {measured:.3f} of the core "
            f"({measured / plan.nominal:.0%} of nominal), the hog {hog_share:.3f}; of what the two got, the probe "
            f"{measured / (measured + hog_share):.3f} (other load on the core takes from both)",
            f"  wake-up lateness of 1 ms sleeps on the client's core: without the hog {fmt(idle)}; "
            f"beside it {fmt(hogged)}",
            f"  the same, each sleep after 1 CPU-ms of work (half a core wanted, like a busy client): "
            f"without the hog {fmt(idle_busy)}; beside it {fmt(hogged_busy)}"]
