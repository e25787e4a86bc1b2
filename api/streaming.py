"""Relay of stream events from Redis pub/sub to HTTP clients.

One pub/sub connection per API process (`StreamHub`) fans events out to per-request queues, so
a thousand open streams cost one Redis connection, not a thousand. A request's channel is
subscribed, and the subscription confirmed by Redis, before its message goes to Kafka: no
event can be published before someone listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from shared import metrics, tracing
from shared.messages import DoneEvent, ErrorEvent, Token, TokensEvent, stream_event_adapter
from shared.settings import Settings

log = logging.getLogger(__name__)

Event = TokensEvent | DoneEvent | ErrorEvent
QUEUED_EVERY_S = 5.0


@dataclass
class Queued:
    """No token yet, `waited_s` after the API accepted it: the request still waits for a worker
    of its pool (which may have none yet). `backlog`: requests waiting in the pool's topic, as
    its workers last reported, plus those admitted since; `workers`: the pool's live workers."""

    waited_s: float
    backlog: int
    workers: int


Relaying = Event | Queued
# The backlog and live workers of the request's pool (api/backpressure.py)
Waiting = Callable[[], tuple[int, int]]


class StreamHub:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        # channel -> a queue per connection relaying it (a resumed stream is a second one)
        self._queues: dict[str, list[asyncio.Queue[Event]]] = {}
        self._opened: dict[str, float] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pubsub = self._redis.pubsub()
        # A channel of our own keeps the connection subscribed while no request is open.
        await self._pubsub.subscribe(f"{self._settings.redis_prefix}:api:{uuid.uuid4().hex}")
        self._reader = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def open(self, request_id: str) -> asyncio.Queue[Event]:
        """A queue of the request's events for one connection; the channel is subscribed
        (once per process) by the time it returns."""
        assert self._pubsub is not None, "StreamHub.start() was not called"
        channel = self._settings.stream_channel(request_id)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        listeners = self._queues.setdefault(channel, [])
        listeners.append(queue)
        if len(listeners) > 1:
            return queue  # another connection of this process relays it: subscribed already
        confirmed = asyncio.get_running_loop().create_future()
        self._opened[request_id] = time.monotonic()
        self._confirmations[channel] = confirmed
        try:
            await self._pubsub.subscribe(channel)
            await asyncio.wait_for(confirmed, timeout=5.0)
        except BaseException:
            await self.close(request_id, queue)
            raise
        finally:
            self._confirmations.pop(channel, None)
        return queue

    async def close(self, request_id: str, queue: asyncio.Queue[Event] | None = None) -> int:
        """End one connection's queue (all of them if `queue` is None); the channel is
        unsubscribed with the last. Returns how many connections still relay the request."""
        channel = self._settings.stream_channel(request_id)
        listeners = self._queues.get(channel, [])
        if queue is None:
            listeners.clear()
        elif queue in listeners:
            listeners.remove(queue)
        if listeners:
            return len(listeners)
        self._queues.pop(channel, None)
        self._opened.pop(request_id, None)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.unsubscribe(channel)
        return 0

    def open_count(self) -> int:
        return sum(map(len, self._queues.values()))

    @property
    def redis(self) -> Redis:
        return self._redis

    async def backlog(self, request_id: str) -> list[Event] | None:
        """The request's events so far, from its Redis stream; None if there is none (unknown,
        or expired)."""
        entries = await self._redis.xrange(self._settings.events_key(request_id))
        if not entries:
            return None
        return [stream_event_adapter.validate_json(fields[b"e"]) for _, fields in entries]

    async def _backfill(self) -> None:
        """After the pub/sub connection was lost, queue what open requests missed meanwhile:
        their streams hold every event, and `events()` drops what was already relayed."""
        for request_id in list(self._opened):
            missed = None
            for attempt in range(3):
                try:
                    missed = await self.backlog(request_id)
                    break
                except Exception as e:
                    log.warning("backfill of %s failed (%s), attempt %d", request_id, e, attempt)
                    await asyncio.sleep(0.5)
            for queue in self._queues.get(self._settings.stream_channel(request_id), []):
                for event in missed or []:
                    queue.put_nowait(event)

    async def _read(self) -> None:
        assert self._pubsub is not None
        lost = False
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
                if lost:  # reconnected (redis-py resubscribes our channels): catch up
                    lost = False
                    log.info("Redis pub/sub reconnected; replaying missed events")
                    await self._backfill()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                lost = True
                log.warning("Redis pub/sub read failed (%s); retrying", e)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                await self._sweep()
                continue
            channel = message["channel"].decode()
            if message["type"] == "subscribe":
                confirmed = self._confirmations.get(channel)
                if confirmed is not None and not confirmed.done():
                    confirmed.set_result(None)
            elif message["type"] == "message" and channel in self._queues:
                try:
                    event = stream_event_adapter.validate_json(message["data"])
                except ValidationError as e:
                    log.error("dropping malformed stream event on %s: %s", channel, e)
                    continue
                for queue in self._queues[channel]:
                    queue.put_nowait(event)

    async def _sweep(self) -> None:
        """Close subscriptions whose relay never ran to its end (a client gone before its
        response started); every relay gives up at the request timeout anyway."""
        limit = time.monotonic() - self._settings.request_timeout_s - 10
        for request_id in [r for r, t in self._opened.items() if t < limit]:
            await self.close(request_id)


