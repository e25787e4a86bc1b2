"""Interactive priority under a batch burst: TTFT of streaming requests with the stack to
themselves, then again while a burst of batch requests waits on the batch topic; one stack
(broker, API, one vLLM worker) per value of `--quiet-ms` (SLUICE_BATCH_QUIET_MS), one after the
other in one run, so that the values compare side by side.

Phase `alone`: `--interactive` streaming requests at `--concurrency`. Then `--batch` requests
are produced to the batch topic as fast as the broker takes them, and once the worker is
running batch work, phase `burst` sends the same interactive requests again. The burst is not
waited for (it would take hours on CPU); how much of it got done meanwhile is reported.

    sluice bench priority [--interactive 60] [--concurrency 4] [--max-tokens 32]
                          [--batch 10000] [--batch-max-tokens 64] [--quiet-ms 0,1000]
                          [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import uuid
from pathlib import Path

import httpx
from aiokafka import AIOKafkaProducer

from bench.serving import (
    PROMPTS,
    Round,
    bench_stack,
    machine,
    percentile,
    run_round,
    sluice_client,
)
from shared import kafka
from shared import redis as sredis
from shared.batch import collect
from shared.messages import GenerationRequest, SamplingOptions
from shared.settings import Settings


async def produce_burst(settings: Settings, n: int, max_tokens: int) -> float:
    """Produce `n` batch requests as fast as possible; returns the seconds it took."""
    producer = AIOKafkaProducer(**kafka.connection(settings), linger_ms=10, acks=1)
    await producer.start()
    start = time.perf_counter()
    try:
        for i in range(0, n, 1000):
            futures = []
            for j in range(i, min(n, i + 1000)):
                request = GenerationRequest(
                    request_id=f"burst-{j}-{uuid.uuid4().hex[:8]}",
                    prompt=f"Summarize in one paragraph: {PROMPTS[j % len(PROMPTS)]}",
                    sampling=SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                    enqueued_at=time.time(),
                    correlation=str(j),
                )
                futures.append(
                    await producer.send(
                        settings.batch_requests_topic,
                        value=request.model_dump_json().encode(),
                        key=request.request_id.encode(),
                    )
                )
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return time.perf_counter() - start


async def wait_batch_running(settings: Settings, timeout_s: float = 60) -> int:
    """Until the worker holds as many requests as its batch cap (from its heartbeat)."""
    redis = sredis.connect(settings)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            beats = await sredis.live_workers(redis, settings)
            in_flight = sum(b.in_flight for b in beats)
            if in_flight >= settings.batch_max_in_flight:
                return in_flight
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()
    raise TimeoutError("the worker never took batch work")


def summarize(r: Round) -> dict[str, float]:
    ttft = [s.ttft * 1000 for s in r.samples]
    queue = [s.queue_ms for s in r.samples]
    out = {"requests": len(r.samples), "tokens_per_s": r.tokens_per_s}
    for q in (50, 90, 99):
        out[f"ttft_ms_p{q}"] = percentile(ttft, q)
    out["queue_ms_p50"] = percentile(queue, 50)
    out["e2e_ms_p50"] = percentile([s.e2e * 1000 for s in r.samples], 50)
    return out


async def bench(args: argparse.Namespace, url: str, settings: Settings) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        one = sluice_client(http, args.max_tokens)
        await run_round("warm-up", one, args.concurrency * 2, args.concurrency)
        load = {"before_alone": os.getloadavg()[0]}
        alone = await run_round("alone", one, args.interactive, args.concurrency)
        load["after_alone"] = os.getloadavg()[0]
        print(f"alone: TTFT p50 {summarize(alone)['ttft_ms_p50']:.0f} ms", flush=True)
        produce_s = await produce_burst(settings, args.batch, args.batch_max_tokens)
        print(f"produced {args.batch} batch requests in {produce_s:.1f} s", flush=True)
        held = await wait_batch_running(settings)
        burst_start = time.monotonic()
        burst = await run_round("burst", one, args.interactive, args.concurrency)
        burst_s = time.monotonic() - burst_start
        load["after_burst"] = os.getloadavg()[0]
        print(f"burst: TTFT p50 {summarize(burst)['ttft_ms_p50']:.0f} ms", flush=True)
    done = await collect(settings, None, timeout_s=60)
    results = {"alone": summarize(alone), "burst": summarize(burst)}
    return {
        "results": results,
        "ttft_p50_ratio": results["burst"]["ttft_ms_p50"] / results["alone"]["ttft_ms_p50"],
        "ttft_p99_ratio": results["burst"]["ttft_ms_p99"] / results["alone"]["ttft_ms_p99"],
        "burst": {
            "produced": args.batch,
            "produce_s": produce_s,
            "worker_in_flight_at_start": held,
            "interactive_phase_s": burst_s,
            "batch_results_by_end": len(done),
        },
        # 1-min load average: this 2-core machine is shared; the stack alone keeps it near 2
        "load_average": load,
        "samples": {
            r.path: [{"ttft_ms": s.ttft * 1000, "queue_ms": s.queue_ms} for s in r.samples]
            for r in (alone, burst)
        },
    }


def markdown(runs: list[dict]) -> str:
    rows = [
        "| quiet ms | phase | TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | Kafka queue p50 ms "
        "| e2e p50 ms | p50 ratio | p99 ratio | batch done |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for phase, r in run["results"].items():
            ratios = "| | |"
            if phase == "burst":
                ratios = (
                    f"| {run['ttft_p50_ratio']:.2f} | {run['ttft_p99_ratio']:.2f} "
                    f"| {run['burst']['batch_results_by_end']} |"
                )
            rows.append(
                f"| {run['batch_quiet_ms']} | {phase} | {r['ttft_ms_p50']:.0f} "
                f"| {r['ttft_ms_p90']:.0f} | {r['ttft_ms_p99']:.0f} | {r['queue_ms_p50']:.0f} "
                f"| {r['e2e_ms_p50']:.0f} {ratios}"
            )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench priority",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--interactive", type=int, default=60, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=10_000, help="batch requests in the burst")
    parser.add_argument("--batch-max-tokens", type=int, default=64)
    parser.add_argument(
        "--quiet-ms",
        default="0,1000",
        help="comma-separated SLUICE_BATCH_QUIET_MS values, each on a fresh stack",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    runs = []
    for quiet_ms in (int(v) for v in args.quiet_ms.split(",")):
        with bench_stack("priority", batch_quiet_ms=quiet_ms) as stack:
            settings = stack.settings
            print(f"-- SLUICE_BATCH_QUIET_MS={quiet_ms}", flush=True)
            result = asyncio.run(bench(args, stack.url, settings))
        runs.append({"batch_quiet_ms": quiet_ms, **result})
    report = {
        "runs": runs,
        "config": {
            **vars(args),
            "out": str(args.out),
            "model": settings.model,
            "dtype": settings.dtype,
            "batch_max_in_flight": settings.batch_max_in_flight,
            "max_in_flight": settings.max_in_flight,
            "scheduling_policy": settings.scheduling_policy,
            "machine": machine(),
        },
    }
    print()
    print(markdown(runs))
    print("\nTTFT p50 burst/alone, target <= 1.25:")
    for run in runs:
        print(f"  quiet {run['batch_quiet_ms']} ms: {run['ttft_p50_ratio']:.2f}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
