"""The usage ledger: per-minute totals in Redis that every worker adds to.

Prometheus answers "what is happening"; the ledger answers "what did the last hour (or week)
cost", for `GET /cost` and `sluice cost report`, with no Prometheus in the loop. Each worker
accumulates amounts in memory and adds them to the current minute's Redis hash every few
seconds (HINCRBYFLOAT), so any number of workers sum up without coordination and a reader
sums the buckets of a window.

Fields (all sums over the bucket): requests, prompt_tokens, completion_tokens, dollars
(attributed to requests), attributed_seconds, worker_seconds (workers alive), busy_seconds
(engine held a request), request_seconds (integral of requests in the engine),
kv_usage_seconds (KV cache usage x busy time), waiting_seconds (engine queue non-empty),
preemptions; per-label dollars as `dollars@topic:<topic>` and `dollars@tenant:<tenant>`, and
per tenant `requests@tenant:`, `prompt_tokens@tenant:` and `completion_tokens@tenant:`.
"""

from __future__ import annotations

import time
from collections import defaultdict

from redis.asyncio import Redis

from shared.settings import Settings

BUCKET_S = 60
RETENTION_S = 8 * 86400  # a week's report, plus a day of slack


def bucket_key(settings: Settings, t: float) -> str:
    return f"{settings.redis_prefix}:ledger:{int(t // BUCKET_S) * BUCKET_S}"


class Ledger:
    """One process's not-yet-written amounts."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._pending: defaultdict[str, float] = defaultdict(float)

    def add(self, field: str, amount: float) -> None:
        if amount:
            self._pending[field] += amount

    async def flush(self) -> None:
        if not self._pending:
            return
        amounts, self._pending = self._pending, defaultdict(float)
        key = bucket_key(self._settings, time.time())
        pipe = self._redis.pipeline(transaction=True)  # a bucket never holds half a flush
        for field, amount in amounts.items():
            pipe.hincrbyfloat(key, field, amount)
        pipe.expire(key, RETENTION_S)
        try:
            await pipe.execute()
        except Exception:
            for field, amount in amounts.items():  # Redis down: keep them for the next flush
                self._pending[field] += amount
            raise


async def totals(
    redis: Redis, settings: Settings, window_s: float, now: float | None = None
) -> dict[str, float]:
    """Sums of every field over the buckets that overlap the last `window_s` seconds."""
    now = time.time() if now is None else now
    first = int((now - window_s) // BUCKET_S) * BUCKET_S
    keys = [bucket_key(settings, t) for t in range(first, int(now) + 1, BUCKET_S)]
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    sums: defaultdict[str, float] = defaultdict(float)
    for bucket in await pipe.execute():
        for field, value in bucket.items():
            sums[field.decode()] += float(value)
    return dict(sums)
