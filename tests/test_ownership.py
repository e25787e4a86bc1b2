"""One live owner per request, takeovers and fencing (workers/ownership.py) on a real broker and
real Redis, with the fake engine for speed: these test the queue logic only. That a dead vLLM
worker's streams continue elsewhere, token-exact, is proven in tests/test_reliability_e2e.py."""

from __future__ import annotations

import asyncio
import json
import sys
import time

from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis

from shared import ledger, tracing
from shared import redis as sredis
from shared.kafka import ensure_topics
from shared.messages import DoneEvent, ErrorEvent, Heartbeat, Token, TokensEvent
from shared.settings import Settings
from tests.conftest import Services, make_settings
from tests.fake_engine import FakeEngine
from tests.test_worker_queue import committed, listen, produce, req, worker
from workers.main import serve
from workers.ownership import Claim, Owners, publish_args
from workers.publisher import Publisher


def as_worker(settings: Settings, worker_id: str, **overrides: object) -> Settings:
    return settings.model_copy(update={"worker_id": worker_id, **overrides})


async def publish_as(owners: Owners, settings: Settings, rid: str, epoch: int, n: int) -> bool:
    """Publish tokens t0..t{n-1} (ids 0..n-1) as `owners`' worker would."""
    tokens, chars = [], 0
    for i in range(n):
        tokens.append(Token(index=i, text=f"t{i} ", offset=chars))
        chars += len(f"t{i} ")
    events = [TokensEvent(tokens=tokens).model_dump_json()]
    keys = owners.publish_keys(rid)
    args = publish_args(
        rid, epoch, settings.stream_channel(rid), 60, 100, chars, 0.0, False, 0, events,
        list(range(n)),
    )  # fmt: skip
    return bool(await owners.publish_script(keys=keys, args=args))


