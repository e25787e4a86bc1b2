"""A topic the worker takes requests from: its consumer, its offsets, its requests in flight.

A worker has two feeds: interactive requests (`sluice.requests`) and batch jobs
(`sluice.batch.requests`). Each has its own consumer group, so each can be held back on its own,
and its own OffsetTracker, so each partition's committed offset only ever covers finished
requests (workers/offsets.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, TopicPartition

from workers.offsets import OffsetTracker

log = logging.getLogger(__name__)

Records = list[tuple[TopicPartition, ConsumerRecord]]


@dataclass(eq=False)
class Feed:
    name: str  # "interactive" or "batch"
    consumer: AIOKafkaConsumer
    topic: str
    group: str
    dlq_topic: str
    priority: int  # passed to the engine: lower is scheduled sooner
    offsets: OffsetTracker = field(default_factory=OffsetTracker)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def batch(self) -> bool:
        return self.name == "batch"

    def subscribe(self) -> None:
        self.consumer.subscribe([self.topic], listener=Rebalance(self))

    async def take(self, max_records: int, timeout_ms: int) -> Records:
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*paused)
        got = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        return [(tp, record) for tp, records in got.items() for record in records]

    async def hold(self) -> None:
        """Take nothing and stop fetching: the records stay in Kafka (visible as lag), and
        the consumer stays in its group."""
        self.consumer.pause(*self.consumer.assignment())
        await self.consumer.getmany(timeout_ms=0)

    async def commit(self) -> None:
        ready = self.offsets.committable()
        if not ready:
            return
        try:
            await self.consumer.commit(ready)
        except Exception as e:  # e.g. a rebalance took the partition: the new owner redoes it
            log.warning("commit of %s failed: %s", ready, e)
            return
        self.offsets.mark_committed(ready)


class Rebalance(ConsumerRebalanceListener):
    def __init__(self, feed: Feed) -> None:
        self._feed = feed

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Commit what finished while we still own it; the rest is redelivered to the new owner.
        await self._feed.commit()
        self._feed.offsets.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info(
            "%s: assigned %s",
            self._feed.name,
            sorted((tp.topic, tp.partition) for tp in assigned),
        )
