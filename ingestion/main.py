"""The ingestion process: consume `sluice.ingest`, load, chunk, embed and store each document.

Records are handled one at a time, in order per partition (a document's versions share a
partition: the topic is keyed by doc_id). An offset is committed only once its document's
status is in Redis, so a process that dies leaves the document to be redelivered; handling is
idempotent (chunk ids are f"{doc_id}#{position}" and an unchanged document is not re-embedded).
A message that cannot be ingested goes to the dead-letter topic and the consumer moves on;
failures of the embedder or the store are retried with backoff first (they pass).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import signal
import time
from collections.abc import Sequence

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, TopicPartition
from pydantic import ValidationError
from redis.asyncio import Redis

from ingestion.chunking import Chunker
from ingestion.loaders import LoadedText, LoadError, PdfLimits, load
from shared import kafka, metrics
from shared import redis as sredis
from shared.documents import DocumentStatus, set_status
from shared.embeddings import Embedder
from shared.messages import DOC_ID_MAX, DOC_ID_PATTERN, IngestDocument
from shared.settings import Settings
from shared.vectorstores import open_store
from shared.vectorstores.base import Chunk, VectorStore

log = logging.getLogger("sluice.ingestion")

GROUP = kafka.INGESTION_GROUP
# Also how long a stop request may wait for the poll to return.
POLL_TIMEOUT_MS = 500
RETRY_MAX_S = 30.0
_DOC_ID = re.compile(DOC_ID_PATTERN)


class Interrupted(Exception):
    """Stopped while waiting to retry: the record is left uncommitted, to be redelivered."""


class Ingester:
    def __init__(
        self,
        settings: Settings,
        embedder: Embedder,
        store: VectorStore,
        redis: Redis,
        producer: AIOKafkaProducer,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.store = store
        self.redis = redis
        self.producer = producer
        self.stopping = stopping or asyncio.Event()
        self.chunker = Chunker.for_embedder(embedder, settings)
        self.pdf = PdfLimits(settings.pdf_max_pages, settings.pdf_parse_timeout_s)

    async def handle(self, record: ConsumerRecord) -> None:
        """Ingest one record and write its status. Problems with the document itself end in the
        DLQ; only failures to reach Redis or the DLQ raise (then nothing may be committed)."""
        try:
            doc = IngestDocument.model_validate_json(record.value or b"")
        except ValidationError as e:
            await self._reject(record, _reason(e), _readable_doc_id(record.value))
            return
        started = time.perf_counter()
        try:
            status, unchanged = await self._apply_retrying(doc)
        except LoadError as e:
            await self._reject(record, f"cannot load document: {e.reason}", doc.doc_id, doc.source)
            return
        except Interrupted:
            raise
        except Exception as e:  # still failing after the retries: keep the message for a replay
            log.exception("ingesting %s failed", doc.doc_id)
            attempts = self.settings.ingest_retries + 1
            reason = f"ingestion failed after {attempts} attempts: {type(e).__name__}: {e}"
            await self._reject(record, reason, doc.doc_id, doc.source)
            return
        await set_status(self.redis, self.settings, status)
        outcome = "unchanged" if unchanged else status.status
        metrics.INGESTED_DOCUMENTS.labels(outcome).inc()
        log.info(
            "%s %s: %s, %d chunks, %.0f ms",
            doc.action,
            doc.doc_id,
            "unchanged" if unchanged else status.status,
            status.chunks,
            (time.perf_counter() - started) * 1000,
        )

    async def _apply_retrying(self, doc: IngestDocument) -> tuple[DocumentStatus, bool]:
        """`_apply`, again after a failure of the embedder or the store (a restart, a timeout),
        with exponential backoff. The document's own faults (LoadError) are not retried; a
        stop during a wait raises Interrupted, so the record is redelivered, not committed."""
        for attempt in range(self.settings.ingest_retries):
            try:
                return await self._apply(doc)
            except LoadError:
                raise
            except Exception as e:
                wait = min(RETRY_MAX_S, self.settings.ingest_retry_base_s * 2**attempt)
                log.warning("ingesting %s failed (%r); retry in %.1f s", doc.doc_id, e, wait)
                metrics.INGEST_RETRIES.inc()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), wait)
                if self.stopping.is_set():
                    raise Interrupted(doc.doc_id) from e
        return await self._apply(doc)

    async def _apply(self, doc: IngestDocument) -> tuple[DocumentStatus, bool]:
        """The document's new status, and whether it was already indexed as it is."""
        if doc.action == "delete":
            await asyncio.to_thread(self.store.delete_document, doc.doc_id)
            return DocumentStatus(doc_id=doc.doc_id, status="deleted", source=doc.source), False
        loaded = await asyncio.to_thread(load, doc, self.settings.max_document_bytes, self.pdf)
        texts = await asyncio.to_thread(self.chunker.split, loaded.text)
        content_hash = self.content_hash(doc, loaded)
        unchanged = await asyncio.to_thread(self._is_indexed, doc.doc_id, content_hash, len(texts))
        if not unchanged:
            chunks = _chunks(doc, loaded, texts, content_hash)
            vectors = await self._embed(texts)
            await asyncio.to_thread(self.store.upsert, chunks, vectors)
            metrics.INGESTED_CHUNKS.inc(len(chunks))
            # After the upsert, so a reader never finds the document missing.
            await asyncio.to_thread(self.store.delete_stale, doc.doc_id, content_hash)
        status = DocumentStatus(
            doc_id=doc.doc_id, status="indexed", chunks=len(texts), source=doc.source
        )
        return status, unchanged

    def content_hash(self, doc: IngestDocument, loaded: LoadedText) -> str:
        """Of everything that ends up in the store, so any change to it re-indexes: the text,
        title, source and metadata, and how chunks are cut and embedded."""
        content = {
            "text": loaded.text,
            "title": loaded.title or "",
            "source": doc.source,
            "metadata": doc.metadata,
            "chunking": [self.chunker.chunk_tokens, self.chunker.overlap_tokens],
            "model": self.settings.embedding_model,
        }
        raw = json.dumps(content, sort_keys=True, ensure_ascii=False).encode("utf-8")
        return hashlib.sha256(raw).hexdigest()

    def _is_indexed(self, doc_id: str, content_hash: str, n_chunks: int) -> bool:
        """Whether the store holds exactly this version's chunks. A write cut short (a crash
        between upsert batches) can leave new and old chunks whose total still matches, so old
        ones are swept first; if any were there, the count no longer matches and it re-indexes."""
        if self.store.document_hash(doc_id) != content_hash:
            return False
        if self.store.count(doc_id) != n_chunks:
            return False
        self.store.delete_stale(doc_id, content_hash)
        return self.store.count(doc_id) == n_chunks

    async def _embed(self, texts: Sequence[str]) -> list[list[float]]:
        # Batch by batch, each in a thread: the event loop keeps the Kafka group heartbeat alive.
        size = self.settings.embedding_batch_size
        vectors: list[list[float]] = []
        for start in range(0, len(texts), size):
            vectors.extend(
                await asyncio.to_thread(self.embedder.embed, texts[start : start + size])
            )
        return vectors

    async def _reject(
        self, record: ConsumerRecord, reason: str, doc_id: str | None, source: str = ""
    ) -> None:
        await self._dead_letter(record, reason)
        metrics.INGESTED_DOCUMENTS.labels("failed").inc()
        if doc_id is not None:
            failed = DocumentStatus(doc_id=doc_id, status="failed", error=reason, source=source)
            await set_status(self.redis, self.settings, failed)

    async def _dead_letter(self, record: ConsumerRecord, reason: str) -> None:
        await kafka.dead_letter(self.producer, self.settings.ingest_dlq_topic, record, reason)


