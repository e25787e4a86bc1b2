"""Idempotency-Key: a retried request is not enqueued again.

One Redis record per (tenant, key) for SLUICE_IDEMPOTENCY_S: a digest of the route and body,
the ids of the request(s) it started, and whether they are on Kafka yet. The first request
claims the record (SET NX) and enqueues; a retry with the same body gets the record and
attaches to those requests: their events, which the worker keeps as long as the record
(`GenerationRequest.retain_s`), replay from the start (or from Last-Event-ID) and then go on
live, so a finished request answers with its stored result and a running one is joined. The
same key with another body is a 422 (on /v1 too, in OpenAI's error shape). A retry that
arrives while the first is still being accepted (retrieval, tokenizing: milliseconds to a
second) waits for it a little, then gets a 409, as Stripe answers a concurrent retry. A
request that failed before it was enqueued gives its key back. Requests under a key are not
cancelled when their client leaves: the retry is expected, and it finds them running.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from redis.asyncio import Redis

from api.auth import Caller
from api.errors import invalid_field
from shared.settings import Settings

ACCEPT_WAIT_S = 5.0
POLL_S = 0.1
HEADER = "Idempotency-Key"
KEY_REUSED = "idempotency_key_reused"  # a 422 on /v1 too (api/openai_serving.from_validation)
STREAMING = {"stream", "stream_options"}  # how the result is delivered, not what it is


@dataclass(frozen=True)
class Key:
    redis_key: str
    digest: str  # of the route and the body


@dataclass
class Record:
    digest: str
    state: Literal["accepting", "enqueued"] = "accepting"
    ids: list[str] = field(default_factory=list)  # one request per choice; a batch's id
    deadline: float | None = None
    extra: Any = None  # what the response holds beside the completion (RAG's sources)

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


class Idempotency:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings

    @property
    def window_s(self) -> int:
        return self._settings.idempotency_s

    def key(self, caller: Caller, header: str | None, route: str, body: BaseModel) -> Key | None:
        """None without the header. The body is compared as parsed, so a retry that serializes
        it differently (key order, spacing) is still the same request; and without `stream`:
        a streamed retry of a request gets its result as a stream, and the other way round."""
        if header is None:
            return None
        if not header.strip():
            raise invalid_field(HEADER.lower(), "must not be empty", header, where="header")
        fields = body.model_dump(mode="json", exclude_unset=True, exclude=STREAMING)
        canonical = json.dumps([route, fields], sort_keys=True)
        digest = hashlib.sha256(canonical.encode()).hexdigest()
        named = hashlib.sha256(header.encode()).hexdigest()[:32]
        return Key(self._settings.idempotency_key(caller.tenant, named), digest)

    async def claim(self, key: Key) -> Record | None:
        """None: the key is new and now this request's; enqueue, then `enqueued`. Otherwise the
        record of the request it names, once that is on Kafka."""
        mine = Record(key.digest)
        if await self._redis.set(key.redis_key, mine.dumps(), nx=True, ex=self.window_s):
            return None
        waited_until = time.monotonic() + ACCEPT_WAIT_S
        while True:
            raw = await self._redis.get(key.redis_key)
            if raw is None:  # the first attempt failed and gave the key back: this one goes
                if await self._redis.set(key.redis_key, mine.dumps(), nx=True, ex=self.window_s):
                    return None
                continue
            held = Record(**json.loads(raw))
            if held.digest != key.digest:
                raise RequestValidationError([{
                    "type": KEY_REUSED, "loc": ("header", HEADER.lower()), "input": None,
                    "msg": f"this {HEADER} was used with another request body (or route)",
                }])  # fmt: skip
            if held.state == "enqueued":
                return held
            if time.monotonic() > waited_until:
                raise HTTPException(
                    409, f"a request with this {HEADER} is still being accepted; retry shortly"
                )
            await asyncio.sleep(POLL_S)

    async def enqueued(
        self, key: Key, ids: list[str], deadline: float | None = None, extra: Any = None
    ) -> None:
        """The key's request(s) are on Kafka: retries attach to them from now on."""
        record = Record(key.digest, "enqueued", ids, deadline, extra)
        await self._redis.set(key.redis_key, record.dumps(), xx=True, keepttl=True)

    async def forget(self, key: Key) -> None:
        """The request failed before it was enqueued: a retry may go again."""
        await self._redis.delete(key.redis_key)
