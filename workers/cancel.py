"""Stopping a request early: at its deadline, or because its client cancelled it.

The worker keeps a `Running` per request it holds (request id -> Running). `listen` applies the
`Cancel` messages of the Redis cancel channel to them. A stop interrupts the request's
generation at once (an asyncio timeout moved to now, so the engine's stream is closed wherever
it waits), after which the worker aborts it in the engine and finishes it like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import redis as sredis
from shared.messages import Cancel, GenerationRequest
from shared.settings import Settings
from workers.feed import Feed
from workers.ownership import Claim

log = logging.getLogger(__name__)

StopReason = Literal["abort", "timeout"]


@dataclass(eq=False)
class Running:
    claim: Claim
    feed: Feed
    stop_reason: StopReason | None = None
    interrupted: bool = False  # the generation was cut short by stop() or the deadline
    fenced: bool = False  # another worker took it over: stop without finishing it
    in_engine: bool = False  # inside the engine (charged if the engine dies)
    ids: list[int] = field(default_factory=list)  # the completion's token ids so far
    _timeout: asyncio.Timeout | None = None

    def __post_init__(self) -> None:
        self.ids = list(self.claim.emitted)

    @property
    def request(self) -> GenerationRequest:
        return self.claim.request

    def fence(self) -> None:
        self.fenced = True
        self._interrupt()

    @property
    def expired(self) -> bool:
        deadline = self.request.deadline
        return deadline is not None and time.time() >= deadline

    def stop(self, reason: StopReason) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._interrupt()

    def _interrupt(self) -> None:
        if self._timeout is not None and not self._timeout.expired():
            self._timeout.reschedule(asyncio.get_running_loop().time())

    @contextlib.asynccontextmanager
    async def stoppable(self) -> AsyncIterator[None]:
        """Run the body until it ends, the deadline passes or stop() is called; the latter two
        raise TimeoutError with `interrupted` set."""
        loop = asyncio.get_running_loop()
        when = None
        if self.stop_reason is not None or self.fenced:
            when = loop.time()
        elif self.request.deadline is not None:
            when = loop.time() + self.request.deadline - time.time()
        async with asyncio.timeout_at(when) as timeout:
            self._timeout = timeout
            try:
                yield
            finally:
                self._timeout = None
                self.interrupted = timeout.expired()

    @property
    def finish_reason(self) -> StopReason:
        """Why an interrupted request ended: a cancel, else its deadline."""
        return self.stop_reason or "timeout"


async def listen(
    redis: Redis,
    settings: Settings,
    on_cancel: Callable[[str], None],
    held: Callable[[], Iterable[str]],
) -> None:
    """Until cancelled: call `on_cancel(request_id)` for every Cancel on the channel. Every
    worker hears every Cancel; the caller ignores ids it does not hold. After each
    (re)subscription the requests held are checked for a cancelled key, so that a cancel sent
    while the connection was down is not lost."""
    while True:
        pubsub = redis.pubsub()
        try:
            await pubsub.subscribe(settings.cancel_channel)
            for request_id in list(held()):
                if await sredis.is_cancelled(redis, settings, request_id):
                    on_cancel(request_id)
            async for message in pubsub.listen():
                if message["type"] == "message" and (rid := _request_id(message["data"])):
                    on_cancel(rid)
        except (RedisError, OSError) as e:
            log.warning("cancel channel lost (%s); subscribing again", e)
            await asyncio.sleep(1.0)
        finally:
            await pubsub.aclose()


def _request_id(data: bytes) -> str | None:
    try:
        return Cancel.model_validate_json(data).request_id
    except ValidationError as e:
        log.warning("ignoring a malformed cancel message: %s", e)
        return None
