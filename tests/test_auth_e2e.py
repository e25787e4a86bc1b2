"""API keys, per-key rate limits, request isolation and input limits on a real stack (API ->
Kafka -> vLLM worker -> Redis) with SLUICE_AUTH_ENABLED=true; then a schemathesis fuzz of the
whole API from its OpenAPI schema, against the same stack.

One module-scoped stack serves every test here: a vLLM worker costs a minute to start.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import schemathesis
from aiokafka import AIOKafkaConsumer
from hypothesis import HealthCheck, Phase, given, seed
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from redis.asyncio import Redis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from api.auth import Caller, owns
from shared import apikeys, devstack
from shared.devstack import LocalStack
from tests.conftest import LOG_DIR, Services, make_settings

pytestmark = pytest.mark.stack

MAX_BODY = 32 * 1024
MAX_DOCUMENT = 4 * 1024
MAX_MESSAGES = 4
SMALL = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def auth_stack(services: Services, model_ready: None) -> Iterator[LocalStack]:
    # Valid requests stay cheap for the fuzz (at most 8 tokens each). The request timeout stays
    # long: a 504 would count as a server error.
    settings = make_settings(
        services,
        port=devstack.free_port(),
        auth_enabled=True,
        max_tokens_limit=8,
        default_max_tokens=4,
        max_messages=MAX_MESSAGES,
        max_body_bytes=MAX_BODY,
        max_document_bytes=MAX_DOCUMENT,
    )
    stack = LocalStack(settings, LOG_DIR / "auth")
    stack.start_worker()
    stack.start_api()
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


def sluice_keys(stack: LocalStack, *args: str, check: bool = True) -> str:
    """`sluice keys ARGS` against the stack's Redis, as an operator runs it."""
    sluice = shutil.which("sluice", path=os.path.dirname(sys.executable)) or "sluice"
    out = subprocess.run(
        [sluice, "keys", *args],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def new_key(stack: LocalStack, tenant: str, *limits: str) -> tuple[str, str]:
    """(plaintext, key id) of a new key made with the CLI."""
    record = json.loads(sluice_keys(stack, "create", "--tenant", tenant, "--json", *limits))
    return record["key"], record["key_id"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def key(auth_stack: LocalStack) -> tuple[str, str]:
    """An unlimited admin key of tenant `acme`, for tests that are not about limits or roles
    (the fuzzer reaches the admin routes with it)."""
    return new_key(auth_stack, "acme", "--rpm", "0", "--tpm", "0", "--admin")


@pytest.fixture(scope="module")
def revoked(auth_stack: LocalStack) -> str:
    plaintext, key_id = new_key(auth_stack, "gone")
    sluice_keys(auth_stack, "revoke", key_id)
    return plaintext


@pytest.fixture
async def http(auth_stack: LocalStack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=auth_stack.url, timeout=120) as client:
        yield client


def openai_client(stack: LocalStack, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=api_key, max_retries=0, timeout=120)


# --- Keys


async def test_keys_cli_create_list_revoke_and_only_the_hash_is_stored(
    auth_stack: LocalStack,
) -> None:
    plaintext, key_id = new_key(auth_stack, "cli-tenant", "--rpm", "5")
    assert plaintext.startswith("sk-sluice-") and len(plaintext) == len("sk-sluice-") + 32
    listed = {r["key_id"]: r for r in json.loads(sluice_keys(auth_stack, "list", "--json"))}
    assert listed[key_id]["tenant"] == "cli-tenant" and listed[key_id]["revoked"] is False
    assert listed[key_id]["requests_per_min"] == 5 and listed[key_id]["tokens_per_min"] is None
    assert listed[key_id]["admin"] is False
    table = sluice_keys(auth_stack, "list")
    assert key_id in table and plaintext not in table

    settings = auth_stack.settings
    redis = Redis.from_url(settings.redis)
    try:
        stored = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}:apikey*")]
        assert f"{settings.redis_prefix}:apikey:{apikeys.hash_key(plaintext)}".encode() in stored
        for name in stored:
            if await redis.type(name) == b"string":
                assert plaintext.encode() not in await redis.get(name)
    finally:
        await redis.aclose()

    assert "revoked" in sluice_keys(auth_stack, "revoke", key_id)
    listed = {r["key_id"]: r for r in json.loads(sluice_keys(auth_stack, "list", "--json"))}
    assert listed[key_id]["revoked"] is True
    assert "no API key" in sluice_keys(auth_stack, "revoke", "nosuchkey", check=False)
    assert "tenant" in sluice_keys(auth_stack, "create", "--tenant", "a b", check=False)


async def test_a_valid_key_generates_and_missing_wrong_or_revoked_keys_get_401(
    http: httpx.AsyncClient, key: tuple[str, str], revoked: str
) -> None:
    plaintext, _ = key
    r = await http.post("/generate", json=SMALL, headers=bearer(plaintext))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] > 0
    r2 = await http.post("/generate", json=SMALL, headers={"X-API-Key": plaintext})
    assert r2.status_code == 200, r2.text
    assert r2.json()["text"] == r.json()["text"]  # greedy: the same answer

    refused = [
        ({}, "missing API key"),
        (bearer("sk-sluice-" + "x" * 32), "invalid API key"),
        (bearer("not-even-a-sluice-key"), "invalid API key"),
        ({"X-API-Key": "sk-sluice-nope"}, "invalid API key"),
        ({"Authorization": f"Basic {plaintext}"}, "missing API key"),
        (bearer(revoked), "revoked"),
    ]
    for headers, why in refused:
        for stream in (False, True):
            r = await http.post("/generate", json={**SMALL, "stream": stream}, headers=headers)
            assert r.status_code == 401, (headers, r.text)
            assert why in r.json()["detail"]
            assert r.headers["www-authenticate"] == "Bearer"


