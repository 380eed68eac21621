"""The two baselines ``scripts/bench.py`` compares the pipeline with, each run as its own process.

``sdk``:   the script a competent user would write with the official ``openai`` SDK: ``AsyncOpenAI``,
           ``stream=True`` with ``stream_options.include_usage``, an ``asyncio.Semaphore`` around one task
           per row, pandas to read the manifest and to write Parquet at the end.
``naive``: the fastest featureless script: aiohttp, ``async for line in resp.content``, ``json.loads``
           per event, results held in a list, Parquet (pyarrow) at the end. No ledger, no progress bar,
           no pre-flight, no retries.

Both read a CSV manifest with ``id`` and ``path`` columns (paths relative to the manifest's folder) and
write ``id, status, content, finish_reason, prompt_tokens, completion_tokens, error`` to Parquet.

    python scripts/bench_baselines.py sdk|naive --manifest M --base-url U --concurrency C --out F.parquet
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import json
import mimetypes
import sys
from pathlib import Path

MODEL = "bench-model"
PROMPT = "Describe this image in one sentence."
API_KEY = "bench-key"


# ---- (2) the official SDK ----------------------------------------------------------------------------------

async def run_sdk(manifest: Path, base_url: str, concurrency: int, out: Path) -> int:
    import openai
    import pandas as pd
    from openai import AsyncOpenAI

    frame = pd.read_csv(manifest, dtype=str)
    folder = manifest.parent
    client = AsyncOpenAI(base_url=base_url, api_key=API_KEY, max_retries=3, timeout=600)
    limit = asyncio.Semaphore(concurrency)

    async def caption(row_id: str, path: str) -> dict:
        async with limit:
            try:
                data = (folder / path).read_bytes()
                mime = mimetypes.guess_type(path)[0] or "image/jpeg"
                url = f"data:{mime};base64,{base64.b64encode(data).decode()}"
                stream = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": [
                        {"type": "text", "text": PROMPT},
                        {"type": "image_url", "image_url": {"url": url}},
                    ]}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                parts: list[str] = []
                finish = None
                usage = None
                async for chunk in stream:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    for choice in chunk.choices:
                        if choice.delta.content:
                            parts.append(choice.delta.content)
                        if choice.finish_reason:
                            finish = choice.finish_reason
                return {"id": row_id, "status": "ok", "content": "".join(parts), "finish_reason": finish,
                        "prompt_tokens": usage.prompt_tokens if usage else None,
                        "completion_tokens": usage.completion_tokens if usage else None, "error": None}
            except (openai.OpenAIError, OSError) as exc:
                return {"id": row_id, "status": "failed", "content": None, "finish_reason": None,
                        "prompt_tokens": None, "completion_tokens": None, "error": f"{type(exc).__name__}: {exc}"}

    try:
        rows = await asyncio.gather(*(caption(i, p) for i, p in zip(frame["id"], frame["path"], strict=True)))
    finally:
        await client.close()
    pd.DataFrame(rows).to_parquet(out, index=False)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


# ---- (3) naive aiohttp -------------------------------------------------------------------------------------

async def run_naive(manifest: Path, base_url: str, concurrency: int, out: Path) -> int:
    import aiohttp
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    folder = manifest.parent
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    results: list[dict] = []
    todo = iter(rows)

    async def worker(session: aiohttp.ClientSession) -> None:
        for row in todo:
            data = (folder / row["path"]).read_bytes()
            body = {"model": MODEL, "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": [
                        {"type": "text", "text": PROMPT},
                        {"type": "image_url",
                         "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()}},
                    ]}]}
            parts: list[str] = []
            finish = usage = None
            async with session.post(url, json=body, headers=headers) as resp:
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        break
                    event = json.loads(payload)
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event["choices"]:
                        if choice["delta"].get("content"):
                            parts.append(choice["delta"]["content"])
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
            results.append({"id": row["id"], "status": "ok", "content": "".join(parts), "finish_reason": finish,
                            "prompt_tokens": usage["prompt_tokens"] if usage else None,
                            "completion_tokens": usage["completion_tokens"] if usage else None, "error": None})

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    pq.write_table(pa.Table.from_pylist(results), out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Baseline captioning scripts for scripts/bench.py.")
    parser.add_argument("kind", choices=["sdk", "naive"])
    parser.add_argument("--manifest", type=Path, required=True, help="CSV with id,path columns")
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", type=Path, required=True, help="output .parquet")
    args = parser.parse_args(argv)
    run = run_sdk if args.kind == "sdk" else run_naive
    return asyncio.run(run(args.manifest, args.base_url, args.concurrency, args.out))


if __name__ == "__main__":
    sys.exit(main())