async def wait_committed(settings: Settings, total: int, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while sum(max(o, 0) for o in (await committed(settings)).values()) != total:
        assert time.monotonic() < deadline, await committed(settings)
        await asyncio.sleep(0.2)


async def test_a_dead_workers_request_continues_from_its_published_tokens(
    services: Services,
) -> None:
    settings = as_worker(make_settings(services, requests_partitions=1), "live")
    ghost_settings = as_worker(settings, "ghost")
    redis = Redis.from_url(settings.redis)
    ghost = Owners(redis, ghost_settings)
    r = req(max_tokens=10)
    rid = r.request_id
    # A worker read the request, published 4 tokens, and died (its beat is a minute old).
    trace_id = "ab" * 16  # the trace its Kafka record's headers named
    claim = Claim(
        r,
        1,
        "interactive",
        settings.requests_topic,
        0,
        0,
        traceparent=f"00-{trace_id}-{'cd' * 8}-01",
    )
    assert await ghost.claim_new(claim) == ("new", "ghost")
    assert await publish_as(ghost, settings, rid, 1, 4)
    stale = Heartbeat(worker_id="ghost", engine="fake", model="m", in_flight=1, ts=time.time() - 60)
    await sredis.write_heartbeat(redis, settings, stale)
    events = await listen(settings, [rid])
    engine = FakeEngine(token_delay_s=0.01)
    async with worker(settings, engine):
        # Its record is still uncommitted: this worker reads it too, and must not run it again.
        await produce(settings, r.model_dump_json().encode())
        received = [e async for _, e in events]
        await wait_committed(settings, 1)
    tokens = [t for e in received if isinstance(e, TokensEvent) for t in e.tokens]
    assert [t.index for t in tokens] == list(range(4, 10))
    assert tokens[0].offset == len("t0 t1 t2 t3 ")
    assert "".join(t.text for t in tokens) == "".join(f"t{i} " for i in range(4, 10))
    done = received[-1]
    assert isinstance(done, DoneEvent) and done.usage.completion_tokens == 10
    assert engine.generated == [rid]  # once: the redelivered record was not run again
    assert engine.resumed[rid] == [0, 1, 2, 3]
    assert await redis.hget(settings.heartbeats_key, "ghost") is None
    # The takeover joined the request's trace.
    took = [
        h for h in await tracing.timeline(redis, settings, rid) if h["hop"] == "worker.took_over"
    ]
    assert took and took[0]["trace"] == trace_id
    totals = await ledger.totals(redis, settings, 3600)
    assert totals["requests"] == 1 and totals["completion_tokens"] == 10
    await redis.aclose()


async def test_a_worker_taken_for_dead_is_fenced_off(services: Services) -> None:
    settings = as_worker(make_settings(services, requests_partitions=1), "slow")
    redis = Redis.from_url(settings.redis)
    thief = Owners(redis, as_worker(settings, "thief"))
    r = req(max_tokens=200)
    rid = r.request_id
    events = await listen(settings, [rid])
    engine = FakeEngine(token_delay_s=0.02)
    async with worker(settings, engine):
        await produce(settings, r.model_dump_json().encode())
        await asyncio.wait_for(engine.started.wait(), 30)
        await asyncio.sleep(0.3)
        # Another worker declared "slow" dead and took its request over (epoch 2).
        assert await redis.smove(thief.owned_key("slow"), thief.orphans_key, rid)
        assert await thief.claim_orphan(rid, [settings.requests_topic + ".other"]) is None
        claim = await thief.claim_orphan(rid, [settings.requests_topic])
        assert claim is not None and claim.epoch == 2 and claim.takeovers == 1
        deadline = time.monotonic() + 5
        while rid not in engine.aborted:  # its next publish was refused: it stopped
            assert time.monotonic() < deadline, "the fenced worker kept generating"
            await asyncio.sleep(0.05)
        assert not await publish_as(Owners(redis, settings), settings, rid, 1, 1)
        # The new owner finishes it; the fenced worker then commits the record it read.
        assert await thief.finish_quietly(rid, claim.epoch)
        await wait_committed(settings, 1)
        assert not engine.completed
    await redis.aclose()
    del events


async def test_a_rebalance_among_live_workers_starts_no_second_copy(services: Services) -> None:
    settings = make_settings(services, requests_partitions=4)
    first, second = FakeEngine(token_delay_s=0.05), FakeEngine(token_delay_s=0.05)
    requests = [req(max_tokens=40) for _ in range(8)]  # ~2 s each
    events = await listen(settings, [r.request_id for r in requests])
    async with worker(as_worker(settings, "first"), first):
        await produce(settings, *(r.model_dump_json().encode() for r in requests))
        deadline = time.monotonic() + 30
        while len(first.running) < 8:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        # A second worker joins (scale-up): the group rebalances and it is assigned partitions
        # whose records are uncommitted, because the first worker is still running them.
        async with worker(as_worker(settings, "second"), second):
            done = [e async for _, e in events if isinstance(e, DoneEvent)]
            await wait_committed(settings, 8, timeout_s=30)
    assert len(done) == 8
    assert sorted(first.generated) == sorted(r.request_id for r in requests)
    assert second.generated == []


async def test_a_poison_pill_is_parked_after_max_attempts_and_the_pool_serves_on(
    services: Services,
) -> None:
    settings = make_settings(services, requests_partitions=1, max_attempts=2)
    redis = Redis.from_url(settings.redis)
    pill, good = req(prompt="kill the engine"), req(max_tokens=3)
    events = await listen(settings, [pill.request_id, good.request_id])
    engines = [FakeEngine(), FakeEngine()]
    await ensure_topics(settings)
    stop = asyncio.Event()
    pool = [
        asyncio.create_task(serve(as_worker(settings, w), e, stop))
        for w, e in zip(("a", "b"), engines, strict=True)
    ]
    try:
        await asyncio.sleep(2)
        await produce(settings, pill.model_dump_json().encode(), good.model_dump_json().encode())
        received = {rid: e async for rid, e in events if not isinstance(e, TokensEvent)}
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*pool), 60)
    error = received[pill.request_id]
    assert isinstance(error, ErrorEvent) and "poison pill: 2 engines died" in error.message
    assert isinstance(received[good.request_id], DoneEvent)
    # The first engine, then the other worker's, which retried it alone; both restarted.
    assert sum(e.restarts for e in engines) == 2
    state = await redis.hgetall(Owners(redis, settings).request_key(pill.request_id))
    assert state[b"state"] == b"done" and state[b"engine_deaths"] == b"2"
    await redis.aclose()


