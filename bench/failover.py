"""Fleet changes under load: a worker killed, added or drained while 16 clients stream.

    sluice bench failover [--variant kill scale-up drain] [--runs 1] [--out F.json]

Each variant starts its own stack (a dev broker, the API, workers each bound to a core of its
own), streams 16 requests (8 greedy, 8 sampled; `ignore_eos`, so every one has the same length)
and makes one change mid-stream:

- `kill`: two workers; SIGKILL to one (worker and engine) once it has sent 2-12 tokens of a stream.
- `scale-up`: one worker; a second one starts (as KEDA would on lag) once every stream has begun.
- `drain`: two workers; SIGTERM to one once it streams, with `--drain-s` to finish what it runs
  (the rest is handed over by migration).

During the change a probe request (4 tokens) is sent every second: its TTFT shows whether the
queue went dark while the consumer group rebalanced. Per stream it reports the longest wait for
a token after the change, split between the streams the changed worker owned and the others;
token indices repeated or missing; takeovers; and second copies (a request that entered the
engine of two workers without a takeover), from the requests' traces and ownership records.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

from bench.serving import PROMPTS, bench_stack, machine, percentile
from shared import devstack, tracing
from shared import redis as sredis
from shared.devstack import LocalStack
from shared.settings import Settings
from workers.ownership import Owners

VARIANTS = ("kill", "scale-up", "drain")
PROBE_EVERY_S = 1.0


@dataclass
class Stream:
    request_id: str = ""
    indices: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # monotonic
    done: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)  # its first token came


async def read(http: httpx.AsyncClient, body: dict, stream: Stream) -> Stream:
    async with aconnect_sse(http, "POST", "/generate", json={**body, "stream": True}) as src:
        src.response.raise_for_status()
        stream.request_id = src.response.headers["x-request-id"]
        async for sse in src.aiter_sse():
            if sse.event == "token":
                stream.indices.append(json.loads(sse.data)["index"])
                stream.arrivals.append(time.monotonic())
                stream.started.set()
            elif sse.event == "done":
                stream.done = True
                return stream
            elif sse.event != "queued":  # waiting for a worker: not a failure
                raise RuntimeError(f"{sse.event}: {sse.data}")
    return stream


def worker_id(proc: Any) -> str:
    return f"{socket.gethostname()}-{proc.pid}"


async def live_workers(stack: LocalStack) -> set[str]:
    redis = sredis.connect(stack.settings)
    try:
        return {b.worker_id for b in await sredis.live_workers(redis, stack.settings)}
    finally:
        await redis.aclose()


async def wait_workers(stack: LocalStack, n: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while len(await live_workers(stack)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} workers not live; see {stack.log_dir}")
        await asyncio.sleep(0.5)


async def streaming_on(stack: LocalStack, worker: str, rids: list[str]) -> bool:
    """Whether `worker` runs one of the requests and has sent 2-12 of its tokens."""
    redis = sredis.connect(stack.settings)
    owners = Owners(redis, stack.settings)
    try:
        for rid in filter(None, rids):
            record = await redis.hgetall(owners.request_key(rid))
            if record.get(b"owner", b"").decode() == worker and record.get(b"state") == b"running":
                if 2 <= await redis.llen(owners.ids_key(rid)) <= 12:
                    return True
    finally:
        await redis.aclose()
    return False


async def probe(http: httpx.AsyncClient, until: asyncio.Event) -> list[float]:
    """TTFT (s) of one short request a second until `until` is set."""
    ttfts: list[float] = []

    async def one(i: int) -> None:
        s = Stream()
        start = time.monotonic()
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4, "ignore_eos": True}
        await read(http, body, s)
        ttfts.append(s.arrivals[0] - start)

    tasks = []
    for i in itertools.count():
        tasks.append(asyncio.create_task(one(i)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(until.wait(), PROBE_EVERY_S)
        if until.is_set():
            break
    await asyncio.gather(*tasks)
    return ttfts


async def run_once(stack: LocalStack, variant: str, max_tokens: int) -> dict[str, Any]:
    streams = [Stream() for _ in PROMPTS]
    bodies = [
        {"prompt": p, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
        if i % 2 == 0
        else {"prompt": p, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.9,
              "seed": i}
        for i, p in enumerate(PROMPTS)
    ]  # fmt: skip
    async with httpx.AsyncClient(base_url=stack.url, timeout=600) as http:
        tasks = [
            asyncio.create_task(read(http, b, s)) for b, s in zip(bodies, streams, strict=True)
        ]
        victim = stack.workers[0]
        changed = worker_id(victim)
        deadline = time.monotonic() + 300
        if variant == "scale-up":
            await asyncio.gather(*(s.started.wait() for s in streams))
        else:
            while not await streaming_on(stack, changed, [s.request_id for s in streams]):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{changed} streamed nothing")
                await asyncio.sleep(0.1)
        changed_at, changed_wall = time.monotonic(), time.time()
        done = asyncio.Event()
        probes = asyncio.create_task(probe(http, done))
        if variant == "kill":
            devstack.kill_group(victim)
        elif variant == "drain":
            victim.terminate()
        else:
            changed = worker_id(stack.start_worker(cpu=1))
        await asyncio.gather(*tasks)
        if variant == "scale-up":  # probe through the join itself, and a little after
            await wait_workers(stack, 2)
            await asyncio.sleep(5)
        done.set()
        probe_ttfts = await probes
        finished_after = max(s.arrivals[-1] for s in streams) - changed_at
    return await measure(stack, variant, streams, changed, changed_at, changed_wall) | {
        "probe_ttft_s": probe_ttfts,
        "all_done_after_s": finished_after,
    }


async def measure(
    stack: LocalStack, variant: str, streams: list[Stream], changed: str, at: float, wall: float
) -> dict[str, Any]:
    redis = sredis.connect(stack.settings)
    owners = Owners(redis, stack.settings)
    owned, others, copies, takeovers, broken = [], [], 0, 0, 0
    try:
        for s in streams:
            hops = await tracing.timeline(redis, stack.settings, s.request_id)
            entered = [h for h in hops if h["hop"] == tracing.ENGINE_SUBMITTED]
            before = [h["by"] for h in entered if h["t"] <= wall]
            record = await redis.hgetall(owners.request_key(s.request_id))
            moved = int(record.get(b"takeovers", 0))
            takeovers += moved
            copies += max(0, len(entered) - 1 - moved)
            waits = [b - a for a, b in itertools.pairwise([at, *(t for t in s.arrivals if t > at)])]
            longest = max(waits, default=0.0)
            (owned if before and before[-1] == changed else others).append(longest)
            broken += s.indices != list(range(len(s.indices))) or not s.done
    finally:
        await redis.aclose()
    return {
        "variant": variant,
        "changed_worker_streams": len(owned),
        "longest_wait_s_changed": _stats(owned),
        "longest_wait_s_others": _stats(others),
        "streams_with_repeated_or_missing_indices": broken,
        "takeovers": takeovers,
        "second_copies": copies,
    }


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "p50": statistics.median(values),
        "p99": percentile(values, 99),
        "max": max(values),
        "n": len(values),
    }


def _row(r: dict[str, Any]) -> str:
    def trio(v: dict[str, float] | None) -> str:
        return "-" if v is None else f"{v['p50']:.2f} / {v['p99']:.2f} ({v['n']})"

    probes = r["probe_ttft_s"]
    return (
        f"| {r['variant']} | {trio(r['longest_wait_s_changed'])} | "
        f"{trio(r['longest_wait_s_others'])} | {max(probes, default=0):.2f} ({len(probes)}) | "
        f"{r['streams_with_repeated_or_missing_indices']} | {r['takeovers']} | "
        f"{r['second_copies']} | {r['all_done_after_s']:.1f} |"
    )


def markdown(runs: list[dict[str, Any]]) -> str:
    return "\n".join([
        "| variant | longest wait, changed worker's streams p50 / p99 s (n) | others p50 / p99 s "
        "(n) | probe TTFT max s (n) | streams with repeated/missing indices | takeovers | "
        "second copies | all done after s |",
        "|---|---|---|---|---|---|---|---|",
        *(_row(r) for r in runs),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench failover",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--runs", type=int, default=1, help="per variant")
    parser.add_argument("--max-tokens", type=int, default=96, help="per stream (kill)")
    parser.add_argument("--long-tokens", type=int, default=256, help="per stream (scale-up, drain)")
    parser.add_argument("--drain-s", type=float, default=5.0, help="SLUICE_DRAIN_TIMEOUT_S")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    runs = []
    for variant in args.variant:
        cpus = (0,) if variant == "scale-up" else (0, 1)
        tokens = args.max_tokens if variant == "kill" else args.long_tokens
        for _ in range(args.runs):
            with bench_stack("failover", cpus=cpus, drain_timeout_s=args.drain_s) as stack:
                asyncio.run(wait_workers(stack, len(cpus)))
                result = asyncio.run(run_once(stack, variant, tokens))
            print(json.dumps(result), flush=True)
            runs.append(result)
    print("\n" + markdown(runs))
    if args.out:
        report = {
            "runs": runs,
            "config": {
                **vars(args),
                "out": str(args.out),
                "machine": machine(),
                # the engine's step budget: a takeover's prefill shares steps with decodes
                "max_num_batched_tokens": Settings().max_num_batched_tokens,
            },
        }
        args.out.write_text(json.dumps(report, indent=2))
