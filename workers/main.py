"""The worker: consume requests from Kafka in micro-batches, run them on the engine, stream out.

Delivery is at-least-once: an offset is committed only when its request (and every earlier one
of the partition) has finished, so a worker that dies leaves its requests to be redelivered.
A worker at `max_in_flight` pauses its partitions and leaves the rest in Kafka for others.

Interactive traffic comes first (workers/feed.py). Each round the worker polls the requests
topic; only when that brought nothing, no interactive request arrived for `batch_quiet_ms`, and
it holds fewer than `batch_max_in_flight` requests in all does it take batch requests, so
interactive arrivals always find room and push batch work out. In the engine, interactive
requests have priority 0 and batch ones 1. Batch requests are not streamed: their result goes
to the batch results topic (workers/sinks.py). `worker_feeds` makes a worker serve one feed
only, e.g. a batch-only pool.

A request stops early at its deadline (finish_reason "timeout") or when cancelled through Redis
("abort", workers/cancel.py); one already expired or cancelled when picked up is never run.
Either way it ends with a done event and its offset is committed: it is handled, not redelivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import signal
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import kafka, metrics, pools, tracing
from shared import redis as sredis
from shared.kafka import KafkaLost
from shared.ledger import Ledger
from shared.messages import GenerationRequest, Heartbeat
from shared.settings import Settings
from shared.tracing import Tracer
from workers import cancel, engines, takeover
from workers.cancel import Running, StopReason
from workers.cost import CostMeter
from workers.engines.base import Engine, EngineDead, RequestRejected
from workers.feed import Feed
from workers.gpu import register_gpu_metrics
from workers.ownership import Claim, Owners
from workers.publisher import Publisher
from workers.rescue import Rescue
from workers.signers import Forged, Signers
from workers.sinks import BatchSink, Progress, ResultTopics, Sink, StreamSink, done_event
from workers.usage import add_request, record_usage
from workers.utilization import EngineLoad, sample_utilization

log = logging.getLogger("sluice.worker")

INTERACTIVE, BATCH = 0, 1  # engine priorities: lower is scheduled sooner
BATCH_POLL_INTERVAL_MS = 3_600_000
CLOSE_TIMEOUT_S = 10.0


class Worker:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        redis: Redis,
        consumer: AIOKafkaConsumer | None,
        producer: AIOKafkaProducer,
        stopping: asyncio.Event | None = None,
        batch_consumer: AIOKafkaConsumer | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.producer = producer
        self.owners = Owners(redis, settings)
        self.tracer = Tracer(settings, redis, "sluice-worker")
        self.publisher = Publisher(redis, settings, self.owners, self._fenced, self.tracer)
        self.cost = CostMeter(settings, engine.model)
        self.load = EngineLoad(engine)
        self.ledger = Ledger(redis, settings)
        self.signers = Signers(redis, settings)
        self.results = ResultTopics(settings)
        s = settings
        self.interactive = None
        if consumer is not None:
            self.interactive = Feed(
                "interactive", consumer, s.requests_topic, s.consumer_group, s.dlq_topic,
                INTERACTIVE,
            )  # fmt: skip
        self.batch = None
        if batch_consumer is not None:
            self.batch = Feed(
                "batch", batch_consumer, s.batch_requests_topic, s.batch_consumer_group,
                s.batch_dlq_topic, BATCH,
            )  # fmt: skip
        self.feeds = [f for f in (self.interactive, self.batch) if f is not None]
        self.rescue = None if consumer is None else Rescue(settings, s.requests_topic)
        self.held: dict[str, Running] = {}  # request id -> the request being served
        self._reclaiming: set[str] = set()
        self._suspects = asyncio.Semaphore(1)  # requests an engine died with run one at a time
        self.stopping = stopping or asyncio.Event()
        self._freed = asyncio.Event()
        self._interactive_at = -math.inf  # monotonic time the last interactive request came
        self._fatal: BaseException | None = None
        self._recovery: asyncio.Task[None] | None = None  # set while the engine restarts
        self._lost: KafkaLost | None = None
        self._polling = True  # until the loop ends (a drain, or Kafka lost)
        self._listed: list[int] = []  # the partitions the last heartbeat said this worker reads

    @property
    def in_flight(self) -> int:
        return sum(len(feed.tasks) for feed in self.feeds)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        # Requests an earlier life of this worker id still owns (an engine restart, a pod
        # restarted under the same name) are not running here: let them be taken over.
        await self.owners.release(await self.owners.mine())
        background = [
            asyncio.create_task(self.publisher.run()),
            asyncio.create_task(self.tracer.run()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(takeover.run(self)),
            asyncio.create_task(sample_utilization(self.engine, self.cost)),
            asyncio.create_task(record_usage(self.ledger)),
            asyncio.create_task(
                cancel.listen(self.redis, self.settings, self.cancel, self.held.keys)
            ),
            *(asyncio.create_task(kafka.report_lag(f.consumer, f.group)) for f in self.feeds),
            asyncio.create_task(
                kafka.watch_topics(self.settings, self.producer, self._topics_recreated)
            ),
        ]
        try:
            while not self.stopping.is_set() and self._lost is None and self._fatal is None:
                await self._poll_once()
                try:
                    await self.commit()
                except KafkaLost as e:
                    self._lost = e
                for feed in self.feeds:
                    if gone := await feed.lost():
                        self._lost = KafkaLost(f"the broker lost {sorted(gone)}")
            if self._lost is not None:
                log.error("Kafka lost (%s): finishing what runs, then reconnecting", self._lost)
            self._polling = False  # say so now: its partitions are read elsewhere meanwhile
            await self._beat()
            await self._drain()
        finally:
            if self._recovery is not None:
                self._recovery.cancel()
                background.append(self._recovery)
            for task in background:
                task.cancel()
            # None of them may outlive the worker (they would act for it).
            await asyncio.wait(background, timeout=CLOSE_TIMEOUT_S)
            await self._hand_over()
            try:
                await self.ledger.flush()
            except Exception as e:
                log.warning("last ledger flush failed, %s", e)
            await sredis.delete_heartbeat(self.redis, self.settings, self.settings.worker_id)
            self.tracer.shutdown()
            if self.rescue is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.rescue.stop(), CLOSE_TIMEOUT_S)
        if self._fatal is not None:
            raise self._fatal
        if self._lost is not None:
            raise self._lost

    def _topics_recreated(self, created: list[str]) -> None:
        self.results.forget()
        # The broker lost its state: this worker's group membership, positions and pending
        # commits refer to logs that are gone. Reconnect rather than wait for a commit to hang.
        if any(feed.topic in created for feed in self.feeds):
            self._lost = KafkaLost(f"the broker lost {sorted(created)}")

    async def _poll_once(self) -> None:
        s = self.settings
        room = s.max_in_flight - self.in_flight
        if room <= 0 or self._recovery is not None:
            await self._wait_for_room()
            return
        if self.interactive is None:  # a batch-only worker: batch work is all there is
            assert self.batch is not None
            batch_room = min(room, s.batch_max_in_flight - self.in_flight)
            if batch_room <= 0:
                await self._wait_for_room()
            else:
                await self._take(self.batch, batch_room, s.poll_timeout_ms)
            return
        if await self._take(self.interactive, room, s.poll_timeout_ms):
            self._interactive_at = time.monotonic()
            return
        # Batch work only with spare capacity: the interactive poll brought nothing, none came
        # for batch_quiet_ms, and the worker holds fewer than batch_max_in_flight requests in
        # all, so that interactive load pushes batch work out. Otherwise the batch consumer is
        # left alone, neither polled nor paused: pausing drops what it has fetched, and with a
        # backlog each resume would fetch megabytes again (it may go unpolled for long, see
        # serve()).
        batch_room = min(room, s.batch_max_in_flight - self.in_flight)
        quiet = time.monotonic() - self._interactive_at >= s.batch_quiet_ms / 1000
        if self.batch is not None and batch_room > 0 and quiet:
            await self._take(self.batch, batch_room, timeout_ms=0)

    async def _wait_for_room(self) -> None:
        """Full: stop fetching (records stay in Kafka for other workers), keep the group
        membership alive, and wake as soon as a request finishes."""
        if self.interactive is not None:
            await self.interactive.hold()
        if self._listed:  # say at once that its partitions are left to others
            await self._beat()
        self._freed.clear()
        try:
            await asyncio.wait_for(self._freed.wait(), timeout=1.0)
        except TimeoutError:
            pass

    async def _take(self, feed: Feed, room: int, timeout_ms: int) -> int:
        # A poll waits out a whole group rebalance (seconds on the dev broker); a SIGTERM must
        # not: the drain bound starts at once (the partitions are read elsewhere meanwhile).
        take = asyncio.ensure_future(
            feed.take(min(room, self.settings.poll_max_records), timeout_ms)
        )
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not take.done():
            take.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await take
            return 0
        records = take.result()
        # Everything taken goes to the engine at once; vLLM batches them continuously.
        for tp, record in records:
            await self.accept(feed, tp, record)
        return len(records)

    async def accept(self, feed: Feed, tp: TopicPartition | None, record: ConsumerRecord) -> None:
        """Claim and start a request read from Kafka. `tp` is None for one read outside the
        group (workers/rescue.py): the partition's owner in the group commits it, or
        dead-letters it if it is bad."""
        if tp is not None:
            feed.offsets.started(tp, record.offset)
        try:
            request = await self._parse(feed, record)
        except (ValidationError, Forged, pools.Misrouted) as e:
            if tp is not None:
                await kafka.dead_letter(self.producer, feed.dlq_topic, record, _reason(e))
                feed.offsets.finished(tp, record.offset)
            return
        if request is None:  # stopping before it could be checked: redelivered
            return
        metrics.KAFKA_QUEUE_TIME.labels(record.topic).observe(
            max(0.0, time.time() - request.enqueued_at)
        )
        rid = request.request_id
        traceparent = (tracing.header(record.headers) or b"").decode(errors="replace")
        self.tracer.start(rid, traceparent, "sluice.worker.request")
        self.tracer.hop(
            rid, tracing.WORKER_PICKED, partition=record.partition, offset=record.offset,
            rescued=tp is None,
        )  # fmt: skip
        claim = Claim(
            request, 1, feed.name, record.topic, record.partition, record.offset,
            traceparent=traceparent,
        )  # fmt: skip
        try:
            state, owner = await self.owners.claim_new(claim)
        except RedisError as e:  # run it: its first publish writes the record (reclaim)
            log.warning("ownership of %s unknown (%s): running it", rid, e)
            state, owner = "new", self.owners.me
        if state != "new":
            # Redelivered (a rebalance, or its worker died and another continued it): it runs,
            # or ran, elsewhere. Commit it once it is done, never run a second copy.
            log.info("%s is %s under %s: not running it again", rid, state, owner)
            metrics.REDELIVERED.labels(state).inc()
            self.tracer.hop(rid, "worker.redelivered", state=state, owner=owner or "")
            self.tracer.end(rid)
            if tp is not None:
                feed.watch(self.owners, tp, record.offset, rid)
            return
        self.start(claim, feed, tp)

    async def _parse(self, feed: Feed, record: ConsumerRecord) -> GenerationRequest | None:
        """The record's request, its tenant verified if it is a batch one. Raises
        ValidationError or Forged; None if the worker stopped while Redis was unreachable."""
        request = GenerationRequest.model_validate_json(record.value or b"")
        pools.check_model(request.model, request.adapter, self.settings)
        if not feed.batch:
            return request
        while not self.stopping.is_set():
            try:
                return await self.signers.verified(record, request)
            except RedisError as e:
                log.warning("cannot check the signature of %s now (%s)", request.request_id, e)
                await asyncio.sleep(1.0)
        return None

    def start(self, claim: Claim, feed: Feed, tp: TopicPartition | None) -> None:
        """Serve a request this worker owns; `tp` is None for one taken over from another
        worker (its Kafka record is that partition's new owner's to commit)."""
        # Held before anything can await, so a Cancel from now on finds it.
        running = Running(claim, feed)
        self.held[claim.request.request_id] = running
        task = asyncio.create_task(self._serve(running))
        feed.tasks.add(task)
        task.add_done_callback(lambda t: self._finished(t, running, tp))

    def _finished(
        self, task: asyncio.Task[None], running: Running, tp: TopicPartition | None
    ) -> None:
        feed, claim = running.feed, running.claim
        feed.tasks.discard(task)
        self._freed.set()
        self.tracer.end(claim.request.request_id)
        exc = None if task.cancelled() else task.exception()
        if isinstance(exc, EngineDead):  # still held: _recover charges and releases it
            if self._recovery is None:
                self._recovery = asyncio.create_task(self._recover(exc))
            return
        if self.held.get(claim.request.request_id) is running:
            del self.held[claim.request.request_id]
        if task.cancelled():
            return  # not finished: handed over (see _hand_over), or redelivered
        if exc is not None:
            log.error("request %s failed outside the engine: %r", claim.request.request_id, exc)
        if tp is None:
            return
        if running.fenced:  # now another worker's: commit once that one is done
            feed.watch(self.owners, tp, claim.offset, claim.request.request_id)
        else:
            feed.offsets.finished(tp, claim.offset)

    def _fenced(self, request_id: str, lost: bool) -> None:
        """Another worker took this request over (this one was taken for dead): stop it. Or
        Redis lost its record (`lost`): write it again, the publisher retries meanwhile."""
        running = self.held.get(request_id)
        if running is None:
            return
        if not lost:
            self.tracer.hop(request_id, "worker.fenced")
            running.fence()
        elif request_id not in self._reclaiming:
            self._reclaiming.add(request_id)
            task = asyncio.create_task(self.owners.reclaim(running.claim, running.ids))
            task.add_done_callback(lambda _: self._reclaiming.discard(request_id))

    def room(self) -> int:
        """Requests this worker may still take: none while its engine restarts or it drains."""
        if self._recovery is not None or not self._polling:
            return 0
        return self.settings.max_in_flight - self.in_flight

    def cancel(self, request_id: str) -> None:
        """A Cancel arrived; every worker hears it, the one holding the request stops it."""
        running = self.held.get(request_id)
        if running is not None:
            log.info("cancelling %s", request_id)
            running.stop("abort")

    async def commit(self) -> None:
        for feed in self.feeds:
            await feed.commit()

    async def _drain(self) -> None:
        """Graceful stop: no new polls; let in-flight requests finish, then commit them (not
        when Kafka is lost: they may come again, at least once). What is still running at the
        drain bound is handed over to other workers (_hand_over), not dropped."""
        tasks = [t for feed in self.feeds for t in feed.tasks]
        if tasks and self._fatal is None:
            log.info("draining %d in-flight requests", len(tasks))
            await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        for feed in self.feeds:
            for task in feed.watching:
                task.cancel()
        if self._fatal is None and self._lost is None:
            await self.commit()

    async def _recover(self, exc: EngineDead) -> None:
        """The engine died: charge the requests that were inside it an attempt, hand every
        request over to live workers, and start a new engine in place. The worker stays in
        its consumer group meanwhile, taking nothing (its records wait, or go to others)."""
        log.error("the engine died (%s): handing requests over, starting a new engine", exc)
        died = [r.request.request_id for r in self.held.values() if r.in_engine]
        with contextlib.suppress(RedisError):
            await self.owners.engine_died(died)
        await self._hand_over()
        self.held.clear()
        try:
            await self.engine.restart()
            log.info("a new engine is serving")
        except Exception as e:  # no engine: exit, the orchestrator restarts the worker
            self._fatal = e
        self._recovery = None
        self._freed.set()

    async def _hand_over(self) -> None:
        """Stop what still runs and let live workers continue it from what was published."""
        unfinished = list(self.held.values())
        tasks = [t for feed in self.feeds for t in feed.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not unfinished:
            return
        try:
            await self.publisher.flush()  # what was generated is what the next worker keeps
            await self.owners.release([r.request.request_id for r in unfinished])
            for r in unfinished:
                self.tracer.hop(r.request.request_id, "worker.handed_over")
            log.warning("handed %d unfinished requests over to other workers", len(unfinished))
        except RedisError as e:  # they are found anyway: their owner has no heartbeat
            log.error("handing requests over failed: %s", e)

    # -- one request ------------------------------------------------------------------------

    async def _serve(self, running: Running) -> None:
        request = running.request
        sink = self.sink(running)
        picked_at = time.time()
        try:
            refused = await self._refused(running)
            if refused is not None:
                log.info("dropping %s unrun: %s", request.request_id, refused)
                unrun = Progress(finish_reason=refused)
                await sink.done(done_event(request, unrun, picked_at, 0.0, self.settings.worker_id))
                return
            async with self._suspects if running.claim.suspect else contextlib.nullcontext():
                await self._generate(running, sink, picked_at)
        finally:
            self.cost.discard(request.request_id)  # a no-op unless it was cancelled

    def sink(self, running: Running) -> Sink:
        claim = running.claim
        rid = claim.request.request_id
        if running.feed.batch:
            return BatchSink(
                self.producer,
                self.results,
                claim.request,
                lambda: self.owners.finish_quietly(rid, claim.epoch),
            )

        async def dead_letter(reason: str) -> None:
            await kafka.dead_letter_value(
                self.producer, running.feed.dlq_topic, rid.encode(),
                claim.request.model_dump_json().encode(), reason, claim.topic, claim.partition,
                claim.offset,
            )  # fmt: skip

        retain = claim.request.retain_s or 0
        return StreamSink(self.publisher, rid, claim.epoch, dead_letter, claim.chars, retain)

    async def _refused(self, running: Running) -> StopReason | None:
        """Why a request must not start: nobody waits for it any more."""
        if running.expired:
            return "timeout"
        if running.stop_reason is None:
            try:
                if await sredis.is_cancelled(self.redis, self.settings, running.request.request_id):
                    return "abort"
            except RedisError as e:  # run it: a missed cancel costs engine time, nothing else
                log.warning("cancel check failed: %s", e)
        return running.stop_reason

    async def _generate(self, running: Running, sink: Sink, picked_at: float) -> None:
        request = running.request
        rid, tenant = request.request_id, request.tenant or "default"
        model = request.adapter or self.settings.model  # what it is billed as
        progress = Progress(completion_tokens=len(running.claim.emitted))
        self.cost.start(rid)
        try:
            await self._stream(running, sink, progress)
        except RequestRejected as e:
            self.cost.finish(rid, tenant, model)
            await sink.rejected(str(e))
            return
        except EngineDead:
            raise
        except Exception as e:
            log.exception("request %s failed", rid)
            self.cost.finish(rid, tenant, model)
            await sink.failed(str(e))
            return
        seconds, _ = self.cost.finish(rid, tenant, model)
        if running.fenced:
            return  # its new owner finishes (and bills) it
        # Earlier owners' engine time counts too: a migrated request costs what all spent.
        seconds += running.claim.seconds
        dollars = seconds * self.cost.dollars_per_second
        # Only once the outcome is stored does the request count as finished in Kafka; only
        # the one owner whose done event went out bills it.
        done = done_event(request, progress, picked_at, dollars, self.settings.worker_id)
        if await sink.done(done):
            add_request(
                self.ledger,
                topic=running.claim.topic,
                tenant=tenant,
                model=model,
                prompt_tokens=progress.prompt_tokens,
                completion_tokens=progress.completion_tokens,
                seconds=seconds,
                dollars=dollars,
            )

    async def _stream(self, running: Running, sink: Sink, p: Progress) -> None:
        """Relay the engine's deltas to the sink until the request ends or is stopped."""
        rid = running.request.request_id
        resume = running.claim.emitted
        reported = 0.0  # engine seconds already passed on with published tokens
        try:
            async with running.stoppable():
                running.in_engine = True
                self.tracer.hop(rid, tracing.ENGINE_SUBMITTED, resume=len(resume))
                stream = self.engine.generate(
                    running.request, priority=running.feed.priority, resume=resume
                )
                async for delta in stream:
                    p.prompt_tokens = delta.prompt_tokens
                    p.finish_reason = delta.finish_reason or p.finish_reason
                    if delta.num_tokens == 0:
                        continue
                    # The prompt's tokens count once, with the first token (it was prefilled).
                    prefilled = p.prompt_tokens + len(resume) if p.first_token_at is None else 0
                    self.cost.tokens(rid, delta.num_tokens + prefilled)
                    if p.first_token_at is None:
                        p.first_token_at = time.time()
                        if delta.scheduled_at is not None:
                            self.tracer.hop(rid, tracing.ENGINE_SCHEDULED, delta.scheduled_at)
                        if delta.sampled_at is not None:
                            self.tracer.hop(rid, tracing.ENGINE_FIRST_TOKEN, delta.sampled_at)
                        self.tracer.hop(rid, tracing.WORKER_FIRST_TOKEN, p.first_token_at)
                    spent = self.cost.spent(rid)
                    sink.tokens(
                        p.completion_tokens, delta.text, delta.token_ids, spent - reported,
                        delta.logprobs,
                    )  # fmt: skip
                    running.ids.extend(delta.token_ids)
                    reported = spent
                    p.completion_tokens += delta.num_tokens
        except TimeoutError:
            if not running.interrupted:
                raise  # the engine's own, not our deadline or a cancel
            p.finish_reason = running.finish_reason
            # Closing the stream already aborts it in vLLM; this makes sure for any engine.
            await self.engine.abort(rid)
        except EngineDead:
            raise  # in_engine stays set: the request is charged an attempt (_hand_over)
        except BaseException:
            running.in_engine = False
            raise
        running.in_engine = False

    async def _heartbeat(self) -> None:
        while True:
            await self._beat()
            metrics.IN_FLIGHT.set(self.in_flight)
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _beat(self) -> None:
        interactive = self.interactive is not None
        kv, rate = self.load.sample()
        beat = Heartbeat(
            worker_id=self.settings.worker_id,
            engine=self.engine.name,
            model=self.engine.model,
            in_flight=self.in_flight,
            ts=time.time(),
            lag=metrics.reported_lag(self.settings.requests_topic) if interactive else 0,
            interactive=interactive,
            partitions=self._partitions(),
            topic=self.settings.requests_topic,
            kv_cache_usage=kv,
            tokens_per_s=rate,
        )
        self._listed = beat.partitions
        try:
            await sredis.write_heartbeat(self.redis, self.settings, beat)
        except Exception as e:
            log.warning("heartbeat failed: %s", e)

    def _partitions(self) -> list[int]:
        """What this worker reads in its group now. Nothing while it takes nothing (full,
        restarting its engine, draining), although it stays a member: the workers with room
        read its partitions meanwhile (workers/rescue.py), so a full worker's share of the
        topic does not wait for it."""
        if self.interactive is None or self.room() <= 0:
            return []
        return sorted(tp.partition for tp in self.interactive.holding)


