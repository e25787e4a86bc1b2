"""Benchmark 4: KV cache pressure: throughput and preemptions as concurrency exceeds the cache.

Two vLLM engines loaded together, the same but for the KV cache: `small` holds `--cache-blocks`
blocks (a handful of full sequences), `ample` the configured size (SLUICE_KV_CACHE_SPACE_GIB).
At each concurrency both serve the same requests (greedy, fixed length), taking turns.
Preemptions (a running sequence evicted to free blocks, recomputed later) are counted by a vLLM
stat logger.

    sluice bench kv [--concurrency 4 8 16 32] [--cache-blocks 12] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

from bench.serving import PROMPTS, direct_client, machine, percentile, run_round
from shared.models import prepare_default_model
from shared.settings import Settings

BLOCK_SIZE = 128
MAX_MODEL_LEN = 512


class PreemptionCounter(StatLoggerBase):
    """A vLLM stat logger (the class is its own factory) summing preemptions per engine step."""

    def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
        self.preemptions = 0
        self.max_kv_usage = 0.0
        PreemptionCounter.latest = self

    def record(
        self,
        scheduler_stats: Any,
        iteration_stats: Any,
        mm_cache_stats: Any = None,
        engine_idx: int = 0,
    ) -> None:
        if iteration_stats is not None:
            self.preemptions += iteration_stats.num_preempted_reqs
        if scheduler_stats is not None:
            self.max_kv_usage = max(self.max_kv_usage, scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        pass

    latest: PreemptionCounter


def start(settings: Settings, blocks: int | None) -> tuple[Any, PreemptionCounter]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from workers.engines.vllm import VllmEngine, engine_args

    # Requests here are ~140 tokens; a short context lets a tiny cache pass vLLM's start check
    # (the cache must hold one max_model_len sequence).
    update = {"block_size": BLOCK_SIZE, "max_model_len": MAX_MODEL_LEN}
    args = engine_args(settings.model_copy(update=update))
    args = AsyncEngineArgs(
        **args, num_gpu_blocks_override=blocks, disable_log_stats=False, enable_log_requests=False
    )
    llm = AsyncLLM.from_engine_args(args, stat_loggers=[PreemptionCounter])
    return VllmEngine(llm, settings.model), PreemptionCounter.latest


async def bench(args: argparse.Namespace, settings: Settings) -> dict:
    engines: dict[str, tuple[Any, PreemptionCounter]] = {}
    try:
        engines["small"] = start(settings, args.cache_blocks)
        engines["ample"] = start(settings, None)
        clients = {k: direct_client(e, args.max_tokens) for k, (e, _) in engines.items()}
        for name, one in clients.items():  # warm-up
            await run_round(name, one, 2, 2)
        results = []
        for i, c in enumerate(args.concurrency):
            order = list(clients) if i % 2 == 0 else list(reversed(clients))
            for name in order:
                counter = engines[name][1]
                counter.preemptions, counter.max_kv_usage = 0, 0.0
                r = await run_round(name, clients[name], c, c)
                ttft = [s.ttft * 1000 for s in r.samples]
                results.append(
                    {
                        "cache": name,
                        "concurrency": c,
                        "tokens_per_s": r.tokens_per_s,
                        "preemptions": counter.preemptions,
                        "max_kv_cache_usage": counter.max_kv_usage,
                        "ttft_ms_p50": percentile(ttft, 50),
                        "e2e_ms_max": max(s.e2e for s in r.samples) * 1000,
                    }
                )
                print(
                    f"c={c} {name}: {r.tokens_per_s:.1f} tok/s, {counter.preemptions} preemptions",
                    flush=True,
                )
    finally:
        for engine, _ in engines.values():
            await engine.shutdown()
    return {"results": results}


def markdown(report: dict) -> str:
    rows = {(r["cache"], r["concurrency"]): r for r in report["results"]}
    lines = [
        "| concurrency | small cache tok/s | preemptions | peak KV use "
        "| ample cache tok/s | preemptions | peak KV use | small / ample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in sorted({c for _, c in rows}):
        s, a = rows[("small", c)], rows[("ample", c)]
        lines.append(
            f"| {c} | {s['tokens_per_s']:.1f} | {s['preemptions']} | {s['max_kv_cache_usage']:.0%} "
            f"| {a['tokens_per_s']:.1f} | {a['preemptions']} | {a['max_kv_cache_usage']:.0%} "
            f"| {s['tokens_per_s'] / a['tokens_per_s']:.2f} |"
        )
    return "\n".join(lines)


def plot(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax2 = ax.twinx()
    for cache, color in (("small", "tab:red"), ("ample", "tab:blue")):
        pts = sorted(
            (r["concurrency"], r["tokens_per_s"], r["preemptions"])
            for r in report["results"]
            if r["cache"] == cache
        )
        xs, tps, pre = zip(*pts, strict=True)
        ax.plot(xs, tps, marker="o", color=color, label=f"{cache} cache tok/s")
        shifted = [x * (0.93 if cache == "small" else 1.07) for x in xs]
        widths = [x * 0.12 for x in xs]
        ax2.bar(shifted, pre, width=widths, color=color, alpha=0.3, label=f"{cache} preemptions")
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s")
    ax.set_xticks(report["config"]["concurrency"], labels=report["config"]["concurrency"])
    ax.set_xticks([], minor=True)
    ax2.set_ylabel("preemptions")
    ax.set_title("KV cache pressure (vLLM)")
    ax.grid(alpha=0.3)
    lines = ax.get_legend_handles_labels()
    bars = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + bars[0], lines[1] + bars[1], fontsize=8, loc="upper left")
    path = out.with_name(out.stem + ".png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sluice bench kv",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--cache-blocks", type=int, default=12, help=f"of {BLOCK_SIZE} tokens")
    parser.add_argument("--out", type=Path, default=Path("bench/results/kv-cpu.json"))
    args = parser.parse_args(argv)
    settings = Settings()
    prepare_default_model(settings)
    report = asyncio.run(bench(args, settings))
    report["config"] = {**vars(args), "out": str(args.out), "block_size": BLOCK_SIZE,
                        "prompts": len(PROMPTS), "model": settings.model,
                        "max_num_seqs": settings.max_num_seqs, "machine": machine()}  # fmt: skip
    args.out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"wrote {plot(report, args.out)}")


if __name__ == "__main__":
    main()
