"""Kafka clients with the settings every Sluice process shares.

The defaults also suit the dev broker (Tansu, see docs/ARCHITECTURE.md): it does not wake a
waiting fetch when data arrives, so fetches wait at most `SLUICE_KAFKA_FETCH_MAX_WAIT_MS`, and
it has no idempotent producer, which stays a setting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord, TopicPartition

from shared import metrics
from shared.settings import Settings

log = logging.getLogger(__name__)


# Ingest messages carry whole documents (SLUICE_MAX_DOCUMENT_BYTES, 5 MiB; PDFs base64, 4/3
# of that) in a JSON envelope; aiokafka's default request cap is 1 MiB. The ingest topics are
# created with the same max.message.bytes (deploy/ sets it for Strimzi and compose too).
MAX_MESSAGE_BYTES = 8 * 2**20
# Sticky: a worker joining or leaving moves only the partitions it must, so the others keep
# their prefix keys (api/affinity.py) and what their KV caches hold. Round-robin stays listed
# so that on Kafka a group with older members (round-robin only) agrees on it during an
# upgrade; the dev broker refuses such a mixed group (InconsistentGroupProtocol).
ASSIGNORS = (StickyPartitionAssignor, RoundRobinPartitionAssignor)
# Why a message was dead-lettered: a header of every DLQ record (`sluice status` shows it).
DLQ_REASON = "sluice.dlq.reason"
# Ingestion's consumer group (no setting: one ingestion pool per stack).
INGESTION_GROUP = "sluice-ingestion"


def connection(settings: Settings) -> dict[str, Any]:
    """Where the brokers are and how to authenticate: every Kafka client Sluice makes."""
    protocol = settings.kafka_security_protocol
    kwargs: dict[str, Any] = {"bootstrap_servers": settings.kafka, "security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile or None)
    if protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kwargs["sasl_plain_username"] = settings.kafka_sasl_username
        kwargs["sasl_plain_password"] = settings.kafka_sasl_password.get_secret_value()
    return kwargs


def make_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **connection(settings),
        acks="all",
        enable_idempotence=settings.kafka_idempotence,
        linger_ms=0,
        max_request_size=MAX_MESSAGE_BYTES,
    )


def make_consumer(
    settings: Settings,
    *topics: str,
    group: str | None = None,
    max_poll_interval_ms: int = 300_000,
) -> AIOKafkaConsumer:
    """A consumer in `group` (default: the workers' group) that commits only by hand. It leaves
    its group when getmany() is not called for `max_poll_interval_ms`."""
    return AIOKafkaConsumer(
        *topics,
        **connection(settings),
        group_id=group or settings.consumer_group,
        client_id=settings.worker_id,  # a group member is then known by its process
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        max_poll_records=settings.poll_max_records,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
        max_poll_interval_ms=max_poll_interval_ms,
        partition_assignment_strategy=ASSIGNORS,
    )


# A metadata request on a connection the process already has: cheap enough to ask every second.
TOPIC_CHECK_S = 1.0
# aiokafka retries a commit the broker refuses with a retriable error (say an unknown
# partition) forever; past this the consumer's Kafka session counts as lost.
COMMIT_TIMEOUT_S = 10.0


class KafkaLost(Exception):
    """The broker lost this consumer's topic, log or group (as the dev broker does when it
    restarts: memory storage). The process reconnects from scratch."""


def rewound(consumer: AIOKafkaConsumer, seen: dict[TopicPartition, int]) -> list[TopicPartition]:
    """Partitions whose log now ends before offsets already taken from them (`seen`: one past
    the highest per partition): the broker lost them, and fetching there would wait forever."""
    mine = consumer.assignment()  # highwater() asserts the partition is assigned
    return [
        tp
        for tp, nxt in seen.items()
        if tp in mine and (end := consumer.highwater(tp)) is not None and end < nxt
    ]


async def reconnecting(serve: Callable[[], Awaitable[None]]) -> None:
    """Run `serve` (a consumer process's Kafka session), again with fresh clients each time it
    ends with KafkaLost."""
    while True:
        try:
            await serve()
            return
        except KafkaLost as e:
            log.warning("Kafka lost (%s): reconnecting from scratch", e)


async def commit(consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
    """Commit `offsets`, or raise KafkaLost if the broker will not take them."""
    try:
        await asyncio.wait_for(consumer.commit(offsets), COMMIT_TIMEOUT_S)
    except TimeoutError as e:
        raise KafkaLost(f"no commit taken in {COMMIT_TIMEOUT_S:.0f} s") from e


def _topics(settings: Settings) -> dict[str, int]:
    """Every Sluice topic and its partition count."""
    return {
        settings.requests_topic: settings.requests_partitions,
        settings.dlq_topic: 1,
        settings.batch_requests_topic: settings.requests_partitions,
        settings.batch_results_topic: settings.requests_partitions,
        settings.batch_dlq_topic: 1,
        settings.batch_embeddings_topic: settings.requests_partitions,
        settings.ingest_topic: settings.ingest_partitions,
        settings.ingest_dlq_topic: 1,
    }


async def ensure_topic(settings: Settings, name: str, partitions: int) -> None:
    """Create one topic if missing (e.g. a tenant's batch results topic)."""
    await ensure_topics(settings, {name: partitions})


async def ensure_topics(settings: Settings, wanted: dict[str, int] | None = None) -> list[str]:
    """Create Sluice's topics (requests, batch, ingestion, and their dead-letter topics), or
    `wanted` (name -> partitions), if missing: every process calls this at start, so none
    depends on another having started first. Returns those it created."""
    wanted = wanted or _topics(settings)
    admin = AIOKafkaAdminClient(**connection(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        large = {settings.ingest_topic, settings.ingest_dlq_topic}
        missing = [
            NewTopic(
                name,
                num_partitions=n,
                replication_factor=1,
                topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)}
                if name in large
                else {},
            )
            for name, n in wanted.items()
            if name not in existing
        ]
        if missing:
            # Two processes starting at once may both try; "already exists" is fine.
            await admin.create_topics(missing)
            log.info("created topics %s", [t.name for t in missing])
    finally:
        await admin.close()
    return [t.name for t in missing]


async def watch_topics(
    settings: Settings,
    producer: AIOKafkaProducer,
    on_recreated: Callable[[list[str]], None] | None = None,
) -> None:
    """Every second, recreate topics the broker has lost, and tell `on_recreated`. A real Kafka
    keeps its topics; the dev broker (memory storage) forgets them when it restarts, and then
    acknowledges messages produced to them without keeping them, until they are created again:
    the sooner that happens, the fewer requests are lost."""
    wanted = set(_topics(settings))
    while True:
        await asyncio.sleep(TOPIC_CHECK_S)
        try:
            cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), TOPIC_CHECK_S)
            if wanted <= cluster.topics():
                continue
            created = await ensure_topics(settings)
        except Exception as e:  # broker down: the clients report that themselves
            log.debug("topic check failed: %s", e)
            continue
        if created:
            log.warning("the broker had lost topics %s (restarted without storage?)", created)
            if on_recreated is not None:
                on_recreated(created)


