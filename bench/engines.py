"""Benchmark 1: continuous batching vs one request at a time, side by side in one run.

Three engines, loaded together, fed the same prompts (greedy, fixed output length):
- `vllm`: the worker's VllmEngine (AsyncLLM, continuous batching, paged KV cache);
- `transformers`: the worker's TransformersEngine (transformers' continuous batching manager);
- `sequential`: plain `model.generate()`, one request at a time (what a naive server does).

At each concurrency C, C clients submit at once. Each round measures every engine at every
concurrency, the order of engines alternating between rounds; medians over rounds are reported.
`sequential` serves one request at a time, so its throughput does not depend on C; it is measured
on min(C, 4) requests to bound the run time, and its TTFT (mostly queueing) is not reported.

    sluice bench engines [--concurrency 1 4 16 32] [--max-tokens 64] [--rounds 3] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench.serving import PROMPTS, Round, direct_client, machine, percentile, run_round
from shared.messages import GenerationRequest
from shared.models import prepare_default_model
from shared.prompts import prompt_token_ids
from shared.settings import Settings
from workers.engines.base import Delta

SEQUENTIAL_MAX_REQUESTS = 4


class SequentialGenerate:
    """`model.generate()` behind the Engine interface, one request at a time, batch size 1."""

    name = "sequential"

    def __init__(self, settings: Settings) -> None:
        from workers.engines.transformers import load_model

        self._model, self._tokenizer = load_model(settings)
        self._lock = asyncio.Lock()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        ids = prompt_token_ids(self._tokenizer, request)
        async with self._lock:
            loop = asyncio.get_running_loop()
            tokens: asyncio.Queue[int | None] = asyncio.Queue()
            streamer = _Streamer(lambda n: loop.call_soon_threadsafe(tokens.put_nowait, n))
            work = asyncio.create_task(asyncio.to_thread(self._run, ids, request, streamer))
            while (n := await tokens.get()) is not None:
                yield Delta(text="", num_tokens=n, prompt_tokens=len(ids))
            await work

    def _run(self, ids: list[int], request: GenerationRequest, streamer: _Streamer) -> None:
        import torch

        s = request.sampling
        eos = None if s.ignore_eos else self._tokenizer.eos_token_id
        with torch.inference_mode():
            self._model.generate(
                torch.tensor([ids]),
                max_new_tokens=s.max_tokens,
                min_new_tokens=s.max_tokens if s.ignore_eos else 0,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=self._tokenizer.eos_token_id,
                streamer=streamer,
            )

    async def shutdown(self) -> None:
        pass


class _Streamer:
    """transformers' streamer protocol: the first `put` is the prompt, then one per step."""

    def __init__(self, emit: Any) -> None:
        self._emit = emit
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._emit(int(value.numel()))

    def end(self) -> None:
        self._emit(None)


async def bench(args: argparse.Namespace, settings: Settings) -> dict:
    from workers.engines.transformers import TransformersEngine
    from workers.engines.vllm import VllmEngine

    engines: dict[str, Any] = {}
    try:
        for name in args.engines:
            start = time.perf_counter()
            if name == "vllm":
                engines[name] = VllmEngine.start(settings)
            elif name == "transformers":
                engines[name] = TransformersEngine.start(settings)
            else:
                engines[name] = SequentialGenerate(settings)
            print(f"{name}: loaded in {time.perf_counter() - start:.1f} s", flush=True)
        clients = {n: direct_client(e, args.max_tokens) for n, e in engines.items()}
        for name, one in clients.items():  # warm-up, not measured
            await run_round(name, one, 2, 2)
        rounds: dict[tuple[str, int], list[Round]] = {}
        for i in range(args.rounds):
            order = list(clients) if i % 2 == 0 else list(reversed(clients))
            for c in args.concurrency:
                for name in order:
                    n = min(c, SEQUENTIAL_MAX_REQUESTS) if name == "sequential" else c
                    r = await run_round(name, clients[name], n, c)
                    rounds.setdefault((name, c), []).append(r)
                    print(f"round {i + 1} c={c} {name}: {r.tokens_per_s:.1f} tok/s", flush=True)
    finally:
        for engine in engines.values():
            await engine.shutdown()
    return {"results": [_summary(name, c, rs) for (name, c), rs in rounds.items()]}


