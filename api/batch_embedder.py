"""The Batch API's embeddings lines: every API process (they hold the embedding model) reads
`sluice.batch.embeddings` in one consumer group (SLUICE_BATCH_EMBEDDER_GROUP), embeds each line
as `/v1/embeddings` would, bills the batch's tenant, and records the line in its batch
(api/batches.py: once per line, so a line read twice after a rebalance or a crash is answered
once). Offsets are committed once the lines are recorded: a process that dies mid-way leaves
its lines to the next reader. A line of a cancelled batch is recorded as `batch_cancelled`
unrun; one that is not a `BatchEmbedding` goes to the batch dead-letter topic with the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord
from pydantic import ValidationError

from api.batches import Batches, embedding_line, error_line
from api.openai_embeddings import EmbeddingsHandler
from api.openai_protocol import EmbeddingRequest
from api.openai_serving import OpenAIError
from shared import kafka
from shared.messages import BatchEmbedding
from shared.settings import Settings

log = logging.getLogger(__name__)

RETRY_S = 2.0


async def run(
    settings: Settings, batches: Batches, embeddings: EmbeddingsHandler, producer: AIOKafkaProducer
) -> None:
    """Until cancelled; a failure (Redis, Kafka) is logged and the reader starts again."""
    while True:
        try:
            await _consume(settings, batches, embeddings, producer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("batch embedder failed; starting again in %.0f s", RETRY_S)
            await asyncio.sleep(RETRY_S)


async def _consume(
    settings: Settings, batches: Batches, embeddings: EmbeddingsHandler, producer: AIOKafkaProducer
) -> None:
    consumer = AIOKafkaConsumer(
        settings.batch_embeddings_topic,
        **kafka.connection(settings),
        group_id=settings.batch_embedder_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        while True:
            got = await consumer.getmany(timeout_ms=1000, max_records=64)
            for records in got.values():
                for record in records:
                    await _serve(settings, record, batches, embeddings, producer)
            if got:
                await kafka.commit(consumer, {tp: rs[-1].offset + 1 for tp, rs in got.items()})
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), kafka.COMMIT_TIMEOUT_S)


async def _serve(
    settings: Settings,
    record: ConsumerRecord,
    batches: Batches,
    embeddings: EmbeddingsHandler,
    producer: AIOKafkaProducer,
) -> None:
    try:
        line = BatchEmbedding.model_validate_json(record.value or b"")
    except ValidationError as e:
        reason = f"not a BatchEmbedding: {e.errors()[0]['msg']}"
        await kafka.dead_letter_value(
            producer, settings.batch_dlq_topic, record.key, record.value, reason,
            record.topic, record.partition, record.offset,
        )  # fmt: skip
        return
    rid = f"{line.batch_id}-{line.line}"
    status = await batches.redis.hget(batches.key(line.batch_id), "status")
    if status not in (b"validating", b"in_progress", b"cancelling"):
        return  # deleted, failed, expired or finalized: nothing to record it in
    if status == b"cancelling":
        why = "the batch was cancelled first"
        text = error_line(line.batch_id, line.line, line.custom_id, "batch_cancelled", why)
        failed = True
    else:
        try:
            body = EmbeddingRequest.model_validate(line.body)
            texts, tokens = await embeddings.checked(body)
            response = await embeddings.embed(body, texts, tokens, line.tenant)
            text, failed = embedding_line(rid, line.custom_id, response), False
        except (ValidationError, OpenAIError) as e:  # checked at creation: a changed setting
            message = e.body.error.message if isinstance(e, OpenAIError) else str(e)
            text = error_line(line.batch_id, line.line, line.custom_id, "invalid_request", message)
            failed = True
    await batches.record_line(line.batch_id, line.line, text, failed)
    await batches.finish_if_done(line.batch_id)
