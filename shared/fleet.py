"""The fleet as an operator sees it (`sluice status`): per topic and partition the end offset,
the consuming group's committed offset, the lag and the age of the oldest record not yet
committed; the consumer groups and who holds what; the live workers from their heartbeats;
each dead-letter topic's count and last reasons.

Read from Kafka's admin API, one group-less consumer and Redis. The dev broker (Tansu) differs
from Kafka in two ways this works around: its ListOffsets is wrong after multi-record batches,
so end offsets are the highwater marks a fetch reports (on Kafka the two agree); and its
DescribeGroups lists the members without their assignments, so who reads which partition
comes from the workers' heartbeats there (on Kafka, from the group too).
"""

from __future__ import annotations

import contextlib
import time

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocol
from aiokafka.structs import TopicPartition
from pydantic import BaseModel
from redis.asyncio import Redis

from shared import kafka, pools
from shared import redis as sredis
from shared.messages import Heartbeat
from shared.settings import Settings

DLQ_REASONS = 3  # the last reasons shown per dead-letter topic
FETCH_S = 1.0  # the most one snapshot waits for the partitions' highwater marks


class PartitionStatus(BaseModel):
    partition: int
    end: int
    committed: int | None  # None: the group never committed here (it starts at the beginning)
    lag: int
    oldest_age_s: float | None  # the oldest record the group has not committed, if any


class TopicStatus(BaseModel):
    topic: str
    kind: str  # interactive, batch, ingest, embeddings, results, dlq
    model: str | None = None  # the pool's, for request topics
    group: str | None = None
    partitions: list[PartitionStatus]

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)


class Member(BaseModel):
    client_id: str
    host: str
    partitions: list[str]  # "topic:partition"


class GroupStatus(BaseModel):
    group: str
    state: str
    members: list[Member] | None  # None: no member (a group that only commits, or idle)


class WorkerStatus(BaseModel):
    worker_id: str
    model: str
    engine: str
    in_flight: int
    lag: int
    partitions: list[int]
    heartbeat_age_s: float
    kv_cache_usage: float | None
    tokens_per_s: float | None


class DeadLetters(BaseModel):
    topic: str
    count: int
    last_reasons: list[str]


class FleetStatus(BaseModel):
    at: float
    topics: list[TopicStatus]
    groups: list[GroupStatus]
    workers: list[WorkerStatus]
    dead_letters: list[DeadLetters]


Watched = tuple[str, str, str | None, str | None]  # topic, kind, model, consuming group


def watched(settings: Settings) -> list[Watched]:
    """Every topic Sluice uses, with what it carries and who consumes it."""
    out: list[Watched] = []
    for model in pools.names(settings):
        pool = pools.pool_settings(settings, model)
        out += [
            (pool.requests_topic, "interactive", model, pool.consumer_group),
            (pool.batch_requests_topic, "batch", model, pool.batch_consumer_group),
            (pool.dlq_topic, "dlq", model, None),
            (pool.batch_dlq_topic, "dlq", model, None),
        ]
    out += [
        (settings.ingest_topic, "ingest", None, kafka.INGESTION_GROUP),
        (settings.ingest_dlq_topic, "dlq", None, None),
        (settings.batch_embeddings_topic, "embeddings", None, settings.batch_embedder_group),
        (settings.batch_results_topic, "results", None, settings.batch_collector_group),
    ]
    return out


async def snapshot(settings: Settings, redis: Redis) -> FleetStatus:
    admin = AIOKafkaAdminClient(**kafka.connection(settings))
    reader = AIOKafkaConsumer(
        **kafka.connection(settings), enable_auto_commit=False, fetch_max_wait_ms=10
    )
    await admin.start()
    await reader.start()
    try:
        existing = await reader.topics()  # also loads the partitions' metadata
        topics = [t for t in watched(settings) if t[0] in existing]
        parts = {t[0]: _partitions(reader, t[0]) for t in topics}
        committed = {
            group: await _committed(admin, group, [tp for t in ts for tp in parts[t]])
            for group, ts in _by_group(topics).items()
        }
        firsts = await _read_from(reader, parts, committed)
        groups = [await _group(admin, g) for g in committed]
        statuses = []
        for topic, kind, model, group in topics:
            done = committed.get(group or "", {})
            states = [_partition(reader, tp, done, firsts) for tp in parts[topic]]
            statuses.append(TopicStatus(topic=topic, kind=kind, model=model, group=group,
                                        partitions=states))  # fmt: skip
        dead = [
            await _dead_letters(reader, parts[t.topic], t.topic)
            for t in statuses
            if t.kind == "dlq"
        ]
    finally:
        await reader.stop()
        await admin.close()
    workers = [_worker(b) for b in await sredis.live_workers(redis, settings)]
    return FleetStatus(
        at=time.time(), topics=statuses, groups=groups, workers=workers, dead_letters=dead
    )


