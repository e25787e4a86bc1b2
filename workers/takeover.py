"""The takeover round: what a worker picks up besides the records of its own partitions.

Every `INTERVAL_S`, each worker moves the requests of workers whose heartbeat stopped to the
orphans (workers/ownership.py), claims orphans while it has room and continues each from its
published tokens, or parks it as a poison pill, and then reads the partitions no live worker
holds (workers/rescue.py). None of it waits for the Kafka group.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from shared import kafka, metrics
from workers.cancel import Running
from workers.feed import Feed
from workers.ownership import Claim, resumable

if TYPE_CHECKING:
    from workers.main import Worker

log = logging.getLogger("sluice.worker")

INTERVAL_S = 0.25  # one HGETALL of the heartbeats a round


async def run(worker: Worker) -> None:
    """Until cancelled; a failed round (Redis or Kafka down) is tried again, never fatal."""
    while True:
        await asyncio.sleep(INTERVAL_S)
        try:
            await one_round(worker)
        except Exception:
            log.exception("takeover round failed; trying again")


async def one_round(worker: Worker) -> None:
    owners = worker.owners
    beats = await owners.heartbeats()  # read once a round: reaping and rescue both need them
    if moved := await owners.reap(beats):
        log.warning("a worker died: %d of its requests to continue", moved)
    feeds = {f.name: f for f in worker.feeds}
    room = worker.room()
    for rid in await owners.orphans(room) if room > 0 else []:
        claim = await owners.claim_orphan(rid, [f.topic for f in worker.feeds])
        if claim is not None:
            await _continue(worker, claim, feeds[claim.feed])
    await _rescue(worker, beats)


async def _continue(worker: Worker, claim: Claim, feed: Feed) -> None:
    rid = claim.request.request_id
    metrics.TAKEOVERS.labels(feed.name).inc()
    worker.tracer.start(rid, claim.traceparent, name="sluice.worker.takeover")
    worker.tracer.hop(rid, "worker.took_over", epoch=claim.epoch, after=len(claim.emitted))
    if reason := worker.owners.parked_reason(claim):
        await _park(worker, claim, feed, reason)
        return
    if not resumable(claim):
        await worker.owners.restart_from_scratch(rid)
        claim.emitted, claim.chars = [], 0
    log.info(
        "continuing %s after %d published tokens (takeover %d)",
        rid, len(claim.emitted), claim.takeovers,
    )  # fmt: skip
    worker.start(claim, feed, None)


async def _park(worker: Worker, claim: Claim, feed: Feed, reason: str) -> None:
    """A poison pill: to the dead-letter topic with the reason, and an error to its client."""
    request = claim.request
    await kafka.dead_letter_value(
        worker.producer, feed.dlq_topic, request.request_id.encode(),
        request.model_dump_json().encode(), reason, claim.topic, claim.partition, claim.offset,
    )  # fmt: skip
    await worker.sink(Running(claim, feed)).failed(reason)
    worker.tracer.hop(request.request_id, "worker.parked", reason=reason)
    worker.tracer.end(request.request_id)


async def _rescue(worker: Worker, beats: dict[bytes, bytes]) -> None:
    """Requests on partitions no live worker consumes (workers/rescue.py)."""
    feed = worker.interactive
    if worker.rescue is None or feed is None:
        return
    partitions = feed.consumer.partitions_for_topic(feed.topic) or set()
    holding = {tp.partition for tp in feed.holding}
    for record in await worker.rescue.round(worker.room(), partitions, holding, beats):
        await worker.accept(feed, None, record)
