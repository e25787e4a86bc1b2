"""Serving benchmark: one streaming workload, up to three paths, side by side in one run.

- `sluice`: HTTP clients streaming SSE from the API (API -> Kafka -> worker -> vLLM -> Redis).
- `direct`: the same `VllmEngine` the worker uses, in this process, no queue, no network.
- `vllm-serve`: vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`,
  same venv, engine arguments and prompts), streaming `/v1/completions`.

Rounds alternate the paths so that drift on a noisy machine hits all alike. Reports TTFT,
inter-token latency (ITL, gaps between tokens as the client receives them), time per output
token (TPOT) and end-to-end latency percentiles, and output tokens/s (median over rounds).
For the sluice path it also reads every request's trace (shared/tracing.py) and reports where
TTFT went, hop by hop, for all requests and for the slowest ones.

    sluice bench [--concurrency 16] [--requests 48] [--max-tokens 64] [--rounds 3]
                 [--paths direct sluice vllm-serve]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from httpx_sse import aconnect_sse

from bench import hops
from shared import devstack
from shared.messages import GenerationRequest, SamplingOptions
from shared.models import prepare_default_model
from shared.settings import Settings

TOPICS = ["the sea", "a lighthouse", "autumn", "a robot", "the moon", "a market", "rain",
          "a violin", "mountains", "a library", "a train", "winter", "a garden", "a city",
          "the desert", "a bridge"]  # fmt: skip
PROMPTS = [f"Write a short story about {t}." for t in TOPICS]


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int
    gaps: list[float] = field(default_factory=list)
    queue_ms: float = 0.0  # Kafka: produced by the API -> picked up by a worker (sluice only)
    request_id: str | None = None  # sluice only: its trace
    sent_at: float = 0.0  # wall clock, to place the client in the request's trace
    first_at: float = 0.0


@dataclass
class Round:
    path: str
    wall_s: float
    samples: list[Sample]

    @property
    def tokens_per_s(self) -> float:
        return sum(s.tokens for s in self.samples) / self.wall_s


OneRequest = Callable[[str], Awaitable[Sample]]


async def run_round(path: str, one: OneRequest, n_requests: int, concurrency: int) -> Round:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    samples: list[Sample] = []

    async def client() -> None:
        while not queue.empty():
            samples.append(await one(queue.get_nowait()))

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return Round(path, time.perf_counter() - start, samples)


def sluice_client(http: httpx.AsyncClient, max_tokens: int) -> OneRequest:
    async def one(prompt: str) -> Sample:
        body = {
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        arrivals: list[float] = []
        queue_ms = 0.0
        sent_at, start = time.time(), time.perf_counter()
        async with aconnect_sse(http, "POST", "/generate", json=body) as source:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                if sse.event == "token":
                    arrivals.append(time.perf_counter())
                elif sse.event == "done":
                    queue_ms = json.loads(sse.data)["timings"]["queue_ms"]
                elif sse.event == "error":
                    raise RuntimeError(sse.data)
        sample = _sample(start, arrivals)
        sample.queue_ms = queue_ms
        sample.request_id = source.response.headers["x-request-id"]
        sample.sent_at, sample.first_at = sent_at, sent_at + sample.ttft
        return sample

    return one


def vllm_serve_client(http: httpx.AsyncClient, model: str, max_tokens: int) -> OneRequest:
    async def one(prompt: str) -> Sample:
        body = {
            "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }  # fmt: skip
        arrivals: list[float] = []
        start = time.perf_counter()
        async with aconnect_sse(http, "POST", "/v1/completions", json=body) as source:
            source.response.raise_for_status()
            async for sse in source.aiter_sse():
                if sse.data == "[DONE]":
                    break
                chunk = json.loads(sse.data)
                # Cumulative usage on every chunk: exact token counts however they are grouped.
                new = chunk["usage"]["completion_tokens"] - len(arrivals)
                if chunk["choices"] and new > 0:
                    arrivals.extend([time.perf_counter()] * new)
        return _sample(start, arrivals)

    return one


def direct_client(engine: object, max_tokens: int) -> OneRequest:
    async def one(prompt: str) -> Sample:
        request = GenerationRequest(
            request_id=uuid.uuid4().hex,
            prompt=prompt,
            sampling=SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            enqueued_at=time.time(),
        )
        arrivals: list[float] = []
        start = time.perf_counter()
        async for delta in engine.generate(request):  # type: ignore[attr-defined]
            arrivals.extend([time.perf_counter()] * delta.num_tokens)
        return _sample(start, arrivals)

    return one


def _sample(start: float, arrivals: list[float]) -> Sample:
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return Sample(
        ttft=arrivals[0] - start, e2e=arrivals[-1] - start, tokens=len(arrivals), gaps=gaps
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(rounds: list[Round]) -> dict[str, float]:
    samples = [s for r in rounds for s in r.samples]
    ttft = [s.ttft * 1000 for s in samples]
    e2e = [s.e2e * 1000 for s in samples]
    gaps = [g * 1000 for s in samples for g in s.gaps]
    tpot = [(s.e2e - s.ttft) * 1000 / (s.tokens - 1) for s in samples if s.tokens > 1]
    out = {
        "tokens_per_s": statistics.median(r.tokens_per_s for r in rounds),
        "requests": len(samples),
    }
    for name, values in (("ttft_ms", ttft), ("itl_ms", gaps), ("tpot_ms", tpot), ("e2e_ms", e2e)):
        for q in (50, 95, 99):
            out[f"{name}_p{q}"] = percentile(values, q)
    return out


def _trio(r: dict[str, float], key: str) -> str:
    return "/".join(f"{r[f'{key}_p{q}']:.0f}" for q in (50, 95, 99))


def markdown(results: dict[str, dict[str, float]]) -> str:
    rows = [
        "| path | tok/s | TTFT p50/p95/p99 ms | ITL p50/p95/p99 ms | TPOT p50 ms "
        "| e2e p50/p95/p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for path, r in results.items():
        rows.append(
            f"| {path} | {r['tokens_per_s']:.1f} | {_trio(r, 'ttft_ms')} | {_trio(r, 'itl_ms')} "
            f"| {r['tpot_ms_p50']:.1f} | {_trio(r, 'e2e_ms')} |"
        )
    return "\n".join(rows)


async def bench(
    args: argparse.Namespace, stack_url: str, settings: Settings, serve_url: str | None
) -> dict:
    from workers.engines.vllm import VllmEngine

    engine = VllmEngine.start(settings) if "direct" in args.paths else None
    try:
        async with (
            httpx.AsyncClient(base_url=stack_url, timeout=600) as http,
            httpx.AsyncClient(base_url=serve_url or stack_url, timeout=600) as serve,
        ):
            clients = {
                "direct": lambda: direct_client(engine, args.max_tokens),
                "sluice": lambda: sluice_client(http, args.max_tokens),
                "vllm-serve": lambda: vllm_serve_client(serve, settings.model, args.max_tokens),
            }
            paths = {name: clients[name]() for name in args.paths}
            for name, one in paths.items():  # warm-up, not measured
                await run_round(name, one, args.concurrency, args.concurrency)
            rounds: dict[str, list[Round]] = {name: [] for name in paths}
            for i in range(args.rounds):
                order = list(paths) if i % 2 == 0 else list(reversed(paths))
                for name in order:
                    r = await run_round(name, paths[name], args.requests, args.concurrency)
                    rounds[name].append(r)
                    await asyncio.sleep(args.pause_s)
                    ttft = [s.ttft * 1000 for s in r.samples]
                    queue = [s.queue_ms for s in r.samples]
                    print(
                        f"round {i + 1} {name}: {r.tokens_per_s:.1f} tok/s, TTFT p50 "
                        f"{percentile(ttft, 50):.0f} ms, max {max(ttft):.0f} ms, "
                        f"Kafka queue max {max(queue):.0f} ms",
                        flush=True,
                    )
    finally:
        if engine is not None:
            await engine.shutdown()
    results = {name: summarize(rs) for name, rs in rounds.items()}
    report: dict = {
        "results": results,
        "per_round_tokens_per_s": {n: [r.tokens_per_s for r in rs] for n, rs in rounds.items()},
        "per_round_ttft_max_ms": {
            n: [max(s.ttft for s in r.samples) * 1000 for r in rs] for n, rs in rounds.items()
        },
    }
    if "sluice" in rounds:
        samples = [x for r in rounds["sluice"] for x in r.samples]
        report["hops"] = await hops.breakdown(settings, samples)
    s = results.get("sluice")
    for other in ("direct", "vllm-serve"):
        if s is None or other not in results:
            continue
        o = results[other]
        report.setdefault("vs", {})[other] = {
            "throughput_ratio": s["tokens_per_s"] / o["tokens_per_s"],
            "ttft_added_p50_ms": s["ttft_ms_p50"] - o["ttft_ms_p50"],
            "ttft_added_p99_ms": s["ttft_ms_p99"] - o["ttft_ms_p99"],
            "ttft_p99_ratio": s["ttft_ms_p99"] / o["ttft_ms_p99"],
        }
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=48, help="per round and path")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--paths", nargs="+", choices=["direct", "sluice", "vllm-serve"],
        default=["direct", "sluice"],
    )  # fmt: skip
    parser.add_argument("--pause-s", type=float, default=0.0, help="idle time after each round")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    with bench_stack("serving") as stack, vllm_server(stack, "vllm-serve" in args.paths) as url:
        settings = stack.settings
        report = asyncio.run(bench(args, stack.url, settings, url))
    report["config"] = {
        **vars(args),
        "out": str(args.out),
        "model": settings.model,
        "dtype": settings.dtype,
        "machine": machine(),
    }
    print()
    print(markdown(report["results"]))
    for other, v in report.get("vs", {}).items():
        print(
            f"\nsluice vs {other}: throughput ratio {v['throughput_ratio']:.3f}; TTFT added "
            f"p50 {v['ttft_added_p50_ms']:.1f} ms, p99 {v['ttft_added_p99_ms']:.1f} ms; "
            f"TTFT p99 ratio {v['ttft_p99_ratio']:.2f}"
        )
    if "hops" in report:
        print("\n" + hops.markdown(report["hops"]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


@contextlib.contextmanager
def vllm_server(stack: devstack.LocalStack, wanted: bool) -> Iterator[str | None]:
    """vLLM's own OpenAI server on the stack's engine arguments, or nothing if not `wanted`."""
    if not wanted:
        yield None
        return
    from workers.engines.vllm import engine_args

    port = devstack.free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--port", str(port)]
    for key, value in engine_args(stack.settings).items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    log = stack.log_dir / "vllm-serve.log"
    proc = devstack.spawn(argv, log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve did not start; see {log}")
            time.sleep(1)
        yield url
    finally:
        devstack.stop(proc)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def bench_stack(
    name: str,
    cpus: tuple[int | None, ...] = (None,),
    worker_env: list[dict[str, str]] | None = None,
    **overrides: object,
) -> Iterator[devstack.LocalStack]:
    """A broker of its own, the API and a vLLM worker per entry of `cpus` (with the variables
    of the same entry of `worker_env`), on a fresh Redis prefix and with auth off (the
    benchmarks measure serving, not keys), and any other settings `overrides`; all of it stops
    on exit."""
    base = Settings()
    prepare_default_model(base)
    log_dir = Path(tempfile.mkdtemp(prefix=f"sluice-bench-{name}-"))
    broker_port = devstack.free_port()
    broker = devstack.start_broker(broker_port, log_dir / "broker.log")
    settings = base.model_copy(update={
        "kafka": f"127.0.0.1:{broker_port}", "port": devstack.free_port(),
        "redis_prefix": f"sluice-bench-{uuid.uuid4().hex[:8]}", "worker_metrics_port": 0,
        "auth_enabled": False, **overrides,
    })  # fmt: skip
    stack = devstack.LocalStack(settings, log_dir)
    try:
        envs = worker_env or [{} for _ in cpus]
        for cpu, env in zip(cpus, envs, strict=True):  # its engine bound to that core if given
            stack.start_worker(cpu, env=env)
        stack.start_api()
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()
        devstack.stop(broker)


def machine() -> str:
    import os

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {cpu_model()}, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def cpu_model() -> str:
    """CPU model and the ISA extensions that decide bf16/int8 speed on CPU (they differ between
    machines of the same kind, so every result records them)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu unknown"
    first_cpu = info.split("\n\n")[0].splitlines()
    fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in first_cpu if ":" in ln)}
    name = fields.get("model name", "?")
    flags = set(fields.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"]
    return f"{name} ({' '.join(f for f in wanted if f in flags) or 'no AVX2'})"