async def kafka_reachable(producer: AIOKafkaProducer, timeout_s: float = 2.0) -> bool:
    try:
        await asyncio.wait_for(producer.client.fetch_all_metadata(), timeout_s)
    except Exception:
        return False
    return True


async def dead_letter(
    producer: AIOKafkaProducer, dlq_topic: str, record: ConsumerRecord, reason: str
) -> None:
    """Park a message that can never be processed on `dlq_topic`, unchanged, with where it came
    from and why in headers, so that it is neither lost nor retried forever."""
    await dead_letter_value(
        producer, dlq_topic, record.key, record.value, reason,
        record.topic, record.partition, record.offset,
    )  # fmt: skip


async def dead_letter_value(
    producer: AIOKafkaProducer,
    dlq_topic: str,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    topic: str,
    partition: int,
    offset: int,
) -> None:
    """`dead_letter` for a message known by its parts (e.g. a request taken over from a dead
    worker, whose record this worker never read)."""
    log.warning("dead-lettering %s/%d@%d: %s", topic, partition, offset, reason)
    headers = [
        (DLQ_REASON, reason.encode()),
        ("sluice.dlq.topic", topic.encode()),
        ("sluice.dlq.partition", str(partition).encode()),
        ("sluice.dlq.offset", str(offset).encode()),
    ]
    await producer.send_and_wait(dlq_topic, value=value, key=key, headers=headers)
    metrics.DEAD_LETTERED.labels(topic).inc()


async def report_lag(consumer: AIOKafkaConsumer, group: str, interval_s: float = 1.0) -> None:
    """Keep `sluice_kafka_consumer_lag` current for the partitions this consumer holds
    (runs until cancelled)."""
    reported: set[tuple[str, str, str]] = set()
    while True:
        await asyncio.sleep(interval_s)
        current = set()
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is None:  # nothing fetched from it yet
                continue
            labels = (tp.topic, str(tp.partition), group)
            try:
                lag = max(0, highwater - await consumer.position(tp))
            except Exception:  # revoked by a rebalance since assignment(): next round
                continue
            metrics.KAFKA_LAG.labels(*labels).set(lag)
            current.add(labels)
        for labels in reported - current:  # moved to another consumer by a rebalance
            metrics.KAFKA_LAG.remove(*labels)
        reported = current
