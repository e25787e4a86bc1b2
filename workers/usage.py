"""Feeds this worker's share of the fleet ledger (shared/ledger.py) once a second.

Engine-level amounts are the deltas of counters this process already exports (ours and
vLLM's), so the ledger and Prometheus can never disagree about what happened; gauges (KV cache
usage, engine queue) are integrated over time. Per-request amounts are added by the worker
when a request finishes (`add_request`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from shared import metrics
from shared.ledger import Ledger

log = logging.getLogger(__name__)

SAMPLE_S = 1.0
FLUSH_EVERY = 5  # samples per Redis write

COUNTERS = {
    "busy_seconds": "sluice_engine_busy_seconds_total",
    "request_seconds": "sluice_engine_request_seconds_total",
    "preemptions": "vllm:num_preemptions_total",
}
GAUGES = {"kv": "vllm:kv_cache_usage_perc", "waiting": "vllm:num_requests_waiting"}


def add_request(
    ledger: Ledger,
    *,
    topic: str,
    tenant: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    seconds: float,
    dollars: float,
) -> None:
    ledger.add("requests", 1)
    ledger.add("attributed_seconds", seconds)
    ledger.add("prompt_tokens", prompt_tokens)
    ledger.add("completion_tokens", completion_tokens)
    ledger.add("dollars", dollars)
    ledger.add(f"dollars@topic:{topic}", dollars)
    ledger.add(f"dollars@model:{model}", dollars)
    ledger.add_tenant(tenant, model, prompt_tokens, completion_tokens, dollars)


async def record_usage(ledger: Ledger) -> None:
    """Until cancelled; the caller flushes once more after cancelling."""
    last = metrics.sample_sums([*COUNTERS.values(), *GAUGES.values()])
    last_t = time.monotonic()
    n = 0
    while True:
        await asyncio.sleep(SAMPLE_S)
        now = metrics.sample_sums([*COUNTERS.values(), *GAUGES.values()])
        now_t = time.monotonic()
        _add_sample(ledger, last, now, now_t - last_t)
        last, last_t = now, now_t
        n += 1
        if n % FLUSH_EVERY == 0:
            with contextlib.suppress(Exception):  # amounts stay pending; next flush retries
                await ledger.flush()


def _add_sample(
    ledger: Ledger, before: dict[str, float], after: dict[str, float], dt: float
) -> None:
    ledger.add("worker_seconds", dt)
    for field, name in COUNTERS.items():
        ledger.add(field, max(0.0, after[name] - before[name]))
    busy = max(0.0, after[COUNTERS["busy_seconds"]] - before[COUNTERS["busy_seconds"]])
    ledger.add("kv_usage_seconds", after[GAUGES["kv"]] * busy)
    if after[GAUGES["waiting"]] > 0:
        ledger.add("waiting_seconds", dt)
