"""Cost benchmark: what a request costs through the real stack, busy and idle, from the ledger.

Two phases on one worker, then the report `GET /cost` would give for the whole run:
- busy: `--requests` streaming requests at `--concurrency`, fixed lengths (greedy, ignore_eos);
- trickle: one request at a time every `--trickle-every-s`, for `--trickle-s` seconds.
Each phase's cost per 1,000 requests is read from ledger deltas, both as billed (fleet: worker
time, idle included) and as attributed to requests (engine time by token share).

    sluice bench cost [--requests 64] [--concurrency 16] [--max-tokens 64] [--out F.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx

from bench.serving import bench_stack, machine, run_round, sluice_client
from shared import cost, ledger
from shared import redis as sredis
from shared.settings import Settings

SETTLE_S = 6  # workers write the ledger every 5 s

# Projection assumptions (docs/COST.md): $/h per GPU and memory bandwidth (GB/s).
GPUS = {"A10 24GB": (0.55, 600), "H100 SXM 80GB": (3.50, 3350)}
# Weight bytes, and the tok/s measured for the shape on the lent H200 at 64 concurrent requests
# (docs/BENCHMARKS.md §2: transformers engine, host-bound, so a floor, not what vLLM reaches).
# A 135M model is bound by per-step overhead, not bandwidth: no roofline for it.
MODELS = {
    "SmolLM2-135M (fp32)": (None, 594.6),
    "Llama-2-7B (fp16)": (13.5e9, 271.5),
    "Llama-2-7B (int8)": (7.0e9, None),
}
ROOFLINE_BATCH = 32


def projections(tokens_per_request: float) -> list[dict]:
    """Cost per 1,000 requests of this workload on each GPU, at the target utilization, between
    two throughputs: the memory-bandwidth roofline (each decode step reads the weights once for a
    batch of ROOFLINE_BATCH; KV reads and compute ignored: a lower bound on cost) and the H200
    measurement (an upper bound on cost: that run was host-bound)."""
    rows = []
    for gpu, (price, bandwidth) in GPUS.items():
        for model, (weight_bytes, measured) in MODELS.items():
            roofline = ROOFLINE_BATCH * bandwidth * 1e9 / weight_bytes if weight_bytes else None
            rows.append({
                "gpu": gpu, "model": model, "usd_per_hour": price,
                "roofline_tok_s": roofline, "measured_h200_tok_s": measured,
                "per_1k_low_usd": _per_1k(price, roofline, tokens_per_request),
                "per_1k_high_usd": _per_1k(price, measured, tokens_per_request),
            })  # fmt: skip
    return rows


def _per_1k(price: float, tok_s: float | None, tokens_per_request: float) -> float | None:
    if tok_s is None:
        return None
    requests_per_hour = tok_s / tokens_per_request * 3600 * cost.TARGET_UTILIZATION
    return price / requests_per_hour * 1000


def _phase(before: dict[str, float], after: dict[str, float], settings: Settings) -> dict:
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    fleet = d.get("worker_seconds", 0.0) / 3600 * cost.worker_hourly_usd(settings)
    n = d.get("requests", 0.0)
    return {
        "requests": n,
        "prompt_tokens": d.get("prompt_tokens", 0.0),
        "completion_tokens": d.get("completion_tokens", 0.0),
        "worker_s": d.get("worker_seconds", 0.0),
        "busy_s": d.get("busy_seconds", 0.0),
        "utilization": d.get("busy_seconds", 0.0) / max(d.get("worker_seconds", 0.0), 1e-9),
        "fleet_usd": fleet,
        "attributed_usd": d.get("dollars", 0.0),
        "fleet_per_1k_usd": fleet / n * 1000 if n else None,
        "attributed_per_1k_usd": d.get("dollars", 0.0) / n * 1000 if n else None,
    }


async def bench(args: argparse.Namespace, url: str, settings: Settings, ready_at: float) -> dict:
    redis = sredis.connect(settings)

    async def snapshot() -> dict[str, float]:
        await asyncio.sleep(SETTLE_S)
        return await ledger.totals(redis, settings, window_s=86400)

    try:
        async with httpx.AsyncClient(base_url=url, timeout=600) as http:
            one = sluice_client(http, args.max_tokens)
            start = await snapshot()
            busy = await run_round("sluice", one, args.requests, args.concurrency)
            print(f"busy: {busy.tokens_per_s:.1f} tok/s over {busy.wall_s:.0f} s", flush=True)
            after_busy = await snapshot()
            trickle_end = time.monotonic() + args.trickle_s
            while time.monotonic() < trickle_end:
                await run_round("sluice", one, 1, 1)
                await asyncio.sleep(args.trickle_every_s)
            end = await snapshot()
        window_s = time.time() - ready_at
        report = cost.build_report(end, settings, window_s)
    finally:
        await redis.aclose()
    busy_phase = _phase(start, after_busy, settings)
    per_request = busy_phase["completion_tokens"] / max(busy_phase["requests"], 1)
    return {
        "busy": {**busy_phase, "tokens_per_s": busy.tokens_per_s},
        "projections": projections(per_request),
        "trickle": _phase(after_busy, end, settings),
        "report": report.model_dump(),
        "report_text": cost.render(report),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sluice bench cost", description=__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--trickle-s", type=float, default=120.0)
    parser.add_argument("--trickle-every-s", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    with bench_stack("cost") as stack:
        settings = stack.settings
        result = asyncio.run(bench(args, stack.url, settings, time.time()))
    result["config"] = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "model": settings.model,
        "dtype": settings.dtype,
        "instance_hourly_usd": settings.instance_hourly_usd,
        "machine": machine(),
        "prompt": "16 short-story prompts (bench/serving.py), greedy, ignore_eos",
    }
    for name in ("busy", "trickle"):
        p = result[name]
        print(
            f"{name}: {p['requests']:.0f} requests, utilization {p['utilization']:.0%}, "
            f"per 1k requests ${p['fleet_per_1k_usd']:.4f} billed, "
            f"${p['attributed_per_1k_usd']:.4f} attributed"
        )
    print(result["report_text"])
    print("\nProjected cost per 1,000 requests of this workload at 70% utilization:")
    for row in result["projections"]:
        low, high = (
            "n/a" if v is None else f"${v:.4f}"
            for v in (row["per_1k_low_usd"], row["per_1k_high_usd"])
        )
        print(f"  {row['gpu']:14} {row['model']:20} best case {low}, host-bound case {high}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
