"""Is the engine saturated? Samples how many requests it holds, as two Prometheus counters.

    utilization      = rate(sluice_engine_busy_seconds_total[1m])
    mean batch size  = rate(sluice_engine_request_seconds_total[1m])
                       / rate(sluice_engine_busy_seconds_total[1m])

Counters, not gauges, so that any scrape interval and any number of workers aggregate right.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from shared import metrics
from workers.cost import CostMeter
from workers.engines.base import Engine

SAMPLE_INTERVAL_S = 0.1


async def sample_utilization(engine: Engine, meter: CostMeter | None = None) -> None:
    last = time.monotonic()
    while True:
        await asyncio.sleep(SAMPLE_INTERVAL_S)
        if meter is not None:
            meter.tick()
        now = time.monotonic()
        held = engine.num_running()
        if held:
            metrics.ENGINE_BUSY.inc(now - last)
            metrics.ENGINE_REQUEST_SECONDS.inc((now - last) * held)
        last = now


class EngineLoad:
    """KV cache use and tokens per second over the last minute, from vLLM's own metrics in
    this process (None where the engine exports none: the transformers one)."""

    WINDOW_S = 60.0
    KV, GENERATED = "vllm:kv_cache_usage_perc", "vllm:generation_tokens_total"

    def __init__(self, engine: Engine) -> None:
        self._exported = engine.name == "vllm"
        self._samples: deque[tuple[float, float]] = deque()

    def sample(self) -> tuple[float | None, float | None]:
        if not self._exported:
            return None, None
        values = metrics.sample_sums([self.KV, self.GENERATED])
        now = time.monotonic()
        self._samples.append((now, values[self.GENERATED]))
        while now - self._samples[0][0] > self.WINDOW_S:
            self._samples.popleft()
        t0, v0 = self._samples[0]
        rate = (values[self.GENERATED] - v0) / (now - t0) if now > t0 else None
        return round(values[self.KV], 4), None if rate is None else round(rate, 1)
