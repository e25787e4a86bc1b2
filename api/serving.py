"""Handlers of /generate: validate, enqueue on Kafka, relay the worker's events."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaProducer
from fastapi import HTTPException
from fastapi.responses import StreamingResponse

from api.errors import invalid_field
from api.schemas import GenerateBody, GenerateResponse
from api.streaming import Clock, Event, RequestFailed, StreamHub, collect, events, sse_frames
from shared.messages import GenerationRequest
from shared.prompts import prompt_token_ids
from shared.settings import Settings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class GenerateHandler:
    def __init__(
        self, settings: Settings, tokenizer: Any, producer: AIOKafkaProducer, hub: StreamHub
    ) -> None:
        self.settings = settings
        self.tokenizer = tokenizer
        self.producer = producer
        self.hub = hub

    def to_message(self, body: GenerateBody, tenant: str | None = None) -> GenerationRequest:
        """The wire message, or a 422 naming the field, before anything is enqueued."""
        limit = self.settings.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            raise invalid_field(
                "max_tokens", f"must be <= {limit} (SLUICE_MAX_TOKENS_LIMIT)", body.max_tokens
            )
        sampling = body.sampling(min(self.settings.default_max_tokens, limit))
        n_prompt = len(prompt_token_ids(self.tokenizer, body))
        context = self.settings.max_model_len
        if n_prompt + sampling.max_tokens > context:
            field = "prompt" if body.prompt is not None else "messages"
            raise invalid_field(
                field,
                f"is {n_prompt} tokens; with max_tokens={sampling.max_tokens} that exceeds "
                f"the model's context of {context} tokens",
                n_prompt,
            )
        now = time.time()
        # The API stops waiting at the timeout, so a worker must not start the request after.
        timeout = min(
            body.timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s
        )
        return GenerationRequest(
            request_id=uuid.uuid4().hex,
            prompt=body.prompt,
            messages=body.messages,
            sampling=sampling,
            enqueued_at=now,
            deadline=now + timeout,
            tenant=tenant,
        )

    async def _submit(self, message: GenerationRequest) -> asyncio.Queue[Event]:
        """Listen first, then enqueue: the first token can never beat the subscription."""
        rid = message.request_id
        queue = await self.hub.open(rid)
        try:
            await self.producer.send_and_wait(
                self.settings.requests_topic,
                value=message.model_dump_json().encode(),
                key=rid.encode(),
            )
        except Exception as e:
            await self.hub.close(rid)
            raise HTTPException(503, f"could not enqueue the request on Kafka: {e}") from e
        return queue

    async def submit(self, message: GenerationRequest) -> AsyncIterator[Event]:
        """Enqueue `message`; its events up to the terminal one. Enqueue failures raise here,
        before any response starts. The caller ends with `close(request_id)`."""
        clock = Clock(time.monotonic())
        queue = await self._submit(message)
        timeout = self.settings.request_timeout_s
        if message.deadline is not None:
            timeout = message.deadline - message.enqueued_at
        return events(queue, clock, timeout)

    async def close(self, request_id: str) -> None:
        await self.hub.close(request_id)

    async def stream(
        self, body: GenerateBody, prelude: bytes = b"", tenant: str | None = None
    ) -> StreamingResponse:
        """SSE of the completion; `prelude` (whole SSE events, e.g. RAG's `sources`) goes first."""
        message = self.to_message(body, tenant)
        source = await self.submit(message)

        async def frames() -> AsyncIterator[bytes]:
            try:
                if prelude:
                    yield prelude
                async for frame in sse_frames(source):
                    yield frame
            finally:
                await self.close(message.request_id)

        headers = {**SSE_HEADERS, "X-Request-Id": message.request_id}
        return StreamingResponse(frames(), media_type="text/event-stream", headers=headers)

    async def complete(self, body: GenerateBody, tenant: str | None = None) -> GenerateResponse:
        message = self.to_message(body, tenant)
        source = await self.submit(message)
        try:
            text, done = await collect(source)
        except RequestFailed as e:
            raise HTTPException(e.status, e.message) from e
        finally:
            await self.close(message.request_id)
        return GenerateResponse(
            request_id=done.request_id,
            text=text,
            finish_reason=done.finish_reason,
            usage=done.usage,
            timings=done.timings,
            cost_usd=done.cost_usd,
        )
