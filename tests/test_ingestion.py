"""The ingestion consumer on a real broker, real Redis, real embeddings and Milvus Lite: indexing,
skipping unchanged documents, replacing and deleting chunks, dead letters, committed offsets."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from redis.asyncio import Redis

from ingestion.chunking import Chunker
from ingestion.loaders import load
from ingestion.main import Ingester, serve
from shared.documents import DocumentStatus, get_status
from shared.embeddings import Embedder
from shared.kafka import ensure_topics
from shared.messages import IngestDocument
from shared.settings import Settings
from shared.vectorstores import open_store
from shared.vectorstores.base import Chunk, VectorStore
from tests.conftest import Services, make_settings

WAIT_S = 60.0


class EmbedCounter:
    """Wraps a real embedder's `embed` to count the calls ingestion makes."""

    def __init__(self, embedder: Embedder) -> None:
        self.calls = 0
        self.fail_next = 0  # the next calls raise, as an embedding server being restarted
        self._embed = embedder.embed
        embedder.embed = self  # type: ignore[method-assign]

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        self.calls += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            raise ConnectionError("embedder unavailable")
        return self._embed(texts)

    def query(self, text: str) -> list[float]:
        """A query vector, not counted as ingestion's."""
        return self._embed([text])[0]


@dataclass
class Rig:
    settings: Settings
    group: str
    embedder: Embedder
    counter: EmbedCounter
    store: VectorStore
    redis: Redis
    producer: AIOKafkaProducer
    task: asyncio.Task[None]


@pytest.fixture(scope="module")
async def rig(services: Services, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Rig]:
    tag = uuid.uuid4().hex[:8]
    settings = make_settings(
        services,
        ingest_topic=f"sluice.ingest.{tag}",
        milvus_uri=str(tmp_path_factory.mktemp("milvus") / "milvus.db"),
        collection=f"chunks_{tag}",
        chunk_tokens=64,
        chunk_overlap_tokens=8,
        embedding_batch_size=4,
        ingest_retries=2,
        ingest_retry_base_s=0.1,
    )
    embedder = await asyncio.to_thread(Embedder.load, settings)
    counter = EmbedCounter(embedder)
    store = await asyncio.to_thread(open_store, settings, embedder.dim)
    # Topics first: a producer racing the consumer would auto-create the topic with defaults.
    await ensure_topics(settings)
    stop = asyncio.Event()
    group = f"sluice-ingestion-{tag}"
    task = asyncio.create_task(serve(settings, embedder, store, stop, group=group))
    redis = Redis.from_url(settings.redis)
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka)
    await producer.start()
    try:
        yield Rig(settings, group, embedder, counter, store, redis, producer, task)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await producer.stop()
        await redis.aclose()
        store.close()


def text_doc(doc_id: str, text: str, **fields: object) -> IngestDocument:
    values: dict[str, object] = {"doc_id": doc_id, "text": text, "enqueued_at": time.time()}
    values.update(fields)
    return IngestDocument(**values)  # type: ignore[arg-type]


def prose(topic: str, paragraphs: int) -> str:
    return "\n\n".join(
        " ".join(
            f"The {topic} note {p}.{s} explains one more detail of the design." for s in range(8)
        )
        for p in range(paragraphs)
    )


async def send(rig: Rig, value: IngestDocument | bytes, key: str | None = None) -> float:
    """Put a message on the ingest topic (keyed by doc_id unless `key`); returns the send time."""
    sent_at = time.time()
    if isinstance(value, IngestDocument):
        key = key or value.doc_id
        value = value.model_dump_json().encode()
    await rig.producer.send_and_wait(
        rig.settings.ingest_topic, value=value, key=key.encode() if key else None
    )
    return sent_at


