"""Scenario (f) of ``scripts/bench.py``: more streams. (b)'s shape (300 ms to the first token, then 40 content
chunks) stretched to 1 s answers, at concurrency 2,048 and 4,096: ideal 2,048 and 4,096 img/s.

Why a scenario of its own: at thousands of streams with tokens ~18 ms apart, nearly every network read
carries one SSE event, so what the client pays per event (a wake-up, a read, the HTTP framing, the SSE
decoder, one JSON chunk) is multiplied by ~86,000 events a second at 2,048 streams, on top of what it pays
per image. Both sides of the bench run on one core each, so this finds where a single core saturates:
the client's, or the endpoint's (whose writes also carry the loopback's TCP work). Each run reports both
cores' CPU over the served window, so a saturated endpoint is visible, not mistaken for the client.

Columns: *served* is rows / (endpoint's first request in -> last answer out), as in (b); *steady* counts
only the answers completed between 2 s after the first request and 1 s before the last answer (the ramp,
where 2,048 requests are prepared and 2,048 connections opened, and the tail are left out), from the
endpoint's own completion times. Served with the ``--uvloop`` endpoint (cheaper per write than asyncio's
default loop) so the endpoint is not the first limit. Rows per run: 10 per stream, as in (b) (20,480 at 2,048),
so the ramp and the tail weigh in *served* as much as they do in (b); ``--rows`` sets another total
(``--rows 12288``: the 6 per stream of the first measurements). Each run's notes give the ramp as the endpoint saw
it (when the 512th, 1,024th, 2,048th request arrived, when the connections opened, when the first token went out)
and where the window lost stream-time (``idle_shares``: the ramp, the turnarounds between an answer and the
stream's next request, the tail).

    .venv/bin/python scripts/bench.py --scenario f --out /tmp/bench-work            # 2,048 and 4,096
    .venv/bin/python scripts/bench.py --scenario f --concurrency 2048 --repeat 3    # one size, median of 3
"""

from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["idle_shares", "ramp_note", "run_scenario", "steady_rate"]

FIRST_TOKEN_S, ANSWER_S = 0.3, 1.0
QUICK = (0.05, 0.2, 64)  # --quick: first token, answer, the one concurrency
SIZES = (2048, 4096)
ROWS_PER_STREAM = 10  # (b)'s shape: 10 rows per stream (5,120 at 512)
WARM, TAIL = 2, 1  # answers' worth of time left out at the start (ramp) and at the end (tail)


def steady_rate(done_at: list[float], first_at: float, last_at: float, warm_s: float, tail_s: float) -> float | None:
    """Answers per second completed in [first_at + warm_s, last_at - tail_s]; None if that window is empty."""
    start, end = first_at + warm_s, last_at - tail_s
    if end <= start:
        return None
    return sum(1 for t in done_at if start <= t <= end) / (end - start)


def run_scenario(args: argparse.Namespace, sizes: Any, work: Path, bench: ModuleType) -> bool:
    chunks = sizes.chunks
    first, answer, quick_conc = QUICK if args.quick else (FIRST_TOKEN_S, ANSWER_S, 0)
    delay = (answer - first) / (chunks - 1)
    concurrencies = [args.concurrency or quick_conc] if args.concurrency or args.quick else list(SIZES)
    notes: list[str] = []
    clients = [c for c in bench._clients(args, notes) if c != "sdk"]  # the SDK does ~100 img/s: not run here
    table, all_ok = [], True
    for conc in concurrencies:
        rows = args.rows or ROWS_PER_STREAM * conc
        print(f"\n== (f) more streams: {rows} rows, {first * 1000:.0f} ms to first token + {chunks} chunks "
              f"{delay * 1000:.1f} ms apart ({answer:g} s answers), concurrency {conc}")
        data = work / "photos"
        paths = bench.make_images(data, rows, "photo", sizes.photo_size)  # unique: no deduplication
        expected = bench.expected_by_path(data, paths, chunks)
        manifest = bench.write_manifest(data, f"manifest-f-{rows}.csv", paths, rows)
        endpoint = bench.Endpoint(work, chunks=chunks, first_token=first, chunk_delay=delay)
        endpoint.args.append("--uvloop")
        with endpoint:
            for client in clients:
                runs = []
                for _ in range(args.repeat):
                    out = bench.fresh_output(work, "f", f"{client}-{conc}")
                    run = bench.run_client(client, endpoint, manifest, rows, conc, out)
                    bench.verify(run, out, manifest, expected)
                    all_ok &= run.verified == "ok"
                    runs.append((_rates(endpoint, run, rows, answer, conc), run))
                table.append(_row(client, conc / answer, conc, rows, runs, notes))
    print_note = [f"ideal = concurrency / {answer:g} s; 'steady' leaves out the first {WARM * answer:g} s and the last "
                  f"{TAIL * answer:g} s of the window (ramp and tail); client busy = its CPU-s / its wall time (start-up and "
                  "export included: CPU-ms/img too); endpoint busy = its CPU-s / served window; "
                  "endpoint on uvloop, pinned to its own core"]
    bench.print_table(f"(f) more streams, {answer:g} s answers", ["client", "concurrency", "rows", "served img/s", "of ideal",
                      "steady img/s", "steady of ideal", "CPU-ms/img", "client busy", "endpoint busy",
                      "endpoint CPU-ms/img", "peak RSS MB", "content verified"], table, print_note + notes)
    return all_ok


