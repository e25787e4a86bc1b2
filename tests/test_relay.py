"""The API relays each token index and each character once, whatever is replayed to it, and a
resumed stream is not undone by the connection it replaced."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

from api.serving import GenerateHandler, Relay
from api.streaming import Event, Relayed, StreamHub
from shared import redis as sredis
from shared.messages import Token, TokensEvent
from tests.conftest import Services, make_settings


def ev(*tokens: tuple[int, str, int]) -> TokensEvent:
    return TokensEvent(tokens=[Token(index=i, text=t, offset=o) for i, t, o in tokens])


def relay(relayed: Relayed, *events: TokensEvent) -> str:
    out = [relayed.fresh(e) for e in events]
    return "".join(t.text for e in out if e is not None for t in e.tokens)


def test_a_replayed_stream_adds_nothing() -> None:
    first = [ev((0, "Hel", 0)), ev((1, "lo", 3), (2, " world", 5))]
    r = Relayed()
    assert relay(r, *first) == "Hello world"
    assert relay(r, *first) == ""  # the stream backfill after a Redis reconnect


def test_a_regeneration_grouped_differently_is_trimmed_to_the_new_part() -> None:
    r = Relayed()
    # First worker: tokens 1 and 2 came as one delta, its text on the last one.
    assert relay(r, ev((0, "Hel", 0)), ev((1, "", 3), (2, "lo w", 3))) == "Hello w"
    # The request is redelivered and generated again, grouped otherwise: 2 and 3 together.
    again = [ev((0, "Hel", 0)), ev((1, "lo", 3)), ev((2, "", 5), (3, " world", 5))]
    assert relay(r, *again) == "orld"
    assert r.next_index == 4 and r.chars == len("Hello world")


def test_resume_after_an_index_relays_the_rest() -> None:
    r = Relayed()
    relay(r, ev((0, "a", 0), (1, "b", 1)))  # what the client saw (Last-Event-ID: 1)
    assert relay(r, ev((0, "a", 0), (1, "b", 1), (2, "c", 2))) == "c"


def test_tokens_without_offsets_dedupe_by_index() -> None:
    r = Relayed()
    old = TokensEvent(tokens=[Token(index=0, text="x"), Token(index=1, text="y")])
    assert relay(r, old, old) == "xy"


async def next_text(queue: asyncio.Queue[Event]) -> str:
    event = await asyncio.wait_for(queue.get(), 5)
    assert isinstance(event, TokensEvent)
    return event.tokens[0].text


async def test_a_resumed_stream_survives_the_connection_it_replaced(services: Services) -> None:
    """A client resumes while the API has not yet noticed its first connection is gone. That
    connection ending must neither take the resumed one's events away nor cancel the request;
    the resumed connection ending early still does."""
    settings = make_settings(services)
    redis = sredis.connect(settings)
    hub = StreamHub(redis, settings)
    await hub.start()
    handler = GenerateHandler(settings, None, None, hub)  # type: ignore[arg-type]
    rid = uuid.uuid4().hex
    channel = settings.stream_channel(rid)

    async def publish(text: str) -> None:
        event = ev((0, text, 0)).model_dump_json()
        await redis.xadd(settings.events_key(rid), {"e": event})
        await redis.publish(channel, event)

    try:
        first = await hub.open(rid)  # the original connection (as `submit` opens it)
        await publish("a")
        assert await next_text(first) == "a"
        resumed_response = await handler.resume(rid, last_event_id=-1)
        assert resumed_response.status_code == 200
        resumed = hub._queues[channel][1]
        assert await next_text(resumed) == "a"  # its backlog
        # The first connection ends without its client: nothing is cancelled, and the resumed
        # one still gets what is published.
        await handler._cleanup(rid, Relay(rid, first, no_events([])), cancel=True)
        await publish("b")
        assert await next_text(resumed) == "b"
        assert not await sredis.is_cancelled(redis, settings, rid)
        # The resumed connection's client goes away too: now the request is cancelled.
        await handler._cleanup(rid, Relay(rid, resumed, no_events([]), generation=1), cancel=True)
        assert await sredis.is_cancelled(redis, settings, rid)
        assert hub.open_count() == 0
    finally:
        await hub.stop()
        await redis.aclose()


async def no_events(events: list[Event]) -> AsyncIterator[Event]:
    for event in events:
        yield event