async def test_a_drained_worker_hands_its_requests_over_at_the_drain_bound(
    services: Services,
) -> None:
    """Scale-down or rolling update: SIGTERM gives in-flight requests `drain_timeout_s`; what
    still runs then continues on a live worker from the tokens already sent."""
    settings = make_settings(services, requests_partitions=1)
    leaving, staying = FakeEngine(token_delay_s=0.03), FakeEngine(token_delay_s=0.03)
    # ~12 s: longer than the join of the second worker (seconds on the dev broker), during
    # which the leaving worker's poll, and so its reaction to the stop, waits.
    r = req(max_tokens=400)
    rid = r.request_id
    events = await listen(settings, [rid])
    collected: list = []

    async def collect() -> None:
        collected.extend([e async for _, e in events])

    reader = asyncio.create_task(collect())
    await ensure_topics(settings)
    stop_leaving, stop_staying = asyncio.Event(), asyncio.Event()
    leaving_settings = as_worker(settings, "leaving", drain_timeout_s=0.5)
    leaving_task = asyncio.create_task(serve(leaving_settings, leaving, stop_leaving))
    await produce(settings, r.model_dump_json().encode())
    await asyncio.wait_for(leaving.started.wait(), 30)  # the only worker: it runs it
    staying_task = asyncio.create_task(serve(as_worker(settings, "staying"), staying, stop_staying))
    try:
        await asyncio.sleep(1.0)
        stop_leaving.set()  # SIGTERM: drain 0.5 s, then hand over
        await asyncio.wait_for(leaving_task, 30)
        await asyncio.wait_for(reader, 30)
    finally:
        stop_staying.set()
        await asyncio.wait_for(staying_task, 30)
    assert leaving.generated == [rid] and rid not in leaving.completed
    tokens = [t for e in collected if isinstance(e, TokensEvent) for t in e.tokens]
    assert [t.index for t in tokens] == list(range(400))
    assert isinstance(collected[-1], DoneEvent) and collected[-1].usage.completion_tokens == 400
    resumed = staying.resumed[rid]
    assert 0 < len(resumed) < 400 and resumed == list(range(len(resumed)))


# A consumer in the workers' group, in a process of its own so that it can die without leaving
# the group: it prints the partitions it was given and then holds them, reading nothing.
GHOST_MEMBER = """
import asyncio, json, sys
from aiokafka import AIOKafkaConsumer
from shared.kafka import ASSIGNORS

async def main():
    kafka, topic, group = sys.argv[1:4]
    c = AIOKafkaConsumer(topic, bootstrap_servers=kafka, group_id=group,
                         enable_auto_commit=False, session_timeout_ms=10000,
                         heartbeat_interval_ms=1000, partition_assignment_strategy=ASSIGNORS)
    await c.start()
    while not c.assignment():
        await c.getmany(timeout_ms=200)
    c.pause(*c.assignment())
    print(json.dumps(sorted(tp.partition for tp in c.assignment())), flush=True)
    while True:
        await c.getmany(timeout_ms=500)

asyncio.run(main())
"""


async def beat_partitions(redis: Redis, settings: Settings, worker_id: str) -> list[int] | None:
    raw = await redis.hget(settings.heartbeats_key, worker_id)
    return None if raw is None else Heartbeat.model_validate_json(raw).partitions


async def picked_outside_the_group(redis: Redis, settings: Settings, rid: str) -> bool:
    for _ in range(20):  # hops reach Redis every 0.2 s (shared/tracing.py)
        hops = await tracing.timeline(redis, settings, rid)
        picked = [h for h in hops if h["hop"] == tracing.WORKER_PICKED]
        if picked:
            return bool(picked[0].get("rescued"))
        await asyncio.sleep(0.1)
    return False


