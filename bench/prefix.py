"""Benchmark 3: prefix caching, TTFT with a shared 500-token system prompt, cache on vs off.

Engines with caching on and off are loaded together and take turns on the same requests: a
fixed 500-token system prompt followed by a different user question each time, one request at
a time (so TTFT is prefill, not queueing). The first request fills the cache and is reported
apart; the median is over the rest.

    sluice bench prefix [--requests 12] [--engines vllm transformers] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench.precision import TEXT, TOPICS
from bench.serving import machine, percentile
from shared.messages import ChatMessage, GenerationRequest, SamplingOptions
from shared.models import prepare_default_model
from shared.settings import Settings

SYSTEM_TOKENS = 500


def system_prompt(tokenizer: Any) -> str:
    ids = tokenizer.encode(TEXT.read_text(), add_special_tokens=False)[:SYSTEM_TOKENS]
    return "Answer questions using this licence text.\n\n" + tokenizer.decode(ids)


def start(engine: str, settings: Settings) -> Any:
    if engine == "vllm":
        from workers.engines.vllm import VllmEngine

        return VllmEngine.start(settings)
    from workers.engines.transformers import TransformersEngine

    return TransformersEngine.start(settings)


async def ttft(engine: Any, system: str, question: str, max_tokens: int) -> tuple[float, int]:
    request = GenerationRequest(
        request_id=uuid.uuid4().hex,
        messages=[
            ChatMessage(role="system", content=system),
            ChatMessage(role="user", content=question),
        ],
        sampling=SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        enqueued_at=time.time(),
    )
    start_t = time.perf_counter()
    first, prompt_tokens = None, 0
    async for delta in engine.generate(request):
        if first is None and delta.num_tokens:
            first = time.perf_counter() - start_t
        prompt_tokens = delta.prompt_tokens
    assert first is not None
    return first * 1000, prompt_tokens


async def bench(args: argparse.Namespace, settings: Settings) -> dict:
    engines: dict[str, Any] = {}
    try:
        for name in args.engines:
            for caching in (True, False):
                s = settings.model_copy(update={"enable_prefix_caching": caching})
                engines[f"{name} cache {'on' if caching else 'off'}"] = start(name, s)
        tokenizer = next(iter(engines.values()))._tokenizer
        system = system_prompt(tokenizer)
        questions = [f"Does this licence say anything about {t}?" for t in TOPICS]
        times: dict[str, list[float]] = {k: [] for k in engines}
        prompt_tokens = 0
        for i in range(args.requests):
            order = list(engines) if i % 2 == 0 else list(reversed(engines))
            for key in order:
                ms, prompt_tokens = await ttft(
                    engines[key], system, questions[i % len(questions)], args.max_tokens
                )
                times[key].append(ms)
            print(f"request {i + 1}: " + ", ".join(f"{k} {times[k][-1]:.0f} ms" for k in times))
    finally:
        for engine in engines.values():
            await engine.shutdown()
    results = {
        key: {
            "first_request_ttft_ms": ts[0],
            "ttft_ms_p50": statistics.median(ts[1:]),
            "ttft_ms_p99": percentile(ts[1:], 99),
            "ttft_ms": ts,
        }
        for key, ts in times.items()
    }
    for name in args.engines:
        on, off = results[f"{name} cache on"], results[f"{name} cache off"]
        on["speedup_p50_vs_off"] = off["ttft_ms_p50"] / on["ttft_ms_p50"]
    return {"results": results, "prompt_tokens": prompt_tokens}


def markdown(report: dict) -> str:
    lines = [
        "| engine, prefix cache | first request TTFT ms | TTFT p50 ms (requests 2..N) | p99 ms "
        "| p50 speed-up vs off |",
        "|---|---|---|---|---|",
    ]
    for key, r in report["results"].items():
        speedup = f"{r['speedup_p50_vs_off']:.1f}x" if "speedup_p50_vs_off" in r else ""
        lines.append(
            f"| {key} | {r['first_request_ttft_ms']:.0f} | {r['ttft_ms_p50']:.0f} "
            f"| {r['ttft_ms_p99']:.0f} | {speedup} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench prefix",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument(
        "--engines", nargs="+", choices=["vllm", "transformers"], default=["vllm", "transformers"]
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix-cpu.json"))
    args = parser.parse_args(argv)
    settings = Settings()
    prepare_default_model(settings)
    report = asyncio.run(bench(args, settings))
    report["config"] = {**vars(args), "out": str(args.out), "system_prompt_tokens": SYSTEM_TOKENS,
                        "model": settings.model, "machine": machine()}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))


if __name__ == "__main__":
    main()
