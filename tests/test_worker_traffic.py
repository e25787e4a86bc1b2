"""Traffic under pressure, worker side, on a real broker and real Redis with the fake engine
(queue logic only): deadlines, cancellation, the batch topic and interactive priority.
The same paths on vLLM are in test_cancel_vllm.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from redis.asyncio import Redis

from shared import redis as sredis
from shared.messages import BatchResult, DoneEvent, GenerationRequest, TokensEvent
from shared.settings import Settings
from tests.conftest import Services, make_settings
from tests.fake_engine import FakeEngine
from tests.test_worker_queue import listen, req, worker


async def produce(settings: Settings, topic: str, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value=value)
    finally:
        await producer.stop()


def encode(*requests: GenerationRequest) -> list[bytes]:
    return [r.model_dump_json().encode() for r in requests]


async def read_topic(
    settings: Settings, topic: str, n: int, timeout_s: float = 30
) -> list[ConsumerRecord]:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka,
        group_id=None,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    records: list[ConsumerRecord] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < n:
            assert time.monotonic() < deadline, f"{len(records)} of {n} records on {topic}"
            batch = await consumer.getmany(timeout_ms=500)
            records.extend(r for rs in batch.values() for r in rs)
    finally:
        await consumer.stop()
    return records


async def committed(settings: Settings, topic: str, group: str) -> int:
    """The group's committed offsets on `topic`, summed over partitions (-1: none)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        offsets = [
            await consumer.committed(TopicPartition(topic, p))
            for p in range(settings.requests_partitions)
        ]
    finally:
        await consumer.stop()
    return sum(o for o in offsets if o is not None) if any(o is not None for o in offsets) else -1


async def wait_committed(settings: Settings, topic: str, group: str, n: int) -> None:
    deadline = time.monotonic() + 15
    while (got := await committed(settings, topic, group)) != n:
        assert time.monotonic() < deadline, f"committed {got}, expected {n}"
        await asyncio.sleep(0.2)


async def done_events(events: AsyncIterator) -> dict[str, DoneEvent]:
    out = {}
    async for rid, event in events:
        assert isinstance(event, TokensEvent | DoneEvent), event
        if isinstance(event, DoneEvent):
            out[rid] = event
    return out


async def test_expired_and_cancelled_requests_are_never_run(services: Services) -> None:
    settings = make_settings(services, requests_partitions=1)
    engine = FakeEngine()
    expired = req()
    expired.deadline = time.time() - 1
    cancelled, good = req(), req()
    redis = Redis.from_url(settings.redis)
    await sredis.cancel(redis, settings, cancelled.request_id)  # while it is still queued
    await redis.aclose()
    events = await listen(settings, [expired.request_id, cancelled.request_id, good.request_id])
    async with worker(settings, engine):
        await produce(settings, settings.requests_topic, *encode(expired, cancelled, good))
        done = await done_events(events)
        await wait_committed(settings, settings.requests_topic, settings.consumer_group, 3)
    assert done[expired.request_id].finish_reason == "timeout"
    assert done[cancelled.request_id].finish_reason == "abort"
    for rid in (expired.request_id, cancelled.request_id):
        assert done[rid].usage.completion_tokens == 0 and done[rid].cost_usd == 0
    assert done[good.request_id].finish_reason == "length"
    assert engine.generated == [good.request_id]  # the other two never reached the engine


async def test_a_cancel_aborts_a_running_request_at_once(services: Services) -> None:
    settings = make_settings(services, requests_partitions=1)
    engine = FakeEngine(token_delay_s=0.05)
    long = req(max_tokens=400)  # ~20 s unless stopped
    events = await listen(settings, [long.request_id])
    redis = Redis.from_url(settings.redis)
    async with worker(settings, engine):
        await produce(settings, settings.requests_topic, *encode(long))
        await asyncio.wait_for(engine.started.wait(), 30)
        await asyncio.sleep(0.5)
        cancelled_at = time.monotonic()
        await sredis.cancel(redis, settings, long.request_id, "client_disconnected")
        done = await done_events(events)
        took = time.monotonic() - cancelled_at
        await wait_committed(settings, settings.requests_topic, settings.consumer_group, 1)
    await redis.aclose()
    event = done[long.request_id]
    assert event.finish_reason == "abort"
    assert 0 < event.usage.completion_tokens < 100
    assert engine.aborted == [long.request_id]
    assert not engine.running
    assert took < 1.0, took


async def test_a_running_request_stops_at_its_deadline(services: Services) -> None:
    settings = make_settings(services, requests_partitions=1)
    engine = FakeEngine(token_delay_s=0.05)
    warmup, long = req(max_tokens=1), req(max_tokens=400)
    events = await listen(settings, [warmup.request_id, long.request_id])
    async with worker(settings, engine):
        # Joining the consumer groups takes seconds: only then does the deadline start.
        await produce(settings, settings.requests_topic, *encode(warmup))
        await asyncio.wait_for(engine.started.wait(), 30)
        long.deadline = time.time() + 1.5
        await produce(settings, settings.requests_topic, *encode(long))
        done = await done_events(events)
        await wait_committed(settings, settings.requests_topic, settings.consumer_group, 2)
    assert done[long.request_id].finish_reason == "timeout"
    assert done[long.request_id].usage.completion_tokens > 0
    assert engine.aborted == [long.request_id]
    assert time.time() - long.deadline < 5