async def test_every_route_that_works_or_reads_needs_a_key_but_health_does_not(
    http: httpx.AsyncClient,
) -> None:
    guarded = [
        ("POST", "/rag-generate", {"query": "x"}),
        ("POST", "/retrieve", {"query": "x"}),
        ("POST", "/documents", {"text": "x"}),
        ("GET", "/documents/some-doc", None),
        ("DELETE", "/documents/some-doc", None),
        ("GET", "/cost", None),
        ("GET", "/usage", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": "m", "prompt": "x"}),
        ("POST", "/v1/chat/completions", {"model": "m", "messages": []}),
    ]
    for method, path, body in guarded:
        r = await http.request(method, path, json=body)
        assert r.status_code == 401, (method, path, r.text)
    for path in ("/health", "/ready", "/metrics"):
        assert (await http.get(path)).status_code == 200, path


async def test_what_all_tenants_share_needs_an_admin_key(
    http: httpx.AsyncClient, auth_stack: LocalStack, key: tuple[str, str]
) -> None:
    """Every tenant's cost and the one document corpus: a tenant's key may read the corpus
    (retrieve, document status) but not change it, nor see what other tenants spend."""
    tenant, _ = new_key(auth_stack, "tenant-only", "--rpm", "0", "--tpm", "0")
    admin = bearer(key[0])
    for method, path, body in [
        ("POST", "/documents", {"text": "x"}),
        ("DELETE", "/documents/some-doc", None),
        ("GET", "/cost", None),
    ]:
        r = await http.request(method, path, json=body, headers=bearer(tenant))
        assert r.status_code == 403, (method, path, r.text)
        assert "--admin" in r.json()["detail"] and "tenant-only" in r.json()["detail"]
    assert (await http.get("/cost", headers=admin)).status_code == 200
    r = await http.post("/documents", json={"text": "shared", "doc_id": "admin-doc"}, headers=admin)
    assert r.status_code == 202, r.text
    r = await http.get("/documents/admin-doc", headers=bearer(tenant))
    assert r.status_code == 200, r.text
    r = await http.post("/retrieve", json={"query": "shared"}, headers=bearer(tenant))
    assert r.status_code == 200, r.text
    table = sluice_keys(auth_stack, "list")
    assert "admin" in table and "tenant" in table


def test_v1_answers_401_as_openai_authentication_errors(
    auth_stack: LocalStack, key: tuple[str, str], revoked: str
) -> None:
    model = auth_stack.settings.model
    for bad in ("sk-sluice-wrong", revoked):
        with openai_client(auth_stack, bad) as client:
            with pytest.raises(openai.AuthenticationError) as err:
                client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
                )
            assert err.value.status_code == 401 and err.value.type == "authentication_error"
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
    with openai_client(auth_stack, key[0]) as client:
        answer = client.completions.create(model=model, prompt="Paris is", max_tokens=4)
        assert answer.usage is not None and answer.usage.completion_tokens > 0


# --- Rate limits


