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
from redis.exceptions import RedisError

from shared import kafka
from shared.kafka import KafkaLost
from workers.offsets import OffsetTracker
from workers.ownership import Owners

log = logging.getLogger(__name__)

Records = list[tuple[TopicPartition, ConsumerRecord]]
WATCH_INTERVAL_S = 0.5  # how often to look whether a request run elsewhere is done
OFFSET_CHECK_S = 2.0  # a committed-offset lookup after a rebalance; one round trip when healthy


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
    # Records of requests another worker runs: committed once those are done (not in flight)
    watching: set[asyncio.Task[None]] = field(default_factory=set)
    # Kept across rebalances (unlike `offsets`): per partition, one past the highest offset
    # this worker took, and the highest it committed. A log or a group's offsets found behind
    # these mean the broker lost them.
    taken: dict[TopicPartition, int] = field(default_factory=dict)
    committed: dict[TopicPartition, int] = field(default_factory=dict)
    reassigned: bool = False
    # Partitions this consumer holds in its group now: none from the start of a rebalance
    # (revocation) to its end, although aiokafka's assignment() still lists the old ones.
    holding: set[TopicPartition] = field(default_factory=set)

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
        for tp, records in got.items():
            self.taken[tp] = max(self.taken.get(tp, 0), records[-1].offset + 1)
        return [(tp, record) for tp, records in got.items() for record in records]

    async def lost(self) -> list[TopicPartition]:
        """Partitions the broker lost (a dev broker restarted with memory storage): their log
        now ends before what this worker took, or, after a rebalance, the group's committed
        offset is behind what this worker committed. Fetching there would wait forever."""
        gone = kafka.rewound(self.consumer, self.taken)
        if gone or not self.reassigned:
            return gone
        for tp in self.consumer.assignment() & self.committed.keys():
            try:
                theirs = await asyncio.wait_for(self.consumer.committed(tp), OFFSET_CHECK_S)
            except Exception as e:  # the group is still settling: look again next round
                log.debug("%s: committed offset of %s unknown for now: %r", self.name, tp, e)
                return gone
            if theirs is None or theirs < self.committed[tp]:
                gone.append(tp)
        self.reassigned = False
        return gone

    def watch(self, owners: Owners, tp: TopicPartition, offset: int, rid: str) -> None:
        """A record whose request another worker runs (or ran): finished, so committable, once
        that request is done. Never run here: one live owner per request."""

        async def watch() -> None:
            while True:
                try:
                    if await owners.watch_state(rid) != "running":
                        break
                except RedisError as e:
                    log.warning("state of %s unknown for now: %s", rid, e)
                await asyncio.sleep(WATCH_INTERVAL_S)
            self.offsets.finished(tp, offset)

        task = asyncio.create_task(watch())
        self.watching.add(task)
        task.add_done_callback(self.watching.discard)

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
            await kafka.commit(self.consumer, ready)
        except KafkaLost:
            raise
        except Exception as e:  # e.g. a rebalance took the partition: the new owner redoes it
            log.warning("commit of %s failed: %s", ready, e)
            return
        self.offsets.mark_committed(ready)
        self.committed.update(ready)


class Rebalance(ConsumerRebalanceListener):
    def __init__(self, feed: Feed) -> None:
        self._feed = feed

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._feed.holding = set()
        # Commit what finished while we still own it; the rest is redelivered to the new owner.
        try:
            await self._feed.commit()
        except KafkaLost as e:  # the main loop's next commit finds out too
            log.warning("%s", e)
        self._feed.offsets.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._feed.reassigned = True
        self._feed.holding = set(assigned)
        log.info(
            "%s: assigned %s",
            self._feed.name,
            sorted((tp.topic, tp.partition) for tp in assigned),
        )