def _reason(error: ValidationError | Forged | pools.Misrouted) -> str:
    if isinstance(error, Forged):
        return f"batch message refused: {error}"
    if isinstance(error, pools.Misrouted):
        return f"misrouted: {error}"
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    return f"invalid request message: {where}: {first['msg']} ({error.error_count()} errors)"


async def serve(settings: Settings, engine: Engine, stop: asyncio.Event | None = None) -> None:
    """Run a worker on `engine` until SIGINT/SIGTERM (or `stop` is set, for tests)."""
    await kafka.ensure_topics(settings)
    redis = sredis.connect(settings)
    producer = kafka.make_producer(settings)
    feeds = settings.worker_feeds
    consumer = kafka.make_consumer(settings) if feeds in ("all", "interactive") else None
    # Not polled while interactive traffic keeps the worker busy or its batch slots are full,
    # possibly for long: it must not count as gone (a rebalance) meanwhile.
    batch_consumer = None
    if feeds in ("all", "batch"):
        batch_consumer = kafka.make_consumer(
            settings,
            group=settings.batch_consumer_group,
            max_poll_interval_ms=BATCH_POLL_INTERVAL_MS,
        )
    worker = Worker(
        settings, engine, redis, consumer, producer, stopping=stop, batch_consumer=batch_consumer
    )
    for feed in worker.feeds:
        feed.subscribe()
    await producer.start()
    # Together: each start waits for its group join, seconds on the dev broker.
    await asyncio.gather(*(feed.consumer.start() for feed in worker.feeds))
    if stop is None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stopping.set)
    log.info(
        "worker %s serving %s on %s",
        settings.worker_id,
        engine.model,
        ", ".join(f"{f.topic} ({f.name})" for f in worker.feeds),
    )
    try:
        await worker.run()
    finally:
        for feed in worker.feeds:
            # Bounded: leaving a group the broker has forgotten may not get an answer.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(feed.consumer.stop(), CLOSE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), CLOSE_TIMEOUT_S)
        await redis.aclose()


def main(model: str | None = None) -> None:
    """`model`: the catalog's model whose pool this worker joins (shared/pools.py); None: the
    default model's."""
    settings = Settings()
    if model is not None:
        settings = pools.pool_settings(settings, model)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.worker_metrics_port:
        metrics.serve_metrics(settings.worker_metrics_port, settings.metrics_host)
        register_gpu_metrics()

    async def run() -> None:
        engine = engines.start(settings)
        try:
            # Fresh Kafka clients, topics ensured again; the engine stays loaded.
            await kafka.reconnecting(functools.partial(serve, settings, engine))
        finally:
            await engine.shutdown()

    asyncio.run(run())