async def test_requests_per_minute_limit_is_a_429_with_retry_after(
    http: httpx.AsyncClient, auth_stack: LocalStack
) -> None:
    plaintext, key_id = new_key(auth_stack, "rpm-tenant", "--rpm", "2")
    for _ in range(2):
        r = await http.post("/generate", json=SMALL, headers=bearer(plaintext))
        assert r.status_code == 200, r.text
    r = await http.post("/generate", json=SMALL, headers=bearer(plaintext))
    assert r.status_code == 429, r.text
    assert "2 requests per minute" in r.json()["detail"] and key_id in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 60

    with openai_client(auth_stack, plaintext) as client, pytest.raises(openai.RateLimitError) as e:
        client.completions.create(model=auth_stack.settings.model, prompt="hi", max_tokens=4)
    assert e.value.status_code == 429 and e.value.type == "rate_limit_error"
    assert "requests per minute" in e.value.message
    assert 1 <= int(e.value.response.headers["retry-after"]) <= 60


async def test_retrieval_counts_against_the_key_and_a_rag_call_is_one_request(
    http: httpx.AsyncClient, auth_stack: LocalStack
) -> None:
    """`/retrieve` and `/rag-generate` were not rate-limited: a key over its limit could still
    embed queries and search the store (with `mmr`, re-embed 200 chunks) as fast as it liked.
    Now a retrieval is a request; `/rag-generate` counts once, retrieval and generation."""
    plaintext, _ = new_key(auth_stack, "rag-tenant", "--rpm", "3")
    rag = {"query": "What time is high tide?", "max_tokens": 4, "temperature": 0}
    r = await http.post("/rag-generate", json=rag, headers=bearer(plaintext))
    assert r.status_code == 200, r.text
    for _ in range(2):
        r = await http.post("/retrieve", json={"query": "tides"}, headers=bearer(plaintext))
        assert r.status_code == 200, r.text
    for path, body in (("/retrieve", {"query": "tides"}), ("/rag-generate", rag)):
        r = await http.post(path, json=body, headers=bearer(plaintext))
        assert r.status_code == 429, r.text
        assert "3 requests per minute" in r.json()["detail"] and r.headers["retry-after"]


async def test_embeddings_are_rate_limited_and_billed_to_the_keys_tenant(
    http: httpx.AsyncClient, auth_stack: LocalStack
) -> None:
    plaintext, _ = new_key(auth_stack, "embed-co", "--rpm", "1")
    body = {"model": auth_stack.settings.embedding_model, "input": ["tides", "wind"]}
    r = await http.post("/v1/embeddings", json=body, headers=bearer(plaintext))
    assert r.status_code == 200, r.text
    tokens, dollars = r.json()["usage"]["prompt_tokens"], r.json()["sluice_cost_usd"]
    again = await http.post("/v1/embeddings", json=body, headers=bearer(plaintext))
    assert again.status_code == 429 and again.json()["error"]["type"] == "rate_limit_error"
    usage: dict = {}
    deadline = time.monotonic() + 20  # the API flushes its ledger every 5 s, caches 5 s
    while usage.get("requests") != 1 and time.monotonic() < deadline:
        await asyncio.sleep(1)
        usage = (await http.get("/usage", headers=bearer(plaintext))).json()
    assert usage["requests"] == 1 and usage["prompt_tokens"] == tokens
    assert usage["cost_usd"] == pytest.approx(dollars, abs=1e-8) and dollars > 0


