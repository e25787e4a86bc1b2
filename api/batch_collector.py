"""The batch collector: every API process runs one, all in one consumer group
(SLUICE_BATCH_COLLECTOR_GROUP), over the batch results topics (the shared one and each
tenant's, by pattern). Each partition has one reader, so each result is read by one process;
one read twice (a rebalance, a crash before the commit) is recorded once all the same
(`custom_id` dedupe in api/batches.py). Offsets are committed once the results are in Redis.

It also expires batches past their window: every EXPIRY_S it looks at the batches whose expiry
passed (a sorted set, no scan); the status compare-and-set picks one process for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from api.batches import Batches
from shared import kafka
from shared.messages import BatchResult
from shared.settings import Settings

log = logging.getLogger(__name__)

EXPIRY_S = 15.0
RETRY_S = 2.0


async def run(settings: Settings, batches: Batches) -> None:
    """Until cancelled; a failure (Redis, Kafka) is logged and the collector starts again."""
    expiry = asyncio.create_task(_expire_forever(batches))
    try:
        while True:
            try:
                await _collect(settings, batches)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch collector failed; starting again in %.0f s", RETRY_S)
                await asyncio.sleep(RETRY_S)
    finally:
        expiry.cancel()


async def _collect(settings: Settings, batches: Batches) -> None:
    consumer = AIOKafkaConsumer(
        **kafka.connection(settings),
        group_id=settings.batch_collector_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        # A tenant's results topic appears when its first result does: find it soon.
        metadata_max_age_ms=5000,
    )
    consumer.subscribe(pattern=f"^{re.escape(settings.batch_results_topic)}(\\..+)?$")
    await consumer.start()
    try:
        while True:
            got = await consumer.getmany(timeout_ms=1000, max_records=500)
            for records in got.values():
                for record in records:
                    result = _parse(record.value)
                    if result is not None and result.request_id.startswith("batch_"):
                        await batches.record_result(result)
            if got:
                await kafka.commit(consumer, {tp: rs[-1].offset + 1 for tp, rs in got.items()})
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), kafka.COMMIT_TIMEOUT_S)


def _parse(value: bytes | None) -> BatchResult | None:
    try:
        return BatchResult.model_validate_json(value or b"")
    except ValidationError:
        return None  # not a result (another writer's message)


async def _expire_forever(batches: Batches) -> None:
    while True:
        await asyncio.sleep(EXPIRY_S)
        try:
            due = await batches.redis.zrangebyscore(batches.open_key(), 0, time.time())
            for batch_id in due:
                await batches.expire(batch_id.decode())
        except Exception:
            log.exception("expiring batches failed; trying again")
