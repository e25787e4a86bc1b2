"""Publishes stream events to Redis, coalescing token deltas.

The first token of a request is published at once (it is the client's TTFT); later tokens are
gathered for up to `stream_interval_ms` and go out as one `TokensEvent` per request, all
requests of a flush in one pipelined round trip. Per request the order is kept: tokens first,
then the terminal done/error event.

Every event also goes to the request's capped, expiring Redis stream: pub/sub keeps nothing, so
the stream is what lets an API that restarted (or reconnected to Redis) replay what it missed,
and a client resume with Last-Event-ID.

Each request's events go out through one Lua script (workers/ownership.py) that publishes only
while this worker still owns the request at its epoch, and records the published token ids
with them, so that another worker can continue exactly where the client is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from shared import tracing
from shared.messages import DoneEvent, ErrorEvent, Token, TokensEvent
from shared.settings import Settings
from shared.tracing import Tracer
from workers.ownership import Owners, publish_args

log = logging.getLogger(__name__)

PUBLISHED, FENCED, LOST = 1, 0, -1  # what the publish script answers


@dataclass
class _Pending:
    epoch: int
    tokens: list[Token] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    first_index: int = 0  # completion index of ids[0]
    chars: int = 0  # characters published once these are out
    seconds: float = 0.0  # engine seconds spent since the last flush
    terminal: DoneEvent | ErrorEvent | None = None
    ttl: int = 0  # of the request's events once published; 0: the publisher's own
    published: asyncio.Future[bool] | None = None


class Publisher:
    def __init__(
        self,
        redis: Redis,
        settings: Settings,
        owners: Owners,
        on_fenced: Callable[[str, bool], None],
        tracer: Tracer | None = None,
    ) -> None:
        self._redis = redis
        self._tracer = tracer or Tracer(settings, None, "sluice-worker")
        self._started: set[str] = set()  # requests whose first tokens are out
        self._settings = settings
        self._owners = owners
        self._on_fenced = on_fenced
        self._interval = settings.stream_interval_ms / 1000
        # One event per token at most, plus the terminal one
        self._maxlen = settings.max_tokens_limit + 8
        self._ttl = int(settings.request_timeout_s) + 60
        self._pending: dict[str, _Pending] = {}
        self._urgent = asyncio.Event()
        self._has_data = asyncio.Event()
        self._flushing = asyncio.Lock()

    def tokens(
        self, request_id: str, epoch: int, tokens: list[Token], ids: list[int], chars: int,
        seconds: float = 0.0,
    ) -> None:  # fmt: skip
        """Queue tokens (their ids, and the text length once they are out) of the request this
        worker holds at `epoch`."""
        pending = self._pending.setdefault(request_id, _Pending(epoch))
        if not pending.ids and tokens:
            pending.first_index = tokens[0].index
        pending.tokens.extend(tokens)
        pending.ids.extend(ids)
        pending.chars = chars
        pending.seconds += seconds
        self._has_data.set()
        if self._interval == 0 or (tokens and tokens[0].index == 0):
            self._urgent.set()

    async def finish(
        self, request_id: str, epoch: int, event: DoneEvent | ErrorEvent, retain_s: int = 0
    ) -> bool:
        """Queue the terminal event and wait until it (and every token before it) is in Redis:
        only then may the worker count the request as done and commit its offset. False: the
        request had been taken over (fenced), nothing was published. `retain_s`: keep the
        events at least this long from now (GenerationRequest.retain_s)."""
        pending = self._pending.setdefault(request_id, _Pending(epoch))
        pending.terminal = event
        pending.ttl = max(self._ttl, retain_s)
        pending.published = asyncio.get_running_loop().create_future()
        self._has_data.set()
        self._urgent.set()
        return await pending.published

    async def run(self) -> None:
        while True:
            await self._has_data.wait()  # idle workers do not wake every interval
            try:
                await asyncio.wait_for(self._urgent.wait(), timeout=self._interval or None)
            except TimeoutError:
                pass
            self._urgent.clear()
            await self.flush()
            if not self._pending:
                self._has_data.clear()

    async def flush(self) -> None:
        """Send what is queued. One flush at a time, and never abandoned half-way, even when
        the caller is cancelled (the worker's stop cancels the loop, then flushes what is left
        before handing requests over): the script records a request's token ids by position,
        so a batch lost in between, or sent after a later one, would leave a gap in the ids
        that the next owner continues from."""
        await asyncio.shield(self._flush_in_turn())

    async def _flush_in_turn(self) -> None:
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        pipe = self._redis.pipeline(transaction=False)
        now = time.time()
        for request_id, p in batch.items():
            events = []
            if p.tokens:
                events.append(TokensEvent(tokens=p.tokens, published_at=now).model_dump_json())
            if p.terminal is not None:
                events.append(p.terminal.model_dump_json())
            args = publish_args(
                request_id, p.epoch, self._settings.stream_channel(request_id), p.ttl or self._ttl,
                self._maxlen, p.chars, p.seconds, p.terminal is not None, p.first_index, events,
                p.ids,
            )  # fmt: skip
            keys = self._owners.publish_keys(request_id)
            await self._owners.publish_script(keys=keys, args=args, client=pipe)
        try:
            results = await pipe.execute()
        except Exception:
            # Keep the events and retry: put them back ahead of anything newer.
            log.exception("publishing %d streams to Redis failed; retrying", len(batch))
            for request_id, p in batch.items():
                self._put_back(request_id, p)
            await asyncio.sleep(0.5)
            return
        self._trace(batch, results, now)
        for (request_id, p), outcome in zip(batch.items(), results, strict=True):
            if outcome == LOST:  # Redis lost the record: its owner writes it again, then retry
                self._put_back(request_id, p)
                self._on_fenced(request_id, True)
                continue
            if outcome == FENCED:
                log.warning("%s was taken over by another worker: stopping it here", request_id)
                self._on_fenced(request_id, False)
            if p.published is not None and not p.published.done():
                p.published.set_result(outcome == PUBLISHED)

    def _trace(self, batch: dict[str, _Pending], results: list[int], sent: float) -> None:
        """The hops of what this flush published, at the time it was sent: Redis hands pub/sub
        messages out before its reply to us, so a later clock could come after the API's."""
        for (request_id, p), outcome in zip(batch.items(), results, strict=True):
            if outcome != PUBLISHED:
                self._started.discard(request_id)
                continue
            if p.tokens and request_id not in self._started:
                self._started.add(request_id)
                self._tracer.hop(request_id, tracing.REDIS_FIRST_PUBLISH, sent, index=p.first_index)
            if p.terminal is not None:
                self._started.discard(request_id)
                self._tracer.hop(request_id, tracing.WORKER_DONE, sent, event=p.terminal.type)

    def _put_back(self, request_id: str, p: _Pending) -> None:
        """Ahead of anything queued for the request since."""
        newer = self._pending.pop(request_id, None)
        if newer is not None:
            if not p.ids:
                p.first_index = newer.first_index
            p.tokens.extend(newer.tokens)
            p.ids.extend(newer.ids)
            p.chars = newer.chars
            p.seconds += newer.seconds
            p.terminal = newer.terminal or p.terminal
            p.ttl = max(p.ttl, newer.ttl)
            p.published = newer.published or p.published
        self._pending[request_id] = p
        self._has_data.set()