def test_batches_and_files_are_their_tenants(auth_stack: LocalStack, tmp_path: Path) -> None:
    """Another tenant's file or batch is a 404, as if it did not exist; a batch's lines are
    billed to its tenant."""
    mine, _ = new_key(auth_stack, "batch-owner", "--rpm", "0", "--tpm", "0")
    theirs, _ = new_key(auth_stack, "batch-other", "--rpm", "0", "--tpm", "0")
    body = {"model": auth_stack.settings.model, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": "Hi"}]}  # fmt: skip
    line = {"custom_id": "only", "method": "POST", "url": "/v1/chat/completions", "body": body}
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with openai_client(auth_stack, mine) as owner, openai_client(auth_stack, theirs) as other:
        with path.open("rb") as f:
            file_id = owner.files.create(file=f, purpose="batch").id
        batch = owner.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        for attempt in (
            lambda: other.files.retrieve(file_id),
            lambda: other.files.content(file_id),
            lambda: other.files.delete(file_id),
            lambda: other.batches.retrieve(batch.id),
            lambda: other.batches.cancel(batch.id),
            lambda: other.batches.create(
                input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
            ),
        ):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert file_id not in {f.id for f in other.files.list().data}
        assert batch.id not in {b.id for b in other.batches.list().data}
        deadline = time.monotonic() + 300
        while owner.batches.retrieve(batch.id).status != "completed":
            assert time.monotonic() < deadline
            time.sleep(1)
        usage: dict = {}
        deadline = time.monotonic() + 30
        while usage.get("requests") != 1 and time.monotonic() < deadline:
            time.sleep(1)
            usage = httpx.get(f"{auth_stack.url}/usage", headers=bearer(mine), timeout=30).json()
        assert usage["requests"] == 1 and usage["cost_usd"] > 0


async def test_tokens_per_minute_count_prompt_and_max_tokens(
    http: httpx.AsyncClient, auth_stack: LocalStack
) -> None:
    # "Hi" is 1-4 prompt tokens: two requests of max_tokens 8 fit in 25, a third does not.
    plaintext, _ = new_key(auth_stack, "tpm-tenant", "--tpm", "25")
    long_prompt = {"prompt": "one two three four five six seven eight " * 4, "max_tokens": 8}
    r = await http.post("/generate", json=long_prompt, headers=bearer(plaintext))
    assert r.status_code == 429 and "lower max_tokens" in r.json()["detail"], r.text
    assert "retry-after" not in r.headers  # it can never fit: retrying cannot help

    small = {"prompt": "Hi", "max_tokens": 8, "temperature": 0}
    for _ in range(2):
        r = await http.post("/generate", json=small, headers=bearer(plaintext))
        assert r.status_code == 200, r.text
    r = await http.post("/generate", json=small, headers=bearer(plaintext))
    assert r.status_code == 429, r.text
    assert "25 tokens per minute" in r.json()["detail"]
    assert 1 <= int(r.headers["retry-after"]) <= 60

    with openai_client(auth_stack, plaintext) as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model=auth_stack.settings.model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
        )


# --- Tenants and isolation


async def requests_on_the_wire(stack: LocalStack, ids: set[str]) -> dict[str, dict]:
    """The GenerationRequest messages the API put on the requests topic, by request id."""
    consumer = AIOKafkaConsumer(
        stack.settings.requests_topic,
        bootstrap_servers=stack.settings.kafka,
        auto_offset_reset="earliest",
        group_id=None,
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    found: dict[str, dict] = {}
    try:
        deadline = time.monotonic() + 30
        while len(found) < len(ids) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    message = json.loads(record.value)
                    if message["request_id"] in ids:
                        found[message["request_id"]] = message
    finally:
        await consumer.stop()
    return found


async def test_the_keys_tenant_goes_on_the_wire_and_pays_the_cost(
    http: httpx.AsyncClient, auth_stack: LocalStack, key: tuple[str, str]
) -> None:
    """The API puts the key's tenant on the wire message; the worker attributes cost by it."""
    plaintext, _ = new_key(auth_stack, "billing-co", "--rpm", "0", "--tpm", "0")
    admin = key  # an operator reads the cost of every tenant
    r = await http.post("/generate", json=SMALL, headers=bearer(plaintext))
    assert r.status_code == 200, r.text
    with openai_client(auth_stack, plaintext) as client:
        raw = client.completions.with_raw_response.create(
            model=auth_stack.settings.model, prompt="Hi", max_tokens=4, user="someone-else"
        )
    ids = {r.json()["request_id"], raw.parse().id.removeprefix("cmpl-")}
    wire = await requests_on_the_wire(auth_stack, ids)
    assert set(wire) == ids
    assert {m["tenant"] for m in wire.values()} == {"billing-co"}  # the key's, not `user`'s

    spent = r.json()["cost_usd"] + float(raw.headers["x-sluice-cost-usd"])
    by_tenant: dict[str, float] = {}
    deadline = time.monotonic() + 20  # the worker writes its ledger every 5 s
    while by_tenant.get("billing-co", 0) < spent - 1e-8 and time.monotonic() < deadline:
        await asyncio.sleep(1)
        report = await http.get("/cost", params={"window": "1h"}, headers=bearer(admin[0]))
        by_tenant = report.json()["by_tenant_usd"]
    # The report rounds dollars to 1e-8 (here about 1e-4 of the amount).
    assert by_tenant.get("billing-co") == pytest.approx(spent, abs=1e-8), by_tenant

    # The tenant's own view: its two requests and nothing of other tenants'.
    mine = (await http.get("/usage", headers=bearer(plaintext))).json()
    completion = raw.parse().usage
    assert mine["tenant"] == "billing-co" and mine["requests"] == 2
    assert mine["prompt_tokens"] == r.json()["usage"]["prompt_tokens"] + completion.prompt_tokens
    assert mine["completion_tokens"] == (
        r.json()["usage"]["completion_tokens"] + completion.completion_tokens
    )
    assert mine["cost_usd"] == pytest.approx(spent, abs=1e-8)
    bad = await http.get("/usage", params={"window": "1y"}, headers=bearer(plaintext))
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "window"]