async def wait_status(rig: Rig, doc_id: str, since: float) -> DocumentStatus:
    """The first status of `doc_id` written after `since`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if rig.task.done():
            rig.task.result()  # raises what stopped the consumer
            pytest.fail("the ingestion consumer stopped")
        status = await get_status(rig.redis, rig.settings, doc_id)
        if status is not None and status.updated_at >= since:
            return status
        await asyncio.sleep(0.1)
    pytest.fail(f"no status for {doc_id} within {WAIT_S} s")


async def ingest(rig: Rig, doc: IngestDocument) -> DocumentStatus:
    return await wait_status(rig, doc.doc_id, await send(rig, doc))


def expected_chunks(rig: Rig, doc: IngestDocument) -> list[str]:
    return Chunker.for_embedder(rig.embedder, rig.settings).split(load(doc).text)


def stored_chunks(rig: Rig, doc_id: str) -> list[Chunk]:
    hits = rig.store.search(rig.counter.query("design note"), 100, {"doc_id": doc_id})
    return sorted((h.chunk for h in hits), key=lambda c: c.position)


async def test_text_document_is_indexed(rig: Rig) -> None:
    doc = text_doc("guide/intro.txt", prose("intro", 4), source="guide/intro.txt", title="Intro")
    expected = expected_chunks(rig, doc)
    assert len(expected) > 2

    status = await ingest(rig, doc)

    assert (status.status, status.chunks, status.error) == ("indexed", len(expected), None)
    assert status.source == "guide/intro.txt"
    assert rig.store.count(doc.doc_id) == len(expected)
    chunks = stored_chunks(rig, doc.doc_id)
    assert [c.text for c in chunks] == expected
    assert [c.id for c in chunks] == [f"guide/intro.txt#{i}" for i in range(len(expected))]
    assert {(c.title, c.source) for c in chunks} == {("Intro", "guide/intro.txt")}
    # The status is a receipt that expires: statuses once piled up forever, one per document.
    ttl = await rig.redis.ttl(rig.settings.document_key(doc.doc_id))
    assert 0 < ttl <= rig.settings.document_status_ttl_s


async def test_unchanged_document_is_not_embedded_again(rig: Rig) -> None:
    doc = text_doc("same.md", "# Same\n\n" + prose("same", 2), content_type="text/markdown")
    first = await ingest(rig, doc)
    assert first.status == "indexed"
    calls = rig.counter.calls

    again = await ingest(rig, doc.model_copy(update={"enqueued_at": time.time()}))

    assert (again.status, again.chunks) == ("indexed", first.chunks)
    assert again.updated_at > first.updated_at
    assert rig.counter.calls == calls  # nothing embedded
    assert rig.store.count(doc.doc_id) == first.chunks

    # Metadata is stored with every chunk: changing it alone re-indexes.
    retagged = await ingest(rig, doc.model_copy(update={"metadata": {"team": "search"}}))
    assert retagged.status == "indexed"
    assert rig.counter.calls > calls
    assert {c.metadata["team"] for c in stored_chunks(rig, doc.doc_id)} == {"search"}


async def test_shorter_version_leaves_no_old_chunks(rig: Rig) -> None:
    long_doc = text_doc("changing.txt", prose("long", 6))
    before = await ingest(rig, long_doc)
    old_hash = rig.store.document_hash("changing.txt")

    short_doc = text_doc("changing.txt", prose("short", 1))
    expected = expected_chunks(rig, short_doc)
    after = await ingest(rig, short_doc)

    assert 0 < after.chunks == len(expected) < before.chunks
    assert rig.store.count("changing.txt") == len(expected)
    chunks = stored_chunks(rig, "changing.txt")
    assert [c.text for c in chunks] == expected
    hashes = {c.content_hash for c in chunks}
    assert hashes == {rig.store.document_hash("changing.txt")}
    assert old_hash not in hashes


async def test_a_write_cut_short_is_redone(rig: Rig) -> None:
    """A crash between upsert batches leaves new and old chunks; the redelivered message must
    not take the document for indexed just because its hash and chunk count match."""
    old, new = text_doc("cut.txt", prose("red", 3)), text_doc("cut.txt", prose("blue", 3))
    old_status = await ingest(rig, old)
    new_texts = expected_chunks(rig, new)
    assert len(new_texts) == old_status.chunks  # the case where the count alone would mislead
    ingester = Ingester(rig.settings, rig.embedder, rig.store, rig.redis, rig.producer)
    new_hash = ingester.content_hash(new, load(new))
    partial = [
        Chunk(f"cut.txt#{i}", "cut.txt", i, text, "", "", new_hash)
        for i, text in enumerate(new_texts[:2])
    ]
    rig.store.upsert(partial, [rig.counter.query(c.text) for c in partial])
    calls = rig.counter.calls

    status = await ingest(rig, new)

    assert (status.status, status.chunks) == ("indexed", len(new_texts))
    assert rig.counter.calls > calls  # embedded again
    chunks = stored_chunks(rig, "cut.txt")
    assert [c.text for c in chunks] == new_texts
    assert {c.content_hash for c in chunks} == {new_hash}


async def test_delete_removes_every_chunk(rig: Rig) -> None:
    indexed = await ingest(rig, text_doc("doomed.txt", prose("doomed", 3)))
    assert rig.store.count("doomed.txt") == indexed.chunks > 0

    deleted = await ingest(
        rig, IngestDocument(action="delete", doc_id="doomed.txt", enqueued_at=time.time())
    )

    assert (deleted.status, deleted.chunks) == ("deleted", 0)
    assert rig.store.count("doomed.txt") == 0
    assert rig.store.document_hash("doomed.txt") is None


async def test_bad_messages_are_dead_lettered_and_the_consumer_goes_on(rig: Rig) -> None:
    bad_pdf = IngestDocument(
        doc_id="scan.pdf",
        content_type="application/pdf",
        data_b64=base64.b64encode(b"%PDF-1.4 not really a pdf").decode(),
        enqueued_at=time.time(),
    )
    good = text_doc("after-the-bad-ones.txt", prose("survivor", 1))
    # One key: one partition, so the good document is handled only after the bad ones.
    key = "same-partition"
    since = await send(rig, b"this is not JSON", key)
    await send(rig, b'{"v": 2, "doc_id": "future.txt", "text": "x", "enqueued_at": 0}', key)
    await send(rig, bad_pdf, key)
    await send(rig, good, key)

    status = await wait_status(rig, good.doc_id, since)
    assert status.status == "indexed"
    assert rig.store.count(good.doc_id) == status.chunks > 0

    pdf_status = await wait_status(rig, "scan.pdf", since)
    assert pdf_status.status == "failed"
    assert "cannot load document" in (pdf_status.error or "")
    assert "PDF" in (pdf_status.error or "")
    future = await wait_status(rig, "future.txt", since)  # a readable doc_id is marked failed
    assert future.status == "failed"
    assert "v" in (future.error or "")

    dead = await dead_letters(rig.settings, 3)
    reasons = [h["sluice.dlq.reason"].decode() for _, h in dead]
    assert len(dead) == 3
    assert dead[0][0] == b"this is not JSON"
    assert reasons[0].startswith("invalid ingest message")
    assert reasons[1].startswith("invalid ingest message: v")
    assert reasons[2].startswith("cannot load document") and "PDF" in reasons[2]
    for _, headers in dead:
        assert headers["sluice.dlq.topic"] == rig.settings.ingest_topic.encode()
        assert {"sluice.dlq.partition", "sluice.dlq.offset"} <= headers.keys()


async def test_offsets_are_committed_once_handled(rig: Rig) -> None:
    since = await send(rig, text_doc("last.txt", "The last document of the test run."))
    assert (await wait_status(rig, "last.txt", since)).status == "indexed"
    tps = [
        TopicPartition(rig.settings.ingest_topic, p) for p in range(rig.settings.ingest_partitions)
    ]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=rig.settings.kafka, group_id=rig.group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        ends = await consumer.end_offsets(tps)
        deadline = time.monotonic() + WAIT_S
        while True:  # the commit follows the status write by a round trip
            committed = {tp: await consumer.committed(tp) or 0 for tp in tps}
            if committed == ends or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    finally:
        await consumer.stop()
    assert committed == ends


async def dead_letters(settings: Settings, n: int) -> list[tuple[bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(settings.ingest_dlq_topic, 0)])
        out: list[tuple[bytes, dict[str, bytes]]] = []
        deadline = time.monotonic() + WAIT_S
        while len(out) < n and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                out += [(r.value or b"", dict(r.headers)) for r in records]
        return out
    finally:
        await consumer.stop()


async def test_a_passing_embedder_failure_is_retried_not_dead_lettered(rig: Rig) -> None:
    """A store or embedder failure dead-lettered the document at once; now it is tried again
    with backoff (here 2 retries), and only a failure that outlasts them is dead-lettered."""
    rig.counter.fail_next = 2
    since = await send(rig, text_doc("flaky.txt", prose("flaky", 1)))
    status = await wait_status(rig, "flaky.txt", since)
    assert (status.status, status.error) == ("indexed", None)
    assert rig.store.count("flaky.txt") == status.chunks > 0

    rig.counter.fail_next = 3
    since = await send(rig, text_doc("down.txt", prose("down", 1)))
    status = await wait_status(rig, "down.txt", since)
    assert status.status == "failed"
    assert "after 3 attempts: ConnectionError: embedder unavailable" in (status.error or "")
    rig.counter.fail_next = 0