async def test_requests_on_a_dead_members_partitions_are_served_before_the_group_rebalances(
    services: Services,
) -> None:
    """A worker dies holding partitions: Kafka gives them to a live worker only after its
    session times out and the group rebalances. Requests sent there meanwhile are read outside
    the group (workers/rescue.py) and served at once, then committed, once, by the partition's
    next owner."""
    settings = as_worker(make_settings(services, requests_partitions=4), "live")
    redis = Redis.from_url(settings.redis)
    engine = FakeEngine(token_delay_s=0.01)
    async with worker(settings, engine):
        deadline = time.monotonic() + 60
        while await beat_partitions(redis, settings, "live") != [0, 1, 2, 3]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        ghost = await asyncio.create_subprocess_exec(
            sys.executable, "-c", GHOST_MEMBER, settings.kafka, settings.requests_topic,
            settings.consumer_group, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert ghost.stdout is not None
        held = json.loads(await asyncio.wait_for(ghost.stdout.readline(), 60))
        assert held and len(held) < 4
        beat = Heartbeat(
            worker_id="ghost", engine="fake", model="m", in_flight=0, ts=time.time(),
            partitions=held,
        )  # fmt: skip
        await sredis.write_heartbeat(redis, settings, beat)
        while sorted(set(range(4)) - set(held)) != await beat_partitions(redis, settings, "live"):
            assert time.monotonic() < deadline, "the group did not settle"
            await asyncio.sleep(0.2)
        ghost.kill()  # SIGKILL: no LeaveGroup; its session lives on for 10 s
        await ghost.wait()
        beat.ts = time.time() - 60  # and its heartbeats stop
        await sredis.write_heartbeat(redis, settings, beat)

        requests = {p: req(max_tokens=5) for p in held}
        events = await listen(settings, [r.request_id for r in requests.values()])
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
        await producer.start()
        for p, r in requests.items():
            await producer.send_and_wait(
                settings.requests_topic, r.model_dump_json().encode(), partition=p
            )
        await producer.stop()
        served_while_held: dict[str, list[int] | None] = {}
        async for rid, event in events:
            if isinstance(event, TokensEvent) and rid not in served_while_held:
                served_while_held[rid] = await beat_partitions(redis, settings, "live")
        # Each request had its first token while the live worker did not hold its partition
        # in the group yet: it was read outside the group.
        for p, r in requests.items():
            assert p not in (served_while_held[r.request_id] or []), served_while_held
            assert await picked_outside_the_group(redis, settings, r.request_id)
        # Once the group gives it those partitions, it commits each record, run once.
        await wait_committed(settings, len(held), timeout_s=60)
        assert sorted(engine.generated) == sorted(r.request_id for r in requests.values())
    await redis.aclose()


async def test_a_full_workers_partitions_are_served_by_a_worker_with_room(
    services: Services,
) -> None:
    """A worker at max_in_flight takes nothing from its partitions. Kafka would keep them its
    own, so requests there would wait for it while another worker sits idle; instead the full
    worker stops listing them and the idle one reads them outside the group."""
    base = make_settings(services, requests_partitions=2, max_in_flight=1)
    busy_settings, idle_settings = as_worker(base, "busy"), as_worker(base, "idle")
    redis = Redis.from_url(base.redis)
    busy, idle = FakeEngine(token_delay_s=0.1), FakeEngine(token_delay_s=0.01)
    async with worker(busy_settings, busy), worker(idle_settings, idle):
        deadline = time.monotonic() + 60
        while True:  # the group settles with one partition each
            held = await beat_partitions(redis, base, "busy")
            if held and len(held) == 1 and await beat_partitions(redis, base, "idle"):
                break
            assert time.monotonic() < deadline, "the group did not settle"
            await asyncio.sleep(0.2)
        partition = held[0]
        long, short = req(max_tokens=100), [req(max_tokens=3) for _ in range(3)]
        events = await listen(base, [r.request_id for r in (long, *short)])
        producer = AIOKafkaProducer(bootstrap_servers=base.kafka)
        await producer.start()
        for r in (long, *short):  # all on the busy worker's partition
            value = r.model_dump_json().encode()
            await producer.send_and_wait(base.requests_topic, value, partition=partition)
        await producer.stop()
        done: list[str] = []
        async for rid, event in events:
            if isinstance(event, DoneEvent):
                done.append(rid)
        # The busy worker was running the long request all along (10 s of tokens): the short
        # ones finished before it, on the idle worker, each run once.
        assert busy.generated == [long.request_id]
        assert sorted(idle.generated) == sorted(r.request_id for r in short)
        assert done[-1] == long.request_id
        assert all([await picked_outside_the_group(redis, base, r.request_id) for r in short])
        # The partition's owner commits all four records once each request is done.
        await wait_committed(base, 4, timeout_s=30)
    await redis.aclose()


class SlowSends:
    """Real Redis, but every pipeline waits 0.2 s before it is sent: a slow network, so that a
    flush can be cancelled while its batch is on the way."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    def pipeline(self, **kwargs: object) -> object:
        pipe = self._redis.pipeline(**kwargs)  # type: ignore[arg-type]
        execute = pipe.execute

        async def slow(*args: object, **kw: object) -> object:
            await asyncio.sleep(0.2)
            return await execute(*args, **kw)  # type: ignore[arg-type]

        pipe.execute = slow  # type: ignore[method-assign]
        return pipe

    def __getattr__(self, name: str) -> object:
        return getattr(self._redis, name)


async def test_a_flush_cancelled_mid_send_still_lands_before_the_next(services: Services) -> None:
    """A worker's stop cancels its publisher loop, then flushes what is left before handing
    requests over. A batch taken out of the queue by the cancelled flush was lost, so the
    final flush recorded ids 5.. at positions 0..: the next owner continued from the wrong
    place (once seen as a drain test whose client got indices out of 0..399)."""
    settings = make_settings(services)
    redis = Redis.from_url(settings.redis)
    owners = Owners(redis, settings)
    r = req(max_tokens=10)
    rid = r.request_id
    claim = Claim(r, 1, "interactive", settings.requests_topic, 0, 0)
    assert (await owners.claim_new(claim))[0] == "new"
    publisher = Publisher(SlowSends(redis), settings, owners, lambda *_: None)  # type: ignore[arg-type]

    def queue(first: int, last: int) -> None:
        tokens = [Token(index=i, text=f"t{i} ", offset=3 * i) for i in range(first, last)]
        publisher.tokens(rid, 1, tokens, list(range(first, last)), chars=3 * last)

    queue(0, 5)
    first = asyncio.create_task(publisher.flush())
    await asyncio.sleep(0.05)  # its batch is on the way
    first.cancel()
    queue(5, 10)
    await publisher.flush()
    ids = [int(i) for i in await redis.lrange(owners.ids_key(rid), 0, -1)]
    assert ids == list(range(10))
    sent = [
        t.index
        for _, fields in await redis.xrange(settings.events_key(rid))
        for t in TokensEvent.model_validate_json(fields[b"e"]).tokens
    ]
    assert sent == list(range(10))
    await redis.aclose()


def test_which_taken_over_requests_continue_from_their_tokens() -> None:
    """Plain streams continue after their published ids; those the ids do not fully describe
    regenerate from the start with replay suppression: stop strings (text held back), a
    response_format (the grammar would restart at its root), batch (nothing published)."""
    from shared.messages import GenerationRequest, ResponseFormat, SamplingOptions
    from workers.ownership import resumable

    def claim(feed: str = "interactive", **sampling: object) -> Claim:
        request = GenerationRequest(
            request_id="r", prompt="p", enqueued_at=0.0,
            sampling=SamplingOptions(max_tokens=8, **sampling),  # type: ignore[arg-type]
        )  # fmt: skip
        return Claim(request, 1, feed, "t", 0, 0)

    assert resumable(claim())
    assert resumable(claim(response_format=ResponseFormat(type="text")))
    assert not resumable(claim(stop=["\n"]))
    assert not resumable(claim(response_format=ResponseFormat(type="json_object")))
    assert not resumable(claim(frequency_penalty=0.5))
    assert resumable(claim(stop_token_ids=[7]))
    assert not resumable(claim("batch"))
