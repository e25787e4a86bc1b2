"""OpenAI's Batch API over the batch topics: create, read, list and cancel batches.

A batch's input file is validated line by line like the online endpoint would validate its
body; invalid lines go straight to its error file, valid ones onto `sluice.batch.requests`
(request id `<batch id>-<line>`, `correlation` = `custom_id`, deadline = the batch's expiry,
signed as the caller), where workers serve them with the capacity interactive traffic leaves.
Results come back through the batch collector (api/batch_collector.py), which records each line
once (by line, so by `custom_id`) and, with the batch's last line, writes its output and error
files. State lives in Redis, never in an API process:

- `{prefix}:batch:<id>`: a hash: `static` (what never changes, JSON), `status`, `completed`,
  `failed`, `<status>_at` times, `output_file_id`, `error_file_id`;
- `{prefix}:batch:<id>:lines`: line number -> `<line>\t<counter>\t<output or error line>`,
  until finalized;
- `{prefix}:batches:<tenant>` (listing) and `{prefix}:batches-open` (by expiry) sorted sets.

Status moves by compare-and-set (`_MOVE`), so with several API replicas exactly one finalizes,
cancels or expires a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException

from api.auth import Caller
from api.files import Files
from api.idempotency import Key
from api.openai_embeddings import EmbeddingsHandler
from api.openai_protocol import (
    AssistantMessage,
    BatchCreate,
    BatchList,
    BatchObject,
    BatchRequestCounts,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    UsageInfo,
)
from api.openai_serving import (
    CompletionChunks,
    OpenAIError,
    OpenAIHandler,
    chat_logprobs,
    from_validation,
)
from shared import batch, pools
from shared import redis as sredis
from shared.messages import BatchEmbedding, BatchResult, GenerationRequest
from shared.settings import Settings

# What a valid line becomes: a generation request for the workers, or an embeddings line
Line = GenerationRequest | BatchEmbedding

WINDOW_S = 24 * 3600  # completion_window "24h", the only one OpenAI offers
OPEN = ("validating", "in_progress", "cancelling")

# KEYS[1] the batch; ARGV: allowed statuses (comma-separated), the new one, the time. 1 if moved.
_MOVE = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 0 end
for allowed in string.gmatch(ARGV[1], '[^,]+') do
  if allowed == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[2] .. '_at', ARGV[3])
    return 1
  end
end
return 0
"""
# KEYS[1] the batch, KEYS[2] its lines; ARGV: line number, text, counter. Records a line once,
# while the batch is open; returns {recorded (0/1), lines done, total, status}.
_RECORD = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status or status == 'finalizing' or redis.call('HEXISTS', KEYS[1], 'finalized') == 1 then
  return {0, 0, 0, status or ''}
