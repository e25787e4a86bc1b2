"""The usage ledger: per-minute totals in Redis that every worker adds to.

Prometheus answers "what is happening"; the ledger answers "what did the last hour (or week)
cost", for `GET /cost` and `sluice cost report`, with no Prometheus in the loop. Each worker
accumulates amounts in memory and adds them to the current minute's and the current hour's
Redis hashes every few seconds (HINCRBYFLOAT), so any number of workers sum up without
coordination and a reader sums the buckets of a window: minutes for windows up to two hours,
hours beyond (a week is 169 hashes, not 10,080). Minute buckets live three hours, hour buckets
eight days, so the ledger holds at most ~370 keys whatever the traffic.

Fields (all sums over the bucket): requests, prompt_tokens, completion_tokens, dollars
(attributed to requests), attributed_seconds, worker_seconds (workers alive), busy_seconds
(engine held a request), request_seconds (integral of requests in the engine),
kv_usage_seconds (KV cache usage x busy time), waiting_seconds (engine queue non-empty),
preemptions; per-label dollars as `dollars@topic:<topic>` and `dollars@tenant:<tenant>`, and
per tenant `requests@tenant:`, `prompt_tokens@tenant:` and `completion_tokens@tenant:`, and
the same four per tenant and model as `<field>@tenant-model:<tenant>:<model>` (`add_tenant`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from redis.asyncio import Redis

from shared.settings import Settings

log = logging.getLogger(__name__)

BUCKET_S = 60
HOUR_S = 3600
MINUTE_WINDOW_MAX_S = 2 * HOUR_S  # longer windows are summed by the hour
MINUTE_RETENTION_S = 3 * HOUR_S
RETENTION_S = 8 * 86400  # a week's report, plus a day of slack


def bucket_key(settings: Settings, t: float, size: int = BUCKET_S) -> str:
    start = int(t // size) * size
    if size == BUCKET_S:
        return f"{settings.redis_prefix}:ledger:{start}"
    return f"{settings.redis_prefix}:ledger:h:{start}"


class Ledger:
    """One process's not-yet-written amounts."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._pending: defaultdict[str, float] = defaultdict(float)

    def add(self, field: str, amount: float) -> None:
        if amount:
            self._pending[field] += amount

    def add_tenant(
        self, tenant: str, model: str, prompt_tokens: int, completion_tokens: int, dollars: float
    ) -> None:
        """One request in its tenant's own figures (`GET /usage`), in all and by model. Tenant
        names hold no `:` (shared/apikeys.py), so the first one ends the tenant."""
        amounts = {"requests": 1, "prompt_tokens": prompt_tokens,
                   "completion_tokens": completion_tokens, "dollars": dollars}  # fmt: skip
        for field, amount in amounts.items():
            self.add(f"{field}@tenant:{tenant}", amount)
            self.add(f"{field}@tenant-model:{tenant}:{model}", amount)

    async def flush(self) -> None:
        if not self._pending:
            return
        amounts, self._pending = self._pending, defaultdict(float)
        now = time.time()
        pipe = self._redis.pipeline(transaction=True)  # a bucket never holds half a flush
        for size, keep in ((BUCKET_S, MINUTE_RETENTION_S), (HOUR_S, RETENTION_S)):
            key = bucket_key(self._settings, now, size)
            for field, amount in amounts.items():
                pipe.hincrbyfloat(key, field, amount)
            pipe.expire(key, keep)
        try:
            await pipe.execute()
        except Exception:
            for field, amount in amounts.items():  # Redis down: keep them for the next flush
                self._pending[field] += amount
            raise


async def totals(
    redis: Redis, settings: Settings, window_s: float, now: float | None = None
) -> dict[str, float]:
    """Sums of every field over the buckets that overlap the last `window_s` seconds (minutes,
    or hours past MINUTE_WINDOW_MAX_S)."""
    now = time.time() if now is None else now
    pipe = redis.pipeline(transaction=False)
    for key in window_keys(settings, window_s, now):
        pipe.hgetall(key)
    sums: defaultdict[str, float] = defaultdict(float)
    for bucket in await pipe.execute():
        for field, value in bucket.items():
            sums[field.decode()] += float(value)
    return dict(sums)


async def flush_every(ledger: Ledger, interval_s: float) -> None:
    """Until cancelled; amounts that fail to flush stay pending for the next try."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await ledger.flush()
        except Exception as e:
            log.warning("ledger flush failed (%s); kept for the next one", e)


def window_keys(settings: Settings, window_s: float, now: float) -> list[str]:
    size = BUCKET_S if window_s <= MINUTE_WINDOW_MAX_S else HOUR_S
    first = int((now - window_s) // size) * size
    return [bucket_key(settings, t, size) for t in range(first, int(now) + 1, size)]


class Reader:
    """Window totals, each kept `cache_s` so that many readers of `/usage` or `/cost` cost Redis
    one read of the window between them (concurrent callers share the read in flight)."""

    def __init__(self, redis: Redis, settings: Settings, cache_s: float = 0.0) -> None:
        self._redis = redis
        self._settings = settings
        self._cache_s = cache_s
        self._reads: dict[float, tuple[float, asyncio.Task[dict[str, float]]]] = {}

    async def window(self, window_s: float) -> tuple[float, dict[str, float]]:
        """(the window's end, its totals)."""
        now = time.time()
        cached = self._reads.get(window_s)
        if cached is None or now - cached[0] > self._cache_s or _failed(cached[1]):
            # Windows are the callers' choice (any seconds up to a week): keep only fresh ones.
            fresh = {w: c for w, c in self._reads.items() if now - c[0] <= self._cache_s}
            self._reads = fresh
            task = asyncio.ensure_future(totals(self._redis, self._settings, window_s, now))
            cached = self._reads[window_s] = (now, task)
        return cached[0], dict(await asyncio.shield(cached[1]))


def _failed(task: asyncio.Task[dict[str, float]]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)
