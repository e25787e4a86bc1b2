"""Idempotency-Key records (api/idempotency.py) against a real Redis: who enqueues, who
attaches, and what a retry with another body, another tenant or too early gets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from redis.asyncio import Redis

from api import idempotency
from api.auth import Caller
from api.idempotency import Idempotency
from api.schemas import GenerateBody
from shared import redis as sredis
from tests.conftest import Services, make_settings

ACME, OTHER = Caller(tenant="acme"), Caller(tenant="other")


@pytest.fixture
async def keys(services: Services) -> AsyncIterator[Idempotency]:
    settings = make_settings(services)
    redis: Redis = sredis.connect(settings)
    yield Idempotency(redis, settings)
    await redis.aclose()


def body(prompt: str = "hi", **kw: object) -> GenerateBody:
    return GenerateBody.model_validate({"prompt": prompt, **kw})


async def test_the_first_request_enqueues_and_a_retry_attaches(keys: Idempotency) -> None:
    key = keys.key(ACME, "k1", "/generate", body())
    assert key is not None
    assert await keys.claim(key) is None  # the first: it enqueues
    await keys.enqueued(key, ["rid-1"], deadline=123.0, extra={"sources": []})
    # The same body, however the client serialized it, names the same request.
    again = keys.key(ACME, "k1", "/generate", GenerateBody.model_validate_json('{"prompt":"hi"}'))
    assert again is not None
    held = await keys.claim(again)
    assert held is not None
    assert (held.ids, held.deadline, held.extra) == (["rid-1"], 123.0, {"sources": []})


async def test_another_body_route_or_tenant(keys: Idempotency) -> None:
    first = keys.key(ACME, "k2", "/generate", body(max_tokens=4))
    assert first is not None and await keys.claim(first) is None
    await keys.enqueued(first, ["rid-2"])
    for other in (
        keys.key(ACME, "k2", "/generate", body(max_tokens=5)),
        keys.key(ACME, "k2", "/rag-generate", body(max_tokens=4)),
    ):
        assert other is not None
        with pytest.raises(RequestValidationError) as err:
            await keys.claim(other)
        [error] = err.value.errors()
        assert (
            error["loc"] == ("header", "idempotency-key") and "another request body" in error["msg"]
        )
    # Another tenant's key of the same name is its own.
    theirs = keys.key(OTHER, "k2", "/generate", body(max_tokens=4))
    assert theirs is not None and await keys.claim(theirs) is None


async def test_a_retry_while_accepting_waits_then_409s_and_a_failure_frees_the_key(
    keys: Idempotency, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idempotency, "ACCEPT_WAIT_S", 0.3)
    key = keys.key(ACME, "k3", "/generate", body())
    assert key is not None and await keys.claim(key) is None
    with pytest.raises(HTTPException) as err:
        await keys.claim(key)
    assert err.value.status_code == 409
    # Accepted while the retry waits: the retry attaches.
    waiting = asyncio.create_task(keys.claim(key))
    await asyncio.sleep(0.1)
    await keys.enqueued(key, ["rid-3"])
    held = await waiting
    assert held is not None and held.ids == ["rid-3"]
    # A first attempt that failed before Kafka gives the key back: the retry goes itself.
    failed = keys.key(ACME, "k4", "/generate", body())
    assert failed is not None and await keys.claim(failed) is None
    await keys.forget(failed)
    assert await keys.claim(failed) is None


def test_no_header_no_key_and_an_empty_one_is_refused(keys: Idempotency) -> None:
    assert keys.key(ACME, None, "/generate", body()) is None
    with pytest.raises(RequestValidationError) as err:
        keys.key(ACME, "  ", "/generate", body())
    assert err.value.errors()[0]["loc"] == ("header", "idempotency-key")
