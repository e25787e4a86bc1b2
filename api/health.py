"""Readiness: can this API serve a request end to end right now?"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from shared.kafka import kafka_reachable
from shared.redis import live_workers
from shared.settings import Settings


async def readiness(settings: Settings, redis: Redis, producer: AIOKafkaProducer) -> dict:
    """Each dependency's state; the API is ready only when all are true."""
    try:
        redis_ok = bool(await asyncio.wait_for(redis.ping(), 2.0))
        workers = len(await live_workers(redis, settings)) if redis_ok else 0
    except Exception:
        redis_ok, workers = False, 0
    checks = {
        "kafka": await kafka_reachable(producer),
        "redis": redis_ok,
        "worker": workers > 0,
    }
    failing = [name for name, ok in checks.items() if not ok]
    return {
        "status": "ready" if not failing else "unavailable",
        "failing": failing,
        "checks": checks,
        "live_workers": workers,
    }
