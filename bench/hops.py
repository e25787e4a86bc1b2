"""Where TTFT goes on the Sluice path, hop by hop, from the requests' traces (shared/tracing.py).

Each segment is the time between two hops of the path; `client->api` starts at the client's
own clock when it sent the request (the same host, so the same clock) and `sse->client` ends
when its first token arrived. The segments of one request add up to its TTFT.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any, Protocol

from shared import redis as sredis
from shared import tracing
from shared.settings import Settings

CLIENT_SENT, CLIENT_FIRST = "client.sent", "client.first_token"
PATH = [CLIENT_SENT, *tracing.FIRST_TOKEN_PATH, CLIENT_FIRST]
SEGMENTS = {
    tracing.API_ACCEPTED: "client->api (HTTP, validation, admission)",
    tracing.KAFKA_PRODUCED: "kafka produce",
    tracing.WORKER_PICKED: "kafka -> worker",
    tracing.ENGINE_SUBMITTED: "worker claim",
    tracing.ENGINE_SCHEDULED: "engine queue",
    tracing.ENGINE_FIRST_TOKEN: "engine prefill",
    tracing.WORKER_FIRST_TOKEN: "engine -> worker",
    tracing.REDIS_FIRST_PUBLISH: "worker publish",
    tracing.API_FIRST_RELAY: "redis -> api",
    tracing.SSE_FIRST_WRITE: "api -> sse write",
    CLIENT_FIRST: "sse -> client",
}


class Traced(Protocol):
    request_id: str | None
    ttft: float
    sent_at: float
    first_at: float


def segments(hops: list[dict[str, Any]], sample: Traced) -> dict[str, float] | None:
    """ms per segment of one request; None if its trace misses a hop of the path."""
    at = {CLIENT_SENT: sample.sent_at, CLIENT_FIRST: sample.first_at}
    for h in hops:
        at.setdefault(h["hop"], h["t"])  # the first time: a takeover adds later ones
    if any(hop not in at for hop in PATH):
        return None
    return {SEGMENTS[b]: (at[b] - at[a]) * 1000 for a, b in itertools.pairwise(PATH)}


async def breakdown(settings: Settings, samples: list[Traced], worst: int = 5) -> dict[str, Any]:
    redis = sredis.connect(settings)
    try:
        per_request = []
        for s in samples:
            if s.request_id is None:
                continue
            seg = segments(await tracing.timeline(redis, settings, s.request_id), s)
            if seg is not None:
                per_request.append((s.ttft * 1000, s.request_id, seg))
    finally:
        await redis.aclose()
    summary = {}
    for name in SEGMENTS.values():
        values = sorted(seg[name] for _, _, seg in per_request)
        if values:
            summary[name] = {
                "p50": statistics.median(values),
                "p99": values[min(len(values) - 1, round(0.99 * (len(values) - 1)))],
                "max": values[-1],
                "mean": statistics.fmean(values),
            }
    slowest = sorted(per_request, reverse=True)[:worst]
    return {
        "traced": len(per_request),
        "of": len(samples),
        "segments_ms": summary,
        "slowest": [{"ttft_ms": t, "request_id": r, "segments_ms": seg} for t, r, seg in slowest],
    }


def markdown(report: dict[str, Any]) -> str:
    rows = [
        f"TTFT by hop, {report['traced']} of {report['of']} sluice requests traced "
        "(ms; the last columns: the slowest requests)",
        "",
        "| segment | p50 | p99 | max | mean | "
        + " | ".join(f"TTFT {s['ttft_ms']:.0f}" for s in report["slowest"])
        + " |",
        "|---|---|---|---|---|" + "---|" * len(report["slowest"]),
    ]
    for name, v in report["segments_ms"].items():
        worst = " | ".join(f"{s['segments_ms'][name]:.0f}" for s in report["slowest"])
        rows.append(
            f"| {name} | {v['p50']:.1f} | {v['p99']:.1f} | {v['max']:.1f} | {v['mean']:.1f} "
            f"| {worst} |"
        )
    return "\n".join(rows)