def _chunks(
    doc: IngestDocument, loaded: LoadedText, texts: Sequence[str], content_hash: str
) -> list[Chunk]:
    return [
        Chunk(
            id=f"{doc.doc_id}#{position}",
            doc_id=doc.doc_id,
            position=position,
            text=text,
            source=doc.source,
            title=loaded.title or "",
            content_hash=content_hash,
            metadata=dict(doc.metadata),
        )
        for position, text in enumerate(texts)
    ]


def _reason(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "message"
    return f"invalid ingest message: {where}: {first['msg']} ({error.error_count()} errors)"


def _readable_doc_id(value: bytes | None) -> str | None:
    """The doc_id of an invalid message, if it has a usable one, to mark that document failed."""
    try:
        doc_id = json.loads(value or b"").get("doc_id")
    except (ValueError, AttributeError, RecursionError):  # any bytes at all may arrive
        return None
    usable = isinstance(doc_id, str) and len(doc_id) <= DOC_ID_MAX and _DOC_ID.match(doc_id)
    return doc_id if usable else None


# --- the consumer loop -----------------------------------------------------------------------


async def consume(
    ingester: Ingester,
    consumer: AIOKafkaConsumer,
    stopping: asyncio.Event,
    lost: asyncio.Event | None = None,
) -> None:
    """Handle records one by one until `stopping` (or `lost`: the broker lost the topic) is
    set, committing each once handled."""
    lost = lost or asyncio.Event()
    seen: dict[TopicPartition, int] = {}
    while not stopping.is_set() and not lost.is_set():
        # One record per poll: a batch of large documents could outlast max_poll_interval_ms.
        batch = await consumer.getmany(timeout_ms=POLL_TIMEOUT_MS, max_records=1)
        for tp, records in batch.items():
            for record in records:
                try:
                    await ingester.handle(record)
                except Interrupted:
                    return
                seen[tp] = record.offset + 1
                await _commit(consumer, tp, record.offset + 1)
        if gone := kafka.rewound(consumer, seen):
            raise kafka.KafkaLost(f"the broker's log of {gone} went back")


async def _commit(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> None:
    try:
        await kafka.commit(consumer, {tp: offset})
    except kafka.KafkaLost:
        raise
    except Exception as e:  # e.g. a rebalance took the partition: its new owner redoes it
        log.warning("commit of %s@%d failed: %s", tp, offset, e)


async def serve(
    settings: Settings,
    embedder: Embedder,
    store: VectorStore,
    stop: asyncio.Event | None = None,
    group: str = GROUP,
) -> None:
    """Ingest until SIGINT/SIGTERM (or `stop` is set, for tests)."""
    await kafka.ensure_topics(settings)
    redis = sredis.connect(settings)
    producer = kafka.make_producer(settings)
    consumer = kafka.make_consumer(settings.model_copy(update={"consumer_group": group}))
    consumer.subscribe([settings.ingest_topic])
    stopping = stop or asyncio.Event()
    if stop is None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping.set)
    ingester = Ingester(settings, embedder, store, redis, producer, stopping)
    lost = asyncio.Event()

    def recreated(created: list[str]) -> None:
        if settings.ingest_topic in created:
            lost.set()

    background = [
        asyncio.create_task(kafka.report_lag(consumer, group)),
        asyncio.create_task(kafka.watch_topics(settings, producer, recreated)),
    ]
    try:
        await producer.start()
        await consumer.start()
        log.info("ingesting %s into %s (group %s)", settings.ingest_topic, store.name, group)
        await consume(ingester, consumer, stopping, lost)
    finally:
        for task in background:
            task.cancel()
        # Bounded: leaving a group the broker has forgotten may not get an answer.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), kafka.COMMIT_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), kafka.COMMIT_TIMEOUT_S)
        await redis.aclose()
    if lost.is_set():
        raise kafka.KafkaLost(f"the broker lost {settings.ingest_topic}")


def main() -> None:
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if settings.ingestion_metrics_port:
        metrics.serve_metrics(settings.ingestion_metrics_port, settings.metrics_host)
    embedder = Embedder.load(settings)
    store = open_store(settings, embedder.dim)
    try:
        asyncio.run(kafka.reconnecting(lambda: serve(settings, embedder, store)))
    finally:
        store.close()


if __name__ == "__main__":
    main()