def _summary(engine: str, concurrency: int, rounds: list[Round]) -> dict:
    ttft = [s.ttft * 1000 for r in rounds for s in r.samples]
    out: dict[str, Any] = {
        "engine": engine,
        "concurrency": concurrency,
        "tokens_per_s": statistics.median(r.tokens_per_s for r in rounds),
        "per_round_tokens_per_s": [round(r.tokens_per_s, 2) for r in rounds],
    }
    if engine != "sequential":
        out["ttft_ms_p50"] = percentile(ttft, 50)
        out["ttft_ms_p99"] = percentile(ttft, 99)
    return out


def markdown(report: dict) -> str:
    rows = {(r["engine"], r["concurrency"]): r for r in report["results"]}
    engines = list(dict.fromkeys(e for e, _ in rows))
    levels = sorted({c for _, c in rows})
    head = "| concurrency | " + " | ".join(f"{e} tok/s" for e in engines)
    head += " | vllm / sequential | " + " | ".join(
        f"{e} TTFT p50/p99 ms" for e in engines if e != "sequential"
    )
    lines = [head + " |", "|" + "---|" * (head.count("|"))]
    for c in levels:
        cells = [f"{rows[(e, c)]['tokens_per_s']:.1f}" for e in engines]
        ratio = ""
        if ("vllm", c) in rows and ("sequential", c) in rows:
            vllm, seq = rows[("vllm", c)], rows[("sequential", c)]
            ratio = f"{vllm['tokens_per_s'] / seq['tokens_per_s']:.1f}x"
        ttfts = [
            f"{rows[(e, c)]['ttft_ms_p50']:.0f}/{rows[(e, c)]['ttft_ms_p99']:.0f}"
            for e in engines
            if e != "sequential"
        ]
        lines.append(f"| {c} | " + " | ".join([*cells, ratio, *ttfts]) + " |")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    engines = list(dict.fromkeys(r["engine"] for r in results))
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for e in engines:
        pts = sorted((r["concurrency"], r["tokens_per_s"]) for r in results if r["engine"] == e)
        ax.plot(*zip(*pts, strict=True), marker="o", label=e)
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s (median)")
    ax.set_xticks(report["config"]["concurrency"], labels=report["config"]["concurrency"])
    ax.set_title("Throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out.with_name(out.stem + "-throughput.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in engines:
        if e == "sequential":
            continue
        pts = sorted(
            (r["concurrency"], r["ttft_ms_p50"], r["ttft_ms_p99"])
            for r in results
            if r["engine"] == e
        )
        xs, p50, p99 = zip(*pts, strict=True)
        (line,) = ax.plot(xs, p50, marker="o", label=f"{e} p50")
        ax.plot(xs, p99, marker="x", linestyle="--", color=line.get_color(), label=f"{e} p99")
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="TTFT (ms)")
    ax.set_xticks(report["config"]["concurrency"], labels=report["config"]["concurrency"])
    ax.set_title("Time to first token vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend()
    paths.append(out.with_name(out.stem + "-ttft.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close("all")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench engines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=["vllm", "transformers", "sequential"],
        default=["vllm", "transformers", "sequential"],
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/engines-cpu.json"))
    args = parser.parse_args(argv)
    settings = Settings()
    prepare_default_model(settings)
    report = asyncio.run(bench(args, settings))
    report["config"] = {
        **vars(args),
        "out": str(args.out),
        "prompts": len(PROMPTS),
        "model": settings.model,
        "dtype": settings.dtype,
        "max_num_seqs": settings.max_num_seqs,
        "machine": machine(),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    for p in plot(report, args.out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
