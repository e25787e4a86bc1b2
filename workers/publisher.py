"""Publishes stream events to Redis, coalescing token deltas.

The first token of a request is published at once (it is the client's TTFT); later tokens are
gathered for up to `stream_interval_ms` and go out as one `TokensEvent` per request, all
requests of a flush in one pipelined round trip. Per request the order is kept: tokens first,
then the terminal done/error event.

Every event also goes to the request's capped, expiring Redis stream: pub/sub keeps nothing, so
the stream is what lets an API that restarted (or reconnected to Redis) replay what it missed,
and a client resume with Last-Event-ID.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from redis.asyncio import Redis

from shared.messages import DoneEvent, ErrorEvent, Token, TokensEvent
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    tokens: list[Token] = field(default_factory=list)
    terminal: DoneEvent | ErrorEvent | None = None
    published: asyncio.Future[None] | None = None


class Publisher:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self._redis = redis
        self._settings = settings
        self._interval = settings.stream_interval_ms / 1000
        # One event per token at most, plus the terminal one
        self._cap = {"maxlen": settings.max_tokens_limit + 8, "approximate": True}
        self._ttl = int(settings.request_timeout_s) + 60
        self._pending: dict[str, _Pending] = {}
        self._urgent = asyncio.Event()
        self._has_data = asyncio.Event()

    def tokens(self, request_id: str, tokens: list[Token]) -> None:
        pending = self._pending.setdefault(request_id, _Pending())
        pending.tokens.extend(tokens)
        self._has_data.set()
        if self._interval == 0 or (tokens and tokens[0].index == 0):
            self._urgent.set()

    async def finish(self, request_id: str, event: DoneEvent | ErrorEvent) -> None:
        """Queue the terminal event and wait until it (and every token before it) is in Redis:
        only then may the worker count the request as done and commit its offset."""
        pending = self._pending.setdefault(request_id, _Pending())
        pending.terminal = event
        pending.published = asyncio.get_running_loop().create_future()
        self._has_data.set()
        self._urgent.set()
        await pending.published

    async def run(self) -> None:
        while True:
            await self._has_data.wait()  # idle workers do not wake every interval
            try:
                await asyncio.wait_for(self._urgent.wait(), timeout=self._interval or None)
            except TimeoutError:
                pass
            self._urgent.clear()
            if self._pending:
                await self._flush()
            if not self._pending:
                self._has_data.clear()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        pipe = self._redis.pipeline(transaction=False)
        now = time.time()
        for request_id, pending in batch.items():
            channel = self._settings.stream_channel(request_id)
            events = []
            if pending.tokens:
                events.append(TokensEvent(tokens=pending.tokens, published_at=now))
            if pending.terminal is not None:
                events.append(pending.terminal)
            for event in events:
                data = event.model_dump_json()
                pipe.publish(channel, data)
                pipe.xadd(self._settings.events_key(request_id), {"e": data}, **self._cap)
            pipe.expire(self._settings.events_key(request_id), self._ttl)
        try:
            await pipe.execute()
        except Exception:
            # Keep the events and retry: put them back ahead of anything newer.
            log.exception("publishing %d streams to Redis failed; retrying", len(batch))
            for request_id, newer in self._pending.items():
                old = batch.setdefault(request_id, _Pending())
                old.tokens.extend(newer.tokens)
                old.terminal = newer.terminal or old.terminal
                old.published = newer.published or old.published
            self._pending = batch
            await asyncio.sleep(0.5)
            return
        for pending in batch.values():
            if pending.published is not None and not pending.published.done():
                pending.published.set_result(None)