end
local fresh = redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2])
if fresh == 1 then redis.call('HINCRBY', KEYS[1], ARGV[3], 1) end
local done = redis.call('HLEN', KEYS[2])
local total = cjson.decode(redis.call('HGET', KEYS[1], 'static'))['total']
return {fresh, done, total, status}
"""


class Static(BaseModel):
    """What a batch is, set at creation."""

    id: str
    tenant: str
    endpoint: str
    model: str
    input_file_id: str
    created_at: int
    expires_at: int
    total: int
    metadata: dict[str, str] | None = None


class Batches:
    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        producer: AIOKafkaProducer,
        files: Files,
        openai: OpenAIHandler,
        embeddings: EmbeddingsHandler,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.producer = producer
        self.files = files
        self.openai = openai
        self.embeddings = embeddings
        self._move = redis.register_script(_MOVE)
        self._record = redis.register_script(_RECORD)

    def key(self, batch_id: str) -> str:
        return f"{self.settings.redis_prefix}:batch:{batch_id}"

    def open_key(self) -> str:
        return f"{self.settings.redis_prefix}:batches-open"

    def _index(self, tenant: str) -> str:
        return f"{self.settings.redis_prefix}:batches:{tenant}"

    # -- the API's side ----------------------------------------------------------------------

    async def create(
        self, body: BatchCreate, caller: Caller, key: Key | None = None
    ) -> BatchObject:
        """Under an Idempotency-Key already used, the batch it created (api/idempotency.py)."""
        if key is None:
            return await self._create(body, caller)
        keys = self.openai.generate.idempotency
        held = await keys.claim(key)
        if held is not None:
            return await self.get(held.ids[0], caller.tenant)
        try:
            batch = await self._create(body, caller)
        except BaseException:
            with contextlib.suppress(RedisError):
                await keys.forget(key)
            raise
        await keys.enqueued(key, [batch.id])
        return batch

    async def _create(self, body: BatchCreate, caller: Caller) -> BatchObject:
        source = await self.files.get(body.input_file_id, caller.tenant)
        if source.purpose != "batch":
            why = f"{source.id} has purpose {source.purpose}, not batch"
            raise OpenAIError(400, why, "input_file_id")
        lines = (await self.files.content(source.id, caller.tenant)).decode("utf-8", "replace")
        numbered = [(n, text) for n, text in enumerate(lines.splitlines()) if text.strip()]
        most = self.settings.max_batch_lines
        if not 1 <= len(numbered) <= most:
            why = f"the file has {len(numbered)} lines; 1 to {most} (SLUICE_MAX_BATCH_LINES)"
            raise OpenAIError(400, why, "input_file_id")
        now = int(time.time())
        static = Static(
            id=f"batch_{uuid.uuid4().hex}", tenant=caller.tenant, endpoint=body.endpoint,
            model=self.settings.model, input_file_id=source.id, created_at=now,
            expires_at=now + WINDOW_S, total=len(numbered), metadata=body.metadata,
        )  # fmt: skip
        key = self.key(static.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"static": static.model_dump_json(), "status": "validating",
                                    "completed": 0, "failed": 0})  # fmt: skip
            pipe.zadd(self._index(caller.tenant), {static.id: now})
            pipe.zadd(self.open_key(), {static.id: static.expires_at})
            await pipe.execute()
        good, bad = await self._validate(static, numbered)
        for line, custom_id, message in bad:
            text = error_line(static.id, line, custom_id, "invalid_request", message)
            await self.record_line(static.id, line, text, failed=True)
        try:
            await self._send(good, caller)
        except Exception as e:  # Kafka: what was sent may run, but the batch is given up
            await self._move(keys=[key], args=["validating", "failed", time.time()])
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, "finalized", 1)
                pipe.delete(key + ":lines")
                pipe.zrem(self.open_key(), static.id)
                await pipe.execute()
            raise OpenAIError(503, "could not enqueue the batch's lines (Kafka unavailable)") from e
        await self._move(keys=[key], args=["validating", "in_progress", time.time()])
        await self.finish_if_done(static.id)
        return await self.get(static.id, caller.tenant)

    async def _send(self, lines: list[Line], caller: Caller) -> None:
        """Generation lines to the batch topic, signed as the caller; embeddings lines to the
        API processes' topic (api/batch_embedder.py)."""
        signer = None
        if caller.key_id is not None and caller.signing_secret is not None:
            signer = (caller.key_id, caller.signing_secret)
        sent = []
        for line in lines:
            if isinstance(line, BatchEmbedding):
                value = line.model_dump_json().encode()
                key = f"{line.batch_id}-{line.line}".encode()
                topic = self.settings.batch_embeddings_topic
                sent.append(await self.producer.send(topic, value=value, key=key))
            else:  # to its model's pool (shared/pools.py)
                pool = pools.pool_settings(self.settings, line.model or self.settings.model)
                sent.append(
                    await batch.send(self.producer, pool.batch_requests_topic, line, signer)
                )
        await asyncio.gather(*sent)

    async def _validate(
        self, static: Static, numbered: list[tuple[int, str]]
    ) -> tuple[list[Line], list[tuple[int, str | None, str]]]:
        """The lines' requests, and (line, custom_id, why) of those that cannot be sent."""
        good: list[Line] = []
        bad: list[tuple[int, str | None, str]] = []
        seen: set[str] = set()
        for n, text in numbered:
            custom_id = None
            try:
                line = json.loads(text)
                custom_id = line.get("custom_id") if isinstance(line, dict) else None
                request = await self._request(static, n, line, seen)
            except OpenAIError as e:
                error = e.body.error  # the message names the param, as the error file has no field
                named = error.param is None or error.param in error.message
                bad.append(
                    (n, custom_id, error.message if named else f"{error.param}: {error.message}")
                )
            except ValueError as e:  # JSON, or a line's own shape
                bad.append((n, custom_id, f"line {n + 1}: {e}"))
            else:
                seen.add(custom_id or "")
                good.append(request)
        return good, bad

    async def _request(self, static: Static, n: int, line: Any, seen: set[str]) -> Line:
        if not isinstance(line, dict) or set(line) - {"custom_id", "method", "url", "body"}:
            raise ValueError('each line is {"custom_id", "method", "url", "body"}')
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 256:
            raise ValueError("custom_id: a string of 1 to 256 characters")
        if custom_id in seen:
            raise ValueError(f"custom_id {custom_id!r} is used by an earlier line")
        if line.get("method") != "POST" or line.get("url") != static.endpoint:
            raise ValueError(f"method and url: POST {static.endpoint}, the batch's endpoint")
        body = line.get("body")
        if not isinstance(body, dict) or body.get("stream"):
            raise ValueError("body: the endpoint's JSON body, without stream")
        try:
            if static.endpoint == "/v1/embeddings":
                await self.embeddings.checked(EmbeddingRequest.model_validate(body))
                return BatchEmbedding(
                    batch_id=static.id, line=n, custom_id=custom_id, tenant=static.tenant,
                    body=body,
                )  # fmt: skip
            if static.endpoint == "/v1/chat/completions":
                chat = ChatCompletionRequest.model_validate(body)
                validated = await self.openai.chat_message(chat, static.tenant)
            else:
                completion = CompletionRequest.model_validate(body)
                validated = await self.openai.completion_message(completion, static.tenant)
        except ValidationError as e:
            raise from_validation(RequestValidationError(e.errors())) from e
        except Exception as e:  # the online checks' 4xx (RequestValidationError, HTTPException)
            raise _as_openai(e) from e
        if (body.get("n") or 1) != 1:
            raise ValueError("n: one choice per line in batches (a line per choice instead)")
        return validated.message.model_copy(update={
            "request_id": f"{static.id}-{n}", "correlation": custom_id,
            "deadline": float(static.expires_at),
        })  # fmt: skip

    async def get(self, batch_id: str, tenant: str) -> BatchObject:
        raw = await self.redis.hgetall(self.key(batch_id)) if batch_id.startswith("batch_") else {}
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        static = Static.model_validate_json(fields["static"]) if "static" in fields else None
        if static is None or static.tenant != tenant:
            raise OpenAIError(404, f"No such Batch object: {batch_id}", "batch_id")
        return _object(static, fields)

    async def list(self, tenant: str, after: str | None, limit: int) -> BatchList:
        ids = [i.decode() for i in await self.redis.zrevrange(self._index(tenant), 0, -1)]
        if after is not None and after in ids:
            ids = ids[ids.index(after) + 1 :]
        page = [await self.get(i, tenant) for i in ids[:limit]]
        return BatchList(
            data=page, first_id=page[0].id if page else None,
            last_id=page[-1].id if page else None, has_more=len(ids) > limit,
        )  # fmt: skip

    async def cancel(self, batch_id: str, tenant: str) -> BatchObject:
        batch = await self.get(batch_id, tenant)
        key = self.key(batch_id)
        if await self._move(keys=[key], args=["validating,in_progress", "cancelling", time.time()]):
            await self.stop_lines(batch_id, batch.request_counts.total, batch.expires_at)
            await self.finish_if_done(batch_id)
        elif batch.status not in ("cancelling", "cancelled"):
            raise OpenAIError(400, f"batch {batch_id} is {batch.status}: it cannot be cancelled")
        return await self.get(batch_id, tenant)

    async def stop_lines(self, batch_id: str, total: int, until: int) -> None:
        """Cancel every line still queued or running: workers drop queued ones unrun and
        stop running ones (their results say `abort`). Marks last until the batch's expiry."""
        rids = [f"{batch_id}-{n}" for n in range(total)]
        await sredis.cancel_many(self.redis, self.settings, rids, "cancelled", until - time.time())

    # -- the collector's side (api/batch_collector.py) ---------------------------------------

    async def record_result(self, result: BatchResult) -> None:
        """One line's result, recorded once; the batch's last line finalizes it."""
        batch_id, _, line = result.request_id.rpartition("-")
        raw = await self.redis.hget(self.key(batch_id), "static")
        if raw is None or not line.isdigit():
            return  # not a Batch API line (e.g. `sluice batch`), or a deleted batch
        static = Static.model_validate_json(raw)
        n, custom_id = int(line), result.correlation or f"line {int(line) + 1}"
        if result.finish_reason in ("stop", "length"):
            text = output_line(static, n, custom_id, result)
            failed = False
        else:
            code = {"abort": "batch_cancelled", "timeout": "batch_expired"}.get(
                result.finish_reason, "server_error"
            )
            message = result.error or f"the request ended with {result.finish_reason}"
            text = error_line(static.id, n, custom_id, code, message)
            failed = True
        await self.record_line(static.id, n, text, failed)
        await self.finish_if_done(static.id)

    async def record_line(self, batch_id: str, line: int, text: str, failed: bool) -> None:
        """Once per line: by line number, as good as by `custom_id` (unique in a batch)."""
        counter = "failed" if failed else "completed"
        args = [str(line), f"{line}\t{counter}\t{text}", counter]
        await self._record(keys=[self.key(batch_id), self.key(batch_id) + ":lines"], args=args)

    async def finish_if_done(self, batch_id: str) -> None:
        key = self.key(batch_id)
        static_raw, status = await self.redis.hmget(key, ["static", "status"])
        if static_raw is None or status is None:
            return
        static = Static.model_validate_json(static_raw)
        if await self.redis.hlen(key + ":lines") < static.total:
            return
        final = {b"in_progress": "completed", b"cancelling": "cancelled"}.get(status)
        if final is not None and await self._move(
            keys=[key], args=[status.decode(), "finalizing", time.time()]
        ):
            await self.finalize(static, final)

    async def expire(self, batch_id: str) -> None:
        """Past its window: cancel what still runs, finalize with what is done."""
        key = self.key(batch_id)
        static_raw = await self.redis.hget(key, "static")
        if static_raw is None:
            await self.redis.zrem(self.open_key(), batch_id)
            return
        if await self._move(keys=[key], args=[",".join(OPEN), "finalizing", time.time()]):
            static = Static.model_validate_json(static_raw)
            await self.stop_lines(static.id, static.total, int(time.time()) + 3600)
            await self.finalize(static, "expired")

    async def finalize(self, static: Static, final: str) -> None:
        """Write the output and error files (lines in input order; lines never answered are
        errors), then the final status. Only the process that moved it to finalizing runs it."""
        key = self.key(static.id)
        lines = [
            v.decode().split("\t", 2) for v in (await self.redis.hgetall(key + ":lines")).values()
        ]
        done = sorted((int(n), counter, text) for n, counter, text in lines)
        answered = {n for n, _, _ in done}
        code = "batch_expired" if final == "expired" else "batch_cancelled"
        missing = [
            (n, "failed", error_line(static.id, n, None, code, f"the batch was {final} first"))
            for n in range(static.total)
            if n not in answered
        ]
        outputs = [text for _, counter, text in done if counter == "completed"]
        errors = [text for _, counter, text in sorted(done + missing) if counter == "failed"]
        ids: dict[str, str] = {}
        for name, texts in (("output_file_id", outputs), ("error_file_id", errors)):
            if texts:
                data = "".join(t + "\n" for t in texts).encode()
                file = await self.files.create(
                    static.tenant, f"{static.id}_{name.split('_')[0]}.jsonl", data, "batch_output"
                )
                ids[name] = file.id
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={
                **ids, "status": final, f"{final}_at": time.time(), "finalized": 1,
                "failed": len(errors), "completed": len(outputs),
            })  # fmt: skip
            pipe.delete(key + ":lines")
            pipe.zrem(self.open_key(), static.id)
            await pipe.execute()


