"""Partitions nobody consumes, read anyway, so the queue never goes dark.

Kafka hands a dead member's partitions to a live one only after its session times out (10 s)
and the group rebalances; a rebalance revokes every partition from every member until it ends
(aiokafka's assignors are eager; 5-18 s on the dev broker). New requests on those partitions
would wait all that time. So each worker also reads, with a consumer outside the group, the
partitions of the requests topic that no live worker's heartbeat lists (a dead worker's, or
all of them during a rebalance), from the group's committed offset. What it reads it claims
like any request (workers/ownership.py): a record read twice, here and later by the
partition's next owner in the group, runs once. It never commits: that next owner commits each
record once its request is done, as it does for any request another worker runs.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord, TopicPartition

from shared import kafka
from shared.messages import Heartbeat
from shared.settings import Settings

log = logging.getLogger(__name__)


def uncovered(partitions: set[int], beats: list[Heartbeat], mine: set[int]) -> set[int]:
    """Partitions that no worker (this one included) consumes in the group now."""
    covered = set(mine).union(*(b.partitions for b in beats))
    return partitions - covered


class Rescue:
    def __init__(self, settings: Settings, topic: str) -> None:
        self._settings = settings
        self._topic = topic
        self._consumer: AIOKafkaConsumer | None = None
        self.partitions: set[TopicPartition] = set()

    async def round(
        self, room: int, all_: set[int], holding: set[int], beats: dict[bytes, bytes]
    ) -> list[ConsumerRecord]:
        """Up to `room` records from the partitions (of `all_`) that neither this worker
        (`holding`) nor any other live one (by its beat in `beats`, the raw heartbeats hash)
        holds now."""
        now, limit = time.time(), self._settings.worker_dead_after_s
        me = self._settings.worker_id
        parsed = [Heartbeat.model_validate_json(raw) for raw in beats.values()]
        # Only this pool's workers read this topic (shared/pools.py).
        others = [
            b for b in parsed
            if b.worker_id != me and now - b.ts < limit and b.serves(self._topic, self._topic)
        ]  # fmt: skip
        await self.cover(uncovered(all_, others, holding) if room > 0 else set())
        return await self.take(room)

    async def cover(self, partitions: set[int]) -> None:
        """Read exactly these partitions from now on, from the group's committed offsets."""
        wanted = {TopicPartition(self._topic, p) for p in partitions}
        if wanted == self.partitions:
            return
        if self._consumer is None:
            if not wanted:
                return
            # In the workers' group by id, for its committed offsets (where a manually
            # assigned consumer starts), but never a member: it does not join, commit or
            # leave. Its own connection: the members' may be held up by a rebalance.
            self._consumer = AIOKafkaConsumer(
                **kafka.connection(self._settings),
                group_id=self._settings.consumer_group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self._settings.kafka_fetch_max_wait_ms,
            )
            await self._consumer.start()
        self._consumer.assign(sorted(wanted))
        if wanted - self.partitions:
            log.warning("reading partitions %s outside the group: no live worker holds them",
                        sorted(tp.partition for tp in wanted - self.partitions))  # fmt: skip
        self.partitions = wanted

    async def take(self, max_records: int) -> list[ConsumerRecord]:
        if self._consumer is None or not self.partitions or max_records <= 0:
            return []
        got = await self._consumer.getmany(timeout_ms=0, max_records=max_records)
        return [record for records in got.values() for record in records]

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