async def test_batch_requests_produce_results_not_streams(services: Services) -> None:
    settings = make_settings(services, requests_partitions=1)
    engine = FakeEngine()
    ok = req(max_tokens=4)
    ok.correlation = "job-1"
    rejected = req(prompt="reject me")
    rejected.correlation = "job-2"
    redis = Redis.from_url(settings.redis)
    pubsub = redis.pubsub()
    await pubsub.psubscribe(settings.stream_channel("*"))
    async with worker(settings, engine):
        await produce(settings, settings.batch_requests_topic, b"{not json", *encode(ok, rejected))
        records = await read_topic(settings, settings.batch_results_topic, 2)
        dlq = await read_topic(settings, settings.batch_dlq_topic, 1)
        await wait_committed(
            settings, settings.batch_requests_topic, settings.batch_consumer_group, 3
        )
    streamed = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
    await pubsub.aclose()
    await redis.aclose()
    assert streamed is None  # nothing went to Redis
    results = {r.key.decode(): BatchResult.model_validate_json(r.value) for r in records}
    assert set(results) == {ok.request_id, rejected.request_id}
    good = results[ok.request_id]
    assert good.correlation == "job-1"
    assert good.text == "t0 t1 t2 t3 " and good.finish_reason == "length"
    assert good.usage.completion_tokens == 4 and good.error is None
    bad = results[rejected.request_id]
    assert bad.correlation == "job-2" and bad.finish_reason == "error"
    assert "refused" in (bad.error or "")
    assert "invalid request message" in dict(dlq[0].headers)["sluice.dlq.reason"].decode()
    assert engine.priorities == {ok.request_id: 1}  # batch: after interactive in the engine


async def test_interactive_requests_overtake_a_batch_backlog(services: Services) -> None:
    settings = make_settings(services, batch_max_in_flight=4)
    engine = FakeEngine(token_delay_s=0.02)
    backlog = [req(max_tokens=10) for _ in range(50)]  # ~0.2 s each, 4 at a time: ~2.5 s
    interactive = [req(max_tokens=10) for _ in range(3)]
    events = await listen(settings, [r.request_id for r in interactive])
    async with worker(settings, engine):
        await produce(settings, settings.batch_requests_topic, *encode(*backlog))
        await asyncio.wait_for(engine.started.wait(), 30)
        await produce(settings, settings.requests_topic, *encode(*interactive))
        done = await done_events(events)
        await read_topic(settings, settings.batch_results_topic, len(backlog), timeout_s=60)
    assert all(e.finish_reason == "length" for e in done.values())
    order = engine.completed
    assert len(order) == len(backlog) + len(interactive)
    ranks = [order.index(r.request_id) for r in interactive]
    assert max(ranks) < len(backlog) // 2, ranks  # before most of the backlog
    assert {engine.priorities[r.request_id] for r in interactive} == {0}
    assert {engine.priorities[r.request_id] for r in backlog} == {1}
    # Batch work never took more than its cap: the interactive ones were the only extra.
    assert engine.max_running <= settings.batch_max_in_flight + len(interactive)


async def test_batch_work_waits_until_interactive_arrivals_pause(services: Services) -> None:
    # Interactive clients come in waves; batch work started between two waves would share the
    # next wave's prefill. A request every 0.25 s never leaves the 1.5 s quiet window.
    settings = make_settings(services, batch_quiet_ms=1500, batch_max_in_flight=4)
    engine = FakeEngine(token_delay_s=0.01)
    first, *drip = [req(max_tokens=5) for _ in range(12)]
    backlog = [req(max_tokens=5) for _ in range(4)]
    events = await listen(settings, [r.request_id for r in (first, *drip)])
    async with worker(settings, engine):
        await produce(settings, settings.requests_topic, *encode(first))
        await asyncio.wait_for(engine.started.wait(), 30)
        await produce(settings, settings.batch_requests_topic, *encode(*backlog))
        for r in drip:
            await asyncio.sleep(0.25)
            await produce(settings, settings.requests_topic, *encode(r))
        last_interactive_at = time.monotonic()
        await done_events(events)
        await read_topic(settings, settings.batch_results_topic, len(backlog), timeout_s=30)
        batch_done_at = time.monotonic()
    order = engine.generated
    batch_starts = [order.index(r.request_id) for r in backlog]
    interactive_starts = [order.index(r.request_id) for r in (first, *drip)]
    assert min(batch_starts) > max(interactive_starts), order
    assert batch_done_at - last_interactive_at >= 1.0  # it waited out the quiet window


async def test_a_batch_only_worker_leaves_interactive_requests_alone(services: Services) -> None:
    settings = make_settings(services, worker_feeds="batch", batch_max_in_flight=2)
    engine = FakeEngine(token_delay_s=0.01)
    interactive = req(max_tokens=3)
    backlog = [req(max_tokens=3) for _ in range(5)]
    async with worker(settings, engine):
        await produce(settings, settings.requests_topic, *encode(interactive))
        await produce(settings, settings.batch_requests_topic, *encode(*backlog))
        results = await read_topic(settings, settings.batch_results_topic, len(backlog))
        redis = Redis.from_url(settings.redis)
        try:
            beats = await sredis.live_workers(redis, settings)
        finally:
            await redis.aclose()
    ids = {BatchResult.model_validate_json(r.value).request_id for r in results}
    assert ids == {r.request_id for r in backlog}
    assert interactive.request_id not in engine.generated  # still in Kafka for other workers
    assert await committed(settings, settings.requests_topic, settings.consumer_group) == -1
    assert engine.max_running <= 2
    # Not counted as interactive capacity by the API's backpressure.
    assert [b.interactive for b in beats] == [False]