def output_line(static: Static, n: int, custom_id: str, result: BatchResult) -> str:
    rid, usage = result.request_id, result.usage
    info = UsageInfo(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )  # fmt: skip
    head = {"id": rid, "created": int(result.finished_at), "model": static.model,
            "usage": info, "sluice_cost_usd": result.cost_usd}  # fmt: skip
    body: BaseModel
    tokens = result.logprobs or []
    if static.endpoint == "/v1/chat/completions":
        choice = ChatChoice(message=AssistantMessage(content=result.text),
                            finish_reason=result.finish_reason,
                            logprobs=chat_logprobs(tokens))  # fmt: skip
        body = ChatCompletionResponse(**{**head, "id": f"chatcmpl-{rid}"}, choices=[choice])
    else:
        legacy = CompletionChunks(f"cmpl-{rid}", static.model).logprobs(tokens, 0)
        choice2 = CompletionChoice(
            text=result.text, finish_reason=result.finish_reason, logprobs=legacy
        )
        body = CompletionResponse(**{**head, "id": f"cmpl-{rid}"}, choices=[choice2])
    return json.dumps({
        "id": f"batch_req_{rid}", "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": rid, "body": body.model_dump()},
        "error": None,
    })  # fmt: skip


def embedding_line(rid: str, custom_id: str, response: EmbeddingResponse) -> str:
    return json.dumps({
        "id": f"batch_req_{rid}", "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": rid, "body": response.model_dump()},
        "error": None,
    })  # fmt: skip


