"""Prefix affinity: prefix keys vs request-id keys, two workers, one run (api/affinity.py).

One stack (a dev broker, the API, two vLLM workers each bound to a core of its own) serves a
workload of many requests over a few long system prompts: each request is one of `--prompts`
system prompts of `--prefix-tokens` tokens (they differ from their first token), then a short
question of its own, 4 output tokens; `--concurrency` clients at a time, prompts drawn at
random. The API is restarted between modes with `SLUICE_PARTITION_KEY=prefix` or `request`;
the workers (and their engines) stay up, and each mode gets system prompts of its own, so no
mode finds the other's prefixes cached.

Per mode: TTFT p50/p99 (client side, SSE), the prefix-cache hit rate from vLLM's own counters
(`vllm:prefix_cache_hits` / `vllm:prefix_cache_queries`, tokens, summed over both workers'
/metrics), and how the requests split between the workers (done events name the worker).

A `hot` phase then measures the spill-over guard: every request has one system prompt, at a
concurrency above `SLUICE_AFFINITY_MAX_IN_FLIGHT`; reported with the bound as set and with no
bound (one partition, one worker takes all).

    sluice bench affinity [--prompts 16] [--prefix-tokens 1500] [--requests 64]
                          [--concurrency 8] [--rounds 1] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from transformers import AutoTokenizer

from bench.precision import TEXT
from bench.serving import bench_stack, machine, percentile
from shared import devstack
from shared.devstack import LocalStack
from shared.models import model_path
from shared.settings import Settings

HOT_BOUND = 4  # the spill bound during the hot phase


def system_prompts(tokenizer: Any, n: int, tokens: int, tag: str) -> list[str]:
    text = TEXT.read_text() * 3
    prompts = []
    for k in range(n):
        ids = tokenizer.encode(text[k * 137 :], add_special_tokens=False)[:tokens]
        prompts.append(f"[{tag} assistant {k}] Answer using this text.\n" + tokenizer.decode(ids))
    return prompts


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: Counter[str] = Counter()
    for line in text.splitlines():
        for name in ("vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"):
            if line.startswith(name):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


def cache_counters(ports: list[int]) -> Counter[str]:
    total: Counter[str] = Counter()
    for port in ports:
        total.update(scrape(port))
    return total


async def one(http: httpx.AsyncClient, system: str, question: str) -> tuple[float, str]:
    body = {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": 4, "ignore_eos": True, "temperature": 0, "stream": True,
    }  # fmt: skip
    start = time.monotonic()
    first = None
    async with aconnect_sse(http, "POST", "/generate", json=body) as src:
        src.response.raise_for_status()
        async for sse in src.aiter_sse():
            if sse.event == "token" and first is None:
                first = time.monotonic() - start
            elif sse.event == "done":
                assert first is not None
                return first * 1000, json.loads(sse.data).get("worker_id") or "?"
            elif sse.event == "error":
                raise RuntimeError(sse.data)
    raise RuntimeError("stream ended without done")


async def phase(
    stack: LocalStack, ports: list[int], prompts: list[str], requests: int, concurrency: int
) -> dict[str, Any]:
    rng = random.Random(7)
    work = [(rng.choice(prompts), f"Question {i}: what does it say about {rng.random():.6f}?")
            for i in range(requests)]  # fmt: skip
    before = cache_counters(ports)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=stack.url, timeout=600) as http:

        async def run(system: str, question: str) -> tuple[float, str]:
            async with gate:
                return await one(http, system, question)

        done = await asyncio.gather(*(run(s, q) for s, q in work))
    after = cache_counters(ports)
    hits = after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
    queries = after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
    ttfts = [t for t, _ in done]
    split = Counter(w for _, w in done)
    return {
        "ttft_p50_ms": round(statistics.median(ttfts)),
        "ttft_p99_ms": round(percentile(ttfts, 99)),
        "prefix_cache_hit_rate": round(hits / queries, 3) if queries else None,
        "prefix_cache_query_tokens": int(queries),
        "requests_per_worker": sorted(split.values(), reverse=True),
    }


def restart_api(stack: LocalStack, **env: str) -> None:
    assert stack.api is not None
    devstack.stop(stack.api)
    stack.env.update(env)
    stack.start_api()
    stack.wait_ready()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    ports = [devstack.free_port(), devstack.free_port()]
    worker_env = [{"SLUICE_WORKER_METRICS_PORT": str(p)} for p in ports]
    tokenizer = AutoTokenizer.from_pretrained(model_path(Settings()))
    results: dict[str, list[dict[str, Any]]] = {"prefix": [], "request": []}
    hot: dict[str, dict[str, Any]] = {}
    with bench_stack("affinity", cpus=(0, 1), worker_env=worker_env) as stack:
        for r in range(args.rounds):
            order = ["request", "prefix"] if r % 2 == 0 else ["prefix", "request"]
            for mode in order:
                restart_api(stack, SLUICE_PARTITION_KEY=mode)
                prompts = system_prompts(tokenizer, args.prompts, args.prefix_tokens, f"{mode}{r}")
                got = await phase(stack, ports, prompts, args.requests, args.concurrency)
                print(mode, got, flush=True)
                results[mode].append(got)
        # One hot system prompt above the bound: spilled vs pinned to one partition.
        for label, bound in (("spill at 4", HOT_BOUND), ("no bound", 10**6)):
            restart_api(
                stack, SLUICE_PARTITION_KEY="prefix", SLUICE_AFFINITY_MAX_IN_FLIGHT=str(bound)
            )
            prompts = system_prompts(tokenizer, 1, args.prefix_tokens, f"hot {label}")
            got = await phase(stack, ports, prompts, args.requests // 2, 3 * HOT_BOUND)
            print("hot", label, got, flush=True)
            hot[label] = got
    return {
        "benchmark": "affinity",
        "machine": machine(),
        "settings": vars(args),
        "modes": results,
        "hot": hot,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sluice bench affinity", description=__doc__)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/affinity-cpu.json"))
    args = parser.parse_args(argv)
    result = asyncio.run(bench(args))
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
