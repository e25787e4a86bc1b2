"""Handlers of /generate: validate, enqueue on Kafka, relay the worker's events."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from aiokafka import AIOKafkaProducer
from fastapi import HTTPException
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from api.auth import ANONYMOUS, Caller, bind
from api.errors import invalid_field, unavailable
from api.idempotency import Idempotency, Key
from api.ratelimit import RateLimiter
from api.routing import Router, Served
from api.schemas import GenerateBody, GenerateResponse
from api.streaming import (
    Clock,
    Completion,
    Event,
    Relayed,
    Relaying,
    RequestFailed,
    StreamHub,
    collect,
    events,
    sse_frames,
)
from shared import pools, tracing
from shared import redis as sredis
from shared.messages import ADAPTER, GenerationRequest, TokensEvent
from shared.pools import UnknownModel
from shared.prompts import prompt_token_ids
from shared.settings import Settings
from shared.tracing import Tracer

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# At the deadline the worker ends the request itself (finish_reason "timeout", text so far);
# the API waits this much longer for that answer, so its 504 means no worker answered at all,
# not that the client's own `timeout_s` passed.
DEADLINE_GRACE_S = 5.0
HANGUP_POLL_S = 0.5
HungUp = Callable[[], Awaitable[bool]]  # Starlette's Request.is_disconnected
log = logging.getLogger(__name__)


class Validated(NamedTuple):
    """A wire message that passed the API's checks, its prompt's length in tokens (counted
    once, for the context check, and used again by the token rate limit) and what its Kafka
    key derives from (api/affinity.py)."""

    message: GenerationRequest
    prompt_tokens: int
    affinity: str = ""


def _relayed(backlog: list[Event], last_index: int) -> Relayed:
    """What a client that saw tokens up to `last_index` already has."""
    relayed = Relayed()
    for event in backlog:
        if isinstance(event, TokensEvent):
            seen = [t for t in event.tokens if t.index <= last_index]
            if seen:
                relayed.fresh(TokensEvent(tokens=seen))
    return relayed


def _unstamped(event: Event) -> Event:
    if isinstance(event, TokensEvent) and event.published_at is not None:
        return event.model_copy(update={"published_at": None})
    return event


class Relay(NamedTuple):
    """One connection's relay of a request: its queue (ended with `release`), the events read
    from it, how many times the stream had been resumed when it opened, and whether the request
    runs on when the client leaves (under an Idempotency-Key, whose retry will attach to it)."""

    request_id: str
    queue: asyncio.Queue[Event]
    events: AsyncIterator[Relaying]
    generation: int = 0
    keep: bool = False


# Builds the wire messages of a request with a given id: one per choice (`n` on /v1), and what
# its response holds beside the completion (RAG's sources), kept for Idempotency-Key retries.
Build = Callable[[str], Awaitable[tuple[list[Validated], Any]]]


def new_request_id() -> str:
    return uuid.uuid4().hex  # random: request ids are bound to their key, never guessed


class GenerateHandler:
    def __init__(
        self,
        settings: Settings,
        tokenizer: Any,
        producer: AIOKafkaProducer,
        hub: StreamHub,
        tracer: Tracer | None = None,
    ) -> None:
        self.settings = settings
        self.tracer = tracer or Tracer(settings, None, "sluice-api")
        self.tokenizer = tokenizer  # the default model's
        self.producer = producer
        self.hub = hub
        self.router = Router(settings, tokenizer, hub)
        self.limiter = RateLimiter(hub.redis, settings)
        self.idempotency = Idempotency(hub.redis, settings)
        self._cleanups: set[asyncio.Task[None]] = set()

    async def to_message(
        self, body: GenerateBody, tenant: str | None = None, request_id: str | None = None
    ) -> Validated:
        """The wire message, or a 422 naming the field, before anything is enqueued (a 404 for
        a model no pool serves). `request_id`: one already admitted for a retrieval
        (api/ratelimit.py); else a new one."""
        try:
            pool = await self.router.get(body.model)
        except UnknownModel:
            raise HTTPException(404, f"model {body.model!r} is not served") from None
        most = self.settings.max_messages
        if body.messages is not None and len(body.messages) > most:
            # Before tokenizing: the chat template's cost grows with every message.
            raise invalid_field(
                "messages", f"has {len(body.messages)}; at most {most} (SLUICE_MAX_MESSAGES)"
            )
        limit = self.settings.max_tokens_limit
        if body.max_tokens is not None and body.max_tokens > limit:
            raise invalid_field(
                "max_tokens", f"must be <= {limit} (SLUICE_MAX_TOKENS_LIMIT)", body.max_tokens
            )
        sampling = body.sampling(min(self.settings.default_max_tokens, limit))
        vocabulary = len(pool.tokenizer) if sampling.stop_token_ids else 0
        if any(i >= vocabulary for i in sampling.stop_token_ids):
            raise invalid_field(
                "stop_token_ids", f"token ids are below {vocabulary} (the model's vocabulary)",
                sampling.stop_token_ids,
            )  # fmt: skip
        context = pool.settings.max_model_len
        field = "prompt" if body.prompt is not None else "messages"
        # A cheap bound first: no token covers more than `token_chars` characters, so a text
        # this long cannot fit, and tokenizing it (0.7 s for 1 MiB) would be for nothing.
        chars = len(body.prompt or "") + sum(len(m.content) for m in body.messages or ())
        at_least = math.ceil(chars / pool.token_chars)
        if at_least + sampling.max_tokens > context:
            raise invalid_field(
                field,
                f"is at least {at_least} tokens ({chars} characters); with max_tokens="
                f"{sampling.max_tokens} that exceeds the model's context of {context} tokens",
                f"{chars} characters",
            )
        # Off the event loop: the streams this process relays do not wait for it.
        prompt_ids = await asyncio.to_thread(prompt_token_ids, pool.tokenizer, body)
        n_prompt = len(prompt_ids)
        if n_prompt + sampling.max_tokens > context:
            raise invalid_field(
                field,
                f"is {n_prompt} tokens; with max_tokens={sampling.max_tokens} that exceeds "
                f"the model's context of {context} tokens",
                n_prompt,
            )
        adapter = body.model if body.model in pools.adapters(pool.settings) else None
        now = time.time()
        # The API stops waiting at the timeout, so a worker must not start the request after.
        timeout = min(
            body.timeout_s or self.settings.request_timeout_s, self.settings.request_timeout_s
        )
        message = GenerationRequest(
            request_id=request_id or new_request_id(),
            prompt=body.prompt,
            messages=body.messages,
            sampling=sampling,
            enqueued_at=now,
            deadline=now + timeout,
            tenant=tenant,
            requires=sampling.features() + ([ADAPTER] if adapter else []),
            model=pool.settings.model,
            adapter=adapter,
        )
        affinity = pool.affinity.affinity(prompt_ids, message.tenant or "", body.user)
        return Validated(message, n_prompt, affinity)

    async def _submit(
        self, message: GenerationRequest, caller: Caller, pool: Served, key: str
    ) -> asyncio.Queue[Event]:
        """Listen first, then enqueue on the pool's topic: the first token can never beat the
        subscription."""
        rid = message.request_id
        queue = await self.hub.open(rid)
        traceparent = self.tracer.start(rid, caller.traceparent, name="sluice.api.request")
        self.tracer.hop(rid, tracing.API_ACCEPTED)
        try:
            sent = await self.producer.send_and_wait(
                pool.settings.requests_topic,
                value=message.model_dump_json().encode(),
                key=key.encode(),
                headers=[(tracing.TRACEPARENT, traceparent.encode())],
            )
        except Exception as e:
            await self.hub.close(rid, queue)
            self.tracer.end(rid)
            raise unavailable("could not enqueue the request (Kafka unavailable)", e) from e
        self.tracer.hop(rid, tracing.KAFKA_PRODUCED, partition=sent.partition, offset=sent.offset)
        return queue

    async def relays(
        self, caller: Caller, key: Key | None, build: Build, last_event_id: int = -1
    ) -> tuple[list[Relay], Any]:
        """The relays of a request's choices, enqueued from `build`'s messages; or, under an
        Idempotency-Key already used, of the request(s) it names (api/idempotency.py), replayed
        after `last_event_id`. Failures raise here, before any response starts."""
        if key is None:
            requests, extra = await build(new_request_id())
            return await self._submit_all(requests, caller), extra
        held = await self.idempotency.claim(key)
        if held is not None:
            return await self._attach_all(held.ids, held.deadline, last_event_id), held.extra
        try:
            requests, extra = await build(new_request_id())
            window = {"retain_s": self.idempotency.window_s}
            kept = [r._replace(message=r.message.model_copy(update=window)) for r in requests]
            relays = await self._submit_all(kept, caller, keep=True)
        except BaseException:
            with contextlib.suppress(RedisError):
                await self.idempotency.forget(key)
            raise
        ids = [r.request_id for r in relays]
        try:
            await self.idempotency.enqueued(key, ids, requests[0].message.deadline, extra)
        except RedisError as e:  # this answer still comes; a retry would wait, then get a 409
            log.warning("could not record Idempotency-Key of %s: %s", ids[0], e)
        return relays, extra

    async def _submit_all(
        self, requests: list[Validated], caller: Caller, keep: bool = False
    ) -> list[Relay]:
        """All or none: a choice that cannot be enqueued cancels those that were."""
        relays: list[Relay] = []
        try:
            for request in requests:
                relays.append(await self.submit(request, caller, keep))
        except BaseException:
            for relay in relays:
                self.release(relay._replace(keep=False), finished=False)
            raise
        return relays

    async def _attach_all(
        self, ids: list[str], deadline: float | None, last_event_id: int
    ) -> list[Relay]:
        relays: list[Relay] = []
        try:
            for rid in ids:
                relays.append(await self.attach(rid, deadline, last_event_id))
        except BaseException:
            for relay in relays:
                self.release(relay, finished=False)  # kept: their requests run on
            raise
        return relays

    async def submit(
        self, request: Validated, caller: Caller = ANONYMOUS, keep: bool = False
    ) -> Relay:
        """Enqueue the request; its events up to the terminal one. Enqueue failures raise here,
        before any response starts. The caller ends with `release`."""
        message = request.message
        clock = Clock(time.monotonic(), model=message.adapter or message.model or "")
        pool = await self.router.get(message.model)  # to_message checked that it is served
        await self._admit(request, caller, pool)
        try:
            key = pool.affinity.claim(message.request_id, request.affinity)
            queue = await self._submit(message, caller, pool, key)
        except BaseException:
            self.router.release(message.request_id)
            raise
        timeout = self.settings.request_timeout_s
        if message.deadline is not None:
            timeout = message.deadline - message.enqueued_at
        mark = functools.partial(self.tracer.hop, message.request_id)
        waiting = pool.admission.waiting
        source = events(queue, clock, timeout + DEADLINE_GRACE_S, mark=mark, waiting=waiting)
        return Relay(message.request_id, queue, source, keep=keep)

    async def close(self, request_id: str, queue: asyncio.Queue[Event]) -> int:
        """End one connection's relay; returns how many others of this process still relay it.
        The request stops counting as its tenant's with the last of them."""
        others = await self.hub.close(request_id, queue)
        if not others:
            self.router.release(request_id)
        return others

    async def _admit(self, request: Validated, caller: Caller, pool: Served) -> None:
        """By key first (its rate limits), then by its pool's capacity, which so counts only
        requests their key allowed: a key over its limit cannot fill the queue for everyone. A
        request the capacity check refuses costs its key no quota. Then the id is bound to the
        caller, for the routes that act on a request id (`api.auth.owns`)."""
        message = request.message
        rid = message.request_id
        tokens = request.prompt_tokens + message.sampling.max_tokens
        await self.limiter.admit(caller, rid, tokens)
        try:
            await pool.admission.check(caller.tenant, rid)
        except HTTPException:
            with contextlib.suppress(RedisError):
                await self.limiter.refund(caller, rid, tokens)
            raise
        try:
            await bind(self.hub.redis, self.settings, rid, caller)
        except RedisError as e:
            self.router.release(rid)
            raise unavailable("could not record the request (Redis unavailable)", e) from e

    def one(self, body: GenerateBody, tenant: str) -> Build:
        async def build(request_id: str) -> tuple[list[Validated], Any]:
            return [await self.to_message(body, tenant, request_id)], None

        return build

    async def stream(
        self, body: GenerateBody, caller: Caller = ANONYMOUS, key: Key | None = None,
        last_event_id: int = -1,
    ) -> StreamingResponse:  # fmt: skip
        """SSE of the completion. A client that goes away before the end cancels the request
        (unless it came with an Idempotency-Key)."""
        relays, _ = await self.relays(caller, key, self.one(body, caller.tenant), last_event_id)
        return self.sse(relays[0])

    async def resume(self, request_id: str, last_event_id: int) -> StreamingResponse:
        """The rest of a request's stream after token `last_event_id`, from its Redis stream and
        then live: for clients whose connection (or API) went away mid-stream. From now on
        this connection is the request's: the earlier one, if the API has not noticed yet that
        it is gone, no longer cancels the request when it ends."""
        queue = await self.hub.open(request_id)
        try:
            backlog = await self.hub.backlog(request_id)
            generation = await self._resumed(request_id) if backlog is not None else 0
        except Exception:
            await self.close(request_id, queue)
            raise
        if backlog is None:
            await self.close(request_id, queue)
            raise HTTPException(404, f"no stream for request {request_id} (unknown or expired)")
        source = self._replay(queue, backlog, last_event_id, self.settings.request_timeout_s)
        return self.sse(Relay(request_id, queue, source, generation))

    async def attach(self, request_id: str, deadline: float | None, last_event_id: int) -> Relay:
        """Relay a request someone else submitted (an Idempotency-Key's): what it published so
        far, then live. It may still wait in Kafka with nothing published; it ends by its
        deadline. Nothing published and the deadline long past: the result is gone."""
        queue = await self.hub.open(request_id)
        try:
            backlog = await self.hub.backlog(request_id)
        except Exception:
            await self.close(request_id, queue)
            raise
        left = (deadline or time.time()) - time.time()
        if backlog is None and left < -DEADLINE_GRACE_S:
            await self.close(request_id, queue)
            raise HTTPException(404, f"the result of request {request_id} is no longer kept")
        source = self._replay(queue, backlog or [], last_event_id, left + DEADLINE_GRACE_S)
        return Relay(request_id, queue, source, keep=True)

    def _replay(
        self, queue: asyncio.Queue[Event], backlog: list[Event], last_event_id: int, timeout: float
    ) -> AsyncIterator[Relaying]:
        live = [queue.get_nowait() for _ in range(queue.qsize())]
        # Stored events were delivered long ago, maybe: not samples of the delivery latency.
        stored = [_unstamped(e) for e in backlog]
        for event in [*stored, *live]:  # in publication order; `events` drops repeats
            queue.put_nowait(event)
        clock = Clock(time.monotonic())
        clock.first_token = clock.accepted  # not a new request: no TTFT sample
        return events(queue, clock, max(timeout, 1.0), _relayed(backlog, last_event_id))

    async def _resumed(self, request_id: str) -> int:
        pipe = self.hub.redis.pipeline(transaction=True)
        pipe.incr(self.settings.resumed_key(request_id))
        pipe.expire(self.settings.resumed_key(request_id), int(self.settings.request_timeout_s))
        generation, _ = await pipe.execute()
        return int(generation)

    async def cancel(self, request_id: str) -> None:
        await sredis.cancel(self.hub.redis, self.settings, request_id, "cancelled")

    def sse(self, relay: Relay, prelude: bytes = b"") -> StreamingResponse:
        """SSE of one relay; `prelude` (whole SSE events, e.g. RAG's `sources`) goes first."""
        rid = relay.request_id

        async def frames() -> AsyncIterator[bytes]:
            finished = written = False
            try:
                if prelude:
                    yield prelude
                async for frame in sse_frames(relay.events):
                    yield frame  # returns once the server has written it
                    if not written:
                        written = True
                        self.tracer.hop(rid, tracing.SSE_FIRST_WRITE)
                finished = True
            finally:
                self.release(relay, finished)

        headers = {**SSE_HEADERS, "X-Request-Id": rid}
        return StreamingResponse(frames(), media_type="text/event-stream", headers=headers)

    def release(self, relay: Relay, finished: bool) -> None:
        """End a connection's relay and, if its client left before the end, cancel the request,
        unless the request is kept (Idempotency-Key) or another connection (a resumed stream)
        relays it now. Its own task: this runs from a response generator's `finally`, which may
        be inside the response's cancelled scope."""
        cancel = not finished and not relay.keep
        task = asyncio.create_task(self._cleanup(relay.request_id, relay, cancel))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _cleanup(self, rid: str, relay: Relay, cancel: bool) -> None:
        self.tracer.end(rid)
        others = await self.close(rid, relay.queue)
        if not cancel or others:
            return
        try:
            # Resumed since this connection opened (perhaps through another API process)?
            latest = int(await self.hub.redis.get(self.settings.resumed_key(rid)) or 0)
            if latest == relay.generation:
                await sredis.cancel(self.hub.redis, self.settings, rid, "client_disconnected")
        except Exception as e:  # the deadline still stops it
            log.warning("could not cancel %s after its client left: %s", rid, e)

    async def collect(self, relay: Relay, hung_up: HungUp | None = None) -> Completion:
        """The relay's whole completion (`stream: false`). A client that hangs up first cancels
        the request, as for a stream: nobody would read the answer. RequestFailed: an error
        event or the deadline."""
        whole = asyncio.ensure_future(collect(relay.events))
        ended = False
        try:
            # The body was read long ago, so only polling notices a client that went away.
            while not (await asyncio.wait({whole}, timeout=HANGUP_POLL_S))[0]:
                if hung_up is not None and await hung_up():
                    raise HTTPException(499, "the client closed the connection")
            ended = True
            return whole.result()
        finally:
            whole.cancel()
            self.release(relay, finished=ended)

    async def complete(
        self, body: GenerateBody, caller: Caller = ANONYMOUS, hung_up: HungUp | None = None,
        key: Key | None = None,
    ) -> GenerateResponse:  # fmt: skip
        relays, _ = await self.relays(caller, key, self.one(body, caller.tenant))
        try:
            whole = await self.collect(relays[0], hung_up)
        except RequestFailed as e:
            raise HTTPException(e.status, e.message) from e
        return response(whole, logprobs=body.logprobs is not None)


def response(whole: Completion, logprobs: bool) -> GenerateResponse:
    done = whole.done
    return GenerateResponse(
        request_id=done.request_id,
        text=whole.text,
        finish_reason=done.finish_reason,
        usage=done.usage,
        timings=done.timings,
        cost_usd=done.cost_usd,
        logprobs=whole.logprobs if logprobs else None,
        worker_id=done.worker_id,
    )
