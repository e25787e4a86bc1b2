"""Idempotency-Key on the real stack: a retry is not enqueued again (its request is on the topic
once), it gets the first request's result, and a stream cut mid-way is picked up
by its retry from Last-Event-ID while the request runs on."""

from __future__ import annotations

import json
import uuid

import httpx
import openai
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from httpx_sse import aconnect_sse

from shared.devstack import LocalStack

pytestmark = pytest.mark.stack


@pytest.fixture
async def client(stack: LocalStack):
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as c:
        yield c


async def enqueued(stack: LocalStack, request_id: str) -> int:
    """How many times the request is on the requests topic. Counted by reading the topic: the
    dev broker's end offsets are not exact after multi-record batches."""
    consumer = AIOKafkaConsumer(bootstrap_servers=stack.settings.kafka, enable_auto_commit=False)
    await consumer.start()
    try:
        topic = stack.settings.requests_topic
        parts = [TopicPartition(topic, p) for p in range(stack.settings.requests_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        count = 0
        while got := await consumer.getmany(timeout_ms=2000, max_records=1000):
            count += sum(request_of(r.value) == request_id for rs in got.values() for r in rs)
        return count
    finally:
        await consumer.stop()


def request_of(value: bytes | None) -> str | None:
    """The request id of a record; None for the junk other tests put on the topic."""
    try:
        return json.loads(value or b"")["request_id"]
    except (ValueError, KeyError, TypeError):
        return None


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"test-{uuid.uuid4().hex}"}


async def test_a_retry_is_enqueued_once_and_answered_with_the_first_result(
    client: httpx.AsyncClient, stack: LocalStack
) -> None:
    # Sampled without a seed: a second run would almost surely differ.
    body = {"prompt": "Name a colour.", "max_tokens": 16, "temperature": 1.0}
    headers = key()
    first = await client.post("/generate", json=body, headers=headers)
    retry = await client.post("/generate", json=body, headers=headers)
    assert first.status_code == retry.status_code == 200, retry.text
    a, b = first.json(), retry.json()
    assert (b["request_id"], b["text"], b["usage"]) == (a["request_id"], a["text"], a["usage"])
    # Streamed, a retry gets the stored events as one replay.
    rid, tokens, done = await stream_events(client, {**body, "stream": True}, headers)
    assert rid == a["request_id"] and done is not None and done["usage"] == a["usage"]
    assert "".join(t["text"] for t in tokens) == a["text"]
    other = await client.post("/generate", json={**body, "max_tokens": 8}, headers=headers)
    assert other.status_code == 422
    assert other.json()["detail"][0]["loc"] == ["header", "idempotency-key"]
    assert await enqueued(stack, a["request_id"]) == 1


async def stream_events(
    client: httpx.AsyncClient, body: dict, headers: dict[str, str], stop_after: int | None = None
) -> tuple[str, list[dict], dict | None]:
    """(request id, token events, done event or None if cut after `stop_after` tokens)."""
    tokens: list[dict] = []
    async with aconnect_sse(client, "POST", "/generate", json=body, headers=headers) as src:
        assert src.response.status_code == 200, await src.response.aread()
        rid = src.response.headers["x-request-id"]
        async for sse in src.aiter_sse():
            data = json.loads(sse.data)
            if sse.event == "token":
                tokens.append(data)
                if stop_after is not None and len(tokens) >= stop_after:
                    return rid, tokens, None  # the connection closes: the client is gone
            elif sse.event == "done":
                return rid, tokens, data
            else:
                raise AssertionError(f"{sse.event}: {sse.data}")
    raise AssertionError("no done event")


async def test_a_stream_cut_mid_way_goes_on_and_its_retry_picks_it_up(
    client: httpx.AsyncClient, stack: LocalStack
) -> None:
    body = {
        "prompt": "Tell a long story about a lighthouse.",
        "max_tokens": 48,
        "ignore_eos": True,
        "temperature": 0.8,
        "stream": True,
    }
    headers = key()
    rid, seen, done = await stream_events(client, body, headers, stop_after=5)
    assert done is None and len(seen) == 5  # cut while the request ran: 43 tokens to go
    # The retry says what it has; it gets the rest of the same request, which was not
    # cancelled when its first client left (no `abort`), and ran to max_tokens.
    again, rest, done = await stream_events(
        client, body, {**headers, "Last-Event-ID": str(seen[-1]["index"])}
    )
    assert again == rid and done is not None and done["request_id"] == rid
    assert done["finish_reason"] == "length" and done["usage"]["completion_tokens"] == 48
    assert [t["index"] for t in seen + rest] == list(range(48))
    # Once finished, a retry without Last-Event-ID replays all of it: the same text.
    _, whole, _ = await stream_events(client, body, headers)
    assert "".join(t["text"] for t in whole) == "".join(t["text"] for t in seen + rest)
    assert await enqueued(stack, rid) == 1


def test_openai_client_retries_with_the_key_get_the_same_completion(
    stack: LocalStack,
) -> None:
    with openai.OpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0) as client:
        ask = dict(
            model=stack.settings.model,
            messages=[{"role": "user", "content": "Say something."}],
            max_tokens=12,
            temperature=1.0,
            n=2,
            extra_headers=key(),
        )
        first = client.chat.completions.create(**ask)  # type: ignore[call-overload]
        retry = client.chat.completions.create(**ask)  # type: ignore[call-overload]
        assert retry.id == first.id
        assert [c.message.content for c in retry.choices] == [
            c.message.content for c in first.choices
        ]
        with pytest.raises(openai.UnprocessableEntityError) as err:  # another body: a 422
            client.chat.completions.create(**{**ask, "max_tokens": 13})  # type: ignore[call-overload]
        assert err.value.param == "idempotency-key"
        chunks = list(client.chat.completions.create(**ask, stream=True))  # type: ignore[call-overload]
    assert {c.id for c in chunks} == {first.id}
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [c.message.content for c in first.choices]
