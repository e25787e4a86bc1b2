"""Redis connections, the worker heartbeat registry, and request cancellation."""

from __future__ import annotations

import time

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, TimeoutError

from shared.messages import Cancel, Heartbeat
from shared.settings import Settings


def connect(settings: Settings) -> Redis:
    # Retried with backoff (~3 s in all): a Redis restart then costs callers a pause, not an
    # error on the first command over each stale pooled connection.
    retry = Retry(ExponentialBackoff(cap=1.0, base=0.05), 6)
    credentials = {}
    if settings.redis_username:  # else what the URL says (none in local mode)
        credentials["username"] = settings.redis_username
    if password := settings.redis_password.get_secret_value():
        credentials["password"] = password
    return Redis.from_url(
        settings.redis,
        **credentials,
        health_check_interval=10,
        retry=retry,
        retry_on_error=[ConnectionError, TimeoutError],
    )


async def write_heartbeat(redis: Redis, settings: Settings, beat: Heartbeat) -> None:
    # One hash for all workers: readers get every beat in one HGETALL, no SCAN. A dead
    # worker's entry goes stale (its `ts` stops moving); whoever takes its requests over
    # removes it (workers/ownership.py).
    await redis.hset(settings.heartbeats_key, beat.worker_id, beat.model_dump_json())


async def delete_heartbeat(redis: Redis, settings: Settings, worker_id: str) -> None:
    await redis.hdel(settings.heartbeats_key, worker_id)


async def live_workers(redis: Redis, settings: Settings) -> list[Heartbeat]:
    """Workers whose last beat is within the TTL."""
    now = time.time()
    raws = (await redis.hgetall(settings.heartbeats_key)).values()
    beats = [Heartbeat.model_validate_json(raw) for raw in raws]
    return [b for b in beats if now - b.ts <= settings.heartbeat_ttl_s]


async def cancel(
    redis: Redis, settings: Settings, request_id: str, reason: str = "cancelled"
) -> None:
    """Stop a request wherever it is (`reason`: one of `Cancel.reason`'s values). The key
    catches it if it is still queued in Kafka (a worker checks at pick-up); the message reaches
    the worker running it. Both, because pub/sub keeps nothing for whoever is not listening."""
    # Nobody waits for an interactive request longer than the request timeout.
    await cancel_many(redis, settings, [request_id], reason, settings.request_timeout_s)


async def cancel_many(
    redis: Redis, settings: Settings, request_ids: list[str], reason: str, keep_s: float
) -> None:
    """`cancel` for many requests in one round trip, the marks kept `keep_s` (a batch's lines
    may wait in Kafka until the batch expires)."""
    pipe = redis.pipeline(transaction=False)
    ttl_ms = max(1000, int(keep_s * 1000))
    for request_id in request_ids:
        message = Cancel(request_id=request_id, reason=reason)  # type: ignore[arg-type]
        pipe.set(settings.cancelled_key(request_id), "1", px=ttl_ms)
        pipe.publish(settings.cancel_channel, message.model_dump_json())
    await pipe.execute()


async def is_cancelled(redis: Redis, settings: Settings, request_id: str) -> bool:
    return bool(await redis.exists(settings.cancelled_key(request_id)))