def _partitions(reader: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    return [TopicPartition(topic, p) for p in sorted(reader.partitions_for_topic(topic) or ())]


def _by_group(topics: list[Watched]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for topic, _, _, group in topics:
        if group is not None:
            out.setdefault(group, []).append(topic)
    return out


async def _committed(
    admin: AIOKafkaAdminClient, group: str, tps: list[TopicPartition]
) -> dict[TopicPartition, int]:
    # Always with partitions: without, the dev broker drops the connection.
    offsets = await admin.list_consumer_group_offsets(group, partitions=tps)
    return {tp: o.offset for tp, o in offsets.items() if o.offset >= 0}


async def _read_from(
    reader: AIOKafkaConsumer,
    parts: dict[str, list[TopicPartition]],
    committed: dict[str, dict[TopicPartition, int]],
) -> dict[TopicPartition, float]:
    """One fetch from each partition's committed offset (its start for DLQs): the highwater
    marks it reports are the end offsets; the first record's timestamp is the oldest age."""
    every = [tp for tps in parts.values() for tp in tps]
    reader.assign(every)
    done = {tp: o for offsets in committed.values() for tp, o in offsets.items()}
    for tp in every:
        reader.seek(tp, done.get(tp, 0))
    firsts: dict[TopicPartition, float] = {}
    deadline = time.monotonic() + FETCH_S
    while any(reader.highwater(tp) is None for tp in every) and time.monotonic() < deadline:
        for tp, records in (await reader.getmany(timeout_ms=100)).items():
            if records and tp not in firsts:
                firsts[tp] = records[0].timestamp / 1000
    return firsts


def _partition(
    reader: AIOKafkaConsumer,
    tp: TopicPartition,
    committed: dict[TopicPartition, int],
    firsts: dict[TopicPartition, float],
) -> PartitionStatus:
    end = reader.highwater(tp) or 0
    done = committed.get(tp)
    lag = max(0, end - (done or 0))
    oldest = firsts.get(tp) if lag else None
    age = round(time.time() - oldest, 1) if oldest is not None else None
    return PartitionStatus(partition=tp.partition, end=end, committed=done, lag=lag,
                           oldest_age_s=age)  # fmt: skip


async def _group(admin: AIOKafkaAdminClient, group: str) -> GroupStatus:
    [response] = await admin.describe_consumer_groups([group])
    _, _, state, _, _, members = response.groups[0][:6]
    if not members:
        return GroupStatus(group=group, state=state or "Unknown", members=None)
    listed = []
    for member_id, client_id, host, _, assignment, *_ in members:
        held = []
        with contextlib.suppress(Exception):  # an empty or foreign assignment
            for topic, partitions in ConsumerProtocol.ASSIGNMENT.decode(assignment).assignment:
                held += [f"{topic}:{p}" for p in partitions]
        listed.append(Member(client_id=client_id or member_id, host=host, partitions=held))
    return GroupStatus(group=group, state=state, members=listed)


async def _dead_letters(
    reader: AIOKafkaConsumer, tps: list[TopicPartition], topic: str
) -> DeadLetters:
    count = sum(reader.highwater(tp) or 0 for tp in tps)
    reasons: list[tuple[int, int, int, str]] = []  # newest last: time, then log order
    for tp in tps:
        end = reader.highwater(tp) or 0
        if not end:
            continue
        reader.seek(tp, max(0, end - DLQ_REASONS))
        for records in (await reader.getmany(tp, timeout_ms=300)).values():
            for r in records:
                why = dict(r.headers).get(kafka.DLQ_REASON, b"").decode(errors="replace")
                reasons.append((r.timestamp, r.partition, r.offset, why))
    last = [why for *_, why in sorted(reasons, reverse=True)[:DLQ_REASONS]]
    return DeadLetters(topic=topic, count=count, last_reasons=last)


def _worker(beat: Heartbeat) -> WorkerStatus:
    return WorkerStatus(
        worker_id=beat.worker_id, model=beat.model, engine=beat.engine,
        in_flight=beat.in_flight, lag=beat.lag, partitions=beat.partitions,
        heartbeat_age_s=round(time.time() - beat.ts, 1),
        kv_cache_usage=beat.kv_cache_usage, tokens_per_s=beat.tokens_per_s,
    )  # fmt: skip