async def test_request_ids_are_random_and_belong_to_their_key(
    http: httpx.AsyncClient, auth_stack: LocalStack, key: tuple[str, str]
) -> None:
    other, other_id = new_key(auth_stack, "other-tenant")
    r = await http.post("/generate", json=SMALL, headers=bearer(key[0]))
    assert r.status_code == 200, r.text
    request_id = r.json()["request_id"]
    assert uuid.UUID(hex=request_id).version == 4 and len(request_id) == 32

    settings = auth_stack.settings
    mine = Caller(tenant="acme", key_id=key[1])
    theirs = Caller(tenant="other-tenant", key_id=other_id)
    redis = Redis.from_url(settings.redis)
    try:
        assert await owns(redis, settings, request_id, mine)
        assert not await owns(redis, settings, request_id, theirs)
        assert not await owns(redis, settings, uuid.uuid4().hex, mine)
        ttl = await redis.pttl(f"{settings.redis_prefix}:owner:{request_id}")
        assert 0 < ttl <= settings.request_timeout_s * 1000
    finally:
        await redis.aclose()

    # The routes that act on an id: someone else's is a 404, like an id that does not exist.
    for method, path in (
        ("GET", f"/requests/{request_id}/stream"),
        ("DELETE", f"/requests/{request_id}"),
    ):
        r = await http.request(method, path, headers=bearer(other))
        assert r.status_code == 404, (method, r.text)
        assert (await http.request(method, path)).status_code == 401
    r = await http.delete(f"/requests/{request_id}", headers=bearer(key[0]))
    assert r.status_code == 202, r.text


# --- Input limits


async def test_a_body_over_the_limit_is_a_413(
    http: httpx.AsyncClient, key: tuple[str, str]
) -> None:
    headers = bearer(key[0])
    big = {"prompt": "x" * (MAX_BODY + 1)}
    r = await http.post("/generate", json=big, headers=headers)
    assert r.status_code == 413 and f"larger than {MAX_BODY} bytes" in r.json()["detail"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(MAX_BODY // 1024 + 1):
            yield b"x" * 1024
        yield b'"}'

    r = await http.post(
        "/generate", content=chunked(), headers={**headers, "content-type": "application/json"}
    )
    assert r.status_code == 413, r.text
    assert "content-length" not in r.request.headers

    r = await http.post("/v1/completions", json={"model": "m", **big}, headers=headers)
    assert r.status_code == 413
    assert r.json()["error"]["type"] == "invalid_request_error"  # OpenAI's shape on /v1


async def test_too_many_messages_is_a_422_naming_messages(
    http: httpx.AsyncClient, auth_stack: LocalStack, key: tuple[str, str]
) -> None:
    messages = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES + 1)
    r = await http.post(
        "/generate", json={"messages": messages, "max_tokens": 4}, headers=bearer(key[0])
    )
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "messages"] and "SLUICE_MAX_MESSAGES" in error["msg"]
    with openai_client(auth_stack, key[0]) as client, pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=auth_stack.settings.model, messages=messages)  # type: ignore[arg-type]
    assert e.value.param == "messages"


async def test_documents_over_the_size_limit_are_413_as_json_and_as_upload(
    http: httpx.AsyncClient, key: tuple[str, str]
) -> None:
    headers = bearer(key[0])
    r = await http.post("/documents", json={"text": "x" * (MAX_DOCUMENT + 1)}, headers=headers)
    assert r.status_code == 413 and "SLUICE_MAX_DOCUMENT_BYTES" in r.json()["detail"]
    files = {"file": ("big.txt", b"x" * (MAX_DOCUMENT + 1), "text/plain")}
    r = await http.post("/documents", files=files, headers=headers)
    assert r.status_code == 413 and "SLUICE_MAX_DOCUMENT_BYTES" in r.json()["detail"]
    r = await http.post("/documents", json={"text": "x" * MAX_DOCUMENT}, headers=headers)
    assert r.status_code == 202, r.text


