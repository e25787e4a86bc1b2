"""The worker: consume requests from Kafka in micro-batches, run them on the engine, stream out.

Delivery is at-least-once: an offset is committed only when its request (and every earlier one
of the partition) has finished, so a worker that dies leaves its requests to be redelivered.
A worker at `max_in_flight` pauses its partitions and leaves the rest in Kafka for others.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import ValidationError
from redis.asyncio import Redis

from shared import kafka, metrics
from shared import redis as sredis
from shared.ledger import Ledger
from shared.messages import (
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    Heartbeat,
    Timings,
    Token,
    Usage,
)
from shared.settings import Settings
from workers import engines
from workers.cost import CostMeter
from workers.engines.base import Engine, EngineDead, RequestRejected
from workers.gpu import register_gpu_metrics
from workers.offsets import OffsetTracker
from workers.publisher import Publisher
from workers.usage import add_request, record_usage
from workers.utilization import sample_utilization

log = logging.getLogger("sluice.worker")


def _ms_since(t: float, now: float) -> float:
    return round(max(0.0, now - t) * 1000, 2)


class Worker:
    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        redis: Redis,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.redis = redis
        self.consumer = consumer
        self.producer = producer
        self.publisher = Publisher(redis, settings)
        self.offsets = OffsetTracker()
        self.cost = CostMeter(settings, engine.model)
        self.ledger = Ledger(redis, settings)
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = stopping or asyncio.Event()
        self._freed = asyncio.Event()
        self._fatal: BaseException | None = None

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        background = [
            asyncio.create_task(self.publisher.run()),
            asyncio.create_task(self._heartbeat()),
            asyncio.create_task(sample_utilization(self.engine, self.cost)),
            asyncio.create_task(kafka.report_lag(self.consumer, self.settings.consumer_group)),
            asyncio.create_task(record_usage(self.ledger)),
        ]
        try:
            while not self.stopping.is_set():
                await self._poll_once()
                await self.commit()
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

    async def _poll_once(self) -> None:
        capacity = self.settings.max_in_flight - len(self.tasks)
        if capacity <= 0:
            # Full: stop fetching (records stay in Kafka for other workers), keep the group
            # membership alive, and wake as soon as a request finishes.
            self.consumer.pause(*self.consumer.assignment())
            self._freed.clear()
            try:
                await asyncio.wait_for(self._freed.wait(), timeout=1.0)
            except TimeoutError:
                await self.consumer.getmany(timeout_ms=0)
            return
        self.consumer.resume(*self.consumer.paused())
        batch = await self.consumer.getmany(
            timeout_ms=self.settings.poll_timeout_ms,
            max_records=min(capacity, self.settings.poll_max_records),
        )
        # Everything in the batch goes to the engine at once; vLLM batches them continuously.
        for tp, records in batch.items():
            for record in records:
                await self._accept(tp, record)

    async def _accept(self, tp: TopicPartition, record: ConsumerRecord) -> None:
        self.offsets.started(tp, record.offset)
        try:
            request = GenerationRequest.model_validate_json(record.value or b"")
        except ValidationError as e:
            await self._dead_letter(record, _reason(e))
            self.offsets.finished(tp, record.offset)
            return
        metrics.KAFKA_QUEUE_TIME.labels(record.topic).observe(
            max(0.0, time.time() - request.enqueued_at)
        )
        task = asyncio.create_task(self._serve(request, record))
        self.tasks.add(task)
        task.add_done_callback(lambda t: self._finished(t, tp, record.offset))

    def _finished(self, task: asyncio.Task[None], tp: TopicPartition, offset: int) -> None:
        self.tasks.discard(task)
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
        self.offsets.finished(tp, offset)

    async def commit(self) -> None:
        ready = self.offsets.committable()
        if not ready:
            return
        try:
            await self.consumer.commit(ready)
        except Exception as e:  # e.g. a rebalance took the partition: the new owner redoes it
            log.warning("commit of %s failed: %s", ready, e)
            return
        self.offsets.mark_committed(ready)

    async def _drain(self) -> None:
        """Graceful stop: no new polls; let in-flight requests finish, then commit them."""
        if self.tasks and self._fatal is None:
            log.info("draining %d in-flight requests", len(self.tasks))
            await asyncio.wait(self.tasks, timeout=self.settings.drain_timeout_s)
        for task in list(self.tasks):
            task.cancel()
        if self._fatal is None:
            await self.commit()

    # -- one request ------------------------------------------------------------------------

    async def _generate(self, request: GenerationRequest, record: ConsumerRecord) -> None:
        rid = request.request_id
        picked_at = time.time()
        next_index = 0
        first_token_at: float | None = None
        prompt_tokens = 0
        finish_reason = "stop"
        self.cost.start(rid)
        try:
            async for delta in self.engine.generate(request):
                prompt_tokens = delta.prompt_tokens
                finish_reason = delta.finish_reason or finish_reason
                if delta.num_tokens == 0:
                    continue
                # The prompt's tokens count once, with the first token (it was prefilled).
                prefilled = prompt_tokens if first_token_at is None else 0
                self.cost.tokens(rid, delta.num_tokens + prefilled)
                if first_token_at is None:
                    first_token_at = time.time()
                self.publisher.tokens(rid, _tokens(next_index, delta.num_tokens, delta.text))
                next_index += delta.num_tokens
        except RequestRejected as e:
            self.cost.finish(rid)
            await self._dead_letter(record, f"rejected by engine: {e}")
            await self.publisher.finish(rid, ErrorEvent(request_id=rid, message=str(e)))
            return
        except EngineDead:
            raise
        except Exception as e:
            log.exception("request %s failed", rid)
            self.cost.finish(rid)
            await self.publisher.finish(
                rid, ErrorEvent(request_id=rid, message=f"engine error: {e}")
            )
            return
        now = time.time()
        seconds, dollars = self.cost.finish(rid)
        add_request(
            self.ledger,
            topic=record.topic,
            tenant="default",
            prompt_tokens=prompt_tokens,
            completion_tokens=next_index,
            seconds=seconds,
            dollars=dollars,
        )
        done = DoneEvent(
            request_id=rid,
            finish_reason=finish_reason,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=next_index),
            timings=Timings(
                queue_ms=_ms_since(request.enqueued_at, picked_at),
                ttft_ms=_ms_since(request.enqueued_at, first_token_at or now),
                e2e_ms=_ms_since(request.enqueued_at, now),
            ),
            cost_usd=dollars,
        )
        # Only once the done event is in Redis does the request count as finished in Kafka.
        await self.publisher.finish(rid, done)

    async def _serve(self, request: GenerationRequest, record: ConsumerRecord) -> None:
        try:
            await self._generate(request, record)
        finally:
            self.cost.discard(request.request_id)  # a no-op unless it was cancelled

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        await kafka.dead_letter(self.producer, self.settings.dlq_topic, record, reason)

    async def _heartbeat(self) -> None:
        while True:
            beat = Heartbeat(
                worker_id=self.settings.worker_id,
                engine=self.engine.name,
                model=self.engine.model,
                in_flight=len(self.tasks),
                ts=time.time(),
            )
            try:
                await sredis.write_heartbeat(self.redis, self.settings, beat)
            except Exception as e:
                log.warning("heartbeat failed: %s", e)
            metrics.IN_FLIGHT.set(len(self.tasks))
            await asyncio.sleep(self.settings.heartbeat_interval_s)


def _tokens(start: int, count: int, text: str) -> list[Token]:
    """One event per token. When a delta holds several tokens (vLLM may group them), the text
    rides on the last one, so indices stay exact and the texts still concatenate."""
    return [Token(index=start + i, text=text if i == count - 1 else "") for i in range(count)]


def _reason(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    return f"invalid request message: {where}: {first['msg']} ({error.error_count()} errors)"


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        # Commit what finished while we still own it; the rest is redelivered to the new owner.
        await self._worker.commit()
        self._worker.offsets.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned %s", sorted((tp.topic, tp.partition) for tp in assigned))


async def serve(settings: Settings, engine: Engine, stop: asyncio.Event | None = None) -> None:
    """Run a worker on `engine` until SIGINT/SIGTERM (or `stop` is set, for tests)."""
    await kafka.ensure_topics(settings)
    redis = sredis.connect(settings)
    producer = kafka.make_producer(settings)
    consumer = kafka.make_consumer(settings)
    worker = Worker(settings, engine, redis, consumer, producer, stopping=stop)
    consumer.subscribe([settings.requests_topic], listener=_Rebalance(worker))
    await producer.start()
    await consumer.start()
    if stop is None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stopping.set)
    log.info(
        "worker %s serving %s on %s", settings.worker_id, engine.model, settings.requests_topic
    )
    try:
        await worker.run()
    finally:
        await consumer.stop()
        await producer.stop()
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
            await serve(settings, engine)
        finally:
            await engine.shutdown()

    asyncio.run(run())
