"""Admission control against real Redis heartbeats: the workers' reported lag plus what this
API admitted since decides, and beyond the bound the answer is 429 with Retry-After."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from transformers import AutoTokenizer

from api.auth import Caller
from api.backpressure import Admission
from api.schemas import GenerateBody
from api.serving import GenerateHandler, Validated
from api.streaming import StreamHub
from shared import redis as sredis
from shared.kafka import ensure_topics
from shared.messages import ChatMessage, GenerationRequest, Heartbeat, SamplingOptions
from shared.models import model_path
from shared.settings import Settings
from tests.conftest import Services, make_settings


async def admitted(admission: Admission, n: int, tenant: str = "default") -> int:
    for i in range(n):
        try:
            await admission.check(tenant, uuid.uuid4().hex)
        except HTTPException as e:
            assert e.status_code == 429
            assert e.headers is not None and int(e.headers["Retry-After"]) >= 1
            assert "queued" in e.detail
            return i
    return n


async def test_reported_lag_and_fresh_admissions_count_against_the_bound(
    services: Services,
) -> None:
    settings = make_settings(services, max_queued_per_worker=5)
    redis = sredis.connect(settings)
    try:
        beat = Heartbeat(
            worker_id="w1", engine="vllm", model="m", in_flight=2, ts=time.time(), lag=3
        )
        await sredis.write_heartbeat(redis, settings, beat)
        # 3 waiting in Kafka: room for 2 more.
        assert await admitted(Admission(settings, StreamHub(redis, settings)), 10) == 2
        # Two workers each with room: 2 x 5 - 3.
        await sredis.write_heartbeat(
            redis, settings, beat.model_copy(update={"worker_id": "w2", "lag": 0})
        )
        assert await admitted(Admission(settings, StreamHub(redis, settings)), 20) == 7
        # Another model's pool is not this one's capacity (shared/pools.py).
        other = beat.model_copy(
            update={"worker_id": "w3", "topic": settings.requests_topic + ".other", "lag": 0}
        )
        await sredis.write_heartbeat(redis, settings, other)
        assert await admitted(Admission(settings, StreamHub(redis, settings)), 20) == 7
    finally:
        await redis.aclose()


async def test_with_no_worker_a_bounded_backlog_still_queues(services: Services) -> None:
    """What scales workers up from zero (KEDA on lag), but no more than one worker's worth."""
    settings = make_settings(services, max_queued_per_worker=4)
    redis = sredis.connect(settings)
    try:
        admission = Admission(settings, StreamHub(redis, settings))
        assert await admitted(admission, 10) == 4
        with pytest.raises(HTTPException):
            await admission.check("default", "one-more")
    finally:
        await redis.aclose()


async def test_a_full_queue_is_shared_between_tenants(services: Services) -> None:
    """One tenant's flood fills the queue; another tenant still gets its share of it."""
    settings = make_settings(services, max_queued_per_worker=4)
    redis = sredis.connect(settings)
    try:
        admission = Admission(settings, StreamHub(redis, settings))
        assert await admitted(admission, 10, "flood") == 4  # alone: the bound is the bound
        # Two tenants hold requests: each may hold half of the bound.
        assert await admitted(admission, 10, "quiet") == 2
        assert await admitted(admission, 10, "flood") == 0
        # A third tenant: a third of it (4 / 3: while it holds fewer than 1.33).
        assert await admitted(admission, 10, "third") == 2
        # A fourth: a quarter. What ends is no longer its tenant's.
        rid = uuid.uuid4().hex
        admission.release("never-admitted")  # a no-op
        await admission.check("fourth", rid)
        admission.release(rid)
        assert await admitted(admission, 10, "fourth") == 1
    finally:
        await redis.aclose()


async def test_a_key_over_its_rate_limit_cannot_fill_the_queue_for_others(
    services: Services,
) -> None:
    """The rate limit runs first: a flood of requests its key may not send takes no room in
    the queue, and a request the capacity check refuses costs its key no quota."""
    settings = make_settings(services, max_queued_per_worker=3)
    redis = sredis.connect(settings)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
    await producer.start()
    await ensure_topics(settings)
    hub = StreamHub(redis, settings)
    await hub.start()
    handler = GenerateHandler(settings, None, producer, hub)
    flooder = Caller(tenant="flooder", key_id="k-flood", requests_per_min=1)
    other = Caller(tenant="other", key_id="k-other")

    async def submit(caller: Caller) -> int:
        message = GenerationRequest(
            request_id=uuid.uuid4().hex, prompt="hi", sampling=SamplingOptions(max_tokens=4),
            enqueued_at=time.time(),
        )  # fmt: skip
        try:
            await handler.submit(Validated(message, 2), caller)
        except HTTPException as e:
            return e.status_code
        return 200

    try:
        assert await submit(flooder) == 200
        refused = [await submit(flooder) for _ in range(20)]
        assert refused == [429] * 20  # its rate limit, one a minute
        assert [await submit(other) for _ in range(2)] == [200, 200]  # room was left
        # Alone over the full queue, a limited key is refused by capacity; that costs no quota.
        lone = Caller(tenant="other", key_id="k-lone", requests_per_min=5)
        assert await submit(lone) == 429
        assert await redis.zcard(f"{settings.redis_prefix}:ratelimit:k-lone") == 0
    finally:
        await hub.stop()
        await producer.stop()
        await redis.aclose()


class WatchedTokenizer:
    """The model's own tokenizer, noting how long a text it was asked to encode and on which
    thread."""

    def __init__(self, settings: Settings) -> None:
        self._inner = AutoTokenizer.from_pretrained(model_path(settings))
        self.encoded: list[tuple[int, bool]] = []  # (characters, on the event loop's thread)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode(self, text: str, **kwargs: Any) -> list[int]:
        self.encoded.append((len(text), threading.current_thread() is threading.main_thread()))
        return self._inner.encode(text, **kwargs)


async def test_prompt_length_is_bounded_before_tokenizing_and_tokenized_off_the_loop(
    services: Services,
) -> None:
    """A 1 MiB prompt took 0.7 s to tokenize on the event loop, stalling every stream the
    process relays. Text that cannot fit is refused by its length alone; the rest is tokenized
    on a thread."""
    settings = make_settings(services)
    redis = sredis.connect(settings)
    tokenizer = WatchedTokenizer(settings)
    handler = GenerateHandler(settings, tokenizer, None, StreamHub(redis, settings))  # type: ignore[arg-type]
    try:
        with pytest.raises(RequestValidationError) as refused:
            await handler.to_message(GenerateBody(prompt="word " * 200_000))
        error = refused.value.errors()[0]
        assert error["loc"] == ("body", "prompt") and "exceeds the model's context" in error["msg"]
        assert tokenizer.encoded == []  # refused without tokenizing
        chat = [ChatMessage(role="user", content="word " * 100_000)]
        with pytest.raises(RequestValidationError) as refused:
            await handler.to_message(GenerateBody(messages=chat))
        assert refused.value.errors()[0]["loc"] == ("body", "messages")
        assert tokenizer.encoded == []
        # Long but possibly fitting: tokenized, off the event loop, then measured exactly.
        with pytest.raises(RequestValidationError) as refused:
            await handler.to_message(GenerateBody(prompt="word " * 3_000))
        assert "is 3001 tokens" in refused.value.errors()[0]["msg"]
        assert tokenizer.encoded == [(15_000, False)]
        ok = await handler.to_message(GenerateBody(prompt="word " * 100, max_tokens=8))
        assert ok.prompt_tokens == 101
    finally:
        await redis.aclose()
