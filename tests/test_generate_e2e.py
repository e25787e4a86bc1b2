"""The whole path over HTTP: API -> Kafka -> vLLM worker -> Redis -> SSE, all real processes."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from httpx_sse import aconnect_sse

from shared.devstack import LocalStack
from tests.conftest import PROMPTS, REF_MAX_TOKENS

pytestmark = pytest.mark.stack


async def stream(client: httpx.AsyncClient, body: dict) -> tuple[list[dict], dict]:
    """(token events, done event) of one streamed request."""
    tokens: list[dict] = []
    async with aconnect_sse(client, "POST", "/generate", json={**body, "stream": True}) as src:
        assert src.response.status_code == 200
        assert src.response.headers["content-type"].startswith("text/event-stream")
        async for sse in src.aiter_sse():
            data = json.loads(sse.data)
            if sse.event == "token":
                assert sse.id == str(data["index"])
                tokens.append(data)
            elif sse.event == "done":
                return tokens, data
            elif sse.event != "queued":  # still waiting for a worker, every 5 s: not an error
                raise AssertionError(f"unexpected event {sse.event}: {sse.data}")
    raise AssertionError("stream ended without a done event")


def greedy(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": REF_MAX_TOKENS, "temperature": 0}


@pytest.fixture
async def client(stack: LocalStack):
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as c:
        yield c


async def test_streamed_greedy_matches_vllm_and_non_streamed(
    client: httpx.AsyncClient, greedy_reference: dict[str, str]
) -> None:
    prompt = PROMPTS[0]
    tokens, done = await stream(client, greedy(prompt))
    text = "".join(t["text"] for t in tokens)
    assert text == greedy_reference[prompt]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert done["usage"]["completion_tokens"] == len(tokens)
    assert done["usage"]["prompt_tokens"] > 0
    assert done["finish_reason"] in ("stop", "length")
    assert set(done["timings"]) == {"queue_ms", "ttft_ms", "e2e_ms"}
    assert 0 <= done["timings"]["ttft_ms"] <= done["timings"]["e2e_ms"]
    # Engine time at the instance price; far below a cent for 24 tokens of a 135M model.
    assert 0 < done["cost_usd"] < 0.01

    r = await client.post("/generate", json=greedy(prompt))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == text
    assert body["request_id"] != done["request_id"]
    assert body["usage"] == done["usage"]
    assert body["finish_reason"] == done["finish_reason"]
    assert 0 < body["cost_usd"] < 0.01


async def test_chat_messages_use_the_chat_template(client: httpx.AsyncClient) -> None:
    msg = [{"role": "user", "content": "What is the capital of France?"}]
    r = await client.post("/generate", json={"messages": msg, "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["text"]
    # The template wraps the question in system/user turns: far more tokens than the question.
    assert body["usage"]["prompt_tokens"] > 20


async def test_stop_and_seed_are_applied(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate",
        json={
            "prompt": "Count: 1, 2, 3, 4, 5, 6,",
            "max_tokens": 30,
            "temperature": 0,
            "stop": [" 9"],
        },
    )
    assert r.status_code == 200, r.text
    assert r.json()["finish_reason"] == "stop"
    assert " 9" not in r.json()["text"] and "8" in r.json()["text"]

    sampled = {
        "prompt": "Once upon a time",
        "max_tokens": 16,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
    }
    a, b = [(await client.post("/generate", json=sampled)).json()["text"] for _ in range(2)]
    assert a == b


async def test_logprobs_come_with_each_token_streamed_or_not(client: httpx.AsyncClient) -> None:
    body = {"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    tokens, done = await stream(client, body)
    assert len(tokens) == done["usage"]["completion_tokens"] == 6
    for t in tokens:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 2
        assert t["token"] == t["top_logprobs"][0]["token"]  # greedy: the most likely
    whole = (await client.post("/generate", json=body)).json()
    assert [t["token"] for t in whole["logprobs"]] == [t["token"] for t in tokens]
    assert "".join(t["token"] for t in whole["logprobs"]) == whole["text"]
    plain = (await client.post("/generate", json=greedy(PROMPTS[1]))).json()
    assert plain["logprobs"] is None


async def test_penalties_and_stop_token_ids_are_applied(
    client: httpx.AsyncClient, stack: LocalStack
) -> None:
    from transformers import AutoTokenizer

    from shared.models import model_path

    # Counting repeats ", " at every step: penalties on repeated tokens break the pattern.
    count = {"prompt": "Count: 1, 2, 3, 4,", "max_tokens": 16, "temperature": 0}
    plain = (await client.post("/generate", json=count)).json()["text"]
    penalized = await client.post(
        "/generate", json={**count, "frequency_penalty": 2.0, "presence_penalty": 2.0}
    )
    assert penalized.status_code == 200, penalized.text
    assert plain.count(",") > penalized.json()["text"].count(","), (plain, penalized.text)

    tokenizer = AutoTokenizer.from_pretrained(model_path(stack.settings))
    [seven] = tokenizer.encode("7", add_special_tokens=False)
    assert "7" in plain and "8" in plain
    stopped = (await client.post("/generate", json={**count, "stop_token_ids": [seven]})).json()
    assert stopped["finish_reason"] == "stop" and "6" in stopped["text"]
    assert "8" not in stopped["text"]


async def test_sixteen_concurrent_streams_each_get_their_own_tokens(
    client: httpx.AsyncClient, greedy_reference: dict[str, str]
) -> None:
    results = await asyncio.gather(*(stream(client, greedy(p)) for p in PROMPTS))
    ids = set()
    for prompt, (tokens, done) in zip(PROMPTS, results, strict=True):
        assert [t["index"] for t in tokens] == list(range(len(tokens)))
        assert "".join(t["text"] for t in tokens) == greedy_reference[prompt], prompt
        ids.add(done["request_id"])
    assert len(ids) == len(PROMPTS)


async def end_offsets(stack: LocalStack) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.settings.kafka)
    await consumer.start()
    try:
        topic = stack.settings.requests_topic
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        if not parts:
            parts = [TopicPartition(topic, p) for p in range(stack.settings.requests_partitions)]
        return await consumer.end_offsets(parts)
    finally:
        await consumer.stop()


BAD_BODIES = [
    ({}, "body"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"messages": []}, "messages"),
    ({"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "body"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
    ({"prompt": "hi", "temperature": -0.1}, "temperature"),
    ({"prompt": "hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "top_p": 1.5}, "top_p"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"prompt": "word " * 5000, "max_tokens": 8}, "prompt"),
    ({"messages": [{"role": "user", "content": "word " * 5000}]}, "messages"),
]


@pytest.mark.parametrize(("body", "field"), BAD_BODIES)
async def test_bad_input_is_rejected_naming_the_field_and_not_enqueued(
    client: httpx.AsyncClient, stack: LocalStack, body: dict, field: str
) -> None:
    before = await end_offsets(stack)
    for stream_flag in (False, True):
        r = await client.post("/generate", json={**body, "stream": stream_flag})
        assert r.status_code == 422, r.text
        errors = r.json()["detail"]
        assert any(field in [str(p) for p in e["loc"]] for e in errors), errors
        assert all(e["msg"] for e in errors)
    assert await end_offsets(stack) == before


async def test_non_json_body_is_a_4xx(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/generate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422


async def test_poison_messages_go_to_the_dead_letter_topic(
    client: httpx.AsyncClient, stack: LocalStack
) -> None:
    settings = stack.settings
    valid = {"request_id": "x", "sampling": {"max_tokens": 4}, "prompt": "hi", "enqueued_at": 0}
    poison = {
        b"not json at all": "invalid request message",
        json.dumps({**valid, "v": 99}).encode(): "v:",
        json.dumps({**valid, "sampling": {"max_tokens": 0}}).encode(): "sampling.max_tokens",
    }
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
    await producer.start()
    try:
        for value in poison:
            await producer.send_and_wait(settings.requests_topic, value=value, key=b"poison")
    finally:
        await producer.stop()

    dlq = AIOKafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=settings.kafka,
        auto_offset_reset="earliest",
        group_id=None,
        fetch_max_wait_ms=10,
    )
    await dlq.start()
    seen: dict[bytes, str] = {}
    try:
        deadline = time.monotonic() + 60
        while len(seen) < len(poison) and time.monotonic() < deadline:
            batch = await dlq.getmany(timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    headers = dict(rec.headers)
                    assert headers["sluice.dlq.topic"].decode() == settings.requests_topic
                    assert int(headers["sluice.dlq.offset"].decode()) >= 0
                    seen[rec.value] = headers["sluice.dlq.reason"].decode()
    finally:
        await dlq.stop()
    for value, expected in poison.items():
        assert value in seen, f"{value!r} never reached {settings.dlq_topic}"
        assert expected in seen[value], seen[value]

    # The worker kept serving.
    r = await client.post("/generate", json=greedy("Say hello."))
    assert r.status_code == 200, r.text


async def test_health_and_metrics(client: httpx.AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "alive"}
    ready = await client.get("/health", params={"ready": 1})
    assert ready.status_code == 200 and ready.json()["checks"]["worker"] is True
    text = (await client.get("/metrics")).text
    assert "sluice_requests_total" in text
    assert 'endpoint="/generate"' in text
    assert "sluice_time_to_first_token_seconds_bucket" in text


# Last in the module: it stops and restarts the worker (the engine start costs a minute).
async def test_readiness_follows_the_worker(client: httpx.AsyncClient, stack: LocalStack) -> None:
    assert (await client.get("/ready")).status_code == 200
    stack.stop_workers()
    deadline = time.monotonic() + stack.settings.heartbeat_ttl_s + 10
    while (r := await client.get("/ready")).status_code == 200:
        assert time.monotonic() < deadline, "still ready with no worker"
        await asyncio.sleep(0.2)
    assert r.status_code == 503
    assert r.json()["failing"] == ["worker"]
    stack.start_worker()
    await asyncio.to_thread(stack.wait_ready)
    assert (await client.get("/ready")).status_code == 200
    r = await client.post("/generate", json=greedy("Say hello."))
    assert r.status_code == 200, r.text
