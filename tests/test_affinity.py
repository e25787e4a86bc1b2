"""Prefix affinity (api/affinity.py): requests that share a prompt prefix, or a `user`, go to
Kafka with one key and so land on one partition of the real broker; a hot key spills to other
partitions past its bound; `partition_key=request` spreads by request id."""

from __future__ import annotations

import json
from collections import defaultdict

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from transformers import AutoTokenizer

from api.affinity import Affinity
from api.schemas import GenerateBody
from api.serving import GenerateHandler
from api.streaming import StreamHub
from shared import redis as sredis
from shared.kafka import ensure_topics
from shared.messages import ChatMessage
from shared.models import model_path
from shared.settings import Settings
from tests.conftest import Services, make_settings

SYSTEM = "You are the support assistant of a bicycle shop. " * 20  # ~200 tokens


def chat(question: str, system: str = SYSTEM, user: str | None = None) -> GenerateBody:
    messages = [
        ChatMessage(role="system", content=system),
        ChatMessage(role="user", content=question),
    ]
    return GenerateBody(messages=messages, max_tokens=4, user=user)


def test_spill_over_is_bounded_per_key_and_released() -> None:
    affinity = Affinity(Settings.model_construct(affinity_max_in_flight=2))
    keys = [affinity.claim(f"r{i}", "hot") for i in range(5)]
    assert keys == ["hot", "hot", "hot:1", "hot:1", "hot:2"]
    affinity.release("r0")
    assert affinity.claim("r5", "hot") == "hot"  # the first variant has room again
    affinity.release("never-claimed")  # e.g. a request refused before its key was chosen
    assert affinity.claim("r6", "") == "r6"  # no affinity: the request id


async def partitions_of(settings: Settings, ids: set[str]) -> dict[str, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(settings.requests_topic, p) for p in range(4)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        found: dict[str, int] = {}
        while len(found) < len(ids) and (got := await consumer.getmany(timeout_ms=3000)):
            for tp, records in got.items():
                for r in records:
                    found[json.loads(r.value)["request_id"]] = tp.partition
        return found
    finally:
        await consumer.stop()


async def test_requests_sharing_a_prefix_or_a_user_land_on_one_partition(
    services: Services,
) -> None:
    settings = make_settings(services, prefix_key_tokens=64, affinity_max_in_flight=4)
    redis = sredis.connect(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
    await producer.start()
    await ensure_topics(settings)
    hub = StreamHub(redis, settings)
    await hub.start()
    tokenizer = AutoTokenizer.from_pretrained(model_path(settings))
    handler = GenerateHandler(settings, tokenizer, producer, hub)
    groups: dict[str, list[str]] = defaultdict(list)

    async def send(group: str, body: GenerateBody) -> None:
        relay = await handler.submit(await handler.to_message(body, "acme"))
        groups[group].append(relay.request_id)

    try:
        # Four in flight at once: within the bound, one key.
        for i in range(4):
            await send("shared system prompt", chat(f"Question {i}: do you repair wheels?"))
        for i in range(3):  # a conversation growing turn by turn, keyed by its user
            body = chat("And brakes? " * (20 * i + 1), system=f"Shop {i}.", user="customer-7")
            await send("one user", body)
        # Different system prompts: their own keys, spread over the partitions.
        for i in range(8):
            await send(f"own prompt {i}", chat("Hello?", system=f"{i} is my number. " * 20))
        # A fifth request of the hot prefix while the four run: past the bound, it spills.
        await send("spilled", chat("Question 5: and tyres?"))
        placed = await partitions_of(settings, {r for ids in groups.values() for r in ids})
        on = {g: {placed[r] for r in ids} for g, ids in groups.items()}
        assert len(on["shared system prompt"]) == 1
        assert len(on["one user"]) == 1
        spread = set().union(*(on[f"own prompt {i}"] for i in range(8)))
        assert len(spread) >= 2  # 8 keys over 4 partitions: all on one has odds 4^-7
        # The spilled request went with the hot key's next variant, not the same key.
        hot = handler.router.default.affinity
        [spilled] = groups["spilled"]
        assert hot._keys[spilled].endswith(":1")
        assert hot._keys[groups["shared system prompt"][0]] + ":1" == hot._keys[spilled]
    finally:
        await hub.stop()
        await producer.stop()
        await redis.aclose()


async def test_request_keys_spread_evenly(services: Services) -> None:
    settings = make_settings(services, partition_key="request")
    redis = sredis.connect(settings)
    tokenizer = AutoTokenizer.from_pretrained(model_path(settings))
    handler = GenerateHandler(settings, tokenizer, None, StreamHub(redis, settings))  # type: ignore[arg-type]
    try:
        validated = await handler.to_message(chat("Do you repair wheels?"), "acme")
        assert validated.affinity == ""
        assert handler.router.default.affinity.claim("r1", validated.affinity) == "r1"
    finally:
        await redis.aclose()