async def test_what_the_fuzzer_found_is_a_4xx_or_served(
    http: httpx.AsyncClient, key: tuple[str, str]
) -> None:
    """Each was a 5xx once: the engine refused it (502), or the API's own wait ran out (504)."""
    headers = bearer(key[0])
    refused = [
        ("/generate", {"prompt": "hi", "stop": ["x", ""]}, "stop"),
        ("/generate", {"prompt": "hi", "seed": 2**64}, "seed"),
        ("/rag-generate", {"query": "hi", "stop": ""}, "stop"),
    ]
    for path, body, field in refused:
        r = await http.post(path, json=body, headers=headers)
        assert r.status_code == 422 and field in r.json()["detail"][0]["loc"], r.text
    r = await http.post(
        "/v1/completions", json={"model": "m", "prompt": "hi", "seed": 2**63}, headers=headers
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = await http.delete("/documents/not a valid id!", headers=headers)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "doc_id"]

    for extreme in (2**63 - 1, -(2**63)):  # the 64-bit extremes still run
        r = await http.post("/generate", json={**SMALL, "seed": extreme}, headers=headers)
        assert r.status_code == 200, r.text
    # The client's own deadline passes before a worker can start it: the worker's answer.
    r = await http.post("/generate", json={**SMALL, "timeout_s": 1e-9}, headers=headers)
    assert r.status_code == 200 and r.json()["finish_reason"] == "timeout", r.text


# --- Fuzzing: last, so that whatever it leaves queued disturbs no other test here

# Examples per operation: about two minutes in all on two CPU cores. SLUICE_FUZZ_SEED explores
# other examples; without it the run is the same every time (no flaky CI).
FUZZ_EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 20}
FUZZ_SEED = os.environ.get("SLUICE_FUZZ_SEED")
# Nothing to fuzz (no input), and /ready's 503 is its documented answer while a worker is late.
NOT_FUZZED = {"/health", "/ready", "/metrics"}


def conforms_unless_streamed(ctx: Any, response: Any, case: Any) -> bool | None:
    """The declared response schema, for JSON answers; a route's `stream: true` answer is SSE,
    which the schema does not describe."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.startswith("text/event-stream"):
        return None
    return response_schema_conformance(ctx, response, case)


def fuzz(operation: Any, mode: GenerationMode, call: Any) -> str | None:
    """Run `call` on generated cases of one operation; the first failure's report, or None."""

    @hypothesis_settings(
        max_examples=FUZZ_EXAMPLES[mode],
        deadline=None,
        database=None,
        derandomize=FUZZ_SEED is None,
        phases=[Phase.explicit, Phase.generate],  # shrinking would replay real generations
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        call(case, mode)

    if FUZZ_SEED is not None:
        run = seed(int(FUZZ_SEED))(run)
    try:
        run()
    except Unsatisfiable:  # no invalid input exists (e.g. a free-form string path parameter)
        return None
    except (Exception, BaseExceptionGroup) as e:  # schemathesis' FailureGroup is a Base one
        return f"{operation.method.upper()} {operation.path} ({mode.value}):\n{e}"
    return None


def test_fuzz_the_api_from_its_openapi_schema(auth_stack: LocalStack, key: tuple[str, str]) -> None:
    """No 5xx, declared response schemas hold, no request hangs, for generated valid and
    invalid input on every operation."""
    schema = schemathesis.openapi.from_url(f"{auth_stack.url}/openapi.json")
    served = auth_stack.settings.model
    headers = bearer(key[0])

    def call(case: Any, mode: GenerationMode) -> None:
        # A random `model` is a 404; the served one lets valid /v1 bodies reach the worker.
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = served
        case.call_and_validate(
            base_url=auth_stack.url,
            headers=headers,
            timeout=60,  # a hang fails the case instead of the whole run
            checks=[not_a_server_error, conforms_unless_streamed],
        )

    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in NOT_FUZZED:
            continue
        failures += [fuzz(operation, mode, call) for mode in FUZZ_EXAMPLES]
    found = [f for f in failures if f]
    assert not found, "\n\n".join(found)
