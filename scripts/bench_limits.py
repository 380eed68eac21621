"""Benchmark: do the limits settle where the endpoint wants them? Real HTTP, real streaming, one process.

Starts the embedded endpoint on 127.0.0.1 and drives it with N workers through ``pipeline.edges.client.ChatClient``:

1. **Undisclosed concurrency limit** (``concurrency_limit:max=8``: 429 without rate-limit headers, as a
   proxy in front of vLLM would): a fixed pool of 32 (the baseline) against ``AdaptiveConcurrency``
   (AIMD, two decrease factors). Prints the limit / in-flight / 429 trace every half second and a summary.
2. **requests_per_minute**: ``RateLimiter(requests_per_minute=R)`` against an endpoint that enforces the
   same R (``rpm_limit:rpm=R``, undisclosed), with no limiter as the baseline. Prints the achieved rate,
   and the 429s the endpoint sent.

Bounded: each run stops starting requests after ``--seconds`` (default 12). Prints tables; asserts nothing.

    .venv/bin/python scripts/bench_limits.py [--seconds 12] [--workers 32] [--max 8] [--rpm 900]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from pipeline.core.config import EndpointConfig  # noqa: E402
from pipeline.core.errors import PipelineError, RateLimited  # noqa: E402
from pipeline.edges.client import ChatClient  # noqa: E402
from pipeline.run.limits import AdaptiveConcurrency, RateLimiter  # noqa: E402
from pipeline.server import FaultPlan, LocalEndpoint  # noqa: E402


def request_body() -> dict[str, Any]:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 64), (30, 90, 200)).save(buffer, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"model": "bench", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Describe this image in one sentence."},
                {"type": "image_url", "image_url": {"url": uri}}]}]}


def client_for(endpoint: LocalEndpoint) -> ChatClient:
    config = EndpointConfig(base_url=endpoint.base_url,
                            timeout={"connect": 5, "first_byte": 10, "idle": 10, "total": 60})
    return ChatClient(config, pool_size=256)


@dataclass
class Counters:
    ok: int = 0
    rejected: int = 0  # 429 seen by the client
    other: int = 0
    sent_at: list[float] = field(default_factory=list)


async def backoff() -> None:
    """What the runner's retry policy does between attempts, shrunk for a short benchmark."""
    await asyncio.sleep(random.uniform(0.0, 0.05))


# --- 1. adaptive concurrency against an undisclosed concurrency limit --------------------------------


async def concurrency_run(label: str, limiter: AdaptiveConcurrency, adaptive: bool, args: argparse.Namespace,
                          body: dict[str, Any]) -> dict[str, Any]:
    plan = FaultPlan([f"concurrency_limit:max={args.max}"], chunk_delay=args.chunk_delay)
    counts = Counters()
    rows: list[tuple[float, float, int, int, int]] = []
    async with LocalEndpoint(plan) as endpoint, client_for(endpoint) as client:
        start = time.monotonic()
        deadline = start + args.seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                async with limiter as permit:
                    try:
                        await client.stream_chat(body)
                        counts.ok += 1
                        if adaptive:
                            limiter.on_success()
                        continue
                    except RateLimited:
                        counts.rejected += 1
                        if adaptive:
                            limiter.on_overload(permit)
                    except PipelineError:
                        counts.other += 1
                await backoff()

        async def sample() -> None:
            seen_ok, seen_429 = 0, 0
            while time.monotonic() < deadline + 1:
                await asyncio.sleep(0.5)
                rows.append((time.monotonic() - start, limiter.limit, limiter.in_flight,
                             counts.rejected - seen_429, counts.ok - seen_ok))
                seen_ok, seen_429 = counts.ok, counts.rejected

        async with asyncio.TaskGroup() as group:
            sampler = group.create_task(sample())
            workers = [group.create_task(worker()) for _ in range(args.workers)]
            await asyncio.gather(*workers)
            sampler.cancel()
        elapsed = time.monotonic() - start
        server = endpoint.stats.snapshot()
    print(f"\n## {label}")
    print(f"{'t (s)':>6} {'limit':>6} {'in-flight':>9} {'429s':>5} {'ok':>5}")
    for t, limit, in_flight, rejected, ok in rows:
        print(f"{t:6.1f} {limit:6.2f} {in_flight:9d} {rejected:5d} {ok:5d}")
    second_half = [r for r in rows if r[0] >= args.seconds / 2 and r[0] <= args.seconds]
    return {
        "run": label,
        "ok": counts.ok,
        "ok/s": counts.ok / elapsed,
        "429s": server["responses_by_status"].get("429", 0),
        "429 share": counts.rejected / max(1, counts.ok + counts.rejected),
        "mean limit (2nd half)": statistics.fmean(r[1] for r in second_half) if second_half else float("nan"),
        "mean in-flight (2nd half)": statistics.fmean(r[2] for r in second_half) if second_half else float("nan"),
    }


