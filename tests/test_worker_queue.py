"""The worker's queue logic on a real broker and real Redis, with a fake engine for speed:
micro-batching, commit-after-finish, dead letters, coalescing, the in-flight cap."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from shared.kafka import ensure_topics
from shared.messages import (
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    SamplingOptions,
    TokensEvent,
    stream_event_adapter,
)
from shared.settings import Settings
from tests.conftest import Services, make_settings
from tests.fake_engine import FakeEngine
from workers.main import serve


@contextlib.asynccontextmanager
async def worker(settings: Settings, engine: FakeEngine) -> AsyncIterator[None]:
    # Topics first: a producer racing the worker would auto-create the topic with defaults.
    await ensure_topics(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, engine, stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def req(prompt: str = "hello", max_tokens: int = 5) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt=prompt,
        sampling=SamplingOptions(max_tokens=max_tokens),
        enqueued_at=time.time(),
    )


async def produce(settings: Settings, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(settings.requests_topic, value=value)
    finally:
        await producer.stop()


async def listen(
    settings: Settings, request_ids: list[str]
) -> AsyncIterator[tuple[str, TokensEvent | DoneEvent | ErrorEvent]]:
    redis = Redis.from_url(settings.redis)
    pubsub = redis.pubsub()
    await pubsub.subscribe(*(settings.stream_channel(r) for r in request_ids))
    return _events(redis, pubsub, len(request_ids))


async def _events(redis: Redis, pubsub, n_requests: int):  # type: ignore[no-untyped-def]
    finished = 0
    deadline = time.monotonic() + 60
    try:
        while finished < n_requests:
            assert time.monotonic() < deadline, "timed out waiting for stream events"
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if msg is None:
                continue
            event = stream_event_adapter.validate_json(msg["data"])
            if not isinstance(event, TokensEvent):
                finished += 1
            yield msg["channel"].decode().rsplit(":", 1)[-1], event
    finally:
        await pubsub.aclose()
        await redis.aclose()


async def dead_letters(settings: Settings) -> list[ConsumerRecord]:
    """What the interactive dead-letter topic holds (read from the start)."""
    dlq = AIOKafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=settings.kafka,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await dlq.start()
    try:
        batch = await dlq.getmany(timeout_ms=5000)
    finally:
        await dlq.stop()
    return [r for records in batch.values() for r in records]


def dlq_reason(record: ConsumerRecord) -> str:
    return dict(record.headers)["sluice.dlq.reason"].decode()


async def committed(settings: Settings) -> dict[int, int]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka, group_id=settings.consumer_group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        out = {}
        for p in range(settings.requests_partitions):
            offset = await consumer.committed(TopicPartition(settings.requests_topic, p))
            out[p] = offset if offset is not None else -1
        return out
    finally:
        await consumer.stop()


async def test_tokens_coalesce_but_the_first_goes_at_once(services: Services) -> None:
    settings = make_settings(services, stream_interval_ms=100, requests_partitions=1)
    engine = FakeEngine(token_delay_s=0.01)
    r = req(max_tokens=30)
    events = await listen(settings, [r.request_id])
    async with worker(settings, engine):
        await produce(settings, r.model_dump_json().encode())
        received = [e async for _, e in events]
    token_events = [e for e in received if isinstance(e, TokensEvent)]
    assert len(token_events[0].tokens) == 1  # the first token is not held back
    assert len(token_events) < 30 / 3  # ~300 ms of tokens in 100 ms windows
    indices = [t.index for e in token_events for t in e.tokens]
    assert indices == list(range(30))
    assert "".join(t.text for e in token_events for t in e.tokens) == "".join(
        f"t{i} " for i in range(30)
    )
    done = received[-1]
    assert isinstance(done, DoneEvent)
    assert done.usage.completion_tokens == 30 and done.finish_reason == "length"


async def test_poison_and_rejected_requests_are_dead_lettered_and_committed(
    services: Services,
) -> None:
    settings = make_settings(services, requests_partitions=1)
    engine = FakeEngine()
    rejected, good = req(prompt="reject me"), req()
    events = await listen(settings, [rejected.request_id, good.request_id])
    async with worker(settings, engine):
        await produce(
            settings,
            b"\x00garbage",
            rejected.model_dump_json().encode(),
            good.model_dump_json().encode(),
        )
        received = {rid: e async for rid, e in events if not isinstance(e, TokensEvent)}
        refused = received[rejected.request_id]
        assert isinstance(refused, ErrorEvent) and "refused" in refused.message
        assert refused.rejected  # the client's to fix: the API answers a 4xx
        assert isinstance(received[good.request_id], DoneEvent)
        deadline = time.monotonic() + 10
        while (await committed(settings))[0] != 3:
            assert time.monotonic() < deadline, await committed(settings)
            await asyncio.sleep(0.2)

    reasons = {r.offset: dlq_reason(r) for r in await dead_letters(settings)}
    assert len(reasons) == 2
    assert "invalid request message" in reasons[0]
    assert "rejected by engine" in reasons[1]


async def test_offset_is_committed_only_after_the_request_finished(services: Services) -> None:
    settings = make_settings(services, requests_partitions=1)
    engine = FakeEngine(token_delay_s=0.1)
    slow = req(max_tokens=30)  # ~3 s
    events = await listen(settings, [slow.request_id])
    async with worker(settings, engine):
        await produce(settings, slow.model_dump_json().encode())
        await asyncio.wait_for(engine.started.wait(), 30)
        await asyncio.sleep(1.0)  # well inside the request; several poll/commit rounds passed
        assert (await committed(settings))[0] <= 0
        _ = [e async for _, e in events]
        deadline = time.monotonic() + 10
        while (await committed(settings))[0] != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("max_in_flight", [2])
async def test_a_full_worker_stops_taking_work(services: Services, max_in_flight: int) -> None:
    settings = make_settings(services, max_in_flight=max_in_flight, requests_partitions=2)
    # Slow enough (~3 s in all) for lag reports (every second) to see the backlog.
    engine = FakeEngine(token_delay_s=0.075)
    requests = [req(max_tokens=10) for _ in range(8)]
    events = await listen(settings, [r.request_id for r in requests])
    busy_before, held_before = (
        counter("sluice_engine_busy_seconds_total"),
        counter("sluice_engine_request_seconds_total"),
    )
    lags: list[float] = []

    async def watch_lag() -> None:
        while True:
            lags.append(lag(settings.requests_topic))
            await asyncio.sleep(0.05)

    async with worker(settings, engine):
        watcher = asyncio.create_task(watch_lag())
        await produce(settings, *(r.model_dump_json().encode() for r in requests))
        done = [e async for _, e in events if isinstance(e, DoneEvent)]
        await asyncio.sleep(1.5)  # one more lag report after the last fetch
        watcher.cancel()
    assert len(done) == 8
    assert engine.max_running == max_in_flight
    # The backlog stayed in Kafka, visible as consumer lag, and drained.
    assert max(lags) >= 2
    assert lags[-1] == 0
    # Eight requests of ~0.75 s, two at a time: the engine was busy ~3 s with ~2 requests.
    busy = counter("sluice_engine_busy_seconds_total") - busy_before
    held = counter("sluice_engine_request_seconds_total") - held_before
    assert busy > 0.3
    assert 1.0 < held / busy <= max_in_flight


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def lag(topic: str) -> float:
    """sluice_kafka_consumer_lag summed over the topic's partitions."""
    return sum(
        sample.value
        for family in REGISTRY.collect()
        if family.name == "sluice_kafka_consumer_lag"
        for sample in family.samples
        if sample.labels["topic"] == topic
    )


async def test_engine_time_is_shared_among_batched_requests(services: Services) -> None:
    """N identical concurrent requests each cost ~1/N of the engine time, and together the
    engine's busy time: batching is not double counted."""
    settings = make_settings(services, instance_hourly_usd=3.6)  # $0.001 per engine second
    engine = FakeEngine(token_delay_s=0.05)
    requests = [req(max_tokens=20) for _ in range(4)]
    events = await listen(settings, [r.request_id for r in requests])
    async with worker(settings, engine):
        await produce(settings, *(r.model_dump_json().encode() for r in requests))
        done = [e async for _, e in events if isinstance(e, DoneEvent)]
    seconds = [d.cost_usd / 0.001 for d in done if d.cost_usd is not None]
    assert len(seconds) == 4
    busy = engine.busy_until - engine.busy_since  # ~1 s: 20 tokens x 50 ms, all at once
    assert sum(seconds) == pytest.approx(busy, rel=0.05)
    for s in seconds:
        assert s == pytest.approx(busy / 4, rel=0.15)