def _rates(endpoint: Any, run: Any, rows: int, answer: float, conc: int) -> tuple[float, float | None]:
    """(served img/s, steady img/s) of the run just finished, from the endpoint's own clock."""
    url = endpoint.base_url.removesuffix("/v1") + "/_stats?times=1"
    with urllib.request.urlopen(url, timeout=30) as response:
        stats = json.loads(response.read())
    if not run.window_s or stats.get("first_at") is None:
        return 0.0, None
    ramp, turns, tail = idle_shares(stats["arrived_at"], stats["done_at"], stats["first_at"], stats["last_at"],
                                    conc)
    run.notes.append(f"{ramp_note(stats)}; stream-time idle: ramp {ramp:.1%}, turnarounds {turns:.1%}, tail {tail:.1%}")
    return rows / run.window_s, steady_rate(stats["done_at"], stats["first_at"], stats["last_at"],
                                            WARM * answer, TAIL * answer)


def ramp_note(stats: dict[str, Any], marks: tuple[int, ...] = (1, 512, 1024, 2048, 4096)) -> str:
    """When the endpoint saw the n-th request arrive and the n-th connection open, and the first token go out,
    in seconds after the first request: how long the client's ramp takes (``GET /_stats?times=1``)."""
    first = stats["first_at"]

    def nth(times: list[float], what: str) -> str:
        times = sorted(times)
        shown = [n for n in marks if n <= len(times)]
        return (f"{what} {'/'.join(f'{n:,}' for n in shown)} at "
                + "/".join(f"{times[n - 1] - first:+.2f}" for n in shown) + " s")

    out = stats.get("first_out_at")
    return ("ramp: " + nth(stats.get("arrived_at", []), "requests") + ", " + nth(stats.get("opened_at", []), "connections")
            + (f", first token out at {out - first:+.2f} s" if out is not None else ""))


def idle_shares(arrived: list[float], done: list[float], first: float, last: float, streams: int) -> tuple[float, ...]:
    """Where the served window lost stream-time: shares of ``streams`` x window during which a stream had no
    request at the endpoint, split into the ramp (until the ``streams``-th request arrived), the turnarounds
    (from then to the last request's arrival: answer out -> next request in) and the tail (after the last
    request arrived). Since every answer takes the same time at the endpoint, served = (1 - their sum) of
    ideal; so this says which part of the run the shortfall comes from."""
    events = sorted([(t, 1) for t in arrived] + [(t, -1) for t in done])
    arrived = sorted(arrived)
    marks = (arrived[min(streams, len(arrived)) - 1], arrived[-1])  # end of the ramp, start of the tail
    idle = [0.0, 0.0, 0.0]
    in_flight, at = 0, first
    for t, step in [*events, (last, 0)]:
        t = min(max(t, first), last)
        for phase, (lo, hi) in enumerate(((first, marks[0]), marks, (marks[1], last))):
            span = min(t, hi) - max(at, lo)
            if span > 0:
                idle[phase] += span * max(streams - in_flight, 0)
        in_flight, at = in_flight + step, t
    total = streams * (last - first)
    return tuple(x / total for x in idle) if total > 0 else (0.0, 0.0, 0.0)


def _row(client: str, ideal: float, conc: int, rows: int, runs: list[tuple[tuple[float, float | None], Any]],
         notes: list[str]) -> list[str]:
    """The table row of the median run (by served img/s); every run's share of ideal goes in the notes."""
    runs.sort(key=lambda pair: pair[0][0])
    (served, steady), run = runs[len(runs) // 2]
    if len(runs) > 1:
        notes.append(f"{client} @{conc}: {len(runs)} runs, served of ideal: "
                     + ", ".join(f"{s / ideal:.1%}" for (s, _), _ in runs) + "; the table shows the median")
    notes += [f"{client} @{conc}: {n}" for n in run.notes]
    window = run.window_s or run.wall_s  # the endpoint works only in the served window
    f = _fmt
    return [client, f"{conc:,}", f"{rows:,}", f(served, 0), f"{served / ideal:.1%}" if served else "-",
            f(steady, 0), f"{steady / ideal:.1%}" if steady else "-", f(run.cpu_s / rows * 1000),
            f"{run.cpu_s / run.wall_s:.0%}", f"{run.server_cpu_s / window:.0%}", f(run.server_cpu_s / rows * 1000),
            f(run.maxrss_mb, 0), run.verified]


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"