# --- 2. requests_per_minute --------------------------------------------------------------------------


async def rpm_run(label: str, limiter: RateLimiter | None, args: argparse.Namespace,
                  body: dict[str, Any]) -> dict[str, Any]:
    plan = FaultPlan([f"rpm_limit:rpm={args.rpm:g}"], chunk_delay=0.001)
    counts = Counters()
    async with LocalEndpoint(plan) as endpoint, client_for(endpoint) as client:
        start = time.monotonic()
        deadline = start + args.seconds

        async def send() -> None:
            counts.sent_at.append(time.monotonic() - start)
            try:
                await client.stream_chat(body)
                counts.ok += 1
            except RateLimited:
                counts.rejected += 1
                await backoff()
            except PipelineError:
                counts.other += 1

        async def worker() -> None:
            while time.monotonic() < deadline:
                if limiter is None:
                    await send()
                    continue
                async with limiter.reserve(0):
                    if time.monotonic() >= deadline:
                        break
                    await send()

        async with asyncio.TaskGroup() as group:
            for _ in range(args.workers):
                group.create_task(worker())
        server = endpoint.stats.snapshot()
    sent = counts.sent_at
    span = (max(sent) - min(sent)) if len(sent) > 1 else float("nan")
    bins: dict[int, list[float]] = {}
    for t in sent:
        bins.setdefault(int(t // 2) * 2, []).append(t)
    print(f"\n## {label}")
    print(f"{'t (s)':>6} {'sent':>6} {'per min':>8}")
    for t0 in sorted(bins):
        if t0 + 2 <= args.seconds:
            print(f"{t0:4d}-{t0 + 2:<2d} {len(bins[t0]):5d} {len(bins[t0]) * 30:8d}")
    achieved = (len(sent) - 1) / span * 60 if len(sent) > 1 else float("nan")
    return {
        "run": label,
        "requests sent": len(sent),
        "achieved/min": achieved,
        "vs limit": achieved / args.rpm - 1,
        "ok": counts.ok,
        "429s at endpoint": server["responses_by_status"].get("429", 0),
    }


def print_summary(title: str, results: list[dict[str, Any]]) -> None:
    print(f"\n### {title}")
    keys = list(results[0])
    first = max(len(str(result["run"])) for result in results)
    widths = [max(len(k), 12) for k in keys]
    print("  ".join(k.rjust(w) if i else k.ljust(first) for i, (k, w) in enumerate(zip(keys, widths, strict=True))))
    for result in results:
        cells = []
        for i, (key, width) in enumerate(zip(keys, widths, strict=True)):
            value = result[key]
            if isinstance(value, float):
                text = f"{value:+.1%}" if key == "vs limit" else f"{value:.1%}" if "share" in key else f"{value:.2f}"
            else:
                text = str(value)
            cells.append(text.ljust(first) if i == 0 else text.rjust(width))
        print("  ".join(cells))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each run")
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--max", type=int, default=8, help="the endpoint's undisclosed concurrency limit")
    parser.add_argument("--rpm", type=float, default=900.0, help="requests_per_minute (client and endpoint)")
    parser.add_argument("--chunk-delay", type=float, default=0.005, help="seconds between streamed chunks")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    random.seed(args.seed)
    body = request_body()
    print(f"# bench_limits: {args.workers} workers, {args.seconds:g} s per run, python {sys.version.split()[0]}")

    print(f"\n# 1. endpoint answers 429 (no headers) above {args.max} requests in flight")
    concurrency = [
        await concurrency_run(f"baseline: fixed concurrency {args.workers}", AdaptiveConcurrency(args.workers),
                              False, args, body),
        await concurrency_run("AIMD decrease=0.5 increase=1", AdaptiveConcurrency(args.workers, 1, args.workers),
                              True, args, body),
        await concurrency_run("AIMD decrease=0.75 increase=1",
                              AdaptiveConcurrency(args.workers, 1, args.workers, decrease=0.75), True, args, body),
    ]
    print_summary(f"concurrency limit {args.max}: summary", concurrency)

    print(f"\n# 2. requests_per_minute={args.rpm:g} against an endpoint enforcing {args.rpm:g}/min")
    rates = [
        await rpm_run("baseline: no limiter", None, args, body),
        await rpm_run(f"RateLimiter(requests_per_minute={args.rpm:g})", RateLimiter(requests_per_minute=args.rpm),
                      args, body),
    ]
    print_summary("requests_per_minute: summary", rates)


if __name__ == "__main__":
    asyncio.run(main())
