"""Where a request's output goes: streamed to its Redis channel (interactive requests), or
gathered into one `BatchResult` on the batch results topic (batch requests).

Either way the terminal call returns only once the outcome is stored (in Redis, in Kafka): only
then may the worker count the request as done and commit its offset.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from shared import batch_auth, kafka
from shared.messages import (
    BatchResult,
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    Timings,
    Token,
    TopLogprob,
    Usage,
)
from shared.settings import Settings
from workers.engines.base import TokenLogprobs
from workers.publisher import Publisher

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What a request has produced so far."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str = "stop"


def done_event(
    request: GenerationRequest, p: Progress, picked_at: float, dollars: float,
    worker_id: str | None = None,
) -> DoneEvent:  # fmt: skip
    """The terminal event of a request (the sinks of batch requests turn it into a
    BatchResult). Timings are from `enqueued_at`, the API's clock."""
    now = time.time()
    return DoneEvent(
        request_id=request.request_id,
        finish_reason=p.finish_reason,  # type: ignore[arg-type]
        usage=Usage(prompt_tokens=p.prompt_tokens, completion_tokens=p.completion_tokens),
        timings=Timings(
            queue_ms=_ms_since(request.enqueued_at, picked_at),
            ttft_ms=_ms_since(request.enqueued_at, p.first_token_at or now),
            e2e_ms=_ms_since(request.enqueued_at, now),
        ),
        cost_usd=dollars,
        worker_id=worker_id,
    )


class Sink(Protocol):
    # Each terminal call returns False when the request had been taken over by another worker
    # (fenced): nothing was stored, and the request is not this worker's to finish.
    def tokens(
        self, start: int, text: str, ids: tuple[int, ...], seconds: float,
        logprobs: tuple[TokenLogprobs, ...] = (),
    ) -> None: ...  # fmt: skip

    async def done(self, event: DoneEvent) -> bool: ...

    async def rejected(self, message: str) -> bool:
        """The engine refused the request."""

    async def failed(self, message: str) -> bool:
        """The engine failed on the request, or it was parked as a poison pill."""


class StreamSink:
    def __init__(
        self,
        publisher: Publisher,
        request_id: str,
        epoch: int,
        dead_letter: Callable[[str], Awaitable[None]],
        chars: int = 0,
        retain_s: int = 0,
    ) -> None:
        self._publisher = publisher
        self._rid = request_id
        self._epoch = epoch
        self._dead_letter = dead_letter
        self._chars = chars  # of text published so far: a token's offset
        self._retain_s = retain_s

    async def _finish(self, event: DoneEvent | ErrorEvent) -> bool:
        return await self._publisher.finish(self._rid, self._epoch, event, self._retain_s)

    def tokens(
        self, start: int, text: str, ids: tuple[int, ...], seconds: float,
        logprobs: tuple[TokenLogprobs, ...] = (),
    ) -> None:  # fmt: skip
        tokens = _tokens(start, len(ids), text, self._chars, logprobs)
        self._chars += len(text)
        self._publisher.tokens(self._rid, self._epoch, tokens, list(ids), self._chars, seconds)

    async def done(self, event: DoneEvent) -> bool:
        return await self._finish(event)

    async def rejected(self, message: str) -> bool:
        await self._dead_letter(f"rejected by engine: {message}")
        return await self._finish(ErrorEvent(request_id=self._rid, message=message, rejected=True))

    async def failed(self, message: str) -> bool:
        return await self._finish(
            ErrorEvent(request_id=self._rid, message=f"engine error: {message}")
        )


class ResultTopics:
    """Each tenant's batch results topic (shared/batch_auth.py), created when first needed."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._known: set[str] = set()

    async def ensure(self, tenant: str | None) -> str:
        topic = batch_auth.results_topic(self._settings, tenant)
        if topic not in self._known:
            await kafka.ensure_topic(self._settings, topic, self._settings.requests_partitions)
            self._known.add(topic)
        return topic

    def forget(self) -> None:
        """The broker lost its topics (a dev broker restarted): create them again."""
        self._known.clear()


class BatchSink:
    """Nobody watches a batch request stream: its text is gathered and produced once, keyed by
    request id. Rejections and failures become results too (`error` set), so that a submitter
    waiting for N results gets N. `finish` marks the request done for its owner; a worker
    fenced between producing and finishing has produced a duplicate (same request id)."""

    def __init__(
        self,
        producer: AIOKafkaProducer,
        topics: ResultTopics,
        request: GenerationRequest,
        finish: Callable[[], Awaitable[bool]],
    ) -> None:
        self._producer = producer
        self._topics = topics
        self._request = request
        self._finish = finish
        self._parts: list[str] = []
        self._chars = 0
        self._logprobs: list[Token] | None = [] if request.sampling.logprobs is not None else None

    def tokens(
        self, start: int, text: str, ids: tuple[int, ...], seconds: float,
        logprobs: tuple[TokenLogprobs, ...] = (),
    ) -> None:  # fmt: skip
        if self._logprobs is not None:
            tokens = _tokens(start, len(ids), text, self._chars, logprobs)
            self._logprobs.extend(t for t in tokens if t.logprob is not None)
        self._parts.append(text)
        self._chars += len(text)

    async def done(self, event: DoneEvent) -> bool:
        await self._send(
            event.finish_reason, event.usage, cost_usd=event.cost_usd, text="".join(self._parts),
            logprobs=self._logprobs,
        )  # fmt: skip
        return await self._finish()

    async def rejected(self, message: str) -> bool:
        await self._send("error", Usage(prompt_tokens=0, completion_tokens=0), error=message)
        return await self._finish()

    async def failed(self, message: str) -> bool:
        return await self.rejected(f"engine error: {message}")

    async def _send(self, finish_reason: str, usage: Usage, **fields: object) -> None:
        result = BatchResult(
            request_id=self._request.request_id,
            correlation=self._request.correlation,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            usage=usage,
            finished_at=time.time(),
            **fields,  # type: ignore[arg-type]
        )
        value, key = result.model_dump_json().encode(), result.request_id.encode()
        # The offset is committed only after this returns (at-least-once), so keep trying; a
        # worker that stops meanwhile cancels this and the request is redelivered.
        while True:
            try:
                topic = await self._topics.ensure(self._request.tenant)
                await self._producer.send_and_wait(topic, value=value, key=key)
                return
            except KafkaError as e:
                log.warning("producing the result of %s failed (%s); retrying", key, e)
                await asyncio.sleep(1.0)


def _ms_since(t: float, now: float) -> float:
    return round(max(0.0, now - t) * 1000, 2)


def _tokens(
    start: int, count: int, text: str, offset: int, logprobs: tuple[TokenLogprobs, ...] = ()
) -> list[Token]:
    """One event per token. When a delta holds several tokens (vLLM may group them), the text
    rides on the last one, so indices stay exact and the texts still concatenate. `offset`
    (where the text starts in the completion) lets the API trim a replayed generation that
    grouped tokens differently."""
    tokens = [
        Token(index=start + i, text=text if i == count - 1 else "", offset=offset)
        for i in range(count)
    ]
    for token, (own, logprob, top) in zip(tokens, logprobs, strict=False):
        token.token, token.logprob = own, logprob
        token.top_logprobs = [TopLogprob(token=t, logprob=lp) for t, lp in top]
    return tokens
