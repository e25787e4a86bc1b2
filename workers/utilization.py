"""Is the engine saturated? Samples how many requests it holds, as two Prometheus counters.

    utilization      = rate(sluice_engine_busy_seconds_total[1m])
    mean batch size  = rate(sluice_engine_request_seconds_total[1m])
                       / rate(sluice_engine_busy_seconds_total[1m])

Counters, not gauges, so that any scrape interval and any number of workers aggregate right.
"""

from __future__ import annotations

import asyncio
import time

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