@dataclass
class Clock:
    """The API's own view of a request's timings (what the client experiences)."""

    accepted: float
    first_token: float | None = None
    last_token: float | None = None
    model: str = ""  # the latency metrics' model_name: the catalog's model or adapter asked for

    def ms(self, t: float) -> float:
        return round((t - self.accepted) * 1000, 2)


class RequestFailed(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Relayed:
    """What a client already has: the next token index and the characters of text. A replay
    (stream backfill, or the whole generation again after a worker crash) relays only the rest."""

    def __init__(self, after_index: int = -1, chars: int = 0) -> None:
        self.next_index = after_index + 1
        self.chars = chars

    def fresh(self, event: TokensEvent) -> TokensEvent | None:
        tokens = []
        for t in event.tokens:
            if t.index < self.next_index:
                continue
            if t.offset is not None and t.offset < self.chars:  # grouped differently
                t = Token(index=t.index, text=t.text[self.chars - t.offset :], offset=self.chars)
            tokens.append(t)
            self.next_index = t.index + 1
            self.chars = (t.offset if t.offset is not None else self.chars) + len(t.text)
        if not tokens:
            return None
        return TokensEvent(tokens=tokens, published_at=event.published_at)


async def events(
    queue: asyncio.Queue[Event],
    clock: Clock,
    timeout_s: float,
    relayed: Relayed | None = None,
    mark: Callable[[str], None] = lambda hop: None,
    waiting: Waiting | None = None,
) -> AsyncIterator[Relaying]:
    """A request's events until its terminal one, each token once, with client-side timings on
    the done event. `mark` records the relay's hops (shared/tracing.py). With `waiting`, every
    QUEUED_EVERY_S without a first token a `Queued` says that it still waits, and for what."""
    relayed = relayed or Relayed()
    deadline = clock.accepted + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        tick = remaining
        if waiting is not None and clock.first_token is None:
            tick = min(remaining, QUEUED_EVERY_S)
        try:
            event = await asyncio.wait_for(queue.get(), timeout=max(tick, 0.001))
        except TimeoutError:
            if tick < remaining:
                backlog, workers = waiting()  # type: ignore[misc]
                yield Queued(round(time.monotonic() - clock.accepted, 1), backlog, workers)
                continue
            raise RequestFailed(504, f"no result within {timeout_s:g} s") from None
        if isinstance(event, TokensEvent):
            fresh = relayed.fresh(event)
            if fresh is None:
                continue
            event = fresh
            if clock.first_token is None:
                mark(tracing.API_FIRST_RELAY)
            _time_tokens(clock, len(event.tokens))
            if event.published_at is not None:
                metrics.DELIVERY_LATENCY.observe(max(0.0, time.time() - event.published_at))
            yield event
            continue
        if isinstance(event, DoneEvent):
            now = time.monotonic()
            metrics.CLIENT_E2E.labels(clock.model).observe(now - clock.accepted)
            event.timings.ttft_ms = clock.ms(clock.first_token or now)
            event.timings.e2e_ms = clock.ms(now)
        mark(tracing.API_DONE)
        yield event
        return


def _time_tokens(clock: Clock, n: int) -> None:
    if n == 0:
        return
    now = time.monotonic()
    if clock.first_token is None:
        clock.first_token = now
        metrics.CLIENT_TTFT.labels(clock.model).observe(now - clock.accepted)
    elif clock.last_token is not None:
        for _ in range(n):
            metrics.CLIENT_ITL.labels(clock.model).observe((now - clock.last_token) / n)
    clock.last_token = now


def sse(event: str, data: dict, event_id: int | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"data: {json.dumps(data, separators=(',', ':'))}")
    return ("\n".join(lines) + "\n\n").encode()


async def sse_frames(source: AsyncIterator[Relaying]) -> AsyncIterator[bytes]:
    """SSE for one request: `queued` while it waits for a worker, `token` events (one per
    token, `id` = token index), then `done` or `error`."""
    metrics.OPEN_STREAMS.inc()
    try:
        async for event in source:
            if isinstance(event, Queued):
                yield sse("queued", asdict(event))
            elif isinstance(event, TokensEvent):
                # One write per coalesced event, however many tokens it holds.
                yield b"".join(sse("token", t.model_dump(), t.index) for t in event.tokens)
            elif isinstance(event, DoneEvent):
                yield sse("done", event.model_dump(exclude={"v", "type"}))
            else:
                yield sse("error", {"request_id": event.request_id, "message": event.message})
    except RequestFailed as e:
        yield sse("error", {"message": e.message, "status": e.status})
    finally:
        metrics.OPEN_STREAMS.dec()


@dataclass
class Completion:
    """A whole completion (`stream: false`)."""

    text: str
    done: DoneEvent
    logprobs: list[Token]  # its tokens, when the request asked for their logprobs


async def collect(source: AsyncIterator[Relaying]) -> Completion:
    """The whole completion, for `stream: false`."""
    parts: list[str] = []
    logprobs: list[Token] = []
    async for event in source:
        if isinstance(event, Queued):
            continue
        if isinstance(event, TokensEvent):
            parts.extend(t.text for t in event.tokens)
            logprobs.extend(t for t in event.tokens if t.logprob is not None)
        elif isinstance(event, DoneEvent):
            return Completion("".join(parts), event, logprobs)
        else:
            raise RequestFailed(400 if event.rejected else 502, event.message)
    raise RequestFailed(502, "stream ended without a result")
