"""Flood benchmark: offered load at 10x what the stack serves, with and without backpressure.

First measures capacity (requests/s of short non-streamed requests at concurrency 16), then
for each mode offers `--factor` x capacity as open-loop arrivals for `--seconds`, and reports
accepted, rejected (429), errors, p50/p99 latency of the accepted ones, the API's peak RSS and
the backlog left in Kafka. Same broker, worker and prompts for both modes, one run.

    sluice bench flood [--factor 10] [--seconds 20] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
import psutil

from bench.serving import PROMPTS, bench_stack, machine, percentile
from shared import devstack

MAX_TOKENS = 16


def body(i: int) -> dict:
    return {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "ignore_eos": True}


async def capacity(url: str, n: int = 48, concurrency: int = 16) -> float:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        sem = asyncio.Semaphore(concurrency)

        async def one(i: int) -> None:
            async with sem:
                (await http.post("/generate", json=body(i))).raise_for_status()

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        return n / (time.perf_counter() - start)


async def flood(url: str, rate: float, seconds: float, api_pid: int) -> dict:
    """Open-loop arrivals at `rate`/s; every response awaited (up to the API's timeout)."""
    api = psutil.Process(api_pid)
    rss = [api.memory_info().rss]
    statuses: list[int] = []
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:

        async def one(i: int) -> None:
            start = time.perf_counter()
            try:
                r = await http.post("/generate", json=body(i))
                statuses.append(r.status_code)
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - start)
            except httpx.HTTPError:
                statuses.append(-1)

        async def sample_rss() -> None:
            while True:
                await asyncio.sleep(0.5)
                rss.append(api.memory_info().rss)

        sampler = asyncio.create_task(sample_rss())
        tasks, start = [], time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        sampler.cancel()
    return {
        "offered": len(statuses),
        "accepted": statuses.count(200),
        "rejected_429": statuses.count(429),
        "errors": sum(1 for s in statuses if s not in (200, 429)),
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": percentile(latencies, 99) if latencies else None,
        "api_rss_mib_start": rss[0] / 2**20,
        "api_rss_mib_peak": max(rss) / 2**20,
        "wall_s": time.perf_counter() - start,
    }


def run_mode(stack: devstack.LocalStack, rate: float, seconds: float) -> dict:
    stack.start_api()
    stack.wait_ready()
    assert stack.api is not None
    try:
        return asyncio.run(flood(stack.url, rate, seconds, stack.api.pid))
    finally:
        devstack.stop(stack.api)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sluice bench flood", description=__doc__)
    parser.add_argument("--factor", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    results: dict = {}
    with bench_stack("flood") as stack:
        cap = asyncio.run(capacity(stack.url))
        devstack.stop(stack.api)  # type: ignore[arg-type]
        rate = cap * args.factor
        print(f"capacity {cap:.1f} req/s; offering {rate:.1f} req/s for {args.seconds:g} s")
        # Without backpressure: bounds so high they never bite.
        modes = {
            "backpressure": {},
            "unbounded": {"SLUICE_MAX_QUEUED_PER_WORKER": "1000000000",
                          "SLUICE_MAX_OPEN_REQUESTS": "1000000000"},
        }  # fmt: skip
        for name, env in modes.items():
            stack.env.update(env)
            results[name] = run_mode(stack, rate, args.seconds)
            for key in env:
                stack.env.pop(key)
            print(name, json.dumps(results[name]), flush=True)
            time.sleep(5)
    report = {
        "capacity_req_s": cap,
        "offered_req_s": rate,
        "results": results,
        "config": {**vars(args), "out": str(args.out), "max_tokens": MAX_TOKENS,
                   "machine": machine()},
    }  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
