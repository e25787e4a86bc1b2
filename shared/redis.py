"""Redis connections and the worker heartbeat registry."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from shared.messages import Heartbeat
from shared.settings import Settings


def connect(settings: Settings) -> Redis:
    return Redis.from_url(settings.redis, health_check_interval=10)


async def write_heartbeat(redis: Redis, settings: Settings, beat: Heartbeat) -> None:
    # The TTL does the liveness work: a worker that dies simply stops renewing its key.
    ttl_ms = int(settings.heartbeat_ttl_s * 1000)
    await redis.set(settings.heartbeat_key(beat.worker_id), beat.model_dump_json(), px=ttl_ms)


async def delete_heartbeat(redis: Redis, settings: Settings, worker_id: str) -> None:
    await redis.delete(settings.heartbeat_key(worker_id))


async def live_workers(redis: Redis, settings: Settings) -> list[Heartbeat]:
    """Workers whose heartbeat key exists and whose last beat is within the TTL."""
    keys = [k async for k in redis.scan_iter(match=settings.heartbeat_key("*"), count=100)]
    if not keys:
        return []
    now = time.time()
    beats = [Heartbeat.model_validate_json(raw) for raw in await redis.mget(keys) if raw]
    return [b for b in beats if now - b.ts <= settings.heartbeat_ttl_s]
