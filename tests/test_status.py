"""`sluice status` against the real dev broker and Redis, with known numbers: requests produced
with no worker running, a group that committed part of them, a worker's heartbeat and two dead
letters; the snapshot (and the command's JSON) must say exactly that."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from shared import fleet, kafka
from shared import redis as sredis
from shared.devstack import LocalStack, settings_env
from shared.messages import Heartbeat
from tests.conftest import Services, make_settings

PER_PARTITION = {0: 3, 1: 1, 2: 0, 3: 2}  # requests produced to each of the 4 partitions
COMMITTED = {0: 2, 1: 1}  # what the workers' group has finished


async def test_status_reports_lag_groups_workers_and_dead_letters(services: Services) -> None:
    settings = make_settings(services)
    await kafka.ensure_topics(settings)
    topic = settings.requests_topic
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
    await producer.start()
    redis = sredis.connect(settings)
    try:
        for partition, n in PER_PARTITION.items():
            for i in range(n):
                await producer.send_and_wait(topic, b"{}", partition=partition, key=b"k%d" % i)
        for why in ("the request is for model x; this pool serves y", "invalid JSON"):
            await kafka.dead_letter_value(producer, settings.dlq_topic, None, b"{}", why, topic,
                                          0, 0)  # fmt: skip
        # The group commits without joining (manual assignment): as a worker that finished.
        group = AIOKafkaConsumer(bootstrap_servers=settings.kafka, group_id=settings.consumer_group,
                                 enable_auto_commit=False)  # fmt: skip
        await group.start()
        group.assign([TopicPartition(topic, p) for p in PER_PARTITION])
        await group.commit(
            {TopicPartition(topic, p): OffsetAndMetadata(o, "") for p, o in COMMITTED.items()}
        )
        await group.stop()
        beat = Heartbeat(worker_id="w-1", engine="vllm", model=settings.model, in_flight=2,
                         ts=time.time(), lag=4, partitions=[0, 1, 2, 3], topic=topic,
                         kv_cache_usage=0.25, tokens_per_s=12.5)  # fmt: skip
        await sredis.write_heartbeat(redis, settings, beat)
        await asyncio.sleep(0.2)  # the oldest waiting request is measurably old

        status = await fleet.snapshot(settings, redis)
    finally:
        await producer.stop()
        await redis.aclose()

    topics = {t.topic: t for t in status.topics}
    requests = topics[topic]
    assert (requests.kind, requests.group, requests.model) == (
        "interactive", settings.consumer_group, settings.model,
    )  # fmt: skip
    by_partition = {p.partition: p for p in requests.partitions}
    for p, n in PER_PARTITION.items():
        got = by_partition[p]
        assert got.end == n
        assert got.committed == COMMITTED.get(p)
        assert got.lag == n - COMMITTED.get(p, 0)
        assert (got.oldest_age_s is not None) == (got.lag > 0)
    assert requests.lag == 6 - 3
    assert by_partition[0].oldest_age_s >= 0.2
    # Every topic of the stack is there, each with its consumer group, DLQs without one.
    assert {settings.ingest_topic, settings.batch_requests_topic, settings.dlq_topic} <= set(topics)
    assert topics[settings.ingest_topic].group == kafka.INGESTION_GROUP
    [dead] = [d for d in status.dead_letters if d.topic == settings.dlq_topic]
    assert dead.count == 2 and dead.last_reasons == [
        "invalid JSON", "the request is for model x; this pool serves y",
    ]  # fmt: skip
    [worker] = status.workers
    assert (worker.worker_id, worker.in_flight, worker.kv_cache_usage, worker.tokens_per_s) == (
        "w-1", 2, 0.25, 12.5,
    )  # fmt: skip
    [workers_group] = [g for g in status.groups if g.group == settings.consumer_group]
    assert workers_group.members is None  # it only committed: no member

    # The command prints the same snapshot as JSON (and tables without --json).
    env = {**os.environ, **settings_env(settings)}

    def sluice(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cli", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    out = await asyncio.to_thread(sluice, "status", "--json")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    lags = {t["topic"]: sum(p["lag"] for p in t["partitions"]) for t in printed["topics"]}
    assert lags[topic] == 3
    tables = await asyncio.to_thread(sluice, "status")
    assert tables.returncode == 0 and "w-1" in tables.stdout and "invalid JSON" in tables.stdout


@pytest.mark.stack
async def test_status_of_the_running_stack_shows_its_worker_at_work(stack: LocalStack) -> None:
    """The real worker's heartbeat carries its engine's KV cache use and tokens/s (vLLM's own
    metrics), and its topic shows nothing left waiting once its requests are answered."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        for _ in range(2):
            r = await client.post("/generate", json={"prompt": "Hi", "max_tokens": 16})
            assert r.status_code == 200
    redis = sredis.connect(stack.settings)
    try:
        deadline = time.monotonic() + 30
        while True:  # the next heartbeat after the requests (every SLUICE_HEARTBEAT_INTERVAL_S)
            status = await fleet.snapshot(stack.settings, redis)
            vllm = [w for w in status.workers if w.engine == "vllm"]
            if vllm and all(w.tokens_per_s for w in vllm):
                break
            assert time.monotonic() < deadline, status.workers
            await asyncio.sleep(0.5)
    finally:
        await redis.aclose()
    assert all(w.kv_cache_usage is not None and 0 <= w.kv_cache_usage <= 1 for w in vllm)
    [requests] = [t for t in status.topics if t.topic == stack.settings.requests_topic]
    assert requests.partitions and sum(p.end for p in requests.partitions) >= 2