def error_line(batch_id: str, n: int, custom_id: str | None, code: str, message: str) -> str:
    return json.dumps({
        "id": f"batch_req_{batch_id}-{n}", "custom_id": custom_id, "response": None,
        "error": {"code": code, "message": message},
    })  # fmt: skip


def _object(static: Static, fields: dict[str, str]) -> BatchObject:
    def at(status: str) -> int | None:
        value = fields.get(f"{status}_at")
        return int(float(value)) if value else None

    return BatchObject(
        id=static.id, endpoint=static.endpoint,  # type: ignore[arg-type]
        input_file_id=static.input_file_id, status=fields["status"],  # type: ignore[arg-type]
        output_file_id=fields.get("output_file_id"), error_file_id=fields.get("error_file_id"),
        created_at=static.created_at, in_progress_at=at("in_progress"),
        expires_at=static.expires_at, finalizing_at=at("finalizing"),
        completed_at=at("completed"), failed_at=at("failed"), expired_at=at("expired"),
        cancelling_at=at("cancelling"), cancelled_at=at("cancelled"),
        request_counts=BatchRequestCounts(
            total=static.total, completed=int(fields.get("completed", 0)),
            failed=int(fields.get("failed", 0)),
        ),
        metadata=static.metadata, sluice_tenant=static.tenant,
    )  # fmt: skip


def _as_openai(error: Exception) -> OpenAIError:
    if isinstance(error, OpenAIError):
        return error
    if isinstance(error, RequestValidationError):
        return from_validation(error)
    if isinstance(error, HTTPException):
        return OpenAIError(400, str(error.detail))
    raise error
