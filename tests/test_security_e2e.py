"""A stack whose Redis trusts no one: the default user off and an ACL user per service
(shared/redis_acl.py). Requests stream through it with nothing denied on the way, and each
service's credentials reach only what it needs.

Kafka's side (SASL/SCRAM) is not run here: the dev broker keeps its users in its memory storage
and, with `--authentication`, refuses the very call that creates one (docs/RELIABILITY.md)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import HTTPException
from httpx_sse import aconnect_sse
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from shared import apikeys, batch, batch_auth, devstack, kafka, redis_acl
from shared.devstack import LocalStack
from shared.messages import GenerationRequest, SamplingOptions
from shared.settings import Settings
from tests.conftest import Services, make_settings

pytestmark = pytest.mark.stack

SERVICES = ("api", "worker", "ingestion", "cli")
ADMIN = "test-admin"  # the test's own, to read the ACL log; not part of Sluice's file


@dataclass
class Secured:
    stack: LocalStack
    redis_port: int
    passwords: dict[str, str]
    admin_password: str

    @property
    def prefix(self) -> str:
        return self.stack.settings.redis_prefix

    def redis_as(self, service: str) -> Redis:
        return Redis(
            port=self.redis_port, username=redis_acl.username(service),
            password=self.passwords[service],
        )  # fmt: skip

    def admin(self) -> Redis:
        return Redis(port=self.redis_port, username=ADMIN, password=self.admin_password)


@pytest.fixture(scope="module")
def secured(
    services: Services, model_ready: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Secured]:
    tmp = tmp_path_factory.mktemp("secured")
    passwords = {s: secrets.token_urlsafe(16) for s in SERVICES}
    admin_password = secrets.token_urlsafe(16)
    prefix = f"sluice-sec-{uuid.uuid4().hex[:8]}"
    acl = redis_acl.acl_file(prefix, passwords)
    acl += f"user {ADMIN} on >{admin_password} ~* &* +@all\n"
    (tmp / "users.acl").write_text(acl)
    redis_port, kafka_port = devstack.free_port(), devstack.free_port()
    redis = devstack.start_redis(redis_port, tmp / "redis.log", "--aclfile", str(tmp / "users.acl"))
    broker = devstack.start_broker(kafka_port, tmp / "broker.log")
    settings = make_settings(
        services, port=devstack.free_port(), kafka=f"127.0.0.1:{kafka_port}",
        redis=f"redis://127.0.0.1:{redis_port}/0", redis_prefix=prefix,
        # The test's own clients are the operator's.
        redis_username=redis_acl.username("cli"), redis_password=passwords["cli"],
    )  # fmt: skip
    per_service = {
        service: {
            "SLUICE_REDIS_USERNAME": redis_acl.username(service),
            "SLUICE_REDIS_PASSWORD": passwords[service],
        }
        for service in ("api", "worker", "ingestion")
    }
    per_service["worker"]["SLUICE_BATCH_REQUIRE_SIGNATURE"] = "true"
    stack = LocalStack(settings, tmp, per_service)
    stack.start_worker()
    stack.start_ingestion()
    stack.start_api()
    try:
        stack.wait_ready()
        yield Secured(stack, redis_port, passwords, admin_password)
    finally:
        stack.stop()
        devstack.stop(broker)
        devstack.stop(redis)


async def test_requests_stream_through_the_secured_stack_with_nothing_denied(
    secured: Secured,
) -> None:
    body = {"prompt": "Say something about rivers.", "max_tokens": 8, "stream": True}
    async with (
        httpx.AsyncClient(base_url=secured.stack.url, timeout=120) as client,
        aconnect_sse(client, "POST", "/generate", json=body) as source,
    ):
        events = [sse.event async for sse in source.aiter_sse()]
    assert events[-1] == "done" and events.count("token") == 8
    async with httpx.AsyncClient(base_url=secured.stack.url, timeout=30) as client:
        assert (await client.get("/ready")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/cost")).status_code == 200
        # Ingestion: the API records the document queued, ingestion indexes it.
        doc = {"doc_id": "sec/tides", "text": "High tide is at six.", "title": "Tides"}
        assert (await client.post("/documents", json=doc)).status_code == 202
        for _ in range(600):
            status = (await client.get("/documents/sec/tides")).json()
            if status["status"] != "queued":
                break
            await asyncio.sleep(0.1)
        assert status["status"] == "indexed", status
        found = await client.post("/retrieve", json={"query": "high tide", "top_k": 1})
        assert found.json()["results"][0]["title"] == "Tides"
    # Every command the API and the worker sent was allowed: the rules are complete.
    admin = secured.admin()
    denied = await admin.execute_command("ACL", "LOG")
    await admin.aclose()
    assert denied == [], denied


async def test_without_credentials_redis_and_kafka_refuse(secured: Secured) -> None:
    anonymous = Redis(port=secured.redis_port)
    with pytest.raises((AuthenticationError, ResponseError)):  # NOAUTH
        await anonymous.ping()
    await anonymous.aclose()
    wrong = Redis(port=secured.redis_port, username="sluice-api", password="guess")
    with pytest.raises(AuthenticationError):
        await wrong.ping()
    await wrong.aclose()


async def test_kafka_clients_take_the_sasl_and_tls_settings() -> None:
    """What every Kafka client Sluice makes is given (shared/kafka.py), checked by aiokafka's
    own validation of a producer built from it."""
    plain = kafka.connection(Settings(kafka="k:9092"))
    assert plain == {"bootstrap_servers": "k:9092", "security_protocol": "PLAINTEXT"}
    secured = Settings(
        kafka="k:9093", kafka_security_protocol="SASL_SSL", kafka_sasl_username="sluice-api",
        kafka_sasl_password="pw", kafka_sasl_mechanism="SCRAM-SHA-256",
    )  # fmt: skip
    kwargs = kafka.connection(secured)
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("sluice-api", "pw")
    assert kwargs["ssl_context"] is not None
    AIOKafkaProducer(**kwargs)  # raises on an inconsistent combination
    assert "pw" not in repr(secured)  # secrets stay out of logs


async def denied(redis: Redis, *command: str) -> bool:
    try:
        await redis.execute_command(*command)
    except NoPermissionError:
        return True
    return False


async def test_each_service_reaches_only_what_it_needs(secured: Secured) -> None:
    p = secured.prefix
    forged = '{"tenant": "x", "admin": true}'
    api, worker = secured.redis_as("api"), secured.redis_as("worker")
    ingestion, cli = secured.redis_as("ingestion"), secured.redis_as("cli")
    try:
        # Nobody but the operator writes API key records (a forged admin key).
        for service in (api, worker, ingestion):
            assert await denied(service, "SET", f"{p}:apikey:forged", forged)
        assert await denied(worker, "GET", f"{p}:apikey:forged")
        await cli.set(f"{p}:apikey:forged", forged)
        await cli.delete(f"{p}:apikey:forged")
        # Only workers write token events and request records; ingestion sees no stream.
        assert await denied(api, "XADD", f"{p}:events:x", "*", "e", "{}")
        assert await denied(api, "HSET", f"{p}:req:x", "owner", "me")
        assert await denied(ingestion, "PUBLISH", f"{p}:stream:x", "{}")
        assert await denied(ingestion, "XRANGE", f"{p}:events:x", "-", "+")
        assert await denied(ingestion, "PUBLISH", f"{p}:cancel", "{}")
        # Workers cannot cancel requests (only read the cancel marks).
        assert await denied(worker, "SET", f"{p}:cancelled:x", "1")
        # They read batch signers (to check signatures) but cannot add one.
        assert not await denied(worker, "GET", f"{p}:batch-signer:x")
        assert await denied(worker, "SET", f"{p}:batch-signer:x", forged)
        # Nothing outside the prefix, and no keyspace scans or dangerous commands for anyone.
        for service in (api, worker, ingestion, cli):
            assert await denied(service, "GET", "other:key")
            assert await denied(service, "KEYS", "*")
            assert await denied(service, "SCAN", "0")
            assert await denied(service, "FLUSHALL")
            assert await denied(service, "CONFIG", "GET", "requirepass")
    finally:
        for r in (api, worker, ingestion, cli):
            await r.aclose()


def test_redis_acl_cli_writes_the_file_the_secured_stack_loads(tmp_path: Path) -> None:
    """`sluice redis-acl` is how a deployment makes the file: the rules the stack above runs
    with, passwords only as hashes."""
    passwords = {s: secrets.token_urlsafe(16) for s in SERVICES}
    for service, password in passwords.items():
        (tmp_path / service).write_text(password + "\n")
    args = [f"--password-file={s}={tmp_path / s}" for s in SERVICES]
    env = {**os.environ, "SLUICE_REDIS_PREFIX": "acme"}
    out = subprocess.run(
        [sys.executable, "-m", "cli", "redis-acl", *args], capture_output=True, text=True,
        env=env, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert out == redis_acl.acl_file("acme", passwords)
    assert out.splitlines()[0].startswith("user default off")
    assert all(password not in out for password in passwords.values())
    bad = subprocess.run(
        [sys.executable, "-m", "cli", "redis-acl", "--password-file=root=/dev/null"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "SERVICE one of api, worker, ingestion, cli" in bad.stderr


async def test_a_503_names_what_is_down_but_not_its_error(caplog: pytest.LogCaptureFixture) -> None:
    """Before authentication, a caller saw Redis' own error text (host, port, errno) in the 503
    for its key. Now it reads what is down; the error itself goes to the log."""
    from api.auth import Authenticator

    port = devstack.free_port()  # nothing listens there
    settings = Settings(redis=f"redis://127.0.0.1:{port}/0", auth_enabled=True)
    redis = Redis(port=port)
    with pytest.raises(HTTPException) as refused:
        await Authenticator(settings, redis).caller("sk-sluice-anything")
    await redis.aclose()
    assert refused.value.status_code == 503
    assert refused.value.detail == "cannot check the API key now (Redis unavailable); retry shortly"
    assert refused.value.headers == {"Retry-After": "1"}
    assert str(port) in caplog.text  # the operator still sees why


def batch_request(tenant: str | None = None) -> GenerationRequest:
    return GenerationRequest(
        request_id=uuid.uuid4().hex, prompt="Name a river.", tenant=tenant,
        sampling=SamplingOptions(max_tokens=4, temperature=0), enqueued_at=time.time(),
    )  # fmt: skip


async def test_batch_tenants_come_from_signatures_not_from_the_message(
    secured: Secured, tmp_path: Path
) -> None:
    """Anyone who may produce to the batch topic could put `"tenant": "globex"` in a message
    and bill globex. Here the worker believes only a signature made with a key's secret: the
    signed file is served and its results land on acme's own topic; the forgeries are parked
    in the DLQ with their reasons, unrun."""
    settings = secured.stack.settings
    cli = secured.redis_as("cli")
    acme_key, _ = await apikeys.create(cli, settings, "acme")
    retired_key, retired = await apikeys.create(cli, settings, "acme")
    await apikeys.revoke(cli, settings, retired.key_id)
    await cli.aclose()

    # The submitter's way: `sluice batch submit` with its key in SLUICE_API_KEY.
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"correlation": "a", "prompt": "Name a river.", "max_tokens": 4}\n')
    env = {**os.environ, **secured.stack.env, "SLUICE_API_KEY": acme_key}
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "cli", "batch", "submit", str(jobs), "--tenant",
        "acme", "--wait", "--timeout", "300"], capture_output=True, text=True, env=env,
        timeout=400, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = (tmp_path / "jobs.results.jsonl").read_text().splitlines()
    assert len(results) == 1 and json.loads(results[0])["finish_reason"] == "length"

    # Forgeries, produced straight to the topic.
    def signed(request: GenerationRequest, key: str) -> tuple[bytes, list[tuple[str, bytes]]]:
        value = request.model_dump_json().encode()
        return value, batch_auth.sign(key, value)

    unsigned = batch_request("acme")
    billed_elsewhere = batch_request("globex")
    tampered = batch_request("acme")
    revoked = batch_request("acme")
    value, headers = signed(tampered, acme_key)
    forged = {
        unsigned.request_id: (unsigned.model_dump_json().encode(), None),
        billed_elsewhere.request_id: signed(billed_elsewhere, acme_key),
        tampered.request_id: (value.replace(b"river", b"ocean"), headers),
        revoked.request_id: signed(revoked, retired_key),
    }
    producer = AIOKafkaProducer(**kafka.connection(settings))
    await producer.start()
    for rid, (value, headers) in forged.items():
        await producer.send_and_wait(
            settings.batch_requests_topic, value, key=rid.encode(), headers=headers
        )
    await producer.stop()
    reasons = await dead_lettered(settings, set(forged))
    assert "unsigned" in reasons[unsigned.request_id]
    assert "not the signing key's tenant" in reasons[billed_elsewhere.request_id]
    assert "does not match the message" in reasons[tampered.request_id]
    assert "is revoked" in reasons[revoked.request_id]
    # None of them ran: no result anywhere, the shared topic holds nothing at all.
    shared = await batch.collect(settings, None, timeout_s=10)
    assert shared == {}
    acme = await batch.collect(settings, None, timeout_s=10, tenant="acme")
    assert len(acme) == 1 and not set(forged) & set(acme)


async def dead_lettered(settings: Settings, ids: set[str]) -> dict[str, str]:
    """The DLQ reason of each of `ids`, once all are there."""
    consumer = AIOKafkaConsumer(
        settings.batch_dlq_topic, **kafka.connection(settings), group_id=None,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )  # fmt: skip
    await consumer.start()
    reasons: dict[str, str] = {}
    try:
        async with asyncio.timeout(120):
            while not ids <= reasons.keys():
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for r in records:
                        reasons[r.key.decode()] = dict(r.headers)["sluice.dlq.reason"].decode()
    finally:
        await consumer.stop()
    return reasons
