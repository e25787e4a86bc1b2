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
import logging
import math
import signal
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared import kafka, metrics
from shared import redis as sredis
from shared.kafka import KafkaLost
from shared.ledger import Ledger
from shared.messages import GenerationRequest, Heartbeat
from shared.settings import Settings
from workers import cancel, engines
from workers.cancel import Running, StopReason
from workers.cost import CostMeter
from workers.engines.base import Engine, EngineDead, RequestRejected
from workers.feed import Feed
from workers.gpu import register_gpu_metrics
from workers.publisher import Publisher
from workers.sinks import BatchSink, Progress, Sink, StreamSink, done_event
from workers.usage import add_request, record_usage
from workers.utilization import sample_utilization

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
        self.publisher = Publisher(redis, settings)
        self.cost = CostMeter(settings, engine.model)
        self.ledger = Ledger(redis, settings)
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
        self.held: dict[str, Running] = {}  # request id -> the request being served
        self.stopping = stopping or asyncio.Event()
        self._freed = asyncio.Event()
        self._interactive_at = -math.inf  # monotonic time the last interactive request came
        self._fatal: BaseException | None = None
        self._lost: KafkaLost | None = None

    @property
    def in_flight(self) -> int:
        return sum(len(feed.tasks) for feed in self.feeds)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        background = [
            asyncio.create_task(self.publisher.run()),
            asyncio.create_task(self._heartbeat()),
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
            while not self.stopping.is_set() and self._lost is None:
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
            await self._drain()
        finally:
            for task in background:
                task.cancel()
            try:
                await self.ledger.flush()
            except Exception as e:
                log.warning("last ledger flush failed, %s", e)
            await sredis.delete_heartbeat(self.redis, self.settings, self.settings.worker_id)
        if self._fatal is not None:
            raise self._fatal
        if self._lost is not None:
            raise self._lost

    def _topics_recreated(self, created: list[str]) -> None:
        # The broker lost its state: this worker's group membership, positions and pending
        # commits refer to logs that are gone. Reconnect rather than wait for a commit to hang.
        if any(feed.topic in created for feed in self.feeds):
            self._lost = KafkaLost(f"the broker lost {sorted(created)}")

    async def _poll_once(self) -> None:
        s = self.settings
        room = s.max_in_flight - self.in_flight
        if room <= 0:
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
        self._freed.clear()
        try:
            await asyncio.wait_for(self._freed.wait(), timeout=1.0)
        except TimeoutError:
            pass

    async def _take(self, feed: Feed, room: int, timeout_ms: int) -> int:
        records = await feed.take(min(room, self.settings.poll_max_records), timeout_ms)
        # Everything taken goes to the engine at once; vLLM batches them continuously.
        for tp, record in records:
            await self._accept(feed, tp, record)
        return len(records)

    async def _accept(self, feed: Feed, tp: TopicPartition, record: ConsumerRecord) -> None:
        feed.offsets.started(tp, record.offset)
        try:
            request = GenerationRequest.model_validate_json(record.value or b"")
        except ValidationError as e:
            await kafka.dead_letter(self.producer, feed.dlq_topic, record, _reason(e))
            feed.offsets.finished(tp, record.offset)
            return
        metrics.KAFKA_QUEUE_TIME.labels(record.topic).observe(
            max(0.0, time.time() - request.enqueued_at)
        )
        # Held before anything can await, so a Cancel from now on finds it.
        running = Running(request, feed)
        self.held[request.request_id] = running
        task = asyncio.create_task(self._serve(running, record))
        feed.tasks.add(task)
        task.add_done_callback(lambda t: self._finished(t, running, tp, record.offset))

    def _finished(
        self, task: asyncio.Task[None], running: Running, tp: TopicPartition, offset: int
    ) -> None:
        feed = running.feed
        feed.tasks.discard(task)
        if self.held.get(running.request.request_id) is running:
            del self.held[running.request.request_id]
        self._freed.set()
        if task.cancelled():
            return  # not finished: leave the offset uncommitted so the request is redelivered
        exc = task.exception()
        if isinstance(exc, EngineDead):
            self._fatal = exc
            self.stopping.set()
            return
        if exc is not None:
            log.error("request at %s@%d failed outside the engine: %r", tp, offset, exc)
        feed.offsets.finished(tp, offset)

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
        when Kafka is lost: they may come again, at least once)."""
        tasks = [t for feed in self.feeds for t in feed.tasks]
        if tasks and self._fatal is None:
            log.info("draining %d in-flight requests", len(tasks))
            await asyncio.wait(tasks, timeout=self.settings.drain_timeout_s)
        for task in tasks:
            task.cancel()
        if self._fatal is None and self._lost is None:
            await self.commit()

    # -- one request ------------------------------------------------------------------------

    async def _serve(self, running: Running, record: ConsumerRecord) -> None:
        request = running.request
        sink = self._sink(running, record)
        picked_at = time.time()
        try:
            refused = await self._refused(running)
            if refused is not None:
                log.info("dropping %s unrun: %s", request.request_id, refused)
                await sink.done(
                    done_event(request, Progress(finish_reason=refused), picked_at, 0.0)
                )
                return
            await self._generate(running, sink, record.topic, picked_at)
        finally:
            self.cost.discard(request.request_id)  # a no-op unless it was cancelled

    def _sink(self, running: Running, record: ConsumerRecord) -> Sink:
        request = running.request
        if running.feed.batch:
            return BatchSink(self.producer, self.settings.batch_results_topic, request)

        async def dead_letter(reason: str) -> None:
            await kafka.dead_letter(self.producer, running.feed.dlq_topic, record, reason)

        return StreamSink(self.publisher, request.request_id, dead_letter)

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

    async def _generate(self, running: Running, sink: Sink, topic: str, picked_at: float) -> None:
        request = running.request
        rid, tenant = request.request_id, request.tenant or "default"
        progress = Progress()
        self.cost.start(rid)
        try:
            await self._stream(running, sink, progress)
        except RequestRejected as e:
            self.cost.finish(rid, tenant)
            await sink.rejected(str(e))
            return
        except EngineDead:
            raise
        except Exception as e:
            log.exception("request %s failed", rid)
            self.cost.finish(rid, tenant)
            await sink.failed(str(e))
            return
        seconds, dollars = self.cost.finish(rid, tenant)
        add_request(
            self.ledger,
            topic=topic,
            tenant=tenant,
            prompt_tokens=progress.prompt_tokens,
            completion_tokens=progress.completion_tokens,
            seconds=seconds,
            dollars=dollars,
        )
        # Only once the outcome is stored does the request count as finished in Kafka.
        await sink.done(done_event(request, progress, picked_at, dollars))

    async def _stream(self, running: Running, sink: Sink, p: Progress) -> None:
        """Relay the engine's deltas to the sink until the request ends or is stopped."""
        rid = running.request.request_id
        try:
            async with running.stoppable():
                stream = self.engine.generate(running.request, priority=running.feed.priority)
                async for delta in stream:
                    p.prompt_tokens = delta.prompt_tokens
                    p.finish_reason = delta.finish_reason or p.finish_reason
                    if delta.num_tokens == 0:
                        continue
                    # The prompt's tokens count once, with the first token (it was prefilled).
                    prefilled = p.prompt_tokens if p.first_token_at is None else 0
                    self.cost.tokens(rid, delta.num_tokens + prefilled)
                    if p.first_token_at is None:
                        p.first_token_at = time.time()
                    sink.tokens(p.completion_tokens, delta.num_tokens, delta.text)
                    p.completion_tokens += delta.num_tokens
        except TimeoutError:
            if not running.interrupted:
                raise  # the engine's own, not our deadline or a cancel
            p.finish_reason = running.finish_reason
            # Closing the stream already aborts it in vLLM; this makes sure for any engine.
            await self.engine.abort(rid)

    async def _heartbeat(self) -> None:
        interactive = self.interactive is not None
        while True:
            beat = Heartbeat(
                worker_id=self.settings.worker_id,
                engine=self.engine.name,
                model=self.engine.model,
                in_flight=self.in_flight,
                ts=time.time(),
                lag=metrics.reported_lag(self.settings.requests_topic) if interactive else 0,
                interactive=interactive,
            )
            try:
                await sredis.write_heartbeat(self.redis, self.settings, beat)
            except Exception as e:
                log.warning("heartbeat failed: %s", e)
            metrics.IN_FLIGHT.set(self.in_flight)
            await asyncio.sleep(self.settings.heartbeat_interval_s)


def _reason(error: ValidationError) -> str:
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


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.worker_metrics_port:
        metrics.serve_metrics(settings.worker_metrics_port)
        register_gpu_metrics()

    async def run() -> None:
        engine = engines.start(settings)
        try:
            # Fresh Kafka clients, topics ensured again; the engine stays loaded.
            await kafka.reconnecting(lambda: serve(settings, engine))
        finally:
            await engine.shutdown()

    asyncio.run(run())
